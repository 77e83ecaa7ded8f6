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


# ---------------------------------------------------------------------------------------------
# The fast evaluation (finished rows leave a generation batch; per-token statistics of the first
# answers only) against the previous path, item by item
# ---------------------------------------------------------------------------------------------

class CountingModel(torch.nn.Module):
    """A stub causal LM with known logits: after token t comes (t + 1) mod V, except that EOS follows a
    token >= `stop` (each row's prompt decides how long it runs). Left padding is ignored through the
    attention mask, as a real model ignores it; the cache only records the batch it holds."""

    class Cache:
        def __init__(self, rows):
            self.rows = rows

        def batch_select_indices(self, idx):
            self.rows = self.rows[idx.cpu()]

    def __init__(self, vocab=40, eos=2, stop=30):
        super().__init__()
        self.vocab, self.eos, self.stop, self.calls = vocab, eos, stop, []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, logits_to_keep=1, cache=None, **_):
        self.calls.append(input_ids.shape[0])
        cache = cache or self.Cache(torch.arange(input_ids.shape[0]))
        assert len(cache.rows) == input_ids.shape[0]                    # the cache holds exactly the live rows
        last = input_ids[:, -1]
        nxt = torch.where(last >= self.stop, torch.full_like(last, self.eos), (last + 1) % self.vocab)
        logits = torch.full((input_ids.shape[0], 1, self.vocab), -10.0)
        logits[torch.arange(len(nxt)), 0, nxt] = 10.0
        return type("Out", (), {"logits": logits, "cache": cache})()


def test_generation_stops_each_row_at_its_eos_or_cap_and_drops_it_from_the_batch():
    """Known answers: a prompt ending in t continues t+1, t+2, ... up to `stop`, then EOS. Prompts of
    different lengths (left padding), 5 prompts in batches of 2 (the last batch not full), a cap that
    cuts one row, and an empty generation (a prompt whose next token is EOS)."""
    model, tok = CountingModel(), type("Tok", (), {"pad_token_id": 0, "eos_token_id": 2})()
    prompts = [[5, 27], [9, 9, 9, 29], [31], [12, 20], [3, 25]]       # 31 >= stop: EOS at once
    caps = [10, 10, 10, 4, 10]
    got = evaluate.generate_ids(model, tok, prompts, caps, batch_size=2)
    assert got == [[28, 29, 30], [30], [], [21, 22, 23, 24], [26, 27, 28, 29, 30]]
    # finished rows leave: the rows of each forward pass, batch by batch (prompts by length: [31] with
    # [5, 27]; [12, 20] with [3, 25]; [9, 9, 9, 29]). Without leaving, every pass would hold 2 rows.
    assert model.calls == [2, 1, 1, 1] + [2, 2, 2, 2, 1, 1] + [1, 1]


def test_generation_equals_transformers_generate_on_every_row(tiny):
    """The loop that drops finished rows gives model.generate's greedy texts: questions of different
    lengths, a batch size that does not divide them, a cap shorter than some answers."""
    model, tok = tiny
    prompts = [data.encode_prompt(tok, "base", r["question"]) for r in data.load_tofu("forget01")[:7]]
    for cap in (3, 12):
        got = evaluate.generate_ids(model, tok, prompts, cap, batch_size=3)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for s in range(0, len(order), 3):
            idx = order[s:s + 3]
            b = data.collate([{"input_ids": prompts[i]} for i in idx], tok.pad_token_id)
            gen = model.generate(**b, max_new_tokens=cap, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[:, b["input_ids"].shape[1]:].tolist()
            for i, row in zip(idx, gen):
                want = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
                assert got[i] == want, (cap, i, got[i], want)


def test_token_statistics_of_first_answers_equal_those_scored_alone(tiny):
    """details=True computes per-token statistics for each item's first answer only (membership inference
    reads no other): they equal the first answer scored alone, and the other answers' NLLs equal a pass
    without details, answers of one token and of many in the same batch."""
    model, tok = tiny
    rows = data.load_tofu("forget01_perturbed")[:5]
    qs = [r["question"] for r in rows]
    answers = [[r["answer"], "Yes", *r["perturbed_answer"][:2]] for r in rows]      # "Yes": one token and EOS
    fast = evaluate.answer_nll(model, tok, "base", qs, answers, rows_per_batch=6, details=True)
    plain = evaluate.answer_nll(model, tok, "base", qs, answers, rows_per_batch=6)
    alone = evaluate.answer_nll(model, tok, "base", qs, [[a[0]] for a in answers], rows_per_batch=1, details=True)
    for f, p, a in zip(fast, plain, alone):
        assert isinstance(f[0], dict) and all(isinstance(x, float) for x in f[1:])
        assert f[1:] == p[1:] and abs(f[0]["nll"] - p[0]) == 0
        for key in ("logp", "z"):
            np.testing.assert_allclose(f[0][key], a[0][key], rtol=0, atol=1e-5)
        assert f[0]["hit"] == a[0]["hit"]


def test_an_evaluation_does_not_depend_on_the_models_evaluated_before_it(tiny, tiny_model_dir):
    model, tok = tiny
    other, _ = models.load_model(tiny_model_dir, device="cpu")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sets = {"forget": data.load_tofu("forget01_perturbed")[:3], "holdout": data.load_tofu("holdout01")[:3],
            "ra": data.load_tofu("real_authors_perturbed")[:3]}
    first = evaluate.evaluate_tofu(model, tok, "base", sets, max_new_tokens=6, batch_size=4)
    evaluate.evaluate_tofu(other, tok, "base", sets, max_new_tokens=6, batch_size=4)
    again = evaluate.evaluate_tofu(model, tok, "base", sets, max_new_tokens=6, batch_size=4)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
