"""Said before the work: each phase of a run (its stages, cached or to compute), an estimate of its time
on this device and the disk it writes, printed before the first stage. A phase estimated over 30
minutes on CPU says so and names the flag that shortens it; nothing waits for an answer.

    phases = [estimate.Phase("fine-tuning", [estimate.Stage(target, trained=tokens, disk=size)]), ...]
    estimate.say_plan(run.say, phases, models.parameter_count(args.model), run.compute)

The time is the work in FLOPs (6 per parameter per trained token, 2 per scored or generated token)
over the device's matrix-multiply rate, measured here in a fraction of a second, times the share of
that rate this project's code reaches (SHARE, measured by bench/RESULTS.md and bench/EVALUATION.md).
Token counts come from the data the stages will read; generation counts every row to its
--max-new-tokens, so evaluation estimates lean high. It is an estimate: the line says "about".
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import data
import models

# Share of the measured matrix-multiply rate reached: training (MFU) 52-63% in bench/RESULTS.md, scoring
# about 160 GFLOP/s of 255 (bench/EVALUATION.md's scoring rows against a 2048 matmul on the same CPU).
# lm-eval's zero-shot requests (batch 8, one request per answer choice) reach less, and cost about 15 ms
# each besides: issue 31 measured FLAT's 38,934 requests at about 10 min for a tiny random model and
# about 2 h for SmolLM2-135M on the 2-core CPU, which these two numbers reproduce.
SHARE = {"trained": 0.55, "forward": 0.6, "lm-eval": 0.35}
PER_REQUEST_S = 0.015
LONG_S = 30 * 60  # a phase above this on CPU is said to be long, with the flag that shortens it


class Stage(NamedTuple):
    """One stage of a phase: where it lives (stages.Run.stage; a str for a model the user named and None
    for a stage not run, neither computed; LATER for one named during the run) and its work."""
    path: object
    trained: float = 0.0   # tokens through forward and backward
    forward: float = 0.0   # tokens through a forward pass only (scoring, generation, references)
    disk: int = 0          # bytes it writes
    share: str = "forward"  # the SHARE its forward tokens reach
    fixed_s: float = 0.0   # seconds that do not scale with the model (lm-eval's work per request)


LATER = Path("(named during the run)")  # a stage whose name is not known yet: counted as to compute


class Phase(NamedTuple):
    name: str
    stages: list[Stage]
    shorten: str = ""      # the flag that shortens the phase, named when it is long


def cached(path) -> bool:
    """Whether a stage looks done (cheap: stages.Run.missing checks it fully when it is reached)."""
    if not isinstance(path, Path):
        return True  # nothing to compute: a model the user named (a str) or a stage not run
    return path.exists() if path.suffix == ".json" else (path / "config.json").exists()


def seconds(stage: Stage, n_params: int, rate: float, checkpointing: bool = False) -> float:
    """Time to compute `stage` at `rate` FLOP/s (matmul_rate); gradient checkpointing recomputes the
    forward pass in backward (8 FLOPs per parameter per trained token instead of 6)."""
    per_trained = 8 if checkpointing else 6
    flops = n_params * (per_trained * stage.trained / SHARE["trained"] + 2 * stage.forward / SHARE[stage.share])
    return flops / rate + stage.fixed_s


_RATES: dict = {}


def matmul_rate(device: str, dtype=torch.float32, n: int | None = None, reps: int = 10) -> float:
    """FLOP/s of an n x n matrix multiply on `device` (the best of a few timed repetitions; n 2048 on CPU,
    8192 on CUDA), measured once per process and device."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    if (device, dtype, n) not in _RATES:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - t)
        _RATES[(device, dtype, n)] = 2 * n ** 3 / best
    return _RATES[(device, dtype, n)]


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def plan_lines(phases: list[Phase], n_params: int, rate: float, device: str, checkpointing: bool = False) -> list[str]:
    """The plan as lines: one per phase (stages to compute of all, about how long, disk), then the total."""
    lines, total_s, total_disk = [], 0.0, 0
    for p in (p for p in phases if p.stages):
        todo = [s for s in p.stages if not cached(s.path)]
        s, disk = sum(seconds(t, n_params, rate, checkpointing) for t in todo), sum(t.disk for t in todo)
        total_s, total_disk = total_s + s, total_disk + disk
        later = sum(t.path is LATER for t in todo)
        line = f"[plan] {p.name}: " + (f"{len(todo)} of {len(p.stages)} stages to compute" + (
            f" ({later} named during the run)" if later else "") + f" | about {duration(s)}" if todo
            else f"{len(p.stages)} cached")
        line += f" | writes {disk / 1e9:.1f} GB" if disk >= 1e8 else ""
        if torch.device(device).type == "cpu" and s > LONG_S:
            line += " | over 30 min on CPU" + (f": {p.shorten} shortens it" if p.shorten else "")
        lines.append(line)
    lines.append(f"[plan] in all: about {duration(total_s)}, {total_disk / 1e9:.1f} GB written ({n_params / 1e6:.0f}M "
                 f"parameters at {rate / 1e9:.0f} GFLOP/s, the matrix-multiply rate measured now; generation counted "
                 f"to --max-new-tokens)")
    return lines


def say_plan(say: Callable[[str], None], phases: list[Phase], n_params: int, compute: models.Compute) -> None:
    """Print the plan before the first stage (the rate is measured only when a stage is to compute)."""
    todo = any(not cached(s.path) for p in phases for s in p.stages)
    dtype = torch.float32 if compute.precision == "fp32" else torch.bfloat16
    rate = matmul_rate(compute.device, dtype) if todo else 1.0
    for line in plan_lines(phases, n_params, rate, compute.device, compute.gradient_checkpointing):
        say(line)


def qa_tokens(tok, style: str, question: str, answer: str) -> int:
    """Tokens of one question and answer as the model reads them (data.encode_qa)."""
    return len(data.encode_qa(tok, style, question, answer)["input_ids"])


def rows_trained(n_rows: int, epochs: float, rows_per_step: int, max_steps: int | None) -> float:
    """Rows a training stage reads: `epochs` passes over n_rows, cut at max_steps optimiser steps."""
    steps = -(-n_rows // rows_per_step) * epochs
    return n_rows * epochs * min(1.0, (max_steps or steps) / steps) if steps else 0.0


def duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
