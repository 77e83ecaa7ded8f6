"""Zero-shot utility (zeroshot.py): each task as lm-eval scores it equals a slow, independent
computation of every choice's log-probability from the task's published prompt format; the task
files are checked (sha256, rows) before any model loads; the runner's cached stage is reused and
recomputed when --zero-shot-limit changes."""
import hashlib
import json
import math
import shutil

import pytest
import torch
from conftest import BOOK_SMOKE, ZERO_SHOT_SMOKE, run_in_process

import books
import data
import models
import run_hp
import zeroshot
from errors import DataError, UsageError

# TruthfulQA's "QA prompt" (Lin et al. 2022, the six questions lm-eval's mc1/mc2 put before each question).
TRUTHFULQA_SHOTS = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\nA: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.")


def raw_rows(task: str, data_dir):
    """The released files as they are, each task's items as (contexts, continuations, gold): one context
    per choice (winogrande) or one shared; the formats of the tasks' lm-eval definitions, written here."""
    d = lambda f: data.read_jsonl(data_dir / f)  # noqa: E731
    if task == "boolq":
        return [([f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"], [" no", " yes"],
                 {"false": 0, "true": 1}[r["label"]]) for r in d("boolq/val.jsonl")]
    if task == "rte":
        return [([f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:"], [" True", " False"],
                 r["label"]) for r in d("rte/validation.jsonl")]
    if task == "winogrande":  # the blank filled with each option is the context; the rest is scored
        out = []
        for r in d("winogrande/dev.jsonl"):
            i = r["sentence"].index("_")
            out.append(([r["sentence"][:i] + r["option1"], r["sentence"][:i] + r["option2"]],
                        [" " + r["sentence"][i + 1:].strip()], int(r["answer"]) - 1))
        return out
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        name = {"arc_easy": "arc_easy/ARC-Easy-Test.jsonl", "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl",
                "openbookqa": "openbookqa/test.jsonl"}[task]
        out = []
        for r in d(name):
            q = r["question"]
            context = q["stem"] if task == "openbookqa" else f"Question: {q['stem']}\nAnswer:"
            labels = [c["label"] for c in q["choices"]]
            out.append(([context], [" " + c["text"] for c in q["choices"]], labels.index(r["answerKey"].strip())))
        return out
    if task == "piqa":
        labels = (data_dir / "piqa/valid-labels.lst").read_text().split()
        return [([f"Question: {r['goal']}\nAnswer:"], [" " + r["sol1"], " " + r["sol2"]], int(y))
                for r, y in zip(d("piqa/valid.jsonl"), labels)]
    key = {"truthfulqa_mc1": "mc1_targets", "truthfulqa_mc2": "mc2_targets"}[task]
    return [([TRUTHFULQA_SHOTS + "\n\nQ: " + r["question"] + "\nA:"], [" " + a for a in r[key]],
             list(r[key].values())) for r in d("truthfulqa/mc_task.jsonl")]


@torch.no_grad()
def slow_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """One unpadded forward pass: the summed log-probability of the continuation's tokens, the
    continuation being what tokenising context + continuation adds after the context's tokens."""
    ctx, whole = tok(context).input_ids, tok(context + continuation).input_ids
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def slow_scores(model, tok, task, item):
    contexts, continuations, gold = item
    lls = [slow_loglikelihood(model, tok, c, x) for c in contexts for x in continuations]
    pick = max(range(len(lls)), key=lls.__getitem__)
    if task == "truthfulqa_mc2":  # lm-eval: the answers before the first false one count as true
        first_false = gold.index(0)
        p = [math.exp(ll) for ll in lls]
        return lls, sum(p[:first_false]) / sum(p), None
    if task == "truthfulqa_mc1":
        return lls, float(pick == 0), None
    acc_norm = None
    if len(continuations) > 1 and task not in ("boolq", "rte"):  # per character of each choice
        norm = [ll / len(x[1:]) for ll, x in zip(lls, continuations)]  # the choice without lm-eval's " "
        acc_norm = float(max(range(len(norm)), key=norm.__getitem__) == gold)
    return lls, float(pick == gold), acc_norm


def rte_dir(tmp_path, monkeypatch):
    """A folder for --zero-shot-data with three RTE pairs (RTE is not vendored), its sum recorded."""
    rows = [{"sentence1": "The cat sat on the mat.", "sentence2": "A cat sat.", "label": 0, "idx": 0},
            {"sentence1": "Paris is in France.", "sentence2": "Paris is in Spain.", "label": 1, "idx": 1},
            {"sentence1": "He wrote three books.", "sentence2": "He wrote a book.", "label": 0, "idx": 2}]
    (tmp_path / "rte").mkdir()
    f = tmp_path / "rte" / "validation.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setitem(zeroshot.TASKS, "rte", zeroshot.TASKS["rte"]._replace(
        files=(("rte/validation.jsonl", hashlib.sha256(f.read_bytes()).hexdigest()),)))
    monkeypatch.setattr(zeroshot, "_RESOLVED", {})
    return tmp_path


def test_every_task_scores_as_a_slow_loop_over_its_published_format(tiny_model_dir, tmp_path, monkeypatch):
    data_dir = rte_dir(tmp_path, monkeypatch)
    tasks = zeroshot.resolve("all", str(data_dir))
    assert [t.name for t in tasks] == [n for n in zeroshot.FLAT_TASKS if n != "hellaswag"]
    model, tok = models.load_model(tiny_model_dir, "cpu", torch.float32)
    limit = 3
    out = zeroshot.zero_shot(model, tok, tasks, limit=limit)
    for t in tasks:
        items = raw_rows(t.name, data_dir if t.name == "rte" else zeroshot.TASK_DIR)[:limit]
        got = out["items"][t.name]
        assert got["doc_id"] == list(range(limit)), t.name
        accs, norms = [], []
        for i, item in enumerate(items):
            lls, acc, acc_norm = slow_scores(model, tok, t.name, item)
            assert got["loglikelihoods"][i] == pytest.approx(lls, rel=1e-4, abs=1e-3), (t.name, i)
            assert got["acc"][i] == pytest.approx(acc, rel=1e-4, abs=1e-6), (t.name, i)  # mc2: a probability
            accs.append(acc)
            norms.append(acc_norm)
        assert out["summary"][f"zeroshot_{t.name}"] == pytest.approx(sum(accs) / limit, rel=1e-4), t.name
        if norms[0] is not None:
            assert out["summary"][f"zeroshot_{t.name}_norm"] == pytest.approx(sum(norms) / limit), t.name
        assert out["summary"][f"zeroshot_{t.name}_items"] == limit
    mean = sum(out["summary"][f"zeroshot_{t.name}"] for t in tasks) / len(tasks)
    assert out["summary"]["zeroshot_mean"] == pytest.approx(mean)
    # the run's plan (estimate) counts the requests lm-eval made: one log-likelihood per answer choice
    made = sum(len(lls) for t in tasks for lls in out["items"][t.name]["loglikelihoods"])
    assert zeroshot.requests(tasks, limit)[0] == made


def test_the_vendored_files_are_the_recorded_releases_in_full():
    for name, task in zeroshot.TASKS.items():
        for f, recorded in task.files:
            path = zeroshot.TASK_DIR / f
            if name == "rte":
                assert not path.exists()  # its licence is unstated: not in the repository
                continue
            assert hashlib.sha256(path.read_bytes()).hexdigest() == recorded, f
    rows = {t.name: t.about["rows"] for t in zeroshot.resolve("all")}
    assert rows == {"boolq": 3270, "winogrande": 1267, "arc_challenge": 1172, "arc_easy": 2376, "openbookqa": 500,
                    "piqa": 1838, "truthfulqa_mc1": 817, "truthfulqa_mc2": 817}  # the sizes the releases state


def test_a_changed_missing_or_malformed_task_file_fails_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(zeroshot, "_RESOLVED", {})
    (tmp_path / "arc_easy").mkdir()
    f = tmp_path / "arc_easy" / "ARC-Easy-Test.jsonl"
    lines = (zeroshot.TASK_DIR / "arc_easy" / "ARC-Easy-Test.jsonl").read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:5]))  # a truncated copy
    with pytest.raises(DataError, match=r"ARC-Easy-Test.jsonl: sha256 .* differs from the recorded release"):
        zeroshot.resolve("arc_easy", str(tmp_path))
    row = json.loads(lines[1])
    row["answerKey"] = "Z"
    f.write_text(lines[0] + json.dumps(row) + "\n")
    monkeypatch.setitem(zeroshot.TASKS, "arc_easy", zeroshot.TASKS["arc_easy"]._replace(
        files=(("arc_easy/ARC-Easy-Test.jsonl", hashlib.sha256(f.read_bytes()).hexdigest()),)))
    with pytest.raises(DataError, match=r"ARC-Easy-Test.jsonl: row 2: answerKey 'Z' is not one of the labels"):
        zeroshot.resolve("arc_easy", str(tmp_path))
    f.write_text(lines[0] + "{not json\n")
    monkeypatch.setitem(zeroshot.TASKS, "arc_easy", zeroshot.TASKS["arc_easy"]._replace(
        files=(("arc_easy/ARC-Easy-Test.jsonl", hashlib.sha256(f.read_bytes()).hexdigest()),)))
    with pytest.raises(DataError, match=r"ARC-Easy-Test.jsonl:2: not valid JSON"):
        zeroshot.resolve("arc_easy", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no local copy and no Hub: say so, and how to give one
    with pytest.raises(UsageError, match=r"--zero-shot rte: no local files .* pass --zero-shot-data DIR"):
        zeroshot.resolve("rte")
    with pytest.raises(UsageError, match=r"unknown task 'boolq2'; local tasks: boolq, rte"):
        zeroshot.resolve("boolq2")


def test_a_bad_task_file_stops_the_runner_before_any_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(zeroshot, "_RESOLVED", {})
    shutil.copytree(zeroshot.TASK_DIR / "piqa", tmp_path / "piqa")
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("a tokenizer was loaded"))
    with pytest.raises(DataError, match=r"valid-labels.lst: sha256"):
        run_hp.main(["--model", tiny_model_dir, "--out", str(tmp_path / "run"), "--zero-shot", "piqa",
                     "--zero-shot-data", str(tmp_path)])
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_zero_shot_stage_is_cached_and_follows_the_limit(book_run, tmp_path):
    report = book_run.report  # --zero-shot arc_easy, its first 2 items (ZERO_SHOT_SMOKE)
    for row in (report["reference"], report["original"], *report["methods"].values()):
        assert row["zeroshot_arc_easy_items"] == 2 and 0 <= row["zeroshot_arc_easy"] <= 1
        assert row["zeroshot_mean"] == row["zeroshot_arc_easy"]
    assert "| zero-shot |" in book_run.stdout and "Zero-shot accuracy" in book_run.stdout
    base = ["--model", book_run.model, "--text", str(book_run.book), "--out", str(tmp_path / "run"),
            "--method", "flat", "--batch-size", "2", *BOOK_SMOKE, *ZERO_SHOT_SMOKE]
    spies = [(zeroshot, "zero_shot"), (books, "evaluate_continuations")]
    first = run_in_process(run_hp.main, base, spies=spies)
    assert len(first.calls["zero_shot"]) == 3  # reference, original, flat
    items = json.loads((tmp_path / "run" / "eval_items.json").read_text())
    assert [len(ll) for ll in items["reference"]["zeroshot"]["arc_easy"]["loglikelihoods"]] == [4, 4]  # 4 choices
    again = run_in_process(run_hp.main, base, spies=spies)
    assert again.calls["zero_shot"] == [] and again.calls["evaluate_continuations"] == []
    assert again.report["methods"]["flat"]["zeroshot_arc_easy"] == first.report["methods"]["flat"]["zeroshot_arc_easy"]
    more = run_in_process(run_hp.main, [*base, "--zero-shot-limit", "3"], spies=spies)
    assert len(more.calls["zero_shot"]) == 3 and more.calls["evaluate_continuations"] == []  # zero-shot only
    assert more.report["original"]["zeroshot_arc_easy_items"] == 3


def test_a_stock_task_without_accuracy_keeps_its_own_metrics_out_of_the_mean():
    # what lm-eval returns for a multiple-choice task and for wikitext (a rolling log-likelihood task)
    out = {"results": {"piqa": {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25, "alias": "piqa"},
                       "wikitext": {"word_perplexity,none": 31.5, "bits_per_byte,none": 0.9, "alias": "wikitext"}},
           "samples": {"piqa": [{"doc_id": 1, "target": 0, "resps": [[(-2.0, False)], [(-1.0, True)]], "acc": 0.0},
                                {"doc_id": 0, "target": 1, "resps": [[(-3.0, False)], [(-1.5, False)]], "acc": 1.0}],
                       "wikitext": [{"doc_id": 0, "target": "text", "resps": [[-120.0]], "word_perplexity": -120.0}]}}
    got = zeroshot.scores(out, ["piqa", "wikitext"])
    assert got["summary"] == {"zeroshot_piqa": 0.5, "zeroshot_piqa_norm": 0.25, "zeroshot_piqa_items": 2,
                              "zeroshot_wikitext_word_perplexity": 31.5, "zeroshot_wikitext_bits_per_byte": 0.9,
                              "zeroshot_wikitext_items": 1, "zeroshot_mean": 0.5}
    assert got["items"]["piqa"]["doc_id"] == [0, 1] and got["items"]["piqa"]["loglikelihoods"] == [[-3.0, -1.5],
                                                                                                   [-2.0, -1.0]]
    assert "loglikelihoods" not in got["items"]["wikitext"]
