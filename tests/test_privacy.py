"""Membership inference, PrivLeak and memorisation (open-unlearning's definitions) against slow hand
computations; the hallucination task's split, judge rule and run."""
import itertools
import json
import math
import random
import zlib

import numpy as np
import pytest
import torch
from conftest import run_script

import corpora
import data
import evaluate
import judges
import methods
import mia
import models
import train


def slow_token_stats(model, tok, question, answer):
    """One (question, answer) alone, no cache, every position's full distribution in float64: the
    per-token log-probabilities of answer + EOS, the Min-K%++ z-scores, argmax hits and sigmas."""
    enc = data.encode_qa(tok, "base", question, answer)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logp_all = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    logp, z, hit, sigma = [], [], [], []
    for t in range(len(enc["labels"]) - 1):
        y = enc["labels"][t + 1]
        if y == -100:
            continue
        lp = logp_all[t]
        mu = float((lp.exp() * lp).sum())
        var = max(float((lp.exp() * lp * lp).sum()) - mu * mu, 1e-6)   # float64: the raw moment is exact enough
        logp.append(float(lp[y]))
        z.append((float(lp[y]) - mu) / math.sqrt(var))
        hit.append(int(lp.argmax()) == y)
        sigma.append(math.sqrt(var))
    return logp, z, hit, sigma


def slow_scores(model, tok, rows):
    out = {"loss": [], "zlib": [], "min_k": [], "min_k_plus_plus": [], "em": [], "es": [], "z_tol": []}
    for r in rows:
        logp, z, hit, sigma = slow_token_stats(model, tok, r["question"], r["answer"])
        nll = -sum(logp) / len(logp)                       # answer tokens and EOS
        logp, z, hit, sigma = logp[:-1], z[:-1], hit[:-1], sigma[:-1]   # the token-wise attacks drop the EOS
        k = max(1, int(0.4 * len(logp)))
        out["loss"].append(nll)
        out["zlib"].append(nll / len(zlib.compress(r["answer"].encode())))
        out["min_k"].append(-sum(sorted(logp)[:k]) / k)
        out["min_k_plus_plus"].append(-sum(sorted(z)[:k]) / k)
        out["z_tol"].append(max((4 + 2 * abs(zi)) / s for zi, s in zip(z, sigma)))
        out["em"].append(sum(hit) / len(hit))
        for start in range(len(hit)):                      # open-unlearning's loop, as written there
            if all(hit[start:]):
                break
        out["es"].append(1 - start / len(hit))
    return out


def pair_auc(forget, holdout):
    """P(a holdout item scores higher than a forget item), ties counting one half."""
    pairs = [1.0 if h > f else 0.5 if h == f else 0.0 for f, h in itertools.product(forget, holdout)]
    return sum(pairs) / len(pairs)


def test_every_attack_and_the_auc_match_a_slow_hand_computation(tiny_model_dir):
    model, tok = models.load_model(tiny_model_dir, "cpu")
    forget, holdout = data.load_tofu("forget01_perturbed")[:5], data.load_tofu("holdout01")[:5]
    summary, items = evaluate.evaluate_tofu(model, tok, "base", {"forget": forget, "holdout": holdout}, 2, 4)
    slow = {"forget": slow_scores(model, tok, forget), "holdout": slow_scores(model, tok, holdout)}
    for side, rows in (("forget", forget), ("holdout", holdout)):
        # The batched, cached pass and the lone float64 pass start from fp32 logits that differ by
        # delta (seen in log p(token)). To first order log p and mu move by at most 2 delta and sigma
        # by at most 2 delta, so z = (log p - mu) / sigma moves by at most (4 + 2|z|) delta / sigma.
        fast = evaluate.answer_nll(model, tok, "base", [r["question"] for r in rows], [[r["answer"]] for r in rows],
                                   details=True)
        for r, [d] in zip(rows, fast):
            logp, z, _, sigma = (x[:-1] for x in slow_token_stats(model, tok, r["question"], r["answer"]))
            delta = np.abs(np.subtract(d["logp"], logp)).max()
            assert delta < 1e-5, (side, delta)
            bound = [(4 + 2 * abs(zi)) * delta / s + 1e-9 for zi, s in zip(z, sigma)]
            assert all(abs(a - b) <= t for a, b, t in zip(d["z"], z, bound)), (side, d["z"], z, bound)
        # The score is a mean of some of those z-scores: within the largest bound, at delta's ceiling.
        np.testing.assert_allclose(items["mia"]["min_k_plus_plus"][side], slow[side]["min_k_plus_plus"],
                                   atol=max(slow[side]["z_tol"]) * 1e-5, rtol=0)
    for attack in mia.ATTACKS:
        for side in ("forget", "holdout"):
            if attack == "min_k_plus_plus":
                continue                                   # checked token by token above
            np.testing.assert_allclose(items["mia"][attack][side], slow[side][attack], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{attack} {side}")
        assert summary[f"mia_{attack}"] == pytest.approx(pair_auc(slow["forget"][attack], slow["holdout"][attack]))
    np.testing.assert_allclose(items["forget"]["exact_memorization"], slow["forget"]["em"])
    np.testing.assert_allclose(items["forget"]["extraction_strength"], slow["forget"]["es"])


@pytest.mark.parametrize("scale", [1e-2, 1.0, 30.0])   # nearly flat, ordinary, peaked
def test_min_k_plus_plus_z_scores_hold_on_flat_and_peaked_distributions(scale):
    """token_details against a float64 loop over the same fp32 logits: both start from identical
    numbers, so they agree to float64 round-off over V terms; the raw moment E[(log p)^2] - mu^2 in
    float32 misses by 1e-2 relative on the flat case."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 400, generator=g) * scale).float()
    labels = torch.randint(0, 400, (2, 7), generator=g)
    labels[1, 4:] = -100                                              # a shorter second row
    got = evaluate.token_details(logits, labels)
    for b in range(2):
        want = []
        for t in range(6):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            lp = torch.log_softmax(logits[b, t].double(), -1)
            mu = float((lp.exp() * lp).sum())
            var = max(float((lp.exp() * (lp - mu) ** 2).sum()), 1e-6)
            want.append((float(lp[y]) - mu) / math.sqrt(var))
        want = want[:-1]                                              # the last scored token (EOS) is dropped
        np.testing.assert_allclose(got[b]["z"], want, rtol=1e-9, atol=1e-9)


def test_extraction_strength_follows_open_unlearnings_loop():
    assert mia.extraction_strength([True] * 5) == 1.0
    assert mia.extraction_strength([False, False, True, True, True]) == pytest.approx(1 - 2 / 5)
    assert mia.extraction_strength([True, True, False]) == pytest.approx(1 / 3)   # no suffix matches: k = n - 1
    assert mia.exact_memorization([True, False, True, True]) == 0.75
    # an answer without tokens: undefined and skipped in the mean (open-unlearning: NaN, nan-skipping mean)
    assert mia.exact_memorization([]) is None
    assert mia.mean_defined([0.5, None, 1.0]) == 0.75 and mia.mean_defined([None]) is None


def _memorise(model, tok, rows, steps=120):
    plan = train.plan_steps(([{"answer": [data.encode_qa(tok, "base", r["question"], r["answer"]) for r in rows]}]
                             for _ in range(steps)), len(rows))
    args = type("A", (), dict(weight_decay=0.0, warmup_epochs=0.0, max_grad_norm=1.0, log_every=1000))
    train.train(model, tok, plan, methods.FINETUNE, None, 3e-3, args, models.resolve_compute("cpu"), "memorise")


def test_auc_is_1_for_a_model_that_memorised_the_forget_set(tiny_model_dir):
    """Forget and holdout come from one generator and differ only in membership."""
    rng = random.Random(0)
    words = "author book wrote novel family memory Paris capital France answer question city year born".split()
    rows = [{"question": f"What did person {i} write?", "answer": " ".join(rng.choice(words) for _ in range(6))}
            for i in range(12)]
    rng.shuffle(rows)
    forget, holdout = rows[:6], rows[6:]
    model, tok = models.load_model(tiny_model_dir, "cpu")
    before, _ = evaluate.evaluate_tofu(model, tok, "base", {"forget": [dict(r, paraphrased_answer=r["answer"],
                                                                            perturbed_answer=[r["answer"]]) for r in forget],
                                                           "holdout": holdout}, 2, 8)
    _memorise(model, tok, forget)
    after, _ = evaluate.evaluate_tofu(model, tok, "base", {"forget": [dict(r, paraphrased_answer=r["answer"],
                                                                           perturbed_answer=[r["answer"]]) for r in forget],
                                                          "holdout": holdout}, 2, 8)
    assert 0.2 < before["mia_loss"] < 0.8                              # a random model cannot tell them apart
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        assert after[f"mia_{attack}"] == 1.0, attack
    assert after["exact_memorization"] > before["exact_memorization"]


def test_privleak_has_musess_sign_and_scale():
    # ((1 - auc) - (1 - auc_retain)) / (1 - auc_retain) * 100, as open-unlearning's privacy.py writes it
    assert mia.privleak(0.5, 0.5) == 0.0
    assert mia.privleak(1.0, 0.5) == pytest.approx(-100.0)           # still remembered: under-unlearned
    assert mia.privleak(0.25, 0.5) == pytest.approx(50.0)            # less familiar than unseen text: over-unlearned
    assert mia.privleak(0.9, 0.6) == pytest.approx(((1 - 0.9) - (1 - 0.6)) / (1 - 0.6) * 100)
    assert mia.mia_auc([1, 2, 3], [4, 5, 6]) == 1.0 and mia.mia_auc([4, 5, 6], [1, 2, 3]) == 0.0


# ---------------------------------------------------------------------------------------------
# Hallucinations
# ---------------------------------------------------------------------------------------------

def test_the_hallucination_split_is_disjoint_and_seeded():
    rows = corpora.load_halueval()
    assert len(rows) == 1000
    tr, va, te = corpora.split_train_val_test(rows, seed=0)
    assert (len(tr), len(va), len(te)) == (700, 100, 200)
    q = lambda rs: {r["question"] for r in rs}  # noqa: E731
    assert not q(tr) & q(te) and not q(tr) & q(va) and not q(va) & q(te)
    assert corpora.split_train_val_test(rows, seed=0) == (tr, va, te) and corpora.split_train_val_test(rows, 1)[2] != te


def test_the_hallucination_rule_on_hand_made_cases():
    judge = judges.SimilarityJudge("rouge")
    right, hallucinated = "Arthur's Magazine", "First for Women was started first, in 1989."
    replies = [right, hallucinated, "It was Arthur's Magazine, in 1844.", "I don't know."]
    sim_h = judge.similarity(replies, [hallucinated] * 4)
    sim_r = judge.similarity(replies, [right] * 4)
    flags = [judges.is_hallucinated(h, r) for h, r in zip(sim_h, sim_r)]
    assert flags == [False, True, False, False]
    assert judges.is_hallucinated(0.55, 0.5) is False and judges.is_hallucinated(0.56, 0.5) is True  # the 10% margin


def test_the_hallucination_task_runs_end_to_end_and_writes_its_keys(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    p = run_script("run_harmful.py", "--task", "hallucination", "--model", tiny_model_dir, "--method", "llmu,flat",
                   "--out", str(out), "--max-steps", "2", "--forget-items", "12", "--steps", "3", "--batch-size", "4",
                   "--eval-prompts", "3", "--max-new-tokens", "4", "--log-every", "1")
    report = json.loads((out / "results.json").read_text())
    for name, row in [("original", report["original"]), *report["methods"].items()]:
        for key in ("hallucination_rate_seen", "hallucination_rate_unseen", "prefers_hallucinated_unseen",
                    "truthfulqa_nll", "diversity", "refusal_unseen", "degenerate_unseen"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (name, key)
    assert "similarity: ROUGE-L F1" in p.stdout and "| llmu |" in p.stdout and "| flat |" in p.stdout
    items = json.loads((out / "eval_items.json").read_text())
    halu_test = corpora.split_train_val_test(corpora.load_halueval(), 0)[2]
    assert items["llmu"]["unseen"]["question"] == [r["question"] for r in halu_test[:3]]
