"""The TOFU evaluation of one model at the offline default, timed by evaluation set and by kind of work,
with the previous implementation (evaluate.py as it was at a git revision) beside this one in the same
run, each in a fresh process, and whether every number came out the same.

    python -m bench --evaluation                         # SmolLM2-135M: bench/EVALUATION.md
    python -m bench --evaluation --models runs/tofu-smollm2-135m-forget01/target-XXXX --before REV
    python -m bench --evaluation --precision bf16        # the working tree in fp32 against bf16 weights

With --precision bf16 or mixed (an evaluation under either reads bf16 weights, models.Compute.eval_dtype)
the two runs are today's evaluate.py in fp32 and in bf16, and the report adds how far each metric of
the summary moved.

Kinds of work: *scoring* (answer likelihoods: one pass per batch of questions, every answer on its
prompt's KV cache, with per-token statistics where membership inference reads them), *generation*
(greedy answers for ROUGE) and *metrics* (the rest of a set's time: ROUGE, truth ratios; for holdout
the membership-inference scores and AUCs, memorisation). The sets are run_tofu's at the offline default (forget01 and its holdout; the first 20
items of retain, real authors, world facts).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import evaluate
import models
import run_tofu
from bench.measure import ROOT, machine, spawn, write_text_atomic

BEFORE = "HEAD"  # the revision whose evaluate.py is "before" (default: the last commit)


def previous_evaluate(rev: str):
    """evaluate.py as it was at git revision `rev`, imported as its own module (it uses today's data,
    models and mia modules: the comparison is of evaluate.py alone)."""
    try:
        text = subprocess.run(["git", "show", f"{rev}:evaluate.py"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"error: --before {rev}: cannot read evaluate.py at that revision ({e})") from None
    path = Path(tempfile.mkdtemp(prefix="flat-eval-before-")) / "evaluate_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("evaluate_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(cfg: dict) -> dict:
    """One model's evaluation with one implementation: seconds per (set, kind), the summary and the items."""
    impl = evaluate if cfg["impl"] == "now" else previous_evaluate(cfg["impl"])
    args = run_tofu.resolve(run_tofu.Args())  # the offline default's sets and settings, whichever model is scored
    sets = run_tofu.tofu_eval_sets(args)
    torch.manual_seed(0)
    dtype = models.resolve_compute("cpu", cfg.get("precision", "fp32")).eval_dtype
    model, tok = models.load_model(cfg["model"], "cpu", dtype)
    style = models.prompt_style(cfg["model"], tok)
    seconds: dict[str, float] = {}

    def timed(kind: str, fn):
        def run(*a, **k):
            where = k.get("desc", "holdout: scoring").split(":")[0]  # evaluate names each pass by its set
            t = time.perf_counter()
            out = fn(*a, **k)
            seconds[f"{where}|{kind}"] = seconds.get(f"{where}|{kind}", 0.0) + time.perf_counter() - t
            return out
        return run
    impl.answer_nll, impl.generate = timed("scoring", impl.answer_nll), timed("generation", impl.generate)
    set_fn = impl.evaluate_tofu_set

    def whole_set(model, tokenizer, style, name, *a, **k):
        t = time.perf_counter()
        out = set_fn(model, tokenizer, style, name, *a, **k)
        seconds[f"{name}|all"] = time.perf_counter() - t
        return out
    impl.evaluate_tofu_set = whole_set
    t = time.perf_counter()
    summary, items = impl.evaluate_tofu(model, tok, style, sets, args.max_new_tokens, args.eval_batch_size)
    seconds["total"] = time.perf_counter() - t
    return {"seconds": seconds, "summary": summary, "items": items}


def numbers(x, where=""):
    """Every number of a result with where it is: {"forget.truth_ratio[3]": 0.52, ...}."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in numbers(val, f"{where}.{key}" if where else key).items()}
    if isinstance(x, list):
        return {k: v for i, val in enumerate(x) for k, v in numbers(val, f"{where}[{i}]").items()}
    return {where: x} if isinstance(x, (int, float, bool, str)) else {}


def compare(before: dict, now: dict) -> tuple[float, list[str]]:
    """The largest difference between two results' numbers, and every key or text that differs."""
    a, b = numbers(before), numbers(now)
    differ = sorted(set(a) ^ set(b))
    worst = 0.0
    for k in set(a) & set(b):
        if isinstance(a[k], str) or isinstance(b[k], str):
            differ += [k] if a[k] != b[k] else []
        elif a[k] != b[k]:
            d = abs(float(a[k]) - float(b[k]))
            worst = max(worst, d if np.isfinite(d) else float("inf"))
    return worst, differ


def table(args, out: Path) -> None:
    name = (args.models or ["smollm2-135m"])[0]
    rev = args.before or BEFORE
    # with bf16 or mixed among --precision: fp32 against bf16 weights, both with today's code
    low = next((p for p in args.precision.split(",") if p in ("bf16", "mixed")), None)
    configs = ({"fp32": dict(impl="now", precision="fp32"), low: dict(impl="now", precision=low)}
               if low else {rev: dict(impl=rev), "now": dict(impl="now")})
    runs = {label: spawn(dict(kind="evaluation", model=name, **cfg), "bench.evaluation", exact_peak=False)
            for label, cfg in configs.items()}
    before, now = runs.values()
    worst, differ = compare({"summary": before["summary"], "items": before["items"]},
                            {"summary": now["summary"], "items": now["items"]})
    what = (f"*before*: the working tree in fp32; *now*: the same with {low} (bf16 weights)" if low else
            f"*before*: evaluate.py at `{rev}` ({git_rev(rev)}); *now*: the working tree")
    lines = ["# TOFU evaluation: where the time goes\n",
             f"`python -m bench {' '.join(sys.argv[1:])}` on {date.today()}, {machine('cpu')}. Model: {name}. {what}. "
             f"Each in a fresh process, one after the other.\n",
             "| set | kind | before (s) | now (s) | speed-up |", "|---|---|---|---|---|"]
    for r in runs.values():  # metrics: what a set's evaluation spends beyond its two model passes
        sec = r["seconds"]
        for s in ("forget", "retain", "ra", "wf"):
            sec[f"{s}|metrics"] = sec.pop(f"{s}|all") - sec[f"{s}|scoring"] - sec[f"{s}|generation"]
        sec["holdout|metrics"] = sec["total"] - sum(v for k, v in sec.items() if k != "total" and k != "holdout|metrics")
    kinds = ("scoring", "generation", "metrics")
    for s in ("forget", "retain", "ra", "wf", "holdout"):
        for kind in kinds:
            k = f"{s}|{kind}"
            if k in now["seconds"]:
                b, n = before["seconds"][k], now["seconds"][k]
                lines.append(f"| {s} | {kind} | {b:.1f} | {n:.1f} | {b / n if n > 0 else float('nan'):.2f}x |")
    for kind in kinds:
        b = sum(v for k, v in before["seconds"].items() if k.endswith("|" + kind))
        n = sum(v for k, v in now["seconds"].items() if k.endswith("|" + kind))
        lines.append(f"| all sets | {kind} | {b:.1f} | {n:.1f} | {b / n:.2f}x |")
    b, n = before["seconds"]["total"], now["seconds"]["total"]
    lines.append(f"| **all** | **everything** | **{b:.1f}** | **{n:.1f}** | **{b / n:.2f}x** |")
    same = "every number and generation equal" if worst == 0 and not differ else \
        f"largest difference {worst:.3g}; differing keys or texts: {len(differ)} ({', '.join(differ[:5])})"
    lines += ["", f"Numbers (summary and every item, generations included): {same}."]
    if low:
        lines += ["", f"| metric | fp32 | {low} | difference |", "|---|---|---|---|"]
        lines += [f"| {k} | {v:.4g} | {now['summary'][k]:.4g} | {now['summary'][k] - v:+.3g} |"
                  for k, v in before["summary"].items() if isinstance(v, float) and k in now["summary"]]
        texts = [k for k in differ if ".generation[" in k]
        lines += ["", f"Greedy generations that differ: {len(texts)} of "
                      f"{sum('.generation[' in k for k in numbers(before['items']))}."]
    write_text_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


def git_rev(rev: str) -> str:
    p = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip() or "?"


if __name__ == "__main__":  # a worker (measure.spawn)
    assert sys.argv[1] == "--worker", "usage: python -m bench --evaluation"
    print(json.dumps(worker(json.loads(sys.argv[2]))))
