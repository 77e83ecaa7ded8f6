"""The CUDA code path, run on the CPU: bf16 autocast over fp32 weights ("mixed"), bf16 weights, and
gradient checkpointing, for every method's training step, against the fp32 path; and plain runs
need no distributed environment."""
import os
import random

import pytest
import torch

import data
import distributed
import methods
import models
import stages
import train


def _batch(tok, method, params):
    forget = data.load_tofu("forget01")[:4]
    templates = {"refusal": data.load_idk(), "random": [r["answer"] for r in data.load_tofu("retain99")[:20]],
                 None: None}[method.template]
    retain = data.load_tofu("retain99")[:20] if method.needs_retain(params) else None
    return data.unlearning_epoch(tok, "base", forget, templates, retain, 4, random.Random(0))[0]


def _step(path, name, compute):
    """One training step of a method in the given precision: (per-row loss, gradient norm)."""
    model, tok, ref = stages.training_model(path, compute, reference=bool(methods.LOSSES[name].reference))
    torch.manual_seed(0)
    with torch.no_grad():  # the model must differ from its reference, or KL and NPO terms are trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.train()
    method, params = methods.LOSSES[name], methods.LossParams(npo_retain=True)
    with compute.autocast():
        loss, diag = train.batch_loss(model, _batch(tok, method, params), method, params, tok.pad_token_id, ref)
    loss.sum().backward()
    grads = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g) for g in grads)
    assert all(torch.isfinite(v).all() for v in diag.values())
    return loss.detach().float(), float(torch.stack(grads).norm())


@pytest.mark.parametrize("name", sorted(methods.LOSSES))
def test_mixed_and_bf16_paths_with_checkpointing_match_fp32(tiny_model_dir, name):
    fp32 = _step(tiny_model_dir, name, models.Compute("cpu", "fp32", False))
    for precision in ("mixed", "bf16"):
        compute = models.Compute("cpu", precision, True)
        assert compute.train_dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        loss, grad_norm = _step(tiny_model_dir, name, compute)
        # bf16 keeps 8 bits of mantissa: agreement to a few percent is what the format allows
        torch.testing.assert_close(loss, fp32[0], rtol=3e-2, atol=3e-2, msg=lambda m: f"{name} {precision}: {m}")
        assert grad_norm == pytest.approx(fp32[1], rel=0.1), (name, precision)


def test_autocast_really_computes_in_bf16_on_cpu():
    compute = models.Compute("cpu", "mixed", False)
    a = torch.randn(4, 4)
    with compute.autocast():
        assert (a @ a).dtype == torch.bfloat16
    with models.Compute("cpu", "fp32", False).autocast():
        assert (a @ a).dtype == torch.float32


def test_resolve_compute_decides_once_and_rejects_unknown_devices():
    c = models.resolve_compute("cpu")
    assert (c.precision, c.gradient_checkpointing, c.train_dtype, c.eval_dtype) == ("fp32", False, torch.float32, torch.float32)
    assert models.resolve_compute("cpu", "mixed").eval_dtype == torch.bfloat16
    for device in ("foo", "cuda:7" if not torch.cuda.is_available() else "cuda:999"):
        with pytest.raises(ValueError, match="device"):
            models.resolve_compute(device)
    with pytest.raises(ValueError, match="precision"):
        models.resolve_compute("cpu", "fp16")


def test_a_plain_run_needs_no_distributed_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.launched()
    assert distributed.init("cpu") == "cpu"
    assert not torch.distributed.is_initialized() and distributed.world() == 1 and distributed.is_main()
    assert "WORLD_SIZE" not in os.environ
