"""Every optimisation against the reference pattern: the fast training step gives the same losses
and gradients, and the fast TOFU evaluation the same metric values, on a tiny model."""
import random

import numpy as np
import pytest
import torch

import data
import evaluate
import methods
import models
import train
from bench import speed as bench


def _batch(tok, method, params, seed=0):
    forget = data.load_tofu("forget01")[:6]
    templates = data.load_idk() if method.template else None
    retain = data.load_tofu("retain99")[:40] if method.needs_retain(params) else None
    return data.unlearning_epoch(tok, "base", forget, templates, retain, 3, random.Random(seed))[0]


@pytest.mark.parametrize("name", sorted(methods.LOSSES))
def test_fast_training_step_matches_the_reference_pattern(tiny_model_dir, name):
    model, tok = models.load_model(tiny_model_dir, "cpu")
    method, params = methods.LOSSES[name], methods.LossParams(npo_retain=True)
    ref = models.frozen_copy(model) if method.reference else None
    with torch.no_grad():  # the model must differ from its reference, or KL and NPO terms are trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = _batch(tok, method, params)
    grads = {}
    for impl, fn in [("ours", train.batch_loss), ("reference", bench.reference_batch_loss)]:
        model.zero_grad()
        loss, _ = fn(model, batch, method, params, tok.pad_token_id, ref, **({} if impl == "ours" else {"length": 400}))
        loss.sum().backward()
        grads[impl] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads["ours"][0], grads["reference"][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads["ours"][1], grads["reference"][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fast_tofu_evaluation_matches_the_reference_pattern(tiny_model_dir):
    model, tok = models.load_model(tiny_model_dir, "cpu")
    rows = data.load_tofu("forget01_perturbed")[:5]
    fast, fast_items = evaluate.evaluate_tofu_set(model, tok, "base", "forget", rows, 12, 4)
    slow, slow_items = evaluate.evaluate_tofu_set(
        model, tok, "base", "forget", rows, 12, 4,
        nll_fn=lambda *a, **k: bench.reference_answer_nll(*a, **k, length=200), generate_fn=bench.reference_generate)
    assert fast.keys() == slow.keys()
    for k in fast:
        assert fast[k] == pytest.approx(slow[k], rel=1e-4, abs=1e-6), k
    assert fast_items["generation"] == slow_items["generation"]
    np.testing.assert_allclose(fast_items["perturbed_nll"], slow_items["perturbed_nll"], rtol=1e-4)


def test_bench_runs_and_writes_its_table(tiny_model_dir, tmp_path):
    out = tmp_path / "RESULTS.md"
    bench.main(["--models", tiny_model_dir, "--methods", "flat", "--steps", "1", "--eval-items", "1",
                "--precision", "fp32,bf16", "--out", str(out)])
    text = out.read_text()
    assert "| flat | off | ours |" in text and "| flat | off | reference |" in text
    assert "| flat | off | ours (bf16) |" in text   # ours again at the second precision
    assert "| yes |" in text and "GFLOP/s" in text
    for bad in ("fp32,fp32", "fp32,fp16"):
        with pytest.raises(SystemExit):
            bench.main(["--precision", bad, "--no-eval"])


def test_the_precision_comparison_reports_each_metrics_drift(tmp_path, monkeypatch):
    """`--evaluation --precision bf16`: the two runs are fp32 and bf16 weights of today's code, and the
    drift table reads each metric from the right run (stubbed runs with known numbers)."""
    from bench import evaluation
    seconds = {f"{s}|{k}": 1.0 for s in ("forget", "retain", "ra", "wf") for k in ("scoring", "generation")}
    seconds.update({f"{s}|all": 2.5 for s in ("forget", "retain", "ra", "wf")}, **{"holdout|scoring": 1.0})
    made = []

    def spawn(cfg, module, exact_peak):
        made.append(cfg)
        low = cfg["precision"] == "bf16"
        return {"seconds": {**seconds, "total": 14.0 if low else 11.0},
                "summary": {"model_utility": 0.40 if low else 0.41, "forget_Q_A_Prob": 0.9},
                "items": {"forget": {"generation": ["a", "b" if low else "c"], "prob": [0.9, 0.8]}}}
    monkeypatch.setattr(evaluation, "spawn", spawn)
    out = tmp_path / "EVALUATION.md"
    bench.main(["--evaluation", "--precision", "bf16", "--out", str(out)])
    assert [(c["impl"], c["precision"]) for c in made] == [("now", "fp32"), ("now", "bf16")]
    text = out.read_text()
    assert "| model_utility | 0.41 | 0.4 | -0.01 |" in text and "| forget_Q_A_Prob | 0.9 | 0.9 | +0 |" in text
    assert "Greedy generations that differ: 1 of 2." in text
    assert "| **all** | **everything** | **11.0** | **14.0** | **0.79x** |" in text

