"""The method: the plan of optimiser steps, the one training loop, the optimiser and its schedule,
and the forward pass from a micro-batch to a method's per-sample loss.

    epochs of steps --plan_steps--> list of optimiser steps, each a list of this rank's micro-batches
    train(model, tok, plan, method, ...)  one loop over the plan: batch_loss, weighted backward, clip, step
    batch_loss(model, micro, method, ...) one forward pass over every stream -> the method's loss (B,)

Two words, two sizes. A *step* is the rows one optimiser step trains on (--batch-size x --grad-accum
x processes): a data builder (data.unlearning_epoch, data.finetune_epoch, ...) cuts an epoch into
steps. A *micro-batch* is the rows of one forward pass (--batch-size): plan_steps cuts each step into
micro-batches and gives every row the weight 1 / (rows in its step). So the steps taken are the
list's length, the learning-rate schedule is planned from that same length, a step never mixes two
epochs, and a short last step is the mean over the rows it has.

What is around a training stage (loading the model with its checkpointing, LoRA, sharding and
reference, the memory check, the save) is the run's: stages.Run.fit.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

import data
import distributed
import errors
import flat
import methods
import models

# ---------------------------------------------------------------------------------------------
# The plan: epochs of steps -> optimiser steps of this rank's micro-batches
# ---------------------------------------------------------------------------------------------

class Micro(NamedTuple):
    batch: dict           # stream name -> rows, the same number of rows in every stream
    weight: float         # each row's weight in its step: 1 / (rows in the step); 0 for a placeholder


class Plan(NamedTuple):
    steps: list[list[Micro]]   # one entry per optimiser step: this rank's micro-batches
    epoch: list[int]           # the epoch of each step
    steps_per_epoch: int       # optimiser steps of one whole epoch (for warmup in epochs)


def plan_steps(epochs: Iterable[list[dict]], micro_batch_size: int, max_steps: int | None = None,
               world: int = 1, rank: int = 0) -> Plan:
    """Optimiser steps from epochs of steps (each a dict stream -> rows, the rows of one step), cut
    after max_steps steps (later epochs are then never built).

    A step's rows are cut into k * world near-equal micro-batches, k = ceil(rows / (micro_batch_size *
    world)); rank r takes the r-th k of them. Every rank thus runs the same number of micro-batches
    (FSDP needs each forward on every rank); a rank whose share is empty (a step with fewer rows than
    processes) runs a placeholder with weight 0.
    """
    steps, epoch_of, per_epoch = [], [], None
    for e, epoch in enumerate(epochs):
        if per_epoch is None:
            per_epoch = len(epoch)
        for step in epoch:
            if max_steps is not None and len(steps) >= max_steps:
                break
            steps.append(_micro_batches(step, micro_batch_size, world, rank))
            epoch_of.append(e)
        if max_steps is not None and len(steps) >= max_steps:
            break
    return Plan(steps, epoch_of, per_epoch or 0)


def _micro_batches(step: dict, micro_batch_size: int, world: int, rank: int) -> list[Micro]:
    n = len(next(iter(step.values())))
    k = math.ceil(n / (micro_batch_size * world))
    bounds = np.linspace(0, n, k * world + 1).round().astype(int)  # near-equal cuts of n rows
    micros = []
    for j in range(rank * k, (rank + 1) * k):
        lo, hi = bounds[j], bounds[j + 1]
        if hi > lo:
            micros.append(Micro({s: rows[lo:hi] for s, rows in step.items()}, 1.0 / n))
        else:
            micros.append(Micro({s: rows[:1] for s, rows in step.items()}, 0.0))
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


def train(model, tok, plan: Plan, method: methods.Method, params: methods.LossParams | None, lr: float, args,
          compute: models.Compute, stage: str, ref=None, progress: Callable | None = None
          ) -> tuple[list[dict], list[dict]]:
    """Run every optimiser step of the plan with `method`'s loss; return (training log, in-training
    evaluations). `args` supplies weight_decay, warmup_epochs, max_grad_norm, log_every and
    eval_every; with eval_every > 0, progress(model, tok, step) -> dict runs at step 0, every
    eval_every steps and after the last step. ref: the frozen reference of methods that have one.
    """
    total = len(plan.steps)
    warmup = min(round(args.warmup_epochs * plan.steps_per_epoch), max(total - 1, 0))
    opt, sched = optimizer_and_schedule(model, lr, args.weight_decay, warmup, total)
    eval_every = getattr(args, "eval_every", 0) if progress is not None else 0
    log, evals, window = [], [], []
    if eval_every:
        evals.append({"step": 0, **progress(model, tok, 0)})
    model.train()
    bar = tqdm(total=total, desc=stage, leave=False, disable=not distributed.is_main())
    t_last = time.time()
    ranks = distributed.world() if distributed.is_sharded(model) else 1  # FSDP averages over ranks: undo it
    for step, micros in enumerate(plan.steps, 1):
        sums = None  # weighted sums over this step's rows: [loss, diagnostics...]
        for m in micros:
            with compute.autocast():
                loss, diag = batch_loss(model, m.batch, method, params, tok.pad_token_id, ref)  # (B,), {name: (B,)}
            (loss * (m.weight * ranks)).sum().backward()  # m.weight = 1 / rows in the step: a mean over the step
            values = torch.stack([loss.detach().float(), *(v.float() for v in diag.values())])  # (1 + D, B)
            sums = (values * m.weight).sum(1) if sums is None else sums + (values * m.weight).sum(1)
        sums = distributed.all_reduce_sum(sums).tolist()      # one sync per step; a no-op in one process
        check_finite(sums[0], step, stage, settings(method, params))
        errors.stop_if_interrupted()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        # An infinite norm would scale every gradient to 0 (or NaN): a step that silently does nothing.
        check_finite(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm), step, stage,
                     settings(method, params), what="gradient norm")
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
        if eval_every and (step % eval_every == 0 or step == total):
            evals.append({"step": step, **progress(model, tok, step)})
            model.train()
    bar.close()
    check_finite_weights(model, total, stage, compute.device)
    model.eval()
    return log, evals


def check_finite(value: float, step: int, stage: str, loss_settings: str = "", what: str = "loss") -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"{stage}: the {what} is {value} at step {step}; stopping without saving "
                                 f"(try a lower --lr{loss_settings})")


def settings(method: methods.Method, params: methods.LossParams | None) -> str:
    """The loss settings a method reads, for an error that may be theirs: ", or other loss settings than
    --beta 0.1" (nothing for fine-tuning)."""
    read = method.read_params(params) if params is not None else {}
    shown = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in read.items() if k not in ("divergence", "npo_retain"))
    return f", or other loss settings than {shown}" if shown else ""


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
# Forward pass: one micro-batch of streams -> statistics -> loss
# ---------------------------------------------------------------------------------------------

def batch_loss(model, batch: dict[str, list[dict]], method: methods.Method, params: methods.LossParams | None,
               pad_id: int, ref_model=None) -> tuple[torch.Tensor, dict]:
    """The method's per-sample loss (B,) for one micro-batch of streams, and detached per-sample diagnostics.

    All streams (forget, template, retain rows; "answer" rows when fine-tuning) go through one forward
    pass, padded together to the batch's longest row; each stream's statistics come from
    flat.sequence_stats on its slice of the logits, and the frozen reference's from reference_stats.
    """
    streams = [s for s in data.STREAMS if s in batch]
    b = data.collate([row for s in streams for row in batch[s]], pad_id)
    b = {k: v.to(next(model.parameters()).device) for k, v in b.items()}
    logits, labels = models.answer_logits(model, b)                   # (sum B_s, k, V), (sum B_s, k)
    rows = stream_slices({s: len(batch[s]) for s in streams})
    stats = {s: flat.sequence_stats(logits[rows[s]], labels[rows[s]]) for s in streams}
    if ref_model is not None:
        stats.update(reference_stats(ref_model, b, rows, method.reference, logits, labels))
    loss = method.call(stats, params)
    diag = {f"p_{s}": stats[s].prob_mean.detach() for s in streams}
    if "retain_kl" in stats:
        diag["retain_kl"] = stats["retain_kl"].detach()
    return loss, diag


def stream_slices(sizes: dict[str, int]) -> dict[str, slice]:
    """The rows of each stream in a batch that stacks the streams in order."""
    rows, start = {}, 0
    for s, n in sizes.items():
        rows[s], start = slice(start, start + n), start + n
    return rows


def reference_stats(ref_model, b: dict, rows: dict[str, slice], streams: tuple, logits, labels) -> dict:
    """What the frozen reference contributes, computed on the rows its terms read only: SeqStats of
    "forget" and "template" under it ("ref_forget", "ref_template"), and for "retain" the per-sample
    KL(p_ref || p_theta) on the retain answers ("retain_kl", (B,), with gradients through `logits`).

    b: the collated batch (left-padded, every stream stacked, data.collate); logits, labels: the
    model's answer_logits of it, (B, k, V) and (B, k). The reference runs on the contiguous rows of
    its streams, without the columns that are padding in all of them.
    """
    mine = [s for s in rows if s in streams]
    if not mine:
        return {}
    lo, hi = rows[mine[0]].start, rows[mine[-1]].stop                  # streams are contiguous
    first = int(b["attention_mask"][lo:hi].any(0).int().argmax())      # drop columns that are all padding
    with torch.no_grad():
        ref_logits, ref_labels = models.answer_logits(ref_model, {k: v[lo:hi, first:] for k, v in b.items()})
    k = min(ref_logits.shape[1], logits.shape[1])
    out = {}
    for s in mine:
        r = slice(rows[s].start - lo, rows[s].stop - lo)
        if s == "retain":
            out["retain_kl"] = flat.kl_to_reference(logits[rows[s], -k:], ref_logits[r, -k:], labels[rows[s], -k:])
        else:
            out["ref_" + s] = flat.sequence_stats(ref_logits[r], ref_labels[r])
    return out


def once_at_step_0(evaluate: Callable) -> Callable:
    """An in-training evaluation whose step-0 result is computed once: at step 0 every method's model
    is the same one (the target, the original), so a run of several methods evaluates it once."""
    memo = {}

    def wrapped(model, tok, step):
        if step:
            return evaluate(model, tok)
        if "step0" not in memo:
            memo["step0"] = evaluate(model, tok)
        return memo["step0"]
    return wrapped
