"""Copyright unlearning: chunking, prompts and continuations, held-out text, BLEU/ROUGE against
hand computations, and run_hp.py end to end on a tiny model (a --text book and MUSE-News)."""
import collections
import json
import math
import random
import subprocess
import sys
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


def test_held_out_chunks_never_enter_training(tiny_model_dir, tmp_path, monkeypatch):
    import run_hp
    seen = []
    for name in ("text_epoch", "chunk_unlearning_epoch"):
        real = getattr(corpora, name)

        def spy(chunks, *a, _real=real, **k):
            seen.extend(map(tuple, chunks))
            return _real(chunks, *a, **k)
        monkeypatch.setattr(corpora, name, spy)
    report = run_hp.main(["--model", tiny_model_dir, "--out", str(tmp_path / "run"), *SMOKE])
    items = json.loads((tmp_path / "run" / "eval_items.json").read_text())
    tok = models.load_tokenizer(tiny_model_dir)
    held_prompts = {p for p in items["original"]["held_out"]["prompt"]}
    trained_prompts = {tok.decode(list(c[:8])) for c in seen}
    assert seen and held_prompts and not held_prompts & trained_prompts
    assert report["reference"]["forget_quality_gap"] == 0.0


SMOKE = ["--max-steps", "2", "--n-chunks", "4", "--chunk-tokens", "24", "--prompt-tokens", "8", "--eval-chunks", "2",
         "--ppl-chunks", "2", "--batch-size", "2", "--log-every", "1"]


def run(*argv, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "run_hp.py"), *argv], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def test_a_text_file_and_muse_news_run_end_to_end(tiny_model_dir, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(corpora.read_text(corpora.HELD_OUT_BOOK)[:20000])
    p = run("--model", tiny_model_dir, "--text", str(book), "--out", str(tmp_path / "a"), "--method", "npo", *SMOKE)
    report = json.loads((tmp_path / "a" / "results.json").read_text())
    for row in ("reference", "original", "unlearned"):
        assert {"forget_bleu", "forget_rougeL", "held_out_bleu", "held_out_rougeL", "forget_quality_gap",
                "wikitext_ppl", "held_out_book_ppl"} <= set(report[row])
    assert report["reference"]["forget_quality_gap"] == 0.0
    assert "[unlearn-npo] step" in p.stdout and "| npo |" in p.stdout
    log = json.loads((Path(report["dirs"]["unlearned"]) / "train_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2]
    p = run("--model", tiny_model_dir, "--corpus", "muse-news", "--out", str(tmp_path / "m"), "--max-new-tokens", "4",
            "--template", "wikitext", "--muse-probes", "2", "--privleak-texts", "1", *SMOKE)
    report = json.loads((tmp_path / "m" / "results.json").read_text())
    assert {"verbmem_forget", "knowmem_forget", "knowmem_retain"} <= set(report["unlearned"])
    items = json.loads((tmp_path / "m" / "eval_items.json").read_text())
    assert len(items["unlearned"]["verbmem"]["generation"]) == 2 and len(items["unlearned"]["knowmem_retain"]["answer"]) == 2


def test_bad_input_fails_clearly(tiny_model_dir, tmp_path):
    for argv, msg in [(["--corpus", "books"], "--corpus books: must be one of book, muse-news"),
                      (["--template", "c4"], "--template c4: must be one of refusal, wikitext"),
                      (["--method", "flatt"], "unknown loss 'flatt'"),
                      (["--text", str(tmp_path / "missing.txt")], "missing.txt: file not found"),
                      (["--prompt-tokens", "30", "--chunk-tokens", "24"], "must be below")]:
        p = run("--model", tiny_model_dir, "--out", str(tmp_path / "x"), *argv, check=False)
        assert p.returncode == 2 and msg in p.stderr, (argv, p.stderr[-500:])
        assert not (tmp_path / "x").exists()
