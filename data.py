"""Data: reading and validating files, TOFU, prompt formatting, tokenisation with answer-only
labels, and dynamically padded, length-bucketed batches. The other benchmarks' data (harmful,
hallucination, books, MUSE-News) is in corpora.py.

A QA pair becomes one sequence, prompt then answer then one EOS; the prompt's labels are
IGNORE_INDEX, so only the answer and its EOS are scored:

    base          "Question: {q}\\nAnswer:" + " {a}"            (OPT, phi: TOFU's phi format)
    llama2-chat   "[INST] {q} [/INST]" + "{a}"                  (Llama-2-chat: TOFU's format, no separator)
    chat-template tokenizer.apply_chat_template(user: q) + "{a}" (instruct models, e.g. SmolLM2)
    qa-hash       "### Question: {q}\\n### Answer:" + " {a}"    (Yao et al.'s format for base models)
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from errors import Choices, DataError
from flat import IGNORE_INDEX
from models import hub_reachable

ROOT = Path(__file__).resolve().parent
TOFU_DIR = ROOT / "vendored" / "tofu"


# ---------------------------------------------------------------------------------------------
# Files: every reader names the file (and line) of what is wrong, before any model is loaded
# ---------------------------------------------------------------------------------------------

def check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a file")
    if not path.is_file():  # a FIFO or a device: reading it could block for ever
        raise DataError(f"{path}: is not a regular file (a pipe or a device)")
    return path


def decode_utf8(raw: bytes, path: Path, what: str = "text") -> str:
    """Bytes as UTF-8 text (a leading BOM dropped); other encodings and binary files are errors."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        hint = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DataError(f"{path}:{line}: not UTF-8{hint}; {what} files must be UTF-8 "
                        f"(convert with: iconv -f ENCODING -t UTF-8)") from None
    if "\x00" in text:
        raise DataError(f"{path}: contains NUL bytes: a binary file, not {what}")
    return text


def read_jsonl(path: str | Path, required: dict[str, type] | None = None) -> list[dict]:
    """JSON Lines -> list of dicts. A malformed line fails with the file name and line number; a
    required string field must be non-empty, a required list must be a non-empty list of strings."""
    path = check_file(path)
    rows = []
    for lineno, line in enumerate(decode_utf8(path.read_bytes(), path, "JSON Lines").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        for key, typ in (required or {}).items():
            check_field(row.get(key), key, typ, f"{path}:{lineno}")
        rows.append(row)
    return rows


def check_field(value, key: str, typ: type, where: str) -> None:
    if not isinstance(value, typ):
        raise DataError(f"{where}: field {key!r} missing or not a {typ.__name__}")
    if typ is str and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    if typ is list and (not value or not all(isinstance(v, str) and v.strip() for v in value)):
        raise DataError(f"{where}: field {key!r} must be a non-empty list of non-empty strings")


def read_lines(path: str | Path) -> list[str]:
    path = check_file(path)
    lines = [s.strip() for s in decode_utf8(path.read_bytes(), path).splitlines() if s.strip()]
    if not lines:
        raise DataError(f"{path}: no lines")
    return lines


def digest(*objs) -> str:
    """A content hash of data (rows, texts, token ids): stage keys hold it, so that editing a data
    file in place gives new stages instead of reusing results of data that no longer exists."""
    h = hashlib.sha256()
    for obj in objs:
        h.update(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# TOFU (Maini et al. 2024)
# ---------------------------------------------------------------------------------------------

_QA = {"question": str, "answer": str}
_PERTURBED = {**_QA, "paraphrased_answer": str, "perturbed_answer": list}
_WITH_OPTIONS = {**_QA, "perturbed_answer": list}
TOFU_CONFIGS = Choices("TOFU config", {
    **{name: _QA for name in ["full", "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
                              "holdout01", "holdout05", "holdout10", "real_authors", "world_facts"]},
    **{f"{name}_perturbed": _PERTURBED for name in ["forget01", "forget05", "forget10", "retain"]},
    "real_authors_perturbed": _WITH_OPTIONS,
    "world_facts_perturbed": _WITH_OPTIONS,
})
SPLITS = Choices("split", {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"})  # -> retain
HOLDOUT = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}  # same size, never trained
AUTHOR_QA = 20  # TOFU has 20 QA pairs per fictitious author, in blocks


def load_tofu(config: str, data_dir: str | Path | None = None) -> list[dict]:
    """One TOFU config as a list of dicts, from data_dir, else the vendored copy, else the Hub."""
    required = TOFU_CONFIGS[config]
    for d in [data_dir, TOFU_DIR]:
        if d is not None and (Path(d) / f"{config}.jsonl").exists():
            path = Path(d) / f"{config}.jsonl"
            rows = read_jsonl(path, required)
            if not rows:  # every TOFU set has rows: an empty one would surface only after training
                raise DataError(f"{path}: the TOFU set {config} is empty")
            if "perturbed_answer" in required:
                _check_options(rows, path)
            return rows
        if d is not None and d == data_dir:
            raise DataError(f"{Path(d) / f'{config}.jsonl'}: file not found (--data-dir {d})")
    return _load_tofu_from_hub(config)


def _check_options(rows: list[dict], path: Path) -> None:
    """The truth ratio takes a (N, K) array of perturbed answers: every row needs the same K."""
    k = len(rows[0]["perturbed_answer"]) if rows else 0
    for i, r in enumerate(rows):
        if len(r["perturbed_answer"]) != k:
            raise DataError(f"{path}: row {i + 1} has {len(r['perturbed_answer'])} perturbed answers, row 1 "
                            f"has {k}: every row needs the same number")


def _load_tofu_from_hub(config: str) -> list[dict]:
    if not hub_reachable():
        raise DataError(f"TOFU config {config!r} is not in {TOFU_DIR} and the Hugging Face Hub is unreachable; "
                        f"pass --data-dir with a copy of locuslab/TOFU as JSON Lines")
    import datasets  # optional: the Hub's copy only
    return [dict(r) for r in datasets.load_dataset("locuslab/TOFU", config, split="train")]


def load_idk(data_dir: str | Path | None = None) -> list[str]:
    """TOFU's 100 "I don't know" answers (idontknow.jsonl is plain text, one answer per line)."""
    d = Path(data_dir) if data_dir is not None and (Path(data_dir) / "idontknow.jsonl").exists() else TOFU_DIR
    return read_lines(d / "idontknow.jsonl")


def first_authors(rows: list[dict], n_authors: int | None) -> list[dict]:
    """The QA pairs of the first n fictitious authors (TOFU stores each author's 20 QA as a block)."""
    return rows if n_authors is None else rows[:n_authors * AUTHOR_QA]


# ---------------------------------------------------------------------------------------------
# Prompts and tokenisation
# ---------------------------------------------------------------------------------------------

def prefilled(style: str, text: str) -> str:
    """A prompt style whose assistant turn begins with `text` (a prefilling attack, attacks.py): the
    prompt ends with it, and every answer scored or generated follows it."""
    return f"{style}|{text}"


def prompt_and_answer(tokenizer, style: str, question: str, answer: str) -> tuple[str, str]:
    """The prompt text and the answer text that follows it (see the module docstring); a style made
    by prefilled() adds its text to the prompt, then the answer after a space."""
    style, _, prefill = style.partition("|")
    if prefill:
        prompt, _ = prompt_and_answer(tokenizer, style, question, "")
        return f"{prompt}{' ' if style in ('base', 'qa-hash') else ''}{prefill}", f" {answer}"
    if style == "base":
        return f"Question: {question}\nAnswer:", f" {answer}"
    if style == "qa-hash":
        return f"### Question: {question}\n### Answer:", f" {answer}"
    if style == "llama2-chat":  # TOFU and open-unlearning: no separator between [/INST] and the answer
        return f"[INST] {question} [/INST]", answer
    if style == "chat-template":
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, tokenize=False)
        return prompt, answer
    raise DataError(f"unknown prompt style {style!r}; valid: base, qa-hash, llama2-chat, chat-template")


def encode_prompt(tokenizer, style: str, question: str) -> list[int]:
    prompt, _ = prompt_and_answer(tokenizer, style, question, "")
    return tokenizer(prompt, add_special_tokens=style != "chat-template").input_ids


def check_context(tokenizer, style: str, rows: list[dict], answers: list[str], context: int | None,
                  new_tokens: int = 0, max_answer_tokens: int | None = None) -> None:
    """Before any work: every question with its longest answer (of `rows`' answer fields and the
    template `answers`), and every prompt followed by `new_tokens` generated ones, fits the model's
    context; a longer one would crash (or be cut) in the middle of a run."""
    if context is None:
        return
    def need(q: str, a: str) -> int:
        return len(encode_qa(tokenizer, style, q, a, max_answer_tokens=max_answer_tokens)["input_ids"])
    longest_q = max((r["question"] for r in rows), key=len)
    for q, candidates in [(r["question"], [r["answer"], r.get("paraphrased_answer"), *r.get("perturbed_answer", [])])
                          for r in rows] + [(longest_q, answers)]:
        n = max([need(q, a) for a in candidates if a] + [len(encode_prompt(tokenizer, style, q)) + new_tokens])
        if n > context:
            raise DataError(f"the question {q[:60]!r} with an answer or {new_tokens} generated tokens needs {n} "
                            f"tokens; the model reads at most {context}")


def encode_qa(tokenizer, style: str, question: str, answer: str, eos: bool = True,
              max_answer_tokens: int | None = None) -> dict:
    """Token ids of prompt + answer + EOS, labels IGNORE_INDEX on the prompt.

    Tokenising the whole text (not the two parts separately) gives the tokens the model sees at
    generation time followed by the ones it would produce; the prompt is the prefix of that
    tokenisation, which holds because every prompt ends at a word boundary. An answer longer than
    max_answer_tokens is cut there and gets no EOS (it does not end there); eos=False never adds one
    (to score a generation that may have been cut off).
    """
    prompt, ans = prompt_and_answer(tokenizer, style, question, answer)
    special = style != "chat-template"  # a chat template already holds its special tokens
    p_ids = tokenizer(prompt, add_special_tokens=special).input_ids
    ids = tokenizer(prompt + ans, add_special_tokens=special).input_ids
    if ids[:len(p_ids)] != p_ids:
        raise DataError(f"the prompt does not tokenise as a prefix of prompt + answer: {prompt!r} + {ans!r}")
    if max_answer_tokens is not None and len(ids) - len(p_ids) > max_answer_tokens:
        ids, eos = ids[:len(p_ids) + max_answer_tokens], False
    ids = ids + [tokenizer.eos_token_id] * eos
    labels = [IGNORE_INDEX] * len(p_ids) + ids[len(p_ids):]
    if len(ids) - len(p_ids) < 1 + eos:
        raise DataError(f"empty answer to {question!r}")
    return {"input_ids": ids, "labels": labels}


def collate(rows: list[dict], pad_id: int, side: str = "left") -> dict[str, torch.Tensor]:
    """Pad to the longest row of this batch (never to a fixed length).

    Left padding (the default) puts every row's answer at the end of the batch, so the logits of
    all scored tokens lie in the last few positions: see models.answer_logits.
    Shape: returns input_ids, attention_mask and, when rows have them, labels, each (len(rows), max_len).
    """
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        span = slice(T - n, T) if side == "left" else slice(0, n)
        ids[i, span] = torch.tensor(r["input_ids"])
        mask[i, span] = 1
        if "labels" in r:
            labels[i, span] = torch.tensor(r["labels"])
    out = {"input_ids": ids, "attention_mask": mask}
    if all("labels" in r for r in rows):
        out["labels"] = labels
    return out


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random,
                           group_batches: int = 50) -> list[list[int]]:
    """Shuffled batches of indices whose members have similar lengths, so padding stays small.

    Indices are shuffled, cut into groups of group_batches * batch_size, sorted by length inside
    each group and cut into batches; the batch order is then shuffled.
    """
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    group = batch_size * group_batches
    batches = []
    for g in range(0, len(idx), group):
        chunk = sorted(idx[g:g + group], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------
# The steps of an epoch: each forget example with its template answer and a retain example. A step
# is the rows of one optimiser step (--batch-size x --grad-accum x processes); train.plan_steps cuts
# it into micro-batches.
# ---------------------------------------------------------------------------------------------

STREAMS = ("answer", "forget", "template", "retain")  # "answer": fine-tuning (methods.FINETUNE)


def epoch_rngs(epochs: int, seed: int):
    """The random generator of each of `epochs` epochs: one generator, seeded once per training stage,
    so that every epoch draws a new order and the same seed gives the same run."""
    rng = random.Random(seed)
    return (rng for _ in range(epochs))


def unlearning_epoch(tokenizer, style: str, forget: list[dict], templates: list[str] | list[list[str]] | None,
                     retain: list[dict] | None, rows_per_step: int, rng: random.Random,
                     max_answer_tokens: int | None = None) -> list[dict]:
    """One epoch of unlearning steps.

    Each forget example (x_f, y_f) gets, when the method needs them, a template answer y_e drawn
    uniformly from `templates` for the same question x_f (a list every question shares, or one list
    per forget example: its own answers, e.g. the pair's safe response), and a uniformly drawn retain
    example (x_r, y_r). Draws come from `rng` (seeded by the run), fresh every epoch. Each step is
    {"forget": rows, "template": rows, "retain": rows} with the streams it needs; the rows of one
    stream align with the forget rows. Answers are cut at max_answer_tokens (see encode_qa).
    """
    if not forget:
        raise DataError("the forget set is empty")
    cut = dict(max_answer_tokens=max_answer_tokens)
    per_row = bool(templates) and isinstance(templates[0], list)
    if per_row and len(templates) != len(forget):
        raise ValueError(f"{len(templates)} lists of templates for {len(forget)} forget examples")
    encoded, index_steps = _qa_steps(tokenizer, style, forget, rows_per_step, rng, **cut)
    steps = []
    for idx in index_steps:
        step = {"forget": [encoded[i] for i in idx]}
        if templates is not None:
            step["template"] = [encode_qa(tokenizer, style, forget[i]["question"],
                                          rng.choice(templates[i] if per_row else templates), **cut) for i in idx]
        if retain is not None:
            picks = [retain[rng.randrange(len(retain))] for _ in idx]
            step["retain"] = [encode_qa(tokenizer, style, r["question"], r["answer"], **cut) for r in picks]
        steps.append(step)
    return steps


def finetune_epoch(tokenizer, style: str, rows: list[dict], rows_per_step: int, rng: random.Random,
                   max_answer_tokens: int | None = None) -> list[dict]:
    """One epoch of plain QA steps {"answer": rows} (answer tokens scored) for fine-tuning."""
    if not rows:
        raise DataError("no fine-tuning data")
    encoded, index_steps = _qa_steps(tokenizer, style, rows, rows_per_step, rng, max_answer_tokens)
    return [{"answer": [encoded[i] for i in idx]} for idx in index_steps]


def _qa_steps(tokenizer, style: str, rows: list[dict], rows_per_step: int, rng: random.Random,
              max_answer_tokens: int | None = None):
    """The encoded QA pairs of rows, and length-bucketed steps of their indices."""
    encoded = [encode_qa(tokenizer, style, r["question"], r["answer"], max_answer_tokens=max_answer_tokens)
               for r in rows]
    return encoded, length_grouped_batches([len(e["input_ids"]) for e in encoded], rows_per_step, rng)
