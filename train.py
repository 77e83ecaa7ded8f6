"""The training loop every stage runs, and what it is built from.

    epochs of batches --plan_steps--> list of optimiser steps, each a list of this rank's micro-batches
    train(model, plan, loss_fn, ...)   one loop over that list: forward, weighted backward, clip, step

A data builder (data.unlearning_epoch, data.finetune_epoch, ...) cuts an epoch into batches of the
rows one optimiser step trains on (batch_size x grad_accum x processes); plan_steps cuts each of
them into micro-batches and gives every row the weight 1 / (rows in its step). So the steps taken
are the list's length, the learning-rate schedule is planned from that same length, a step never
mixes two epochs, and a short last step is the mean over the rows it has.

Also here: flags (a dataclass per runner, each field with its help, the stages it matters to and
its valid range), stage keys derived from the resolved flags, the forward pass from a batch of
streams to a method's loss, atomic writes and the run directory's lock.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

import data
import distributed
import flat
import models

# ---------------------------------------------------------------------------------------------
# Flags: one dataclass per runner; each field declares its help, its stages and its valid range
# ---------------------------------------------------------------------------------------------

STAGES = ("finetune", "unlearn", "eval")


class UsageError(ValueError):
    """A flag or setting that cannot work: reported as one `error:` line, exit 2, before any work."""


class Check(NamedTuple):
    """A valid range of a numeric flag: the test and how the error message states it."""
    ok: Callable[[float], bool]
    says: str


POSITIVE = Check(lambda v: v > 0, "> 0")
NON_NEGATIVE = Check(lambda v: v >= 0, ">= 0")
AT_LEAST_1 = Check(lambda v: v >= 1, ">= 1")
FRACTION = Check(lambda v: 0 < v < 1, "in (0, 1)")


def one_of(*names: str) -> Check:
    return Check(lambda v: v in names, "one of " + ", ".join(names))


def arg(default, help: str, only: tuple | None = None, check: Check | None = None):
    """A flag: a dataclass field with its one-line help. only: the stages (STAGES) whose output the
    flag changes, for stage keys; None means every stage (the safe default: a flag wrongly left
    in a key costs a cache miss, one wrongly left out a stale result). check: its valid range."""
    return dataclasses.field(default=default, metadata={"help": help, "only": only, "check": check})


@dataclasses.dataclass
class RunArgs(flat.LossParams):
    """The flags every runner has; each runner's Args extends this (and flat.LossParams, whose fields
    are the loss hyperparameters)."""
    model: str = arg("smollm2-135m", "model alias (models.MODELS), local directory or Hub id")
    method: str = arg("flat", "unlearning loss(es): a key of flat.LOSSES, a comma-separated list "
                              "(flat:kl,flat:js,npo: FLAT with each divergence) or 'all'", only=())
    weight_decay: float = arg(0.01, "AdamW weight decay", check=NON_NEGATIVE)
    max_grad_norm: float = arg(1.0, "gradient clipping norm", check=POSITIVE)
    max_steps: int | None = arg(None, "cap on optimiser steps in every training stage (smoke runs)", check=AT_LEAST_1)
    eval_every: int = arg(0, "evaluate every N optimiser steps of unlearning, and at step 0 (0: never)",
                          only=("unlearn",), check=NON_NEGATIVE)
    out: str | None = arg(None, "run directory (default: runs/RUNNER-MODEL-...)", only=())
    device: str | None = arg(None, "cpu, cuda or cuda:N (default: cuda when available)", only=())
    precision: str = arg("auto", "fp32, mixed (fp32 weights, bf16 autocast) or bf16 (bf16 weights); auto: mixed "
                                 "on CUDA, fp32 elsewhere", only=(), check=Check(lambda v: v in models.PRECISIONS,
                                                                                 "one of " + ", ".join(models.PRECISIONS)))
    gradient_checkpointing: bool | None = arg(None, "recompute activations in backward (default: on for CUDA)",
                                              only=())
    trust_remote_code: bool = arg(False, "allow model code from the Hub", only=())
    seed: int = arg(0, "seed of data order and random draws")
    log_every: int = arg(5, "optimiser steps between log lines", only=(), check=AT_LEAST_1)


def parse_args(cls, argv=None):
    """Parse flags into the dataclass `cls`: one flag per field (--max-steps and --max_steps both work),
    its help and default in --help. Unknown flags fail."""
    import argparse
    import typing
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0],
                                     allow_abbrev=False)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            typ = next(t for t in typing.get_args(typ) if t is not type(None))      # Optional[X] -> X
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "from the model's preset" if default is None else repr(default)
        kwargs = dict(default=default, dest=f.name, help=f"{f.metadata.get('help', '')} (default: {shown})")
        if typ is bool:
            kwargs.update(type=_boolean, nargs="?", const=True)
        elif typing.get_origin(typ) is list:
            kwargs.update(type=typing.get_args(typ)[0], nargs="*")
        else:
            kwargs.update(type=typ)
        names = dict.fromkeys([f"--{f.name.replace('_', '-')}", f"--{f.name}"])
        parser.add_argument(*names, **kwargs)
    args, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unknown arguments {rest}")
    return cls(**vars(args))


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def validate(args) -> None:
    """Every flag against its declared range, before any work: raises ValueError naming the flag,
    its value and the valid range."""
    for f in dataclasses.fields(args):
        value, check = getattr(args, f.name), f.metadata.get("check")
        if check is None or value is None:
            continue
        bad_number = isinstance(value, float) and not math.isfinite(value)
        if bad_number or not check.ok(value):
            raise UsageError(f"--{f.name.replace('_', '-')} {value}: must be {check.says}")


def loss_params(args) -> flat.LossParams:
    return flat.LossParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(flat.LossParams)})


def fill_defaults(args, defaults: dict):
    """Set each flag left at None to its value in `defaults` (a protocol, then a model's preset)."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def methods(spec: str, supported=None) -> list[tuple[str, str, flat.LossParams | None]]:
    """--method as a list of (label, loss name, divergence): "flat", "npo,ga", "flat:kl,flat:js"
    (FLAT with each divergence) or "all" (every loss in flat.LOSSES, or in `supported`). A name
    without a divergence uses --divergence. Unknown names raise with the valid ones."""
    names = list(supported or flat.LOSSES) if spec == "all" else [s.strip() for s in spec.split(",")]
    out = []
    for name in names:
        loss, _, divergence = name.partition(":")
        flat.LOSSES[loss]
        if divergence:
            if loss != "flat":
                raise flat.UnknownName(f"{name!r}: only flat takes a divergence (flat:kl, flat:js, ...)")
            flat.DIVERGENCES[divergence]
        out.append((name, loss, divergence or None))
    if len({label for label, _, _ in out}) != len(out):
        raise flat.UnknownName(f"--method {spec!r} names a method twice")
    return out


# ---------------------------------------------------------------------------------------------
# Setup: run directory, device and precision, seeds
# ---------------------------------------------------------------------------------------------

def check_out_dir(out: Path) -> None:
    """Fail unless `out` is, or can be created as, a writable directory (nothing is created here)."""
    p = out
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if p == out and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if not p.is_dir():
        raise UsageError(f"--out {out}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {p} is not writable")


def setup_run(args, default_out: str) -> tuple[Path, models.Compute]:
    """The run directory (created, locked against a second run, cleared of temporary directories a
    killed run left), device and precision (models.resolve_compute; under torchrun, this rank's
    device) and the Python and torch seeds."""
    out = Path(args.out or default_out)
    try:
        compute = models.resolve_compute(args.device, args.precision, args.gradient_checkpointing)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_out_dir(out)
    compute = dataclasses.replace(compute, device=distributed.init(compute.device))
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        lock_run_dir(out)
        remove_stale_temporaries(out)
        if models.cache_dir().is_dir():  # another process may be converting the default model right now
            remove_stale_temporaries(models.cache_dir(), older_than_s=3600)
    distributed.barrier()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one progress bar per training stage is enough
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return out, compute


_LOCKS = []  # open lock files: the lock lasts as long as the process


def lock_run_dir(out: Path) -> None:
    """Hold an exclusive lock on OUT/.lock for the life of the process: a second run on the same
    directory fails at once instead of doing the same work and racing the first one's writes."""
    while _LOCKS:  # a process runs one run at a time (tests call several main()s in one process)
        _LOCKS.pop().close()
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UsageError(f"another run is using {out} (it holds {out / '.lock'}); wait for it to finish "
                           f"or pass another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS.append(f)


TMP_PREFIX = models.TMP_PREFIX


def remove_stale_temporaries(root: Path, older_than_s: float = 0.0) -> list[Path]:
    """Remove what an interrupted save left under root (this project's temporary names only, at
    the top level): under a locked run directory nothing else can be writing them."""
    removed = []
    now = time.time()
    for p in root.glob(TMP_PREFIX + "*"):
        if now - p.stat().st_mtime >= older_than_s:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        print(f"[cleanup] removed {len(removed)} temporary file(s) an interrupted run left in {root}")
    return removed


def safe_name(name: str) -> str:
    """A model name or path as one directory-name component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def main_guard(main) -> None:
    """Run a runner's main: known failures become one `error:` line and exit 2; Ctrl-C or SIGTERM
    exits 130 with every finished stage left usable (each is written atomically)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: every finished stage is saved; the same command resumes from there",
              file=sys.stderr)
        raise SystemExit(130)
    except (FloatingPointError, models.ModelLoadError, data.DataError, UsageError, flat.UnknownName) as e:
        fail(str(e))
    finally:
        signal.signal(signal.SIGTERM, previous)
        distributed.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# The plan: epochs of step batches -> optimiser steps of this rank's micro-batches
# ---------------------------------------------------------------------------------------------

class Micro(NamedTuple):
    batch: dict           # stream name -> rows, the same number of rows in every stream
    weight: float         # each row's weight in its step: 1 / (rows in the step); 0 for a placeholder


class Plan(NamedTuple):
    steps: list[list[Micro]]   # one entry per optimiser step: this rank's micro-batches
    epoch: list[int]           # the epoch of each step
    steps_per_epoch: int       # optimiser steps of one whole epoch (for warmup in epochs)


def plan_steps(epochs: Iterable[list[dict]], batch_size: int, max_steps: int | None = None,
               world: int = 1, rank: int = 0) -> Plan:
    """Optimiser steps from epochs of step batches (each a dict stream -> rows, the rows of one step),
    cut after max_steps steps (later epochs are then never built).

    A step's rows are cut into k * world near-equal micro-batches, k = ceil(rows / (batch_size *
    world)); rank r takes the r-th k of them. Every rank thus runs the same number of micro-batches
    (FSDP needs each forward on every rank); a rank whose share is empty (a step with fewer rows than
    processes) runs a placeholder with weight 0.
    """
    steps, epoch_of, per_epoch = [], [], None
    for e, batches in enumerate(epochs):
        if per_epoch is None:
            per_epoch = len(batches)
        for step_batch in batches:
            if max_steps is not None and len(steps) >= max_steps:
                break
            steps.append(_micro_batches(step_batch, batch_size, world, rank))
            epoch_of.append(e)
        if max_steps is not None and len(steps) >= max_steps:
            break
    return Plan(steps, epoch_of, per_epoch or 0)


def _micro_batches(step_batch: dict, batch_size: int, world: int, rank: int) -> list[Micro]:
    n = len(next(iter(step_batch.values())))
    k = math.ceil(n / (batch_size * world))
    bounds = np.linspace(0, n, k * world + 1).round().astype(int)  # near-equal cuts of n rows
    micros = []
    for j in range(rank * k, (rank + 1) * k):
        lo, hi = bounds[j], bounds[j + 1]
        if hi > lo:
            micros.append(Micro({s: rows[lo:hi] for s, rows in step_batch.items()}, 1.0 / n))
        else:
            micros.append(Micro({s: rows[:1] for s, rows in step_batch.items()}, 0.0))
    return micros


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def optimizer_and_schedule(model, lr: float, weight_decay: float, warmup_steps: int, total_steps: int):
    """AdamW (no decay on biases and norm weights) with linear warmup, then linear decay that reaches
    0 after the last step: step s (from 0) uses lr * (s + 1) / (warmup + 1) during warmup, then
    lr * (total - s) / (total - warmup)."""
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


def train(model, plan: Plan, loss_fn, lr: float, args, stage: str, compute: models.Compute,
          evaluate: Callable | None = None, eval_every: int = 0) -> tuple[list[dict], list[dict]]:
    """Run every optimiser step of the plan; return (training log, in-training evaluations).

    loss_fn(model, batch) -> (per-row loss (B,), {diagnostic: (B,)}). `args` supplies weight_decay,
    warmup_epochs, max_grad_norm and log_every. With eval_every > 0, evaluate(model, step) -> dict runs
    at step 0, every eval_every steps and after the last step.
    """
    total = len(plan.steps)
    warmup = min(round(args.warmup_epochs * plan.steps_per_epoch), max(total - 1, 0))
    opt, sched = optimizer_and_schedule(model, lr, args.weight_decay, warmup, total)
    log, evals, window = [], [], []
    if evaluate is not None and eval_every:
        evals.append({"step": 0, **evaluate(model, 0)})
    model.train()
    bar = tqdm(total=total, desc=stage, leave=False, disable=not distributed.is_main())
    t_last = time.time()
    ranks = distributed.world() if distributed.is_sharded(model) else 1  # FSDP averages over ranks: undo it
    for step, micros in enumerate(plan.steps, 1):
        sums = None  # weighted sums over this step's rows: [loss, diagnostics...]
        for m in micros:
            with compute.autocast():
                loss, diag = loss_fn(model, m.batch)                  # (B,), {name: (B,)}
            (loss * (m.weight * ranks)).sum().backward()
            values = torch.stack([loss.detach().float(), *(v.float() for v in diag.values())])  # (1 + D, B)
            sums = (values * m.weight).sum(1) if sums is None else sums + (values * m.weight).sum(1)
        sums = distributed.all_reduce_sum(sums).tolist()      # one sync per step; a no-op in one process
        check_finite(sums[0], step, stage)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update()
        window.append(dict(zip(["loss", *diag], sums)))
        if step % args.log_every == 0 or step == total:
            now = time.time()
            mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            lr_now = sched.get_last_lr()[0]  # after this step's update: 0 after the last step
            if distributed.is_main():
                tqdm.write(log_line(stage, step, total, lr_now, (now - t_last) / len(window), mean))
            log.append({"step": step, "epoch": plan.epoch[step - 1], "lr": lr_now, **mean})
            window, t_last = [], now
        if evaluate is not None and eval_every and (step % eval_every == 0 or step == total):
            evals.append({"step": step, **evaluate(model, step)})
            model.train()
    bar.close()
    check_finite_weights(model, total, stage, compute.device)
    model.eval()
    return log, evals


def check_finite(loss: float, step: int, stage: str) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"{stage}: the loss is {loss} at step {step}; stopping without saving "
                                 f"(try a lower --lr)")


def check_finite_weights(model, step: int, stage: str, device: str) -> None:
    """After the last step no forward pass shows the damage: look at the weights before saving."""
    ok = all(bool(torch.isfinite(distributed.local(p)).all()) for p in model.parameters())
    if not distributed.all_true(ok, device):
        raise FloatingPointError(f"{stage}: the weights are not finite after step {step}; stopping without "
                                 f"saving (try a lower --lr)")


def log_line(stage: str, step: int, total: int, lr: float, sec_per_step: float, mean: dict) -> str:
    """The one fixed-format line logged every --log-every optimiser steps."""
    extra = " ".join(f"{k} {v:.4f}" for k, v in mean.items() if k != "loss")
    return (f"[{stage}] step {step:>5}/{total} | loss {mean['loss']:.4f} | lr {lr:.2e} | "
            f"{sec_per_step:.2f} s/step | {extra}")


# ---------------------------------------------------------------------------------------------
# Forward pass: one batch of streams -> statistics -> loss
# ---------------------------------------------------------------------------------------------

def batch_loss(model, batch: dict[str, list[dict]], method: flat.Method, params: flat.LossParams,
               pad_id: int, ref_model=None) -> tuple[torch.Tensor, dict]:
    """The method's per-sample loss (B,) for one unlearning batch, and detached per-sample diagnostics.

    All streams (forget, template, retain rows) go through one forward pass, padded together to the
    batch's longest row; their statistics come from flat.sequence_stats on slices of the logits.
    The frozen reference, when the method has one, runs on the rows its terms read, without gradients.
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
    diag = {f"p_{s}": stats[s].prob_mean.detach() for s in streams}
    if "retain_kl" in stats:
        diag["retain_kl"] = stats["retain_kl"].detach()
    return loss, diag


def finetune_loss(model, batch: dict[str, list[dict]], pad_id: int) -> tuple[torch.Tensor, dict]:
    """Per-sample mean answer-token NLL (B,) for fine-tuning on the rows of batch["answer"]."""
    b = {k: v.to(next(model.parameters()).device) for k, v in data.collate(batch["answer"], pad_id).items()}
    stats = flat.sequence_stats(*models.answer_logits(model, b))
    return -stats.logp_mean, {"p_answer": stats.prob_mean.detach()}


# ---------------------------------------------------------------------------------------------
# Stages, results and files
# ---------------------------------------------------------------------------------------------

def stage_key(args, stage: str, compute: models.Compute, **extra) -> dict:
    """Everything a stage's output depends on: every resolved flag except those declared for other
    stages only (arg(..., only=...)) and the loss hyperparameters (an unlearning stage holds those
    its method reads, flat.Method.read_params, passed in `extra`); the device type and resolved
    precision; and `extra` (data digests, upstream stage names)."""
    loss_fields = {f.name for f in dataclasses.fields(flat.LossParams)}
    key = {}
    for f in dataclasses.fields(args):
        only = f.metadata.get("only")
        if f.name not in loss_fields and (only is None or stage in only):
            key[f.name] = getattr(args, f.name)
    return {**key, "compute": f"{torch.device(compute.device).type}-{compute.precision}", **extra}


def model_id(path) -> str:
    """How a stage key names a model: a stage directory by its (hash-named) directory name, anything
    else (an alias, a Hub id, a directory of the user's) by what was passed."""
    return Path(path).name if isinstance(path, Path) else str(path)


def training_model(name, compute: models.Compute, trust_remote_code: bool = False, reference: bool = False):
    """(model, tokenizer, frozen reference or None) to train, in the run's precision; under torchrun
    both models are sharded (distributed.shard) after the reference is copied from the full model."""
    sharded = distributed.world() > 1
    model, tok = models.load_model(str(name), "cpu" if sharded else compute.device, compute.train_dtype,
                                   compute.checkpointing, trust_remote_code)
    ref = models.frozen_copy(model) if reference else None
    if sharded:
        for m in (model, ref):
            if m is not None:
                distributed.shard(m)
                m.to(compute.device)
    return model, tok, ref


def stage_dir(root: Path, name: str, key: dict) -> Path:
    """A stage's directory, named by a hash of everything its output depends on, so that a rerun
    with the same settings finds it and other settings get their own."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return root / f"{name}-{digest}"


def is_saved_model(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def load_cached_model_or_none(path: Path) -> bool:
    """Whether a cached model directory is usable; a damaged one (a config or a safetensors header
    that does not parse) is moved aside, reported, and the stage recomputed."""
    if not is_saved_model(path):
        return False
    try:
        from safetensors import safe_open
        json.loads((path / "config.json").read_text())
        for f in path.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                st.keys()
        return True
    except Exception as e:  # any parse error of either file: the directory cannot be trusted
        aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
        path.rename(aside)
        print(f"[cache] {path}: damaged ({e}); moved to {aside.name}, recomputing")
        return False


def read_cache(path: Path):
    """A cached JSON result, or None when there is none. One that does not parse (a truncated write
    from a tool other than this project, a full disk) is reported, moved aside and recomputed."""
    if not path.exists():
        return None
    try:
        return read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
        os.replace(path, aside)
        print(f"[cache] {path}: does not parse ({e}); moved to {aside.name}, recomputing")
        return None


def save_model_atomic(model, tokenizer, path: Path, extra: dict[str, object]) -> None:
    """save_pretrained (safetensors) into a temporary directory renamed into place at the end, so an
    interrupted run never leaves a half-written model that a rerun would trust. Under torchrun every
    rank gathers the full state dict and rank 0 writes it."""
    state = distributed.full_state_dict(model) if distributed.is_sharded(model) else None
    if state is not None and getattr(model.config, "tie_word_embeddings", False):
        for key in getattr(model, "_tied_weights_keys", None) or ():  # e.g. lm_head.weight: the embedding's copy
            state.pop(key, None)
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-"))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a saved model is an ordinary directory
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        for name, obj in extra.items():
            write_json(tmp / name, obj)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    distributed.barrier()


def write_cache(path: Path, obj) -> None:
    """A stage's cached result, written atomically. Python's own reader takes NaN, so a non-finite
    metric is kept as it came out (results.json, strict, turns it into null with a warning)."""
    write_json(path, obj, allow_nan=True)


def write_json(path: Path, obj, allow_nan: bool = False) -> None:
    """Write strict JSON atomically (temporary file, then rename). A non-finite float would be
    written as a bare NaN that strict parsers reject: it is an error here (see finite_report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str, allow_nan=allow_nan)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_report(report, path: str = "") -> tuple[object, list[str]]:
    """The report with every NaN or infinite number replaced by None, and the list of where they were
    (e.g. "unlearned.fluency_ppl"), so that results.json stays strict JSON and says what is missing."""
    warnings = []

    def clean(x, where):
        if isinstance(x, float) and not math.isfinite(x):
            warnings.append(f"{where}: {x}")
            return None
        if isinstance(x, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(x)]
        return x
    return clean(report, path), warnings


def cell(row: dict, key: str, spec: str) -> str:
    """A table cell: "-" for a metric the row does not have, "NaN (!)" for one that came out non-finite
    (written as null, see finite_report)."""
    if key not in row:
        return "-"
    return "NaN (!)" if row[key] is None else format(row[key], spec)


def say(msg: str) -> None:
    """Print on rank 0 only (every rank runs the same code under torchrun)."""
    if distributed.is_main():
        print(msg, flush=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def training_logs(stage: Path) -> dict:
    """A trained stage's logs: {"log": per-step records, "evals": in-training evaluations}."""
    return {"log": read_json(stage / "train_log.json"),
            "evals": read_json(stage / "eval_log.json") if (stage / "eval_log.json").exists() else []}


def once_at_step_0(evaluate: Callable) -> Callable:
    """An in-training evaluation whose step-0 result is computed once: at step 0 every method's model
    is the same one (the target, the original), so a run of several methods evaluates it once."""
    memo = {}

    def wrapped(model, step, **kw):
        if step:
            return evaluate(model, **kw)
        if "step0" not in memo:
            memo["step0"] = evaluate(model, **kw)
        return memo["step0"]
    return wrapped


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextmanager
def timed(times: dict, name: str):
    """Record the wall time of a block in times[name], in seconds."""
    t = time.time()
    yield
    times[name] = round(time.time() - t, 1)
