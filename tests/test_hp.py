"""Copyright unlearning: chunking, prompts and continuations, held-out text, BLEU/ROUGE against
hand computations, and run_hp.py end to end on a tiny model (a --text book and MUSE-News)."""
import collections
import json
import math
import random
from pathlib import Path

import pytest

import corpora
import data
import evaluate
import models
from flat import IGNORE_INDEX

ROOT = Path(__file__).resolve().parent.parent


def test_chunking_round_trips_the_text(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    text = corpora.read_text(corpora.HELD_OUT_BOOK)[:5000]
    ids = tok(text, add_special_tokens=False).input_ids
    chunks = corpora.chunk_ids(ids, 37)
    assert [i for c in chunks for i in c] == ids and all(len(c) == 37 for c in chunks[:-1])
    assert tok.decode([i for c in chunks for i in c]) == text


def test_forget_and_held_out_chunks_are_disjoint_and_prompts_never_overlap_continuations():
    ids = list(range(1005))  # distinct ids: a token's id is its position
    forget, held = corpora.split_chunks(corpora.chunk_ids(ids, 10), None, 0.2, 10)
    assert len(held) == 20 and held[-1][-1] == 999  # the end of the text; the 5-token tail is dropped
    assert not {i for c in forget for i in c} & {i for c in held for i in c}
    assert len(corpora.split_chunks(corpora.chunk_ids(ids, 10), 7, 0.2, 10)[0]) == 7
    row = corpora.prefix_row(forget[3], 4)
    prompt = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab == IGNORE_INDEX]
    scored = [lab for lab in row["labels"] if lab != IGNORE_INDEX]
    assert prompt == forget[3][:4] and scored == forget[3][4:] and not set(prompt) & set(scored)
    template = corpora.prefix_row(forget[3], 4, [7, 8, 9])
    assert template["input_ids"] == forget[3][:4] + [7, 8, 9] and template["labels"][4:] == [7, 8, 9]
    batch = corpora.chunk_unlearning_epoch(forget, 4, [[7, 8]], forget, 3, random.Random(0))
    assert sum(len(b["forget"]) for b in batch) == len(forget)
    with pytest.raises(data.DataError, match="too few"):
        corpora.split_chunks(corpora.chunk_ids(ids[:15], 10), None, 0.2, 10)


def _ngrams(words, n):
    return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def test_bleu_and_rouge_match_hand_computations():
    ref = "the quick brown fox jumps over the lazy dog"
    hyp = "the quick brown fox jumps over the dog"
    r, h = ref.split(), hyp.split()
    precisions = [sum((_ngrams(h, n) & _ngrams(r, n)).values()) / max(1, len(h) - n + 1) for n in range(1, 5)]
    bp = math.exp(1 - len(r) / len(h))
    # sacreBLEU's own 0-100 scale, as FLAT's tables report it
    assert evaluate.bleu([hyp], [ref])[0] == pytest.approx(100 * bp * math.exp(sum(map(math.log, precisions)) / 4),
                                                           abs=1e-2)
    assert evaluate.bleu([ref], [ref])[0] == pytest.approx(100.0)
    # ROUGE-L: the longest common subsequence is the 8 words of hyp
    assert evaluate.rouge_l_recall([hyp], [ref])[0] == pytest.approx(8 / 9)
    assert evaluate.rouge_l_f1([hyp], [ref])[0] == pytest.approx(2 * (8 / 9) * 1 / (8 / 9 + 1))
    assert evaluate.rouge_l_recall(["the fox over the dog"], [ref])[0] == pytest.approx(5 / 9)
    assert evaluate.rouge_l_recall(["dog lazy the"], [ref])[0] == pytest.approx(1 / 9)  # order matters
    s = {"forget_bleu": 30.0, "forget_rougeL": 0.5}  # BLEU points, ROUGE-L on 0-1: the gap is in points
    assert evaluate.forget_quality_gap(s, s) == 0
    assert evaluate.forget_quality_gap(s, {"forget_bleu": 10.0, "forget_rougeL": 0.6}) == pytest.approx(30.0)


def test_knowmem_answer_cut_at_stop_strings():
    assert evaluate.cut_at_stops(" Paris.\n\nQuestion: next") == "Paris."
    assert evaluate.cut_at_stops("Paris\nQuestion: x") == "Paris"
    assert evaluate.cut_at_stops("no stop") == "no stop"


def test_held_out_chunks_never_enter_training(book_run):
    seen = [tuple(c) for name in ("text_epoch", "chunk_unlearning_epoch")
            for args, _ in book_run.calls[name] for c in args[0]]
    items = json.loads((book_run.out / "eval_items.json").read_text())
    tok = models.load_tokenizer(book_run.model)
    held_prompts = {p for p in items["original"]["held_out"]["prompt"]}
    trained_prompts = {tok.decode(list(c[:8])) for c in seen}
    assert seen and held_prompts and not held_prompts & trained_prompts


def test_a_book_run_reports_every_key_for_every_model(book_run):
    report = book_run.report
    assert list(report["methods"]) == ["npo", "flat"]
    for name, row in [("reference", report["reference"]), ("original", report["original"]), *report["methods"].items()]:
        assert {"forget_bleu", "forget_rougeL", "held_out_bleu", "held_out_rougeL", "forget_quality_gap", "privleak",
                "mia_min_k", "wikitext_ppl", "held_out_book_ppl"} <= set(row), name
        assert f"| {name} |" in book_run.stdout
    assert report["reference"]["forget_quality_gap"] == 0.0 and report["reference"]["privleak"] == 0.0
    assert "[unlearn-npo] step" in book_run.stdout and "BLEU and FQ gap" in book_run.stdout
    for method in ("npo", "flat"):
        log = json.loads((Path(report["dirs"][method]) / "train_log.json").read_text())
        assert [r["step"] for r in log] == [1, 2]
    items = json.loads((book_run.out / "eval_items.json").read_text())
    assert len(items["npo"]["mia"]["min_k"]["holdout"]) == 2 and 0 <= max(items["npo"]["forget"]["bleu"]) <= 100
