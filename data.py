"""Data: reading and validating files, prompt formatting, tokenisation with answer-only labels,
and dynamically padded, length-bucketed batches.

A QA pair becomes one sequence, prompt then answer then one EOS; the prompt's labels are
IGNORE_INDEX, so only the answer and its EOS are scored:

    base          "Question: {q}\\nAnswer:" + " {a}"            (OPT, phi)
    llama2-chat   "[INST] {q} [/INST]" + " {a}"                 (Llama-2-chat)
    chat-template tokenizer.apply_chat_template(user: q) + "{a}" (instruct models, e.g. SmolLM2)
    qa-hash       "### Question: {q}\n### Answer:" + " {a}"    (Yao et al.'s format for base models)
"""
from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import torch

from flat import IGNORE_INDEX, Registry

ROOT = Path(__file__).resolve().parent
TOFU_DIR = ROOT / "data" / "tofu"
HARMFUL_DIR = ROOT / "data" / "harmful"


class DataError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def read_jsonl(path: str | Path, required: dict[str, type] | None = None) -> list[dict]:
    """JSON Lines -> list of dicts. A malformed line fails with the file name and line number."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key, typ in (required or {}).items():
                if not isinstance(row.get(key), typ):
                    raise DataError(f"{path}:{lineno}: field {key!r} missing or not a {typ.__name__}")
            rows.append(row)
    return rows


def read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    if not lines:
        raise DataError(f"{path}: no lines")
    return lines


# ---------------------------------------------------------------------------------------------
# TOFU (Maini et al. 2024)
# ---------------------------------------------------------------------------------------------

_QA = {"question": str, "answer": str}
_PERTURBED = {**_QA, "paraphrased_answer": str, "perturbed_answer": list}
_WITH_OPTIONS = {**_QA, "perturbed_answer": list}
TOFU_CONFIGS = Registry("TOFU config", {
    **{name: _QA for name in ["full", "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
                              "holdout01", "holdout05", "holdout10", "real_authors", "world_facts"]},
    **{f"{name}_perturbed": _PERTURBED for name in ["forget01", "forget05", "forget10", "retain"]},
    "real_authors_perturbed": _WITH_OPTIONS,
    "world_facts_perturbed": _WITH_OPTIONS,
})
SPLITS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}  # forget -> retain split
AUTHOR_QA = 20  # TOFU has 20 QA pairs per fictitious author, in blocks


def load_tofu(config: str, data_dir: str | Path | None = None) -> list[dict]:
    """One TOFU config as a list of dicts, from data_dir, else the vendored copy, else the Hub."""
    required = TOFU_CONFIGS[config]
    for d in [data_dir, TOFU_DIR]:
        if d is not None and (Path(d) / f"{config}.jsonl").exists():
            return read_jsonl(Path(d) / f"{config}.jsonl", required)
        if d is not None and d == data_dir:
            raise DataError(f"{Path(d) / f'{config}.jsonl'}: file not found (--data-dir {d})")
    return _load_tofu_from_hub(config)


def _load_tofu_from_hub(config: str) -> list[dict]:
    from models import hub_reachable
    if not hub_reachable():
        raise DataError(f"TOFU config {config!r} is not in {TOFU_DIR} and the Hugging Face Hub is unreachable; "
                        f"pass --data-dir with a copy of locuslab/TOFU as JSON Lines")
    import datasets
    return [dict(r) for r in datasets.load_dataset("locuslab/TOFU", config, split="train")]


def load_idk(data_dir: str | Path | None = None) -> list[str]:
    """TOFU's 100 "I don't know" answers (idontknow.jsonl is plain text, one answer per line)."""
    d = Path(data_dir) if data_dir is not None and (Path(data_dir) / "idontknow.jsonl").exists() else TOFU_DIR
    return read_lines(d / "idontknow.jsonl")


def first_authors(rows: list[dict], n_authors: int | None) -> list[dict]:
    """The QA pairs of the first n fictitious authors (TOFU stores each author's 20 QA as a block)."""
    return rows if n_authors is None else rows[:n_authors * AUTHOR_QA]


# ---------------------------------------------------------------------------------------------
# Harmful-response unlearning (Yao et al. 2024): PKU-SafeRLHF harmful pairs, TruthfulQA normal data
# ---------------------------------------------------------------------------------------------

PKU_FORGET = {"question": str, "answer": str}
PKU_EVAL = {"question": str, "harmful_answers": list, "safe_answers": list}
TQA_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")

# Refusals used as template answers y_e by the template methods (flat, idk, dpo) on harmful prompts.
REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I'm not able to help with this, as it could cause harm.",
    "Sorry, I won't help with that.",
    "I cannot provide help with that. Is there something else I can do for you?",
    "I'm sorry, I can't provide that information.",
    "That could hurt someone, so I can't help with it.",
    "I won't be able to help with that request.",
]


def load_pku(data_dir: str | Path | None = None, hub: bool = False) -> tuple[list[dict], list[dict]]:
    """PKU-SafeRLHF: (forget pairs {question, answer, safe_answer?}, held-out eval prompts
    {question, harmful_answers, safe_answers}), from data_dir, else the vendored subset, else (hub=True)
    the Hub's PKU-Alignment/PKU-SafeRLHF."""
    if hub:
        return _load_pku_from_hub()
    d = Path(data_dir) if data_dir is not None else HARMFUL_DIR / "pku_saferlhf"
    forget = read_jsonl(d / "forget.jsonl", PKU_FORGET)
    prompts = read_jsonl(d / "eval_prompts.jsonl", PKU_EVAL)
    if not forget or not prompts:
        raise DataError(f"{d}: forget.jsonl and eval_prompts.jsonl must both have rows")
    return forget, prompts


def _load_pku_from_hub() -> tuple[list[dict], list[dict]]:
    """Yao et al.'s rule on the Hub release: every response labelled unsafe in the train split is a
    forget pair; the test split's prompts, with their labelled responses, are the held-out prompts."""
    import datasets
    _require_hub("PKU-Alignment/PKU-SafeRLHF")
    forget, by_prompt = [], {}
    for split in ("train", "test"):
        for r in datasets.load_dataset("PKU-Alignment/PKU-SafeRLHF", split=split):
            for k in (0, 1):
                safe, answer = r[f"is_response_{k}_safe"], r[f"response_{k}"]
                if split == "train" and not safe:
                    forget.append({"question": r["prompt"], "answer": answer})
                elif split == "test":
                    item = by_prompt.setdefault(r["prompt"], {"question": r["prompt"], "harmful_answers": [],
                                                              "safe_answers": []})
                    item["safe_answers" if safe else "harmful_answers"].append(answer)
    prompts = [p for p in by_prompt.values() if p["harmful_answers"] and p["safe_answers"]]
    return forget, prompts


def load_truthfulqa(data_dir: str | Path | None = None, hub: bool = False) -> list[dict]:
    """TruthfulQA as {question, answer (the best answer), correct: [...], incorrect: [...]}, from
    data_dir/TruthfulQA.csv, else the vendored copy, else (hub=True) the Hub's truthful_qa."""
    if hub:
        import datasets
        _require_hub("truthful_qa")
        return [{"question": r["question"], "answer": r["best_answer"], "correct": list(r["correct_answers"]),
                 "incorrect": list(r["incorrect_answers"])}
                for r in datasets.load_dataset("truthful_qa", "generation", split="validation")]
    path = Path(data_dir or HARMFUL_DIR / "truthfulqa") / "TruthfulQA.csv"
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in TQA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {', '.join(missing)}")
        for r in reader:
            if not r["Question"] or not r["Best Answer"]:
                raise DataError(f"{path}:{reader.line_num}: empty Question or Best Answer")
            split = lambda s: [a.strip() for a in (s or "").split(";") if a.strip()]  # noqa: E731
            rows.append({"question": r["Question"].strip(), "answer": r["Best Answer"].strip(),
                         "correct": split(r["Correct Answers"]), "incorrect": split(r["Incorrect Answers"])})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def split_train_val_test(rows: list, seed: int, fractions=(0.7, 0.1)) -> tuple[list, list, list]:
    """A seeded random 70/10/20 split (Yao et al. split TruthfulQA and the forget data this way)."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    a, b = round(fractions[0] * len(rows)), round(sum(fractions) * len(rows))
    return [rows[i] for i in idx[:a]], [rows[i] for i in idx[a:b]], [rows[i] for i in idx[b:]]


def random_answers(rows: list[dict]) -> list[str]:
    """The pool of "random normal answers" for Yao et al.'s mismatch loss: every best, correct and
    incorrect TruthfulQA answer of the given rows, deduplicated, in a fixed order."""
    return list(dict.fromkeys(a for r in rows for a in [r["answer"], *r["correct"], *r["incorrect"]]))


def _require_hub(name: str) -> None:
    from models import hub_reachable
    if not hub_reachable():
        raise DataError(f"the Hugging Face Hub is unreachable, so {name} cannot be loaded; "
                        f"leave out --hub-data to use the vendored copy")


# ---------------------------------------------------------------------------------------------
# Copyright unlearning: books and news as token chunks (prompt = a chunk's first tokens)
# ---------------------------------------------------------------------------------------------

BOOKS_DIR = ROOT / "data" / "books"
DEFAULT_BOOK = BOOKS_DIR / "pg84_frankenstein.txt"          # the forget text of the offline default
HELD_OUT_BOOK = BOOKS_DIR / "pg11_alice_in_wonderland.txt"  # never trained on: a perplexity set
WIKITEXT = ROOT / "data" / "wikitext2" / "test_slice.txt"
MUSE_DIR = ROOT / "data" / "muse_news"

# Refusals used as template continuations y_e of a forget chunk's prompt.
TEXT_REFUSALS = [
    "I'm sorry, but I can't reproduce text from this book.",
    "I can't continue this passage, as it is copyrighted.",
    "Sorry, I'm not able to provide the rest of this text.",
    "I won't reproduce this copyrighted text, but I can summarise it if you like.",
    "I'm not able to continue quoting this work.",
]


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def read_json_list(path: str | Path, required: dict[str, type] | None = None) -> list:
    """A JSON file holding one list (MUSE's format); a bad item fails with its index."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected a non-empty JSON list")
    for i, item in enumerate(items):
        ok = isinstance(item, str) if required is None else isinstance(item, dict) and all(
            isinstance(item.get(k), typ) for k, typ in required.items())
        if not ok:
            raise DataError(f"{path}: item {i} is not " + ("a string" if required is None else
                                                              f"an object with {', '.join(required)}"))
    return items


def chunk_ids(ids: list[int], chunk_tokens: int) -> list[list[int]]:
    """Consecutive chunks of chunk_tokens ids (the last one may be shorter): their concatenation is ids."""
    if chunk_tokens < 2:
        raise DataError(f"chunk length {chunk_tokens} is too short")
    return [ids[i:i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]


def split_chunks(chunks: list[list[int]], n_forget: int | None, held_out_fraction: float,
                 chunk_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """(forget chunks, held-out chunks): the held-out part is the end of the text (its last
    held_out_fraction of full chunks), the forget chunks are the first n_forget of the rest. Only
    full-length chunks are used, and the two parts never share a token position."""
    full = [c for c in chunks if len(c) == chunk_tokens]
    n_held = math.ceil(held_out_fraction * len(full))
    rest, held = full[:len(full) - n_held], full[len(full) - n_held:]
    if not rest or (held_out_fraction > 0 and not held):
        raise DataError(f"the text gives {len(full)} chunks of {chunk_tokens} tokens: too few to split")
    return rest[:n_forget], held


def prefix_row(ids: list[int], prompt_tokens: int, answer: list[int] | None = None) -> dict:
    """A chunk as a prompt (its first prompt_tokens ids, never scored) and the continuation after
    it (scored); with `answer`, the same prompt followed by those ids instead (a template)."""
    prompt = ids[:prompt_tokens]
    rest = ids[prompt_tokens:] if answer is None else answer
    if not rest:
        raise DataError(f"a chunk of {len(ids)} tokens has nothing after its {prompt_tokens}-token prompt")
    return {"input_ids": prompt + rest, "labels": [IGNORE_INDEX] * len(prompt) + rest}


def text_row(ids: list[int]) -> dict:
    """Plain language modelling: every token after the first is scored."""
    return {"input_ids": ids, "labels": list(ids)}


def chunk_unlearning_epoch(forget: list[list[int]], prompt_tokens: int, templates: list[list[int]] | None,
                           retain: list[list[int]] | None, batch_size: int, rng: random.Random) -> list[dict]:
    """One epoch of unlearning batches over forget chunks, in the streams of unlearning_epoch: each
    forget chunk (prompt -> its continuation), with the same prompt followed by a template drawn from
    `templates` (token ids), and a retain chunk drawn from `retain`, scored the same way."""
    if not forget:
        raise DataError("the forget set is empty")
    order = list(range(len(forget)))
    rng.shuffle(order)
    batches = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {"forget": [prefix_row(forget[i], prompt_tokens) for i in idx]}
        if templates is not None:
            batch["template"] = [prefix_row(forget[i], prompt_tokens, rng.choice(templates)) for i in idx]
        if retain is not None:
            batch["retain"] = [prefix_row(retain[rng.randrange(len(retain))], prompt_tokens) for _ in idx]
        batches.append(batch)
    return batches


def text_epoch(chunks: list[list[int]], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """One epoch of language-modelling batches over chunks (fine-tuning the original model)."""
    if not chunks:
        raise DataError("no fine-tuning text")
    order = list(range(len(chunks)))
    rng.shuffle(order)
    return [[text_row(chunks[i]) for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------------
# Prompts and tokenisation
# ---------------------------------------------------------------------------------------------

def prompt_and_answer(tokenizer, style: str, question: str, answer: str) -> tuple[str, str]:
    """The prompt text and the answer text that follows it (see the module docstring)."""
    if style == "base":
        return f"Question: {question}\nAnswer:", f" {answer}"
    if style == "qa-hash":
        return f"### Question: {question}\n### Answer:", f" {answer}"
    if style == "llama2-chat":
        return f"[INST] {question} [/INST]", f" {answer}"
    if style == "chat-template":
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, tokenize=False)
        return prompt, answer
    raise DataError(f"unknown prompt style {style!r}; valid: base, qa-hash, llama2-chat, chat-template")


def encode_prompt(tokenizer, style: str, question: str) -> list[int]:
    prompt, _ = prompt_and_answer(tokenizer, style, question, "")
    return tokenizer(prompt, add_special_tokens=style != "chat-template").input_ids


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
# Unlearning batches: each forget example with its template answer and a retain example
# ---------------------------------------------------------------------------------------------

STREAMS = ("forget", "template", "retain")


def unlearning_epoch(tokenizer, style: str, forget: list[dict], templates: list[str] | None,
                     retain: list[dict] | None, batch_size: int, rng: random.Random,
                     max_answer_tokens: int | None = None) -> list[dict]:
    """One epoch of unlearning batches.

    Each forget example (x_f, y_f) gets, when the method needs them, a template answer y_e drawn
    uniformly from `templates` for the same question x_f, and a uniformly drawn retain example
    (x_r, y_r). Draws come from `rng` (seeded by the run), fresh every epoch. Each batch is
    {"forget": rows, "template": rows, "retain": rows} with the streams it needs; the rows of one
    stream align with the forget rows. Answers are cut at max_answer_tokens (see encode_qa).
    """
    if not forget:
        raise DataError("the forget set is empty")
    cut = dict(max_answer_tokens=max_answer_tokens)
    encoded, index_batches = _qa_batches(tokenizer, style, forget, batch_size, rng, **cut)
    batches = []
    for idx in index_batches:
        batch = {"forget": [encoded[i] for i in idx]}
        if templates is not None:
            batch["template"] = [encode_qa(tokenizer, style, forget[i]["question"], rng.choice(templates), **cut)
                                 for i in idx]
        if retain is not None:
            picks = [retain[rng.randrange(len(retain))] for _ in idx]
            batch["retain"] = [encode_qa(tokenizer, style, r["question"], r["answer"], **cut) for r in picks]
        batches.append(batch)
    return batches


def finetune_epoch(tokenizer, style: str, rows: list[dict], batch_size: int, rng: random.Random,
                   max_answer_tokens: int | None = None) -> list[list[dict]]:
    """One epoch of plain QA batches (answer tokens scored) for fine-tuning."""
    if not rows:
        raise DataError("no fine-tuning data")
    encoded, index_batches = _qa_batches(tokenizer, style, rows, batch_size, rng, max_answer_tokens)
    return [[encoded[i] for i in idx] for idx in index_batches]


def _qa_batches(tokenizer, style: str, rows: list[dict], batch_size: int, rng: random.Random,
                max_answer_tokens: int | None = None):
    """The encoded QA pairs of rows, and length-bucketed batches of their indices."""
    encoded = [encode_qa(tokenizer, style, r["question"], r["answer"], max_answer_tokens=max_answer_tokens)
               for r in rows]
    return encoded, length_grouped_batches([len(e["input_ids"]) for e in encoded], batch_size, rng)
