"""What the runners share around their own training loops: flags, optimiser and schedule, the
forward pass that turns a batch of streams into a method's loss, a divergence guard, cached
stages and atomic writes. The loops themselves stay in the runners."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import data
import flat
import models


def arg(default, help: str):
    """A dataclass field with its one-line help, for parse_args."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_args(cls, argv=None):
    """Parse flags into the dataclass `cls` (both --max-steps and --max_steps work); unknown flags fail."""
    from transformers import HfArgumentParser
    parser = HfArgumentParser(cls)
    args, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unknown arguments {rest}")
    return cls(**vars(args))


@dataclasses.dataclass
class LossFlags:
    """The flags of flat.LossParams, shared by the runners: each runner's Args extends this."""
    divergence: str = arg("kl", "flat: FLAT's f-divergence, a key of flat.DIVERGENCES")
    beta: float = arg(0.1, "dpo, npo: beta")
    simnpo_beta: float = arg(2.5, "simnpo: beta")
    simnpo_delta: float = arg(0.0, "simnpo: reward margin")
    retain_weight: float = arg(1.0, "weight of the retain term (gd, kl, idk; npo/simnpo with --npo-retain)")
    npo_retain: bool = arg(False, "npo, simnpo: add the retain NLL")
    eps1: float = arg(0.5, "llmu: gradient-ascent weight")
    eps2: float = arg(1.0, "llmu: random-answer (mismatch) weight")
    eps3: float = arg(1.0, "llmu: KL-to-original weight on the retain data")


def loss_params(args) -> flat.LossParams:
    return flat.LossParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(flat.LossParams)})


def setup_run(args, default_out: str):
    """(run directory, device, whether it is CUDA, training dtype) from the common flags, and the
    Python and torch seeds set."""
    out = Path(args.out or default_out)
    device = args.device or models.default_device()
    cuda = str(device).startswith("cuda")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return out, device, cuda, torch.bfloat16 if cuda and args.precision == "bf16" else torch.float32


def safe_name(name: str) -> str:
    """A model name or path as one directory-name component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def fill_defaults(args, defaults: dict):
    """Set each flag left at None to its value in `defaults` (a protocol, then a model's preset)."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------

def optimizer_and_schedule(model, lr: float, weight_decay: float, warmup_steps: int, total_steps: int):
    """AdamW (no decay on biases and norm weights) with linear warmup then linear decay to zero."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def autocast(device: str, enabled: bool):
    """bf16 autocast over fp32 master weights on CUDA. Pure bf16 weights would round most AdamW
    updates at lr ~1e-5 away (bf16 keeps 8 bits of mantissa), so training keeps fp32 weights."""
    if enabled and str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def check_finite(loss: torch.Tensor, step: int, stage: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{stage}: the loss is {loss.item()} at step {step}; stopping without saving "
                                 f"(try a lower --lr)")


def check_finite_weights(model, step: int, stage: str) -> None:
    """After the last step no forward pass shows the damage: look at the weights before saving."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise FloatingPointError(f"{stage}: the weights are not finite after step {step}; stopping without "
                                 f"saving (try a lower --lr)")


def train_loop(model, epoch_batches, loss_fn, n_examples: int, lr: float, epochs: int, args, stage: str,
               device: str) -> list[dict]:
    """The explicit loop: AdamW, warmup then linear decay, gradient accumulation and clipping,
    a divergence check every micro-batch, a progress bar and one log line every --log-every steps.
    epoch_batches(epoch) gives an epoch's batches, loss_fn(model, batch) their per-sample loss and
    diagnostics. `args` supplies batch_size, grad_accum, max_steps, weight_decay,
    warmup_epochs, max_grad_norm, precision and log_every. Returns the logged records (the training log)."""
    n_batches = -(-n_examples // args.batch_size)
    per_epoch, total = steps_for(n_batches, args.grad_accum, epochs, args.max_steps)
    opt, sched = optimizer_and_schedule(model, lr, args.weight_decay, round(args.warmup_epochs * per_epoch), total)
    cuda = str(device).startswith("cuda")
    model.train()
    log, step, micro, window, t_last = [], 0, 0, [], time.time()
    bar = tqdm(total=total, desc=stage, leave=False)
    for epoch in range(epochs):
        for batch in epoch_batches(epoch):
            with autocast(device, cuda and args.precision == "mixed"):
                loss, diag = loss_fn(model, batch)
                loss = loss.mean()
            check_finite(loss, step, stage)
            (loss / args.grad_accum).backward()
            micro += 1
            window.append({"loss": loss.item(), **diag})
            if micro % args.grad_accum and micro < epochs * n_batches:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            if step % args.log_every == 0 or step == total:
                now = time.time()
                mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                line = log_line(stage, step, total, mean.pop("loss"), sched.get_last_lr()[0],
                                      (now - t_last) / len(window) * args.grad_accum, mean)
                tqdm.write(line)
                log.append({"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0],
                                    "loss": float(np.mean([w["loss"] for w in window])), **mean})
                window, t_last = [], now
            if step >= total:
                break
        if step >= total:
            break
    bar.close()
    check_finite_weights(model, step, stage)
    model.eval()
    return log


# ---------------------------------------------------------------------------------------------
# Forward pass: one batch of streams -> statistics -> loss
# ---------------------------------------------------------------------------------------------

def batch_loss(model, batch: dict[str, list[dict]], method: flat.Method, params: flat.LossParams,
               pad_id: int, ref_model=None) -> tuple[torch.Tensor, dict]:
    """The method's per-sample loss (B,) for one unlearning batch, and detached diagnostics.

    All streams (forget, template, retain rows) go through one forward pass, padded together to the
    batch's longest row; their statistics come from flat.sequence_stats on slices of the logits.
    The frozen reference, when the method has one, runs on the same rows without gradients.
    """
    streams = [s for s in data.STREAMS if s in batch]
    sizes = [len(batch[s]) for s in streams]
    b = data.collate([row for s in streams for row in batch[s]], pad_id)
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in b.items()}
    logits, labels = models.answer_logits(model, b)  # (sum B_s, k, V), (sum B_s, k)
    rows, start = {}, 0
    for s, n in zip(streams, sizes):
        rows[s], start = slice(start, start + n), start + n
    stats = {s: flat.sequence_stats(logits[rows[s]], labels[rows[s]]) for s in streams}
    ref_streams = [s for s in streams if s in method.reference] if ref_model is not None else []
    if ref_streams:  # the reference runs only on the rows its terms read
        lo, hi = rows[ref_streams[0]].start, rows[ref_streams[-1]].stop  # streams are contiguous
        first = int(b["attention_mask"][lo:hi].any(0).int().argmax())      # drop columns that are all padding
        with torch.no_grad():
            ref_logits, ref_labels = models.answer_logits(ref_model, {k: v[lo:hi, first:] for k, v in b.items()})
        k = min(ref_logits.shape[1], logits.shape[1])
        for s in ref_streams:
            r = slice(rows[s].start - lo, rows[s].stop - lo)
            if s == "retain":
                stats["retain_kl"] = flat.kl_to_reference(logits[rows[s], -k:], ref_logits[r, -k:],
                                                          labels[rows[s], -k:])
            else:
                stats["ref_" + s] = flat.sequence_stats(ref_logits[r], ref_labels[r])
    loss = method.call(stats, params)
    diag = {f"p_{s}": stats[s].prob_mean.mean().item() for s in streams}
    if "retain_kl" in stats:
        diag["retain_kl"] = stats["retain_kl"].mean().item()
    return loss, diag


def finetune_loss(model, rows: list[dict], pad_id: int) -> tuple[torch.Tensor, dict]:
    """Per-sample mean answer-token NLL (B,) for fine-tuning on QA pairs."""
    b = {k: v.to(next(model.parameters()).device) for k, v in data.collate(rows, pad_id).items()}
    stats = flat.sequence_stats(*models.answer_logits(model, b))
    return -stats.logp_mean, {"p_answer": stats.prob_mean.mean().item()}


# ---------------------------------------------------------------------------------------------
# Stages, logs and files
# ---------------------------------------------------------------------------------------------

def stage_dir(root: Path, name: str, key: dict) -> Path:
    """A stage's directory, named by a hash of everything its output depends on, so that a rerun
    with the same settings finds it and other settings get their own."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return root / f"{name}-{digest}"


def is_saved_model(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def save_model_atomic(model, tokenizer, path: Path, extra: dict[str, object]) -> None:
    """save_pretrained (safetensors) into a temporary directory renamed into place at the end,
    so an interrupted run never leaves a half-written model that a rerun would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a saved model is an ordinary directory
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, obj in extra.items():
        write_json(tmp / name, obj)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def log_line(stage: str, step: int, total: int, loss: float, lr: float, sec_per_step: float, diag: dict) -> str:
    """The one fixed-format line logged every --log-every optimiser steps."""
    extra = " ".join(f"{k} {v:.4f}" for k, v in diag.items())
    return f"[{stage}] step {step:>5}/{total} | loss {loss:.4f} | lr {lr:.2e} | {sec_per_step:.2f} s/step | {extra}"


def steps_for(n_batches: int, grad_accum: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(optimiser steps per epoch, total optimiser steps), the total capped by max_steps."""
    per_epoch = math.ceil(n_batches / grad_accum)
    total = per_epoch * epochs
    return per_epoch, min(total, max_steps) if max_steps else total


@contextmanager
def timed(times: dict, name: str):
    """Record the wall time of a block in times[name], in seconds."""
    t = time.time()
    yield
    times[name] = round(time.time() - t, 1)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)
