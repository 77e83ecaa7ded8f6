"""Memory planner: the peak memory of one unlearning step of this project, per process, for every
architecture, method, precision, checkpointing setting and number of FSDP2 processes, without a GPU
and without weights: the real step (train.batch_loss, AdamW, backward, clipping, the optimiser step)
runs on fake tensors under PyTorch's memory tracker. Checked against a measured CPU step.

    python -m bench --plan-memory                     # writes bench/MEMORY.md

Each setting runs in a worker process (`python memplan.py --worker JSON`, started by spawn), so that a
fake process group and the measured peak belong to that setting alone.
"""
from __future__ import annotations

import functools
import json
import os
import resource
import sys
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import torch

import adapters
import distributed
import methods
import models
import train
from bench import measure
from bench.measure import ARCHS, argv_of, machine, write_text_atomic
from errors import UsageError
from flat import IGNORE_INDEX


PLAN_METHODS = ("flat", "npo")      # FLAT alone; NPO with its frozen reference model
PLAN_PRECISIONS = ("mixed", "bf16")
PLAN_WORLDS = (1, 2, 4, 8)
PLAN_LORA = (8, 16, 64)              # LoRA ranks planned for the papers' models, one process, checkpointing on
SMALL_BATCHES = (8, 4)               # micro-batches (TOFU's is 8) planned again for the 24 GB GPU's LoRA rows
GPU_GBS = (80, 24)                   # one 80 GB GPU (A100/H100), one 24 GB GPU (RTX 3090/4090, A10)
HEADROOM = 0.9                       # the share of it a run can count on (CUDA context, allocator, workspaces)


def plan_rows() -> list[dict]:
    """Every setting the planner's table has: architecture x method x precision x checkpointing x processes,
    full fine-tuning; then LoRA (PLAN_LORA) on OPT-2.7B and Llama-2-7B, one process, checkpointing on."""
    full = [dict(model=m, method=meth, precision=p, gc=gc, world=w, lora=0) for m in ARCHS for meth in PLAN_METHODS
            for p in PLAN_PRECISIONS for gc in (True, False) for w in PLAN_WORLDS]
    return full + [dict(model=m, method=meth, precision=p, gc=True, world=1, lora=r) for m in ("opt-2.7b", "llama2-7b")
                   for meth in PLAN_METHODS for p in PLAN_PRECISIONS for r in PLAN_LORA]


class _NoHook:
    def remove(self) -> None:
        pass


def _peak_only(tracker_cls):
    """A memory tracker keeping the whole-process peak only: the stock trackers also keep every
    module's peak, which costs O(modules) per operator (a 100x slowdown on a 30-layer model)."""
    class PeakOnly(tracker_cls):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for p in module.parameters():  # a frozen parameter (LoRA's base weights) gets no gradient to hook
                if not p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state):
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)
    return PeakOnly


@contextmanager
def fsdp_allocations_in(fake_mode):
    """Run FSDP2's own work (all-gathers into unsharded parameters, reduce-scatters of gradients,
    resharding) inside the fake mode, so that its buffers are fake as well. The rest of the step runs
    outside it: the parameters are fake, so everything computed from them is, while the batch's token
    ids and masks stay real and the step's Python-level checks on them work as in a real run."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup  # under torchrun only
    names = ["lazy_init", "unshard", "wait_for_unshard", "reshard", "pre_forward", "post_forward", "pre_backward",
             "post_backward", "finalize_backward", "_prefetch_unshard", "_backward_prefetch"]
    saved = {n: FSDPParamGroup.__dict__[n] for n in names}

    def inside(f):
        @functools.wraps(f)
        def run(*a, **k):
            with fake_mode:
                return f(*a, **k)
        return run
    for n, f in saved.items():
        setattr(FSDPParamGroup, n, staticmethod(inside(f.__func__)) if isinstance(f, staticmethod) else inside(f))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(FSDPParamGroup, n, f)


def step_batch(method: methods.Method, vocab: int, batch: int, length: int) -> dict:
    """A fixed micro-batch of random tokens, half prompt and half answer: `batch` forget rows, and as many
    template rows when the method has a template stream."""
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, vocab, (length,), generator=g).tolist()} for _ in range(2 * batch)]
    for r in rows:
        r["labels"] = [IGNORE_INDEX] * (length // 2) + r["input_ids"][length // 2:]
    return {"forget": rows[:batch], **({"template": rows[batch:]} if method.template else {})}


def plan_step_memory(config, method_name: str, precision: str, gc: bool, batch: int, length: int, lora: int = 0,
                     rows: dict | None = None) -> dict:
    """Peak memory in bytes of one unlearning step of this project (train.batch_loss, the AdamW of
    train.optimizer_and_schedule, backward, clipping, the optimiser step; the reference for methods
    that have one, as stages.training_model makes it), run on fake tensors under a memory tracker, in
    the current process group (a fake one of N processes: each process's share, FSDP2-sharded as
    distributed.shard does it). lora: the rank of --lora (0: full fine-tuning). rows: a real
    micro-batch ({stream: rows}) instead of step_batch's. The second of two steps is the peak: AdamW's
    moments exist from the first.
    Returns {params, grads, optimizer, activations (and temporaries, gathered parameters and
    communication buffers), reference, total}."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # the planner only
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoModelForCausalLM
    compute = models.Compute("cpu", precision, gc)
    method, params = methods.FINETUNE if method_name == "finetune" else methods.WITH_ALIGNMENT[method_name], \
        methods.LossParams()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    if lora:  # peft moves each adapter to its layer's device by swapping parameters, which a fake tensor
        with torch.device("meta"):  # refuses: the model is built on the meta device, then given fake storage
            model = adapters.with_lora(AutoModelForCausalLM.from_config(config, dtype=compute.train_dtype),
                                       adapters.Lora(lora, 2.0 * lora))
        with fake_mode:
            model.to_empty(device="cpu")
            model.get_base_model().tie_weights()
    else:
        with fake_mode:
            model = AutoModelForCausalLM.from_config(config, dtype=compute.train_dtype)
    with fake_mode:  # the parameters, and so everything computed from them, are fake
        if gc:
            models.checkpointing(model, on=True)
        ref = None  # as stages.training_model makes it (a copy in the compute dtype: built anew, since
        if method.reference:  # a fake tensor cannot be cast in place), or the model with its adapters off
            ref = adapters.AdaptersOff(model) if lora else models.frozen_copy(
                AutoModelForCausalLM.from_config(config, dtype=compute.eval_dtype))
    sharded = distributed.world() > 1
    if sharded:  # outside the fake mode: the device mesh is made of real tensors
        for m in (model, ref) if ref is not None and not lora else (model,):
            distributed.shard(m, frozen=m is ref)
    nbytes = lambda m: sum(distributed.local(p).numel() * p.element_size() for p in m.parameters())  # noqa: E731
    copy = ref if not lora else None  # a LoRA run's reference is the model itself
    param_bytes, ref_bytes = nbytes(model), nbytes(copy) if copy is not None else 0  # resident: sharded
    if copy is not None:  # MemTracker hooks the gradient of every parameter it sees in a forward pass, which
        copy.requires_grad_(True)  # fails on frozen ones; the reference runs under no_grad: no gradient is made
    model.train()
    opt, _ = train.optimizer_and_schedule(model, 1e-5, 0.01, 0, 10)
    b = rows or step_batch(method, config.vocab_size, batch, length)
    tracker = _peak_only(FSDPMemTracker)(model, opt) if sharded else _peak_only(MemTracker)()
    tracker.track_external(*filter(None, (model, opt, ref)))
    with fsdp_allocations_in(fake_mode), tracker:
        for it in range(2):
            if it:
                tracker.reset_mod_stats()
            with compute.autocast():
                loss, _ = train.batch_loss(model, b, method, params, 0, ref)
            (loss * (distributed.world() / len(loss))).sum().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    by = {str(k).split(".")[-1].lower(): v for k, v in peak.items()}
    # FSDPMemTracker follows one root module: the reference's sharded parameters, made before it starts
    # and resident throughout, are not in its total (its gathered ones, while it runs, are)
    total = peak["Total"] + (ref_bytes if sharded else 0)
    out = {"total": total, "reference": ref_bytes, "params": param_bytes,
           "grads": sum(v for k, v in by.items() if "grad" in k), "optimizer": by.get("opt", by.get("optstate", 0))}
    out["activations"] = out["total"] - out["params"] - out["grads"] - out["optimizer"] - out["reference"]
    return out


def worker_plan(cfg: dict) -> dict:
    """Plan every row of one process-group size (a fake group of cfg["world"] processes)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # the planner only
    world = cfg["world"]
    if world > 1:
        torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    rows = []
    for row in cfg["rows"]:
        config = arch_config(row["model"])
        t = time.perf_counter()
        rows.append({**row, **plan_step_memory(config, row["method"], row["precision"], row["gc"], cfg["batch"],
                                               cfg["length"], row.get("lora", 0), cfg.get("batch_rows")),
                     "seconds": time.perf_counter() - t})
    return {"rows": rows}


def arch_config(name):
    """The transformers config of an architecture of ARCHS, of a model (alias or directory; its config
    only), or of a spec [kind, fields] ("opt" or "llama") such as the entries of ARCHS."""
    from transformers import LlamaConfig, OPTConfig  # heavy (seconds to import): where a model or config is built
    if isinstance(name, str) and name not in ARCHS:
        return models.model_config(name)
    kind, cfg = ARCHS[name] if isinstance(name, str) else name
    return (OPTConfig if kind == "opt" else LlamaConfig)(**cfg)


def worker_measure(cfg: dict) -> dict:
    """The same step as plan_step_memory, for real: on the CPU the peak resident memory of this process
    (getrusage's high-water mark) above what it held before the model was built; on CUDA
    (cfg["device"]) torch.cuda.max_memory_allocated, the model built on the GPU. cfg["lora"]: --lora's
    rank. An out-of-memory error gives {"measured": None}."""
    from transformers import AutoModelForCausalLM  # heavy (seconds to import): where a model or config is built
    device = cfg.get("device", "cpu")
    config = arch_config(cfg["model"])
    compute = models.Compute(device, cfg["precision"], cfg["gc"])
    method = methods.FINETUNE if cfg["method"] == "finetune" else methods.WITH_ALIGNMENT[cfg["method"]]
    b = step_batch(method, config.vocab_size, cfg["batch"], cfg["length"])
    cuda = device.startswith("cuda")
    before = _reset_peak_rss() if not cuda else 0
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=compute.train_dtype)
        if cfg["gc"]:
            models.checkpointing(model, on=True)
        if cfg.get("lora"):
            model = adapters.with_lora(model, adapters.Lora(cfg["lora"], 2.0 * cfg["lora"]))
        ref = None
        if method.reference:
            ref = adapters.AdaptersOff(model) if cfg.get("lora") else models.frozen_copy(model, compute.eval_dtype)
        model.train()
        opt, _ = train.optimizer_and_schedule(model, 1e-5, 0.01, 0, 10)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            with compute.autocast():
                loss, _ = train.batch_loss(model, b, method, methods.LossParams(), 0, ref)
            loss.mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        return {"measured": None, "before": before}
    if cuda:
        return {"measured": torch.cuda.max_memory_allocated(device), "before": before}
    return {"measured": _peak_rss() - before, "before": before}


def _reset_peak_rss() -> int:
    """The resident set now, with the high-water mark reset to it (Linux: writing 5 to clear_refs), so
    that a transient peak before the measurement (imports, the batch) cannot count as the step's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # an older kernel or a sandbox: the lifetime high-water mark stands
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """The high-water mark of the resident set (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def plan_memory_table(args, out: Path) -> None:
    """python -m bench --plan-memory: every row of plan_rows() at 16 forget rows (+ 16 template rows for
    FLAT) x 512 tokens per process, one worker process per process-group size; and the planner checked
    against a measured CPU step of SmolLM2-135M's architecture."""
    batch, length = args.batch_size or 16, 512
    rows = plan_rows()
    if args.models:
        rows = [r for r in rows if r["model"] in args.models]
    planned = []
    for world in PLAN_WORLDS:
        mine = [r for r in rows if r["world"] == world]
        if mine:
            planned += spawn(dict(kind="plan", world=world, rows=mine, batch=batch, length=length))["rows"]
            print(f"planned {len(planned)}/{len(rows)} rows", flush=True)
    planned.sort(key=lambda r: r["lora"] > 0)  # the LoRA rows last
    # One 24 GB GPU: Llama-2-7B with bf16 weights and LoRA 16 at smaller micro-batches (TOFU's is 8 rows)
    small_rows = [dict(model="llama2-7b", method=m, precision="bf16", gc=True, world=1, lora=16) for m in PLAN_METHODS]
    small = {b: spawn(dict(kind="plan", world=1, rows=small_rows, batch=b, length=length))["rows"]
             for b in SMALL_BATCHES if not args.models or "llama2-7b" in args.models}
    check = dict(model="smollm2-135m", method="flat", precision="fp32", gc=False, batch=4, length=256)
    est = spawn(dict(kind="plan", world=1, rows=[{k: check[k] for k in ("model", "method", "precision", "gc")}],
                     batch=check["batch"], length=check["length"]))["rows"][0]
    meas = spawn(dict(kind="measure", **check))
    gib = lambda b: b / 2**30  # noqa: E731
    lines = ["# Memory plan: peak memory of one unlearning step, per process\n",
             f"`python -m bench {' '.join(argv_of(args))}` on {date.today()}, {machine('cpu')}.\n",
             f"The real training step of this project (`train.batch_loss`, the AdamW of `train.optimizer_and_schedule`, "
             f"backward, clipping, the optimiser step; NPO's frozen reference model) run on fake tensors "
             f"(`FakeTensorMode`) under PyTorch's memory tracker (`MemTracker`; `FSDPMemTracker` with FSDP2 sharding "
             f"over a fake process group of N processes), models built from their configs, no weights. Micro-batch: "
             f"{batch} forget rows (+ {batch} template rows for FLAT) of {length} tokens per process, half prompt "
             f"and half answer. The peak is the second of two steps (AdamW's moments exist). GiB per process. "
             f"The columns split the total at the moment of the peak: *grads* is 0 where the peak falls in the "
             f"forward pass (set_to_none: no gradient exists yet), *optimizer* includes the step's temporaries where "
             f"it falls in the optimiser step. *activations* holds everything that is not a parameter, gradient, "
             f"optimiser state or the reference: activations, temporaries, gathered parameters, communication "
             f"buffers. The reference is a frozen copy in the compute dtype (bf16 under mixed precision), or with "
             f"--lora the model itself with its adapters off (no copy: 0). *fits* = total <= "
             f"{HEADROOM:.0%} of the GPU's memory (the rest for the CUDA context, allocator fragmentation and "
             f"workspaces).\n",
             f"**Planner against a measurement** (CPU, SmolLM2-135M architecture, FLAT, fp32, {check['batch']} x "
             f"{check['length']} tokens): planned {gib(est['total']):.2f} GiB, measured {gib(meas['measured']):.2f} GiB "
             f"(peak resident memory of a fresh process above what it held before building the model), planned / "
             f"measured = {est['total'] / meas['measured']:.3f}.\n",
             "| model | method | precision | grad. ckpt | processes | LoRA | params | grads | optimizer | activations | "
             "reference | total | " + " | ".join(f"fits one {gb} GB GPU" for gb in GPU_GBS) + " |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(GPU_GBS)]
    row = lambda r: (f"| {r['model']} | {r['method']} | {r['precision']} | {'on' if r['gc'] else 'off'} | {r['world']} | "  # noqa: E731
                     f"{r['lora'] or '-'} | {gib(r['params']):.1f} | {gib(r['grads']):.1f} | {gib(r['optimizer']):.1f} | "
                     f"{gib(r['activations']):.1f} | {gib(r['reference']):.1f} | {gib(r['total']):.1f} | "
                     + " | ".join('yes' if r['total'] <= HEADROOM * gb * 1e9 else 'no' for gb in GPU_GBS) + " |")
    lines += [row(r) for r in planned]
    for b, rows_b in small.items():
        lines += ["", f"## One 24 GB GPU: micro-batch of {b} forget rows (+ {b} template rows for FLAT)", "",
                  f"The same plan at {b} rows of {length} tokens per micro-batch"
                  + (" (TOFU's micro-batch, --batch-size 8)" if b == 8 else "") + ".", "", *lines[4:6],
                  *[row(r) for r in rows_b]]
    lines += ["", "## Measured on a GPU", "", "Not measured yet: no GPU was available to this work "
              "(`python -m bench --device cuda --memory` measures the CUDA rows next to these)."]
    write_text_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# The memory check before a training stage loads its model (CUDA only)
# ---------------------------------------------------------------------------------------------

def free_bytes(device: str) -> int | None:
    """The free memory of a CUDA device (None elsewhere: the check runs on CUDA only)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.mem_get_info(torch.device(device))[0]


def check_fits(start, method_name: str, plan, compute: models.Compute, args, world: int) -> None:
    """Before a training stage loads its weights: plan its peak memory (plan_step_memory on the
    stage's own largest micro-batch, in a worker process; 10-20 s for a 7B model) and, if it
    exceeds HEADROOM of the device's free memory, stop with one line naming the settings estimated
    to fit. Runs on CUDA only; --skip-memory-check skips it."""
    free = free_bytes(compute.device)
    if free is None or getattr(args, "skip_memory_check", False):
        return
    micro = max((m.batch for step in plan.steps for m in step),
                key=lambda b: sum(len(rows) for rows in b.values()) * max(len(r["input_ids"]) for rows in b.values()
                                                                           for r in rows))
    rows = {k: [{f: list(r[f]) for f in ("input_ids", "labels") if f in r} for r in v] for k, v in micro.items()}
    row = dict(model=str(start), method=method_name, precision=compute.precision, gc=compute.gradient_checkpointing,
               lora=args.lora)
    est = spawn(dict(kind="plan", world=world, rows=[row], batch=0, length=0, batch_rows=rows))["rows"][0]
    if est["total"] <= HEADROOM * free:
        return
    n_rows, length = len(next(iter(rows.values()))), max(len(r["input_ids"]) for v in rows.values() for r in v)
    fits = [f"{flag} (about {gib:.1f} GiB)" for flag, gib in alternatives(est, compute.precision, args.lora, world,
                                                                           HEADROOM * free)]
    raise UsageError(
        f"this training stage needs about {est['total'] / 2**30:.1f} GiB per process on {compute.device} "
        f"(memory planner: {method_name}, {compute.precision}, checkpointing "
        f"{'on' if compute.gradient_checkpointing else 'off'}{f', LoRA {args.lora}' if args.lora else ''}, "
        f"{n_rows} x {length} tokens per micro-batch) and {free / 2**30:.1f} GiB is free; "
        + (f"settings estimated to fit: {', '.join(fits)}" if fits else
           "no single change of --precision bf16, --lora 16 or torchrun up to 8 processes is estimated to fit: "
           "lower --batch-size (raise --grad-accum)")
        + "; --skip-memory-check runs anyway")


def alternatives(est: dict, precision: str, lora: int, world: int, budget: float) -> list[tuple[str, float]]:
    """Settings estimated to fit `budget` bytes, from the planned breakdown `est` (plan_step_memory's):
    bf16 weights halve parameters, gradients and AdamW's moments; LoRA leaves the base weights and the
    activations, with no reference copy, gradient or moment of size; N processes divide everything but
    the activations by N / world. Estimates, stated as such: each setting's own plan is the exact number."""
    state = est["params"] + est["grads"] + est["optimizer"] + est["reference"]
    out = []
    if precision != "bf16":
        out.append(("--precision bf16", est["total"] - (est["params"] + est["grads"] + est["optimizer"]) / 2))
    if not lora:
        out.append(("--lora 16", est["params"] + est["activations"]))
    for n in (2, 4, 8):
        if n > world:
            per = state * world / n + est["activations"]
            if per <= budget:
                out.append((f"torchrun --nproc_per_node {n}", per))
                break
    return [(flag, b / 2**30) for flag, b in out if b <= budget]


WORKERS = {"plan": worker_plan, "measure": worker_measure}


def spawn(cfg: dict) -> dict:
    """One planner worker in a fresh process (measure.spawn: the same environment as the benchmark's)."""
    return measure.spawn(cfg, "bench.memplan")


if __name__ == "__main__":
    assert sys.argv[1] == "--worker", "usage: python -m bench --plan-memory"
    cfg = json.loads(sys.argv[2])
    print(json.dumps(WORKERS[cfg.pop("kind")](cfg)))
