"""evaluate.py: TOFU metrics against the TOFU authors' published logs and against slow versions."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import evaluate
import methods
import models

LOGS = Path(__file__).parent / "fixtures" / "tofu_logs"
FULL, RETAIN90 = LOGS / "ft_epoch5_lr1e-05_llama2-7b_full_wd0.01", LOGS / "ft_epoch5_lr1e-05_llama2-7b_retain90_wd0.01"


def log_values(path, key):
    d = json.load(open(path))[key]
    return np.array([d[str(i)] for i in range(len(d))], dtype=float)


def summary_from_log(path, name):
    """One eval set's three numbers, computed with evaluate.py's functions from a published log."""
    gt = log_values(path, "avg_gt_loss")
    pert = log_values(path, "average_perturb_loss")
    correct = gt if name in ("ra", "wf") else log_values(path, "avg_paraphrased_loss")
    r = evaluate.truth_ratio(correct, pert)
    p = np.exp(-gt) / (np.exp(-gt) + np.exp(-pert).sum(1)) if name in ("ra", "wf") else np.exp(-gt)
    prob_key = f"{name}_Q_A_Prob" + ("_normalised" if name in ("ra", "wf") else "")
    return {prob_key: p.mean(), f"{name}_Q_A_ROUGE": log_values(path, "rougeL_recall").mean(),
            f"{name}_Truth_Ratio": evaluate.truth_ratio_score(r, forget=False)}


def test_model_utility_of_the_published_llama2_full_model():
    scores = {**summary_from_log(FULL / "eval_log.json", "retain"),
              **summary_from_log(FULL / "eval_real_author_wo_options.json", "ra"),
              **summary_from_log(FULL / "eval_real_world_wo_options.json", "wf")}
    assert f"{evaluate.model_utility(scores):.3g}" == "0.623"  # published: 0.6227
    assert f"{scores['retain_Q_A_Prob']:.4f}" == "0.9895" and f"{scores['ra_Truth_Ratio']:.3f}" == "0.596"


def test_forget_quality_of_the_published_llama2_full_model_against_retain90():
    def tr(path):
        return evaluate.truth_ratio(log_values(path, "avg_paraphrased_loss"), log_values(path, "average_perturb_loss"))
    fq = evaluate.forget_quality(tr(FULL / "eval_log_forget.json"), tr(RETAIN90 / "eval_log_forget.json"))
    assert f"{fq:.3g}" == "1.83e-21"
    # the logs' own truth_ratio field is 1/R; the KS p-value does not care
    assert math.isclose(fq, evaluate.forget_quality(log_values(FULL / "eval_log_forget.json", "truth_ratio"),
                                                    log_values(RETAIN90 / "eval_log_forget.json", "truth_ratio")))


def test_truth_ratio_matches_a_slow_loop():
    rng = np.random.default_rng(0)
    c, p = rng.uniform(0.1, 4, 7), rng.uniform(0.1, 4, (7, 5))
    slow = []
    for i in range(7):
        pbar = math.exp(sum(-x for x in p[i]) / 5)  # geometric mean of exp(-nll_k)
        slow.append(pbar / math.exp(-c[i]))
    np.testing.assert_allclose(evaluate.truth_ratio(c, p), slow, rtol=1e-12)
    with pytest.raises(ValueError, match=r"\(N,\) and \(N, K\)"):
        evaluate.truth_ratio(c, p[:3])


def test_forget_quality_at_complete_separation_is_the_ks_floor():
    n = 40  # forget01: the smallest p-value a 40 vs 40 KS test can give is 2 / C(80, 40)
    assert math.isclose(evaluate.forget_quality(np.arange(n), np.arange(n) + 100), 2 / math.comb(2 * n, n), rel_tol=1e-6)
    assert evaluate.forget_quality(np.arange(n), np.arange(n)) == 1.0


def test_model_utility_is_a_harmonic_mean_and_zero_with_any_zero():
    scores = dict(zip(evaluate.UTILITY_KEYS, [0.5] * 8 + [0.25]))
    assert math.isclose(evaluate.model_utility(scores), 9 / (8 / 0.5 + 1 / 0.25))
    assert evaluate.model_utility({**scores, "ra_Q_A_ROUGE": 0.0}) == 0.0
    with pytest.raises(KeyError, match="wf_Truth_Ratio"):
        evaluate.model_utility({k: 1 for k in evaluate.UTILITY_KEYS[:-1]})


def test_rouge_l_recall_counts_the_longest_common_subsequence():
    # LCS("the cat sat on the mat", "the cat on mat") = "the cat on mat": 4 of 6 reference words
    assert evaluate.rouge_l_recall(["the cat on mat"], ["the cat sat on the mat"]) == [pytest.approx(4 / 6)]
    assert evaluate.rouge_l_recall(["Writing books"], ["He writes a book"]) == [pytest.approx(2 / 4)]  # stemmed


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load_model(tiny_model_dir, device="cpu")


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_batched_answer_nll_equals_one_sequence_at_a_time(tmp_path, arch):
    from conftest import make_tiny_model
    model, tok = models.load_model(make_tiny_model(tmp_path / arch, arch), device="cpu")
    rows = data.load_tofu("forget01_perturbed")[:5]
    qs = [r["question"] for r in rows]
    answers = [[r["answer"], r["paraphrased_answer"]] + r["perturbed_answer"] for r in rows]
    fast = evaluate.answer_nll(model, tok, "base", qs, answers, rows_per_batch=16)
    assert [len(f) for f in fast] == [7] * 5
    for q, ans, got in zip(qs, answers, fast):
        for a, g in zip(ans, got):
            enc = data.encode_qa(tok, "base", q, a)
            ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor(enc["labels"])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            pos = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
            slow = -sum(float(logp[t, labels[t + 1]]) for t in pos) / len(pos)
            assert math.isclose(g, slow, rel_tol=1e-4), (g, slow)


def test_texts_of_unequal_length_score_the_same_batched_as_alone(tiny):
    """No token is scored from a padding position: a shorter text in a left-padded batch scores the
    same tokens with the same log-probabilities as alone (its first token never)."""
    import corpora
    import train
    model, tok = tiny
    ids = tok("Basil Mahfouz Al-Kuwaiti writes novels about family and memory in 1990.",
              add_special_tokens=False).input_ids
    texts = [ids, ids[:7], ids[3:12]]
    batched = evaluate.text_scores(model, texts, tok.pad_token_id, batch_size=3)
    for text, got in zip(texts, batched):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([text])).logits[0].double(), -1)
        slow = [float(logp[t, text[t + 1]]) for t in range(len(text) - 1)]   # every token after the first
        assert got["n"] == len(slow)
        np.testing.assert_allclose(got["logp"], slow, rtol=1e-4, atol=1e-5)
    # fine-tuning on text (corpora.text_row) likewise: the batch's per-row loss is each row's loss alone
    rows = [corpora.text_row(t) for t in texts]
    loss, _ = train.batch_loss(model, {"answer": rows}, methods.FINETUNE, None, tok.pad_token_id)
    for row, l in zip(rows, loss):
        alone, _ = train.batch_loss(model, {"answer": [row]}, methods.FINETUNE, None, tok.pad_token_id)
        assert math.isclose(float(l.detach()), float(alone[0].detach()), rel_tol=1e-4)


def test_batched_generation_equals_unbatched_greedy_decoding(tiny):
    model, tok = tiny
    qs = [r["question"] for r in data.load_tofu("forget01")[:6]]
    batched = evaluate.generate(model, tok, "base", qs, max_new_tokens=8, batch_size=4)
    for q, b in zip(qs, batched):
        ids = torch.tensor([data.encode_prompt(tok, "base", q)])
        with torch.no_grad():
            for _ in range(8):  # greedy, no cache
                nxt = model(input_ids=ids).logits[0, -1].argmax()
                if int(nxt) == tok.eos_token_id:
                    break
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
        want = tok.decode(ids[0, len(data.encode_prompt(tok, "base", q)):], skip_special_tokens=True).strip()
        assert b == want


def test_evaluate_tofu_reports_every_key(tiny):
    model, tok = tiny
    sets = {"forget": data.load_tofu("forget01_perturbed")[:4], "retain": data.load_tofu("retain_perturbed")[:4],
            "ra": data.load_tofu("real_authors_perturbed")[:4], "wf": data.load_tofu("world_facts_perturbed")[:4]}
    summary, logs = evaluate.evaluate_tofu(model, tok, "base", sets, max_new_tokens=4)
    assert set(summary) == {"forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio", "model_utility",
                            *evaluate.UTILITY_KEYS}
    assert all(np.isfinite(v) for v in summary.values())
    assert len(logs["forget"]["truth_ratio"]) == 4 and len(logs["ra"]["perturbed_nll"][0]) == 3
