"""Membership inference and memorisation, as open-unlearning defines them (locuslab/open-unlearning,
src/evals/metrics/mia/*, privacy.py, memorization.py), as pure functions of per-token statistics.

One scoring pass per model (evaluate.answer_nll(..., details=True)) gives, for every answer, its
mean token NLL over the answer and its EOS, and per answer token (EOS excluded, as open-unlearning's
tokenwise_logprobs drops the last labelled position): the log-probability of the token, the
Min-K%++ z-score of that log-probability under the model's own next-token distribution, and
whether the model's argmax is the token. Every attack reads those; none runs the model again.

Orientation: each attack's score is loss-like (higher = less likely to be training data), and
mia_auc labels the forget set 0 and the holdout set 1, so the AUC is 1 when the model finds the
forget set much more likely than the holdout (it still remembers it) and 0.5 when it cannot tell.
"""
from __future__ import annotations

import zlib

import numpy as np
import scipy.stats

MIN_K = 0.4  # open-unlearning's TOFU configs (mia_min_k.yaml, mia_min_k_plus_plus.yaml)
ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")


def loss_score(nll: float) -> float:
    """LOSS attack: the answer's mean token NLL (answer tokens and EOS)."""
    return float(nll)


def zlib_score(nll: float, text: str) -> float:
    """zlib attack (Carlini et al. 2021): the mean NLL divided by the zlib-compressed length of the
    answer text in bytes (open-unlearning decodes the answer's label tokens; here the answer string)."""
    return float(nll) / max(len(zlib.compress(text.encode("utf-8"))), 1)


def min_k_score(values, k: float = MIN_K) -> float:
    """Min-K% (Shi et al. 2024): minus the mean of the lowest max(1, int(n k)) per-token values
    (log-probabilities for Min-K%, z-scores for Min-K%++). 0 for an answer without tokens."""
    v = np.sort(np.asarray(values, float))
    if not len(v):
        return 0.0
    return float(-v[:max(1, int(len(v) * k))].mean())


def attack_scores(items: list[dict], texts: list[str], k: float = MIN_K) -> dict[str, list[float]]:
    """Every attack's per-item score from the token statistics of evaluate.answer_nll(details=True)
    ({nll, logp, z, hit} per answer) and the answer texts."""
    return {"loss": [loss_score(d["nll"]) for d in items],
            "zlib": [zlib_score(d["nll"], t) for d, t in zip(items, texts)],
            "min_k": [min_k_score(d["logp"], k) for d in items],
            "min_k_plus_plus": [min_k_score(d["z"], k) for d in items]}


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random
    negative, ties counting one half (the Mann-Whitney U statistic over n_pos * n_neg)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if not n_pos or not n_neg:
        raise ValueError("roc_auc needs both classes")
    ranks = scipy.stats.rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mia_auc(forget_scores, holdout_scores) -> float:
    """AUC of telling the forget set (label 0) from the holdout set (label 1) by a loss-like score:
    1 when every forget item scores lower (is more likely) than every holdout item."""
    scores = np.concatenate([np.asarray(forget_scores, float), np.asarray(holdout_scores, float)])
    labels = np.r_[np.zeros(len(forget_scores), bool), np.ones(len(holdout_scores), bool)]
    return roc_auc(scores, labels)


def privleak(auc: float, auc_retain: float) -> float:
    """PrivLeak (MUSE, Shi et al. 2024; open-unlearning privacy.py): the relative change, in percent,
    of 1 - AUC against a model that never trained on the forget set (the retain model on TOFU, the
    base model on books and MUSE-News), ((1 - auc) - (1 - auc_retain)) / (1 - auc_retain) * 100.
    About 0 is ideal; strongly negative = the forget set still looks like training data
    (under-unlearned); positive = it looks less familiar than text never seen (over-unlearned)."""
    ref = 1 - auc_retain
    return float(((1 - auc) - ref) / (ref + 1e-10) * 100)


def exact_memorization(hits) -> float | None:
    """Share of answer tokens (EOS excluded) where the model's teacher-forced argmax is the token;
    None (undefined) for an answer without tokens, as open-unlearning's mean over none is NaN."""
    h = np.asarray(hits, float)
    return float(h.mean()) if len(h) else None


def mean_defined(values) -> float | None:
    """The mean of the values that are defined (not None), None when none is: open-unlearning's
    nan-skipping mean of per-item scores."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def extraction_strength(hits) -> float:
    """1 - k/n, k the smallest offset from which every teacher-forced argmax matches the answer to its
    end (n answer tokens, EOS excluded). As in open-unlearning's loop, an answer whose last token is
    not matched leaves k = n - 1, so it scores 1/n, not 0; an answer without tokens scores 0."""
    h = np.asarray(hits, bool)
    n = len(h)
    if not n:
        return 0.0
    k = n - 1
    for start in range(n):
        if h[start:].all():
            k = start
            break
    return 1 - k / n
