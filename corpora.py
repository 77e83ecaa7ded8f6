"""The data of the benchmarks other than TOFU (data.py): harmful responses and hallucinations
(Yao et al. 2024), books and MUSE-News (copyright). Every reader validates before any model loads
and names the file of what is wrong."""
from __future__ import annotations

import bisect
import csv
import io
import json
import math
import random
import re
from pathlib import Path

from data import ROOT, DataError, check_field, check_file, decode_utf8, read_jsonl
from flat import IGNORE_INDEX
from models import hub_reachable

HARMFUL_DIR = ROOT / "vendored" / "harmful"
HALUEVAL = ROOT / "vendored" / "halueval" / "qa_data_first1000.jsonl"


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
    import datasets  # optional: the Hub's copy only
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
        import datasets  # optional: the Hub's copy only
        _require_hub("truthful_qa")
        return [{"question": r["question"], "answer": r["best_answer"], "correct": list(r["correct_answers"]),
                 "incorrect": list(r["incorrect_answers"])}
                for r in datasets.load_dataset("truthful_qa", "generation", split="validation")]
    path = check_file(Path(data_dir or HARMFUL_DIR / "truthfulqa") / "TruthfulQA.csv")
    text = decode_utf8(path.read_bytes(), path, "CSV")
    rows = []
    with io.StringIO(text, newline="") as f:
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
    if not hub_reachable():
        raise DataError(f"the Hugging Face Hub is unreachable, so {name} cannot be loaded; "
                        f"leave out --hub-data to use the vendored copy")


# ---------------------------------------------------------------------------------------------
# Hallucinations (Yao et al. 2024, third scenario): HaluEval QA's hallucinated answers
# ---------------------------------------------------------------------------------------------

HALUEVAL_FIELDS = {"question": str, "right_answer": str, "hallucinated_answer": str}


def load_halueval(path: str | Path | None = None) -> list[dict]:
    """HaluEval QA rows {question, right_answer, hallucinated_answer, knowledge}, from path (JSON Lines
    with those fields), else the vendored 1,000 rows of the released qa_data.json."""
    rows = read_jsonl(path or HALUEVAL, HALUEVAL_FIELDS)
    if not rows:
        raise DataError(f"{path or HALUEVAL}: no rows")
    return rows


# ---------------------------------------------------------------------------------------------
# Copyright unlearning: books and news as token chunks (prompt = a chunk's first tokens)
# ---------------------------------------------------------------------------------------------

BOOKS_DIR = ROOT / "vendored" / "books"
DEFAULT_BOOK = BOOKS_DIR / "pg84_frankenstein.txt"          # the forget text of the offline default
HELD_OUT_BOOK = BOOKS_DIR / "pg11_alice_in_wonderland.txt"  # never trained on: a perplexity set
WIKITEXT = ROOT / "vendored" / "wikitext2" / "test_slice.txt"
MUSE_DIR = ROOT / "vendored" / "muse_news"

# Refusals used as template continuations y_e of a forget chunk's prompt.
TEXT_REFUSALS = [
    "I'm sorry, but I can't reproduce text from this book.",
    "I can't continue this passage, as it is copyrighted.",
    "Sorry, I'm not able to provide the rest of this text.",
    "I won't reproduce this copyrighted text, but I can summarise it if you like.",
    "I'm not able to continue quoting this work.",
]


def read_text(path: str | Path) -> str:
    """A plain-text book: UTF-8, not empty, and text (mostly printable characters)."""
    path = check_file(path)
    text = decode_utf8(path.read_bytes(), path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    odd = sum(1 for c in text if not (c.isprintable() or c.isspace()))
    if odd > 0.05 * len(text):
        raise DataError(f"{path}: {odd / len(text):.0%} of its characters are not printable: not a text file")
    return text


def read_json_list(path: str | Path, required: dict[str, type] | None = None, allow_empty: bool = False) -> list:
    """A JSON file holding one list (MUSE's format) of strings, or of objects with the `required`
    fields; a bad item fails with its index. allow_empty: empty strings are items too (MUSE-News's
    forget corpus has one empty article)."""
    path = check_file(path)
    try:
        items = json.loads(decode_utf8(path.read_bytes(), path, "JSON"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected a non-empty JSON list")
    for i, item in enumerate(items):
        if required is None:
            if not isinstance(item, str) or not (allow_empty or item.strip()):
                raise DataError(f"{path}: item {i} is not a non-empty string")
        elif not isinstance(item, dict):
            raise DataError(f"{path}: item {i} is not an object with {', '.join(required)}")
        else:
            for key, typ in required.items():
                check_field(item.get(key), key, typ, f"{path}: item {i}")
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
    """Plain language modelling: every token after the first is scored. The first is labelled
    IGNORE_INDEX explicitly: in a left-padded batch with a longer row (MUSE-News's last, shorter
    chunk) it would otherwise be predicted from a padding position."""
    return {"input_ids": ids, "labels": [IGNORE_INDEX] + list(ids[1:])}


def chunk_unlearning_epoch(forget: list[list[int]], prompt_tokens: int, templates: list[list[int]] | None,
                           retain: list[list[int]] | None, rows_per_step: int, rng: random.Random) -> list[dict]:
    """One epoch of unlearning steps over forget chunks, in the streams of data.unlearning_epoch:
    each forget chunk (prompt -> its continuation), with the same prompt followed by a template drawn
    from `templates` (token ids), and a retain chunk drawn from `retain`, scored the same way."""
    if not forget:
        raise DataError("the forget set is empty")
    order = list(range(len(forget)))
    rng.shuffle(order)
    steps = []
    for s in range(0, len(order), rows_per_step):
        idx = order[s:s + rows_per_step]
        step = {"forget": [prefix_row(forget[i], prompt_tokens) for i in idx]}
        if templates is not None:
            step["template"] = [prefix_row(forget[i], prompt_tokens, rng.choice(templates)) for i in idx]
        if retain is not None:
            step["retain"] = [prefix_row(retain[rng.randrange(len(retain))], prompt_tokens) for _ in idx]
        steps.append(step)
    return steps


def text_epoch(chunks: list[list[int]], rows_per_step: int, rng: random.Random) -> list[dict]:
    """One epoch of language-modelling steps {"answer": rows} over chunks (fine-tuning the original)."""
    if not chunks:
        raise DataError("no fine-tuning text")
    order = list(range(len(chunks)))
    rng.shuffle(order)
    return [{"answer": [text_row(chunks[i]) for i in order[s:s + rows_per_step]]}
            for s in range(0, len(order), rows_per_step)]


# ---------------------------------------------------------------------------------------------
# MUSE-News (Shi et al. 2024): the forget corpus and the probes that come from it
# ---------------------------------------------------------------------------------------------

def load_muse() -> dict:
    """MUSE-News as vendored: the forget corpus (889 BBC articles), VerbMem probes {prompt, gt},
    KnowMem questions (forget, retain, and their in-context examples) and the PrivLeak texts
    (forget: excerpts of the forget corpus; holdout: never trained on)."""
    qa = {"question": str, "answer": str}
    muse = {"articles": read_json_list(MUSE_DIR / "raw" / "forget.json", allow_empty=True),
            "verbmem": read_json_list(MUSE_DIR / "verbmem" / "forget.json", {"prompt": str, "gt": str}),
            "privleak_forget": read_json_list(MUSE_DIR / "privleak" / "forget.json"),
            "privleak_holdout": read_json_list(MUSE_DIR / "privleak" / "holdout.json")}
    for split, file in (("forget", "forget"), ("retain", "retain2")):  # MUSE's files name its retain QA retain2
        for suffix in ("", "_icl"):
            muse[f"knowmem_{split}{suffix}"] = read_json_list(MUSE_DIR / "knowmem" / f"{file}_qa{suffix}.json", qa)
    return muse


def _squash(text: str) -> str:
    """Text without whitespace: MUSE cut its probes from the corpus with whitespace changed at a few
    joins (e.g. "on.\\nFrom" for "on. From"), so containment is checked without it."""
    return re.sub(r"\s+", "", text)


def muse_forget_set(muse: dict, n_verbmem: int | None, n_privleak: int | None) -> dict:
    """The articles to train on and the probes to score, chosen together, so that every scored
    VerbMem prompt and continuation, KnowMem-forget answer and PrivLeak forget text lies in the
    training text (the articles joined by blank lines, as MUSE's probes were cut from them).

    None: every article (MUSE's protocol) and every probe that lies in it. A number: that many
    VerbMem probes and PrivLeak texts, those whose articles are shortest, with all their articles;
    KnowMem-forget then scores the questions whose answer occurs in those articles.
    Returns `muse` with its probes narrowed to those scored, the first as many PrivLeak holdout texts
    as forget texts, and "articles" (indices, in corpus order) and "text" (the training text).
    """
    arts = muse["articles"]
    squashed = [_squash(a) for a in arts]
    starts = [0]
    for a in squashed:
        starts.append(starts[-1] + len(a))
    corpus = "".join(squashed)

    def articles_of(text: str) -> list[int] | None:
        i = corpus.find(_squash(text))
        if i < 0:
            return None
        return list(range(bisect.bisect_right(starts, i) - 1, bisect.bisect_right(starts, i + len(_squash(text)) - 1)))

    def pick(texts: list[str], n: int | None) -> tuple[list[int], set[int]]:
        spans = [(k, articles_of(t)) for k, t in enumerate(texts)]
        spans = [(k, s) for k, s in spans if s is not None]
        if n is not None:
            spans = sorted(spans, key=lambda ks: (sum(len(arts[i]) for i in ks[1]), ks[0]))[:n]
        return sorted(k for k, _ in spans), {i for _, s in spans for i in s}

    probes, verb_arts = pick([p["prompt"] + p["gt"] for p in muse["verbmem"]], n_verbmem)
    priv, priv_arts = pick(muse["privleak_forget"], n_privleak)
    chosen = sorted(verb_arts | priv_arts) if n_verbmem is not None else list(range(len(arts)))
    text = "\n\n".join(arts[i] for i in chosen)
    inside = _squash(text)
    out = {**muse, "articles": chosen, "text": text,
           "verbmem": [muse["verbmem"][k] for k in probes],
           "knowmem_forget": [q for q in muse["knowmem_forget"] if _squash(q["answer"]) in inside],
           "privleak_forget": [muse["privleak_forget"][k] for k in priv],
           "privleak_holdout": muse["privleak_holdout"][:len(priv)]}
    check_in_text(out, inside)
    return out


def check_in_text(selection: dict, squashed_text: str) -> None:
    """Every scored probe must lie in the training text: a probe that does not measures memory of
    text the model never saw, and "no memorisation" would then hold trivially."""
    for name, items, text_of in [("VerbMem probe", selection["verbmem"], lambda p: p["prompt"] + p["gt"]),
                                 ("KnowMem-forget answer", selection["knowmem_forget"], lambda q: q["answer"]),
                                 ("PrivLeak forget text", selection["privleak_forget"], lambda t: t)]:
        for i, item in enumerate(items):
            if _squash(text_of(item)) not in squashed_text:
                raise DataError(f"{name} {i} does not lie in the forget text trained on")
