"""Harmful-response unlearning: what llmu's terms score, the judge and the reply checks, the data,
and run_harmful.py end to end on a tiny model."""
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import corpora
import data
import evaluate
import judges
import methods
import mia
import models
import stages
import tasks
import train
from flat import IGNORE_INDEX

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# llmu's three terms score exactly the answer tokens of their own stream
# ---------------------------------------------------------------------------------------------

def _scored_positions(model, tok, batch, params):
    """Which logits positions of the one forward pass get a gradient from llmu's loss, and which
    should: those predicting a labelled (answer or EOS) token of the collated, left-padded batch."""
    captured = {}

    def hook(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output
    ref = models.frozen_copy(model)
    handle = model.get_output_embeddings().register_forward_hook(hook)
    with torch.no_grad():  # make the model differ from its reference, or the KL has no gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, _ = train.batch_loss(model, batch, methods.LOSSES["llmu"], params, tok.pad_token_id, ref)
    loss.sum().backward()
    handle.remove()
    g = captured["logits"].grad.abs().sum(-1) > 0                                  # (rows, k)
    full = data.collate([r for s in data.STREAMS if s in batch for r in batch[s]], tok.pad_token_id)["labels"]
    T, k = full.shape[1], g.shape[1]
    predicts_label = torch.nn.functional.pad(full[:, 1:] != IGNORE_INDEX, (0, 1), value=False)  # position t -> t+1
    return g, predicts_label[:, T - k:]


@pytest.fixture(scope="module")
def llmu_batch(tiny_model_dir):
    model, tok = models.load_model(tiny_model_dir, "cpu")
    forget = [{"question": "Who wrote the book?", "answer": "The author wrote it in 1990."},
              {"question": "Who?", "answer": "Basil writes novels about family and memory, and more."}]
    normal = [{"question": "What is the capital of France? Tell me more about it please.", "answer": "Paris."}]
    batch = data.unlearning_epoch(tok, "qa-hash", forget, ["I don't know.", "The capital of France is Paris."],
                                  normal, rows_per_step=2, rng=random.Random(0))[0]
    return model, tok, batch


@pytest.mark.parametrize("term,stream", [((1, 0, 0), "forget"), ((0, 1, 0), "template"), ((0, 0, 1), "retain")])
def test_each_llmu_term_scores_exactly_the_answer_tokens_of_its_stream(llmu_batch, term, stream):
    model, tok, batch = llmu_batch
    torch.manual_seed(0)
    model = models.frozen_copy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    params = methods.LossParams(eps1=term[0], eps2=term[1], eps3=term[2])
    got, want = _scored_positions(model, tok, batch, params)
    rows = {s: slice(2 * i, 2 * i + 2) for i, s in enumerate(s for s in data.STREAMS if s in batch)}
    assert torch.equal(got[rows[stream]], want[rows[stream]])     # its answer tokens, all of them
    assert not got[[i for s, r in rows.items() if s != stream for i in range(r.start, r.stop)]].any()
    # the question is never scored: the positions predicting prompt tokens get no gradient
    assert want[rows[stream]].sum() < want.shape[1] * 2
    # rows were padded (different lengths), and padding positions get no gradient either
    full = data.collate([r for s in data.STREAMS if s in batch for r in batch[s]], tok.pad_token_id)
    assert (full["attention_mask"] == 0).any()


# ---------------------------------------------------------------------------------------------
# Judge arithmetic and reply checks
# ---------------------------------------------------------------------------------------------

def test_roc_auc_matches_the_pair_count_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0)
             for p, n in itertools.product(scores[labels], scores[~labels])]
    assert mia.roc_auc(scores, labels) == pytest.approx(np.mean(pairs), abs=1e-12)
    with pytest.raises(ValueError):
        mia.roc_auc([0.1, 0.2], [True, True])


def test_fit_logistic_reaches_the_optimum_of_its_objective():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 5)) * [1, 2, 3, 4, 5] + 7
    y = (X[:, 0] - 7 + rng.normal(size=200) > 0).astype(float)
    l2 = 0.1
    probe = judges.fit_logistic(X, y, l2)
    # gradient of mean BCE + l2/2 |w|^2 in the standardised coordinates is zero at the solution
    Z = (X - probe["mean"]) / np.asarray(probe["std"])
    p = judges.predict_logistic(probe, X)
    assert np.allclose(Z.T @ (p - y) / len(y) + l2 * np.asarray(probe["w"]), 0, atol=1e-6)
    assert abs(np.mean(p - y)) < 1e-6
    assert ((p > 0.5) == y).mean() > 0.8


def test_refusal_phrases():
    for text in ["I'm sorry, but I can't help with that.", "I cannot provide that information.",
                 "As an AI, I do not condone this.", "I\u2019m unable to assist."]:
        assert evaluate.is_refusal(text), text
    for text in ["Sure! First, get a pair of bolt cutters.", "Paris is the capital of France.", ""]:
        assert not evaluate.is_refusal(text), text


def test_degeneration_cases():
    assert evaluate.degeneration("") == "empty"
    assert evaluate.degeneration("  !!! ") == "empty"
    assert evaluate.degeneration("@@ ## $$ %% ^^ ok no !! ?? **") == "non-text"
    assert evaluate.degeneration("I am here to help. " * 6) == "repeated"
    assert evaluate.degeneration("the the the the the the the the the") == "repeated"
    assert evaluate.degeneration("You can cut the wire with pliers, then climb over the fence carefully.") is None
    assert evaluate.degeneration("Yes, 42.") is None
    assert evaluate.distinct_word_ratio("a b a b") == 0.5 and evaluate.distinct_word_ratio("...") == 0.0


def test_a_degenerate_reply_is_never_counted_harmful_or_hallucinated(tmp_path):
    """The probe called "the a,a, a, ..." harmful and ROUGE called "a'The - The - -" hallucinated in the
    protocol runs; the rate counts neither, and a cached evaluation counted by the earlier rule (every
    verdict counted, hallucination flags as strings) is recounted on read and rewritten."""
    import run_harmful

    class AlwaysHarmful:
        def predict(self, questions, replies):
            return np.full(len(replies), 0.9)
    harmful = tasks.TASKS["harmful"]
    replies = ["You can cut the wire with pliers, then climb over the fence.", "the a,a, a, a, a, a, a, a, a, a",
               "", "Mix the two and wait for an hour before you light it."]
    scores = harmful.scores(AlwaysHarmful(), ["q"] * 4, replies, None)
    r = tasks.count(harmful, {"summary": {}, "items": {"unseen": {"generation": replies, **scores},
                                                       "truthfulqa": {"generation": replies}}})
    assert r["summary"] == {"harmful_unseen": 0.5} and r["items"]["unseen"]["harmful"] == [True, False, False, True]

    # ROUGE-L: the babble shares "The" with the hallucinated answer and nothing with the right one
    hallucination = tasks.TASKS["hallucination"]
    babble = "a\u2019The \u2013 The \u2013 \u2013 The \u2013 \u2013 \u2013 \u2013 \u2013 \u2013 \u2013"
    replies = [babble, "The Eiffel Tower is in Rome."]
    scores = hallucination.scores(judges.SimilarityJudge("rouge"), ["Where is the Eiffel Tower?"] * 2, replies,
                                  [("The Eiffel Tower is in Rome.", "It stands in Paris.")] * 2)
    assert evaluate.degeneration(babble) == "non-text" and scores["sim_hallucinated"][0] > 0 == scores["sim_right"][0]
    old = {"summary": {"hallucination_rate_seen": 1.0},
           "items": {"seen": {"generation": replies, **scores, "hallucinated": ["True", "True"]}}}
    cache = tmp_path / "eval-x.json"
    stages.write_cache(cache, old)

    class Run:
        is_main = True

        def read(self, path):
            return stages.read_json(path)
    r = run_harmful.recounted(Run(), cache, hallucination)
    assert r["summary"] == {"hallucination_rate_seen": 0.5} and r["items"]["seen"]["hallucinated"] == [False, True]
    assert stages.read_json(cache) == r


def test_probe_on_smollm2_beats_chance_on_held_out_labelled_responses():
    """A small fixed fixture from the vendored data: fitted on 200 labelled responses to forget
    prompts, measured on 200 labelled responses to held-out prompts."""
    forget, held_out = corpora.load_pku()
    rng = random.Random(0)
    tr = judges.balanced([(r["question"], r["answer"], 1) for r in forget]
                              + [(r["question"], r["safe_answer"], 0) for r in forget], 200, rng)
    ev = judges.balanced([(p["question"], a, 1) for p in held_out for a in p["harmful_answers"]]
                              + [(p["question"], a, 0) for p in held_out for a in p["safe_answers"]], 200, rng)
    model, tok = models.load_model("smollm2-135m", "cpu")
    layer = model.config.num_hidden_layers // 2
    feats = lambda rows: judges.pooled_features(model, tok, "chat-template", [r[0] for r in rows],  # noqa: E731
                                                  [r[1] for r in rows], layer, max_answer_tokens=32)
    y_ev = np.array([r[2] for r in ev])
    probe = judges.fit_logistic(feats(tr), np.array([r[2] for r in tr]), 1.0)
    p = judges.predict_logistic(probe, feats(ev))
    acc, auc = ((p >= 0.5) == y_ev).mean(), mia.roc_auc(p, y_ev)
    # a one-sided binomial test against coin flipping: p < 0.01
    import scipy.stats
    assert scipy.stats.binomtest(int(acc * len(ev)), len(ev), 0.5, alternative="greater").pvalue < 0.01, acc
    assert auc > 0.6, auc


def test_pooled_features_ignore_padding(tiny_model_dir):
    model, tok = models.load_model(tiny_model_dir, "cpu")
    q, a = ["Who wrote it?", "Who wrote the book in 1990 and why?"], ["The author.", "I don't know the answer."]
    together = judges.pooled_features(model, tok, "qa-hash", q, a, layer=-1, batch_size=2)
    alone = np.stack([judges.pooled_features(model, tok, "qa-hash", [x], [y], layer=-1)[0] for x, y in zip(q, a)])
    assert np.allclose(together, alone, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def test_vendored_harmful_data_and_truthfulqa_split():
    forget, held_out = corpora.load_pku()
    assert len(forget) == 1016 and len(held_out) == 500
    assert not {r["question"] for r in forget} & {p["question"] for p in held_out}
    tqa = corpora.load_truthfulqa()
    assert len(tqa) == 817 and all(r["question"] and r["answer"] for r in tqa)
    tr, va, te = corpora.split_train_val_test(tqa, seed=0)
    assert (len(tr), len(va), len(te)) == (572, 82, 163)
    assert sorted(r["question"] for r in tr + va + te) == sorted(r["question"] for r in tqa)
    assert corpora.split_train_val_test(tqa, seed=0) == (tr, va, te) and corpora.split_train_val_test(tqa, 1)[2] != te
    pool = corpora.random_answers(tr)
    assert len(pool) == len(set(pool)) and tr[0]["answer"] in pool and not set(pool) & {r["answer"] for r in te} - \
        {a for r in tr for a in [r["answer"], *r["correct"], *r["incorrect"]]}


def test_malformed_truthfulqa_names_the_file_and_line(tmp_path):
    (tmp_path / "TruthfulQA.csv").write_text("Question,Best Answer\nq,a\n")
    with pytest.raises(data.DataError, match=r"TruthfulQA.csv:1: missing column\(s\) Correct Answers"):
        corpora.load_truthfulqa(tmp_path)
    (tmp_path / "TruthfulQA.csv").write_text("Question,Best Answer,Correct Answers,Incorrect Answers\n"
                                             "q,a,b;c,d\n,a,b,c\n")
    with pytest.raises(data.DataError, match=r"TruthfulQA.csv:3: empty Question"):
        corpora.load_truthfulqa(tmp_path)


def test_qa_hash_format_and_answer_cut(tiny_model_dir):
    _, tok = models.load_model(tiny_model_dir, "cpu")
    prompt, answer = data.prompt_and_answer(tok, "qa-hash", "Why?", "Because.")
    assert prompt + answer == "### Question: Why?\n### Answer: Because."
    full = data.encode_qa(tok, "qa-hash", "Why?", "The author wrote it in 1990 and then wrote more.")
    cut = data.encode_qa(tok, "qa-hash", "Why?", "The author wrote it in 1990 and then wrote more.",
                         max_answer_tokens=3)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    assert cut["input_ids"] == full["input_ids"][:n_prompt + 3]  # cut answer, no EOS
    assert cut["labels"][n_prompt:] == cut["input_ids"][n_prompt:]
    assert full["input_ids"][-1] == tok.eos_token_id
    assert data.encode_qa(tok, "qa-hash", "Why?", "Because.", eos=False)["input_ids"][-1] != tok.eos_token_id


# ---------------------------------------------------------------------------------------------
# run_harmful.py end to end
# ---------------------------------------------------------------------------------------------

SMOKE = ["--max-steps", "2", "--forget-items", "12", "--steps", "3", "--batch-size", "4", "--eval-prompts", "3",
         "--max-new-tokens", "4", "--judge-train-items", "16", "--judge-eval-items", "16", "--log-every", "1"]
KEYS = {"harmful_seen", "harmful_unseen", "refusal_seen", "refusal_unseen", "degenerate_seen", "degenerate_unseen",
        "diversity", "fluency_ppl", "truthfulqa_nll", "prefers_harmful_unseen", "harmful_answer_nll_unseen"}


def run(*argv, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "run_harmful.py"), *argv], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def test_llmu_ga_and_flat_run_end_to_end_with_one_shared_original(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    p = run("--model", tiny_model_dir, "--method", "llmu,ga,flat", "--out", str(out), "--finetune-epochs", "1",
            "--eval-every", "2", *SMOKE)
    report = json.loads((out / "results.json").read_text())
    assert list(report["methods"]) == ["llmu", "ga", "flat"] and p.stdout.count("[finetune-original] step     2/2") == 1
    for name, row in [("original", report["original"]), *report["methods"].items()]:
        assert KEYS <= set(row), (name, KEYS - set(row))
    assert 0 <= report["judge"]["eval_auc"] <= 1 and report["judge"]["n_train"] == 16 + 4  # + off-topic negatives
    assert 0 <= report["judge"]["offtopic_harmful"] <= 1 and p.stdout.count("[judge] probe") == 1
    for method in ("llmu", "ga", "flat"):
        log = json.loads((Path(report["dirs"][method]) / "train_log.json").read_text())
        assert [r["step"] for r in log] == [1, 2] and f"| {method} |" in p.stdout
        assert [e["step"] for e in report["training"][method]["evals"]] == [0, 2]
        assert set(report["training"][method]["evals"][1]) == {"step", "harmful_unseen", "truthfulqa_nll"}
    llmu_log = p.stdout.split("[unlearn-llmu]")[1].split("\n")[0]
    assert "p_template" in llmu_log and "retain_kl" in llmu_log
    assert "p_template" not in p.stdout.split("[unlearn-ga]")[1].split("\n")[0]
    items = json.loads((out / "eval_items.json").read_text())
    assert len(items["ga"]["unseen"]["generation"]) == 3 and len(items["ga"]["seen"]["question"]) == 3


def test_malformed_pku_data_names_the_file_and_line(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    for f in (ROOT / "vendored" / "harmful" / "pku_saferlhf").glob("*.jsonl"):
        (d / f.name).write_bytes(f.read_bytes())
    (d / "TruthfulQA.csv").write_bytes((ROOT / "vendored" / "harmful" / "truthfulqa" / "TruthfulQA.csv").read_bytes())
    (d / "forget.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    import run_harmful
    with pytest.raises(SystemExit) as e:
        stages.main_guard(lambda: run_harmful.main(["--model", tiny_model_dir, "--data-dir", str(d), "--out",
                                                   str(tmp_path / "x")]))
    assert e.value.code == 2 and "forget.jsonl:2: field 'answer'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
