"""Benchmark: this project's training step and TOFU evaluation against the reference pattern of
the existing unlearning code, side by side in one run, with model FLOPs utilisation against the
matrix-multiply rate measured on the same machine.

    python bench.py                                   # CPU: SmolLM2-135M, writes bench/RESULTS.md
    python bench.py --device cuda --models opt-1.3b opt-2.7b llama2-7b --memory   # GPU, random weights

The reference pattern, written here from its description (it is not this project's code path):
every example padded to a fixed 500 tokens, the forget / template / retain / reference passes run
separately, full-vocabulary logits at every position, per-sample Python loops computing token
probabilities from a full softmax; evaluation runs one forward pass per candidate answer and
generates a fixed 200 tokens. Both paths compute the same values (tests/test_bench.py).

Each measurement runs in its own subprocess, so peak memory (CUDA: max allocated; CPU: peak RSS
of the process) belongs to that measurement alone.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import numpy as np
import torch

import data
import distributed
import evaluate
import flat
import models
import stages
import train
from flat import IGNORE_INDEX, SeqStats

ROOT = Path(__file__).resolve().parent
FIXED_LENGTH = 500  # the existing TOFU/FLAT code pads every example to 500 tokens
FIXED_NEW_TOKENS = 200

# Architectures built from a config with random weights (no Hub): speed and memory only.
ARCHS = {
    "opt-1.3b": ("opt", dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                             word_embed_proj_dim=2048, vocab_size=50272, max_position_embeddings=2048)),
    "opt-2.7b": ("opt", dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                             word_embed_proj_dim=2560, vocab_size=50272, max_position_embeddings=2048)),
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                max_position_embeddings=4096)),
}


# ---------------------------------------------------------------------------------------------
# The reference pattern
# ---------------------------------------------------------------------------------------------

def pad_right(rows: list[dict], pad_id: int, length: int = FIXED_LENGTH) -> dict[str, torch.Tensor]:
    """Every row padded on the right to a fixed length (rows longer than it are an error)."""
    if max(len(r["input_ids"]) for r in rows) > length:
        raise ValueError(f"a row is longer than the fixed length {length}")
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), 1
        labels[i, :n] = torch.tensor(r.get("labels", r["input_ids"]))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loop_stats(logits: torch.Tensor, labels: torch.Tensor) -> SeqStats:
    """Per-sample loop: full softmax over the vocabulary at every position, then gather."""
    out = []
    for i in range(logits.shape[0]):
        logp_all = torch.log_softmax(logits[i, :-1].float(), -1)     # (T-1, V)
        lab = labels[i, 1:]
        keep = lab != IGNORE_INDEX
        logp = logp_all[keep].gather(-1, lab[keep, None])[:, 0]
        out.append((logp.sum(), logp.mean(), logp.exp().mean(), keep.sum()))
    return SeqStats(*(torch.stack([o[k] for o in out]) for k in range(4)))


def loop_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(logits.shape[0]):
        keep = labels[i, 1:] != IGNORE_INDEX
        logq = torch.log_softmax(logits[i, :-1].float(), -1)[keep]
        logp = torch.log_softmax(ref_logits[i, :-1].float(), -1)[keep]
        out.append((logp.exp() * (logp - logq)).sum(-1).mean())
    return torch.stack(out)


def reference_batch_loss(model, batch: dict, method: flat.Method, params: flat.LossParams, pad_id: int,
                         ref_model=None, length: int = FIXED_LENGTH) -> tuple[torch.Tensor, dict]:
    """train.batch_loss in the reference pattern: one fixed-length forward pass per stream, and
    one more per stream for the reference model."""
    device = next(model.parameters()).device
    stats = {}
    for s in [s for s in data.STREAMS if s in batch]:
        b = {k: v.to(device) for k, v in pad_right(batch[s], pad_id, length).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        stats[s] = loop_stats(logits, b["labels"])
        if ref_model is not None and s in method.reference:
            with torch.no_grad():
                ref_logits = ref_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            if s == "retain":
                stats["retain_kl"] = loop_kl(logits, ref_logits, b["labels"])
            else:
                stats["ref_" + s] = loop_stats(ref_logits, b["labels"])
    return method.call(stats, params), {}


@torch.no_grad()
def reference_answer_nll(model, tokenizer, style, questions, answers, rows_per_batch=32, length=FIXED_LENGTH):
    """One fixed-length forward pass per candidate answer: answer j of every item, batch by batch."""
    device = next(model.parameters()).device
    out = [[None] * len(a) for a in answers]
    for j in range(max(map(len, answers))):
        items = [i for i, a in enumerate(answers) if j < len(a)]
        for s in range(0, len(items), rows_per_batch):
            chunk = items[s:s + rows_per_batch]
            b = pad_right([data.encode_qa(tokenizer, style, questions[i], answers[i][j]) for i in chunk],
                          tokenizer.pad_token_id, length)
            b = {k: v.to(device) for k, v in b.items()}
            nll = -loop_stats(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                              b["labels"]).logp_mean
            for i, v in zip(chunk, nll.tolist()):
                out[i][j] = v
    return out


@torch.no_grad()
def reference_generate(model, tokenizer, style, questions, max_new_tokens=FIXED_NEW_TOKENS, batch_size=32):
    """Generation to a fixed number of new tokens (no stop at EOS), text cut at EOS afterwards."""
    from transformers import GenerationConfig
    prompts = [data.encode_prompt(tokenizer, style, q) for q in questions]
    out = []
    for s in range(0, len(prompts), batch_size):
        idx = list(range(s, min(s + batch_size, len(prompts))))
        b = {k: v.to(next(model.parameters()).device)
             for k, v in data.collate([{"input_ids": prompts[i]} for i in idx], tokenizer.pad_token_id).items()}
        # no EOS id: every row runs the full max_new_tokens (min_new_tokens would instead forbid EOS)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id)
        gen = model.generate(**b, generation_config=config)
        for row in gen[:, b["input_ids"].shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


# ---------------------------------------------------------------------------------------------
# Workers: one measurement each, in its own process
# ---------------------------------------------------------------------------------------------

def load(name: str, device: str, dtype, gc: bool):
    """A real model (alias or directory), or an architecture of ARCHS with random weights and the
    SmolLM2 tokenizer (token ids folded into its vocabulary)."""
    if name not in ARCHS:
        return models.load_model(name, device, dtype, gc)
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig
    kind, cfg = ARCHS[name]
    config = (OPTConfig if kind == "opt" else LlamaConfig)(**cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if gc:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    tok = models.load_tokenizer("smollm2-135m")
    return model, tok


def fold(batch: dict, vocab: int) -> dict:
    """Token ids mod the model's vocabulary (random-weight architectures use SmolLM2's tokenizer)."""
    def f(r):
        return {"input_ids": [i % vocab for i in r["input_ids"]],
                "labels": [i if i == IGNORE_INDEX else i % vocab for i in r["labels"]]}
    return {s: [f(r) for r in rows] for s, rows in batch.items()}


def tofu_batches(tok, style: str, method: flat.Method, params, batch_size: int, n: int, seed: int = 0):
    """n unlearning batches over TOFU forget10 (its real lengths), with IDK templates and retain90."""
    rng = random.Random(seed)
    forget = data.load_tofu("forget10")
    templates = data.load_idk() if method.template else None
    retain = data.load_tofu("retain90") if method.needs_retain(params) else None
    return data.unlearning_epoch(tok, style, forget, templates, retain, batch_size, rng)[:n]


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_gb(device: str) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def worker_train(cfg: dict) -> dict:
    device, gc = cfg["device"], cfg["gc"]
    compute = models.resolve_compute(device, cfg["precision"], gc)
    model, tok = load(cfg["model"], device, compute.train_dtype, gc)
    method, params = flat.LOSSES[cfg["method"]], flat.LossParams()
    ref = models.frozen_copy(model) if method.reference else None
    style = models.prompt_style(cfg["model"], tok) if cfg["model"] not in ARCHS else "base"
    batches = tofu_batches(tok, style, method, params, cfg["batch_size"], cfg["steps"] + 1)
    if cfg["model"] in ARCHS:
        batches = [fold(b, model.config.vocab_size) for b in batches]
    fn = train.batch_loss if cfg["impl"] == "ours" else reference_batch_loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    model.train()
    times = []
    for i, batch in enumerate(batches):
        sync(device)
        t = time.perf_counter()
        with compute.autocast():
            loss, _ = fn(model, batch, method, params, tok.pad_token_id, ref)
            loss = loss.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    n_params = sum(p.numel() for p in model.parameters())
    trained = [sum(len(r["input_ids"]) for rows in b.values() for r in rows) for b in batches[1:]]
    ref_rows = [sum(len(r["input_ids"]) for s in method.reference if s in b for r in b[s]) for b in batches[1:]]
    flops = [(8 if gc else 6) * n_params * t + (2 * n_params * r if ref is not None else 0)
             for t, r in zip(trained, ref_rows)]
    return {"step_s": float(np.mean(times)), "tokens_per_s": float(np.sum(trained) / np.sum(times)),
            "model_flops_per_s": float(np.sum(flops) / np.sum(times)), "peak_gb": peak_memory_gb(device),
            "n_params": n_params, "mean_tokens_per_step": float(np.mean(trained))}


def worker_eval(cfg: dict) -> dict:
    device = cfg["device"]
    compute = models.resolve_compute(device)
    model, tok = load(cfg["model"], device, compute.eval_dtype, False)
    style = models.prompt_style(cfg["model"], tok) if cfg["model"] not in ARCHS else "base"
    rows = data.load_tofu("forget10_perturbed")[:cfg["items"]]
    kw = {} if cfg["impl"] == "ours" else dict(nll_fn=reference_answer_nll, generate_fn=reference_generate)
    sync(device)
    t = time.perf_counter()
    summary, _ = evaluate.evaluate_tofu_set(model, tok, style, "forget", rows, FIXED_NEW_TOKENS,
                                            cfg["batch_size"], **kw)
    sync(device)
    dt = time.perf_counter() - t
    return {"eval_s": dt, "items_per_s": len(rows) / dt, "peak_gb": peak_memory_gb(device), "summary": summary}


def worker_memory(cfg: dict) -> dict:
    """Peak memory of one FLAT step on a fixed batch of random tokens (CUDA)."""
    device = cfg["device"]
    compute = models.resolve_compute(device, cfg["precision"], cfg["gc"])
    model, _ = load(cfg["model"], device, compute.train_dtype, cfg["gc"])
    B, T, V = cfg["batch_size"], cfg["length"], model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, V, (T,), generator=g).tolist()} for _ in range(2 * B)]
    for r in rows:
        r["labels"] = [IGNORE_INDEX] * (T // 2) + r["input_ids"][T // 2:]
    batch = {"forget": rows[:B], "template": rows[B:]}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    try:
        for _ in range(2):
            with compute.autocast():
                loss, _ = train.batch_loss(model, batch, flat.LOSSES["flat"], flat.LossParams(), 0)
            loss.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        return {"peak_gb": peak_memory_gb(device), "fits": True}
    except torch.OutOfMemoryError:
        return {"peak_gb": float("nan"), "fits": False}


def matmul_rate(device: str, dtype, n: int, reps: int = 10) -> float:
    """FLOP/s of an n x n matrix multiply on this device, the best of a few timed repetitions."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


# ---------------------------------------------------------------------------------------------
# Memory planner: the real training step on fake tensors (no GPU, no weights, no memory)
# ---------------------------------------------------------------------------------------------

PLAN_METHODS = ("flat", "npo")      # FLAT alone; NPO with its frozen reference model
PLAN_PRECISIONS = ("mixed", "bf16")
PLAN_WORLDS = (1, 2, 4, 8)
GPU_GB = 80                          # one 80 GB GPU (A100/H100)
HEADROOM = 0.9                       # the share of it a run can count on (CUDA context, allocator, workspaces)


def plan_rows() -> list[dict]:
    """Every setting the planner's table has: architecture x method x precision x checkpointing x processes."""
    return [dict(model=m, method=meth, precision=p, gc=gc, world=w) for m in ARCHS for meth in PLAN_METHODS
            for p in PLAN_PRECISIONS for gc in (True, False) for w in PLAN_WORLDS]


def _peak_only(tracker_cls):
    """A memory tracker keeping the whole-process peak only: the stock trackers also keep every
    module's peak, which costs O(modules) per operator (a 100x slowdown on a 30-layer model)."""
    class PeakOnly(tracker_cls):
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
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
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


def step_batch(method: flat.Method, vocab: int, batch: int, length: int) -> dict:
    """A fixed micro-batch of random tokens, half prompt and half answer: `batch` forget rows, and as many
    template rows when the method has a template stream."""
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, vocab, (length,), generator=g).tolist()} for _ in range(2 * batch)]
    for r in rows:
        r["labels"] = [IGNORE_INDEX] * (length // 2) + r["input_ids"][length // 2:]
    return {"forget": rows[:batch], **({"template": rows[batch:]} if method.template else {})}


def plan_step_memory(config, method_name: str, precision: str, gc: bool, batch: int, length: int) -> dict:
    """Peak memory in bytes of one unlearning step of this project (train.batch_loss, the AdamW of
    train.optimizer_and_schedule, backward, clipping, the optimiser step; the frozen reference for methods
    that have one), run on fake tensors under a memory tracker, in the current process group (a fake
    one of N processes: each process's share, FSDP2-sharded as distributed.shard does it). The second of
    two steps is the peak: AdamW's moments exist from the first.
    Returns {params, grads, optimizer, activations (and temporaries, gathered parameters and
    communication buffers), reference, total}."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoModelForCausalLM
    compute = models.Compute("cpu", precision, gc)
    method, params = flat.LOSSES[method_name], flat.LossParams()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:  # the parameters, and so everything computed from them, are fake
        model = AutoModelForCausalLM.from_config(config, dtype=compute.train_dtype)
        if gc:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        ref = models.frozen_copy(model) if method.reference else None
    sharded = distributed.world() > 1
    if sharded:  # outside the fake mode: the device mesh is made of real tensors
        for m in filter(None, (model, ref)):
            distributed.shard(m, frozen=m is ref)
    nbytes = lambda m: sum(distributed.local(p).numel() * p.element_size() for p in m.parameters())  # noqa: E731
    param_bytes, ref_bytes = nbytes(model), nbytes(ref) if ref is not None else 0  # resident: sharded
    if ref is not None:  # MemTracker hooks the gradient of every parameter it sees in a forward pass, which
        ref.requires_grad_(True)  # fails on frozen ones; the reference runs under no_grad: no gradient is made
    model.train()
    opt, _ = train.optimizer_and_schedule(model, 1e-5, 0.01, 0, 10)
    b = step_batch(method, config.vocab_size, batch, length)
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
    from torch.testing._internal.distributed.fake_pg import FakeStore
    world = cfg["world"]
    if world > 1:
        torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    rows = []
    for row in cfg["rows"]:
        config = arch_config(row["model"])
        t = time.perf_counter()
        rows.append({**row, **plan_step_memory(config, row["method"], row["precision"], row["gc"], cfg["batch"],
                                               cfg["length"]), "seconds": time.perf_counter() - t})
    return {"rows": rows}


def arch_config(name):
    """The transformers config of an architecture of ARCHS, of a model (alias or directory; its config
    only), or of a spec [kind, fields] ("opt" or "llama") such as the entries of ARCHS."""
    from transformers import LlamaConfig, OPTConfig
    if isinstance(name, str) and name not in ARCHS:
        return models.model_config(name)
    kind, cfg = ARCHS[name] if isinstance(name, str) else name
    return (OPTConfig if kind == "opt" else LlamaConfig)(**cfg)


def worker_measure(cfg: dict) -> dict:
    """The same step as plan_step_memory, for real, on the CPU: peak resident memory of this process
    (getrusage's high-water mark) above what it held before the model was built."""
    from transformers import AutoModelForCausalLM
    config = arch_config(cfg["model"])
    compute = models.Compute("cpu", cfg["precision"], cfg["gc"])
    method, params = flat.LOSSES[cfg["method"]], flat.LossParams()
    b = step_batch(method, config.vocab_size, cfg["batch"], cfg["length"])
    before = _rss_bytes()
    model = AutoModelForCausalLM.from_config(config, dtype=compute.train_dtype)
    if cfg["gc"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ref = models.frozen_copy(model) if method.reference else None
    model.train()
    opt, _ = train.optimizer_and_schedule(model, 1e-5, 0.01, 0, 10)
    for _ in range(2):
        with compute.autocast():
            loss, _ = train.batch_loss(model, b, method, params, 0, ref)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"measured": peak - before, "before": before}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def plan_memory_table(args, out: Path) -> None:
    """python bench.py --plan-memory: every row of plan_rows() at 16 forget rows (+ 16 template rows for
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
    check = dict(model="smollm2-135m", method="flat", precision="fp32", gc=False, batch=4, length=256)
    est = spawn(dict(kind="plan", world=1, rows=[{k: check[k] for k in ("model", "method", "precision", "gc")}],
                     batch=check["batch"], length=check["length"]))["rows"][0]
    meas = spawn(dict(kind="measure", **check))
    gib = lambda b: b / 2**30  # noqa: E731
    lines = ["# Memory plan: peak memory of one unlearning step, per process\n",
             f"`python bench.py {' '.join(argv_of(args))}` on {date.today()}, {machine('cpu')}.\n",
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
             f"buffers. *fits* = total <= "
             f"{HEADROOM:.0%} of {GPU_GB} GB (the rest for the CUDA context, allocator fragmentation and workspaces).\n",
             f"**Planner against a measurement** (CPU, SmolLM2-135M architecture, FLAT, fp32, {check['batch']} x "
             f"{check['length']} tokens): planned {gib(est['total']):.2f} GiB, measured {gib(meas['measured']):.2f} GiB "
             f"(peak resident memory of a fresh process above what it held before building the model), planned / "
             f"measured = {est['total'] / meas['measured']:.3f}.\n",
             "| model | method | precision | grad. ckpt | processes | params | grads | optimizer | activations | "
             "reference | total | fits one 80 GB GPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in planned:
        lines.append(f"| {r['model']} | {r['method']} | {r['precision']} | {'on' if r['gc'] else 'off'} | {r['world']} | "
                     f"{gib(r['params']):.1f} | {gib(r['grads']):.1f} | {gib(r['optimizer']):.1f} | "
                     f"{gib(r['activations']):.1f} | {gib(r['reference']):.1f} | {gib(r['total']):.1f} | "
                     f"{'yes' if r['total'] <= HEADROOM * GPU_GB * 1e9 else 'no'} |")
    lines += ["", "## Measured on a GPU", "", "Not measured yet: no GPU was available to this work "
              "(`python bench.py --device cuda --memory` measures the CUDA rows next to these)."]
    write_text_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


def argv_of(args) -> list[str]:
    return sys.argv[1:] if args is not None else []


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{models.TMP_PREFIX}{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


WORKERS = {"train": worker_train, "eval": worker_eval, "memory": worker_memory, "plan": worker_plan,
           "measure": worker_measure}


def spawn(cfg: dict) -> dict:
    """Run one measurement in a fresh process and return its JSON result. glibc's malloc serves every
    allocation above 128 KiB with mmap there, so a freed tensor leaves the resident set at once and the
    process's high-water mark (peak_memory_gb on CPU, worker_measure) is the peak of live memory."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"worker {cfg} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The run and its table
# ---------------------------------------------------------------------------------------------

def positive(text: str) -> int:
    """An argparse type: an integer >= 1 (0 is an error, never "use the default")."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=None, help="default: smollm2-135m on CPU, the ARCHS on CUDA")
    ap.add_argument("--methods", nargs="+", default=["flat", "ga", "npo", "llmu"])
    ap.add_argument("--batch-size", type=positive, default=None, help="forget examples per step (CPU 4, CUDA 8)")
    ap.add_argument("--steps", type=positive, default=None, help="timed steps per measurement (CPU 3, CUDA 10)")
    ap.add_argument("--eval-items", type=positive, default=None, help="forget10 items evaluated (CPU 16, CUDA 100)")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--gc", choices=["on", "off", "both"], default=None, help="gradient checkpointing (CPU off, CUDA both)")
    ap.add_argument("--precision", default="auto", choices=list(models.PRECISIONS),
                    help="auto: mixed (bf16 autocast over fp32 weights) on CUDA, fp32 on CPU")
    ap.add_argument("--memory", action="store_true", help="CUDA: measured peak memory at batch 16 x 512 tokens")
    ap.add_argument("--plan-memory", action="store_true",
                    help="estimate peak memory per setting on fake tensors (no GPU, no weights): bench/MEMORY.md")
    ap.add_argument("--out", default=None, help="default: bench/RESULTS.md (bench/MEMORY.md with --plan-memory)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        print(json.dumps(WORKERS[cfg.pop("kind")](cfg)))
        return
    try:
        compute = models.resolve_compute(args.device, args.precision)
        for m in args.methods:
            flat.LOSSES[m]
        for name in args.models or []:
            if name not in ARCHS:
                models.check_name(name)
    except (ValueError, KeyError, models.ModelLoadError) as e:
        stages.fail(str(e))
    if args.plan_memory:
        return plan_memory_table(args, Path(args.out or ROOT / "bench" / "MEMORY.md"))
    args.out = args.out or str(ROOT / "bench" / "RESULTS.md")
    cuda = compute.device.startswith("cuda")
    model_names = args.models or (list(ARCHS) if cuda else ["smollm2-135m"])
    bs = args.batch_size if args.batch_size is not None else (8 if cuda else 4)
    steps = args.steps if args.steps is not None else (10 if cuda else 3)
    items = args.eval_items if args.eval_items is not None else (100 if cuda else 16)
    gcs = {"on": [True], "off": [False], "both": [False, True]}[args.gc or ("both" if cuda else "off")]
    dtype = torch.bfloat16 if cuda else torch.float32
    rate = matmul_rate(args.device, dtype, 8192 if cuda else 2048)
    lines = ["# Benchmark results\n",
             f"`python bench.py {' '.join(argv if argv is not None else sys.argv[1:])}` on {date.today()}, "
             f"{machine(args.device)}.\n",
             f"Matrix-multiply rate measured in this run ({'bf16' if cuda else 'fp32'}): {rate / 1e9:.1f} GFLOP/s. "
             f"MFU = model FLOPs (6 x params x tokens per trained token, 8x with gradient checkpointing, "
             f"2x for the frozen reference's tokens) / step time / that rate.\n"]
    print("".join(lines))

    lines.append(f"\n## Training step: TOFU forget10, batch {bs} forget examples (+ their template / retain rows), "
                 f"{steps} timed steps after one warm-up\n")
    header = ("| model | method | grad. ckpt | impl | step (s) | tokens/s | MFU | peak mem (GiB) | speed-up |\n"
              "|---|---|---|---|---|---|---|---|---|")
    lines.append(header)
    print(header)
    for name in model_names:
        for gc in gcs:
            for m in args.methods:
                res = {}
                for impl in ("ours", "reference"):
                    res[impl] = spawn(dict(kind="train", impl=impl, model=name, method=m, device=args.device, gc=gc,
                                           precision=args.precision, batch_size=bs, steps=steps))
                for impl in ("ours", "reference"):
                    r = res[impl]
                    speed = res["reference"]["step_s"] / r["step_s"]
                    row = (f"| {name} | {m} | {'on' if gc else 'off'} | {impl} | {r['step_s']:.2f} | "
                           f"{r['tokens_per_s']:.0f} | {r['model_flops_per_s'] / rate:.0%} | {r['peak_gb']:.2f} | "
                           f"{speed:.1f}x |")
                    lines.append(row)
                    print(row, flush=True)

    if not args.no_eval:
        lines.append(f"\n## TOFU evaluation: forget10, first {items} items (7 answers each: probabilities, truth "
                     f"ratio; greedy generation up to {FIXED_NEW_TOKENS} tokens; ROUGE-L)\n")
        header = ("| model | impl | time (s) | items/s | peak mem (GiB) | speed-up | same metrics |\n"
                  "|---|---|---|---|---|---|---|")
        lines.append(header)
        print(header)
        for name in model_names:
            res = {impl: spawn(dict(kind="eval", impl=impl, model=name, device=args.device, items=items,
                                    batch_size=32)) for impl in ("ours", "reference")}
            same = all(abs(res["ours"]["summary"][k] - res["reference"]["summary"][k]) < 2e-3 * max(
                1, abs(res["reference"]["summary"][k])) for k in res["ours"]["summary"])
            for impl in ("ours", "reference"):
                r = res[impl]
                row = (f"| {name} | {impl} | {r['eval_s']:.1f} | {r['items_per_s']:.2f} | {r['peak_gb']:.2f} | "
                       f"{res['reference']['eval_s'] / r['eval_s']:.1f}x | {'yes' if same else 'NO'} |")
                lines.append(row)
                print(row, flush=True)

    if args.memory and cuda:
        lines.append("\n## Memory: full-parameter FLAT step, batch 16 forget + 16 template rows x 512 tokens, AdamW\n")
        header = "| model | precision | grad. ckpt | peak mem (GiB) | fits |\n|---|---|---|---|---|"
        lines.append(header)
        print(header)
        for name in ARCHS:
            for precision in ("mixed", "bf16"):
                for gc in (True, False):
                    r = spawn(dict(kind="memory", model=name, device=args.device, precision=precision, gc=gc,
                                   batch_size=16, length=512))
                    row = f"| {name} | {precision} | {'on' if gc else 'off'} | {r['peak_gb']:.1f} | {r['fits']} |"
                    lines.append(row)
                    print(row, flush=True)
    write_text_atomic(Path(args.out), "\n".join(lines) + "\n")
    print(f"\nwritten to {args.out}")


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads (torch {torch.__version__})")


if __name__ == "__main__":
    main()
