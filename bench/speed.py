"""Benchmark: this project's training step and TOFU evaluation against the reference pattern of
the existing unlearning code, side by side in one run, with model FLOPs utilisation against the
matrix-multiply rate measured on the same machine.

    python -m bench                                   # CPU: SmolLM2-135M, writes bench/RESULTS.md
    python -m bench --device cuda --models opt-1.3b opt-2.7b llama2-7b --memory   # GPU, random weights

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
import json
import random
import resource
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import data
import estimate
import evaluate
import flags
import methods
import models
import stages
import train
from bench import evaluation, measure, memplan
from bench.measure import ARCHS, machine, write_text_atomic
from errors import ModelLoadError
from flat import IGNORE_INDEX, SeqStats

ROOT = Path(__file__).resolve().parent.parent  # the repository
FIXED_LENGTH = 500  # the existing TOFU/FLAT code pads every example to 500 tokens
FIXED_NEW_TOKENS = 200



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


def reference_batch_loss(model, batch: dict, method: methods.Method, params: methods.LossParams, pad_id: int,
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
    from transformers import GenerationConfig  # heavy (seconds to import): where a model or config is built
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

SMOLLM2_FILES = ROOT / "vendored" / "smollm2_tokenizer"


def load(name: str, device: str, dtype, gc: bool):
    """A real model (alias or directory), or an architecture of ARCHS with random weights and the
    SmolLM2 tokenizer (token ids folded into its vocabulary)."""
    if name not in ARCHS:
        model, tok = models.load_model(name, device, dtype)
        models.checkpointing(model, on=gc)
        return model, tok
    # heavy (seconds to import): where a model or config is built
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig
    kind, cfg = ARCHS[name]
    config = (OPTConfig if kind == "opt" else LlamaConfig)(**cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    models.checkpointing(model, on=gc)
    tok = models.load_tokenizer(str(SMOLLM2_FILES))  # SmolLM2's tokenizer files, no weights needed
    return model, tok


def fold(batch: dict, vocab: int) -> dict:
    """Token ids mod the model's vocabulary (random-weight architectures use SmolLM2's tokenizer)."""
    def f(r):
        return {"input_ids": [i % vocab for i in r["input_ids"]],
                "labels": [i if i == IGNORE_INDEX else i % vocab for i in r["labels"]]}
    return {s: [f(r) for r in rows] for s, rows in batch.items()}


def tofu_batches(tok, style: str, method: methods.Method, params, batch_size: int, n: int, seed: int = 0):
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
    method, params = methods.LOSSES[cfg["method"]], methods.LossParams()
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
                loss, _ = train.batch_loss(model, batch, methods.LOSSES["flat"], methods.LossParams(), 0)
            loss.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        return {"peak_gb": peak_memory_gb(device), "fits": True}
    except torch.OutOfMemoryError:
        return {"peak_gb": float("nan"), "fits": False}


WORKERS = {"train": worker_train, "eval": worker_eval, "memory": worker_memory}


def spawn(cfg: dict) -> dict:
    """One benchmark worker in a fresh process (measure.spawn)."""
    return measure.spawn(cfg, "bench.speed")




# ---------------------------------------------------------------------------------------------
# The run and its table
# ---------------------------------------------------------------------------------------------

def positive(text: str) -> int:
    """An argparse type: an integer >= 1 (0 is an error, never "use the default")."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def precisions(text: str) -> str:
    """An argparse type: one precision of models.PRECISIONS, or a comma list of them."""
    names = text.split(",")
    bad = [n for n in names if n not in models.PRECISIONS]
    if bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of distinct precisions of "
                                         f"{', '.join(models.PRECISIONS)}")
    return text


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
    ap.add_argument("--precision", default="auto", type=precisions,
                    help="auto: mixed (bf16 autocast over fp32 weights) on CUDA, fp32 on CPU; a comma list (fp32,bf16) "
                         "times our training step at each, the reference at the first")
    ap.add_argument("--memory", action="store_true", help="CUDA: measured peak memory at batch 16 x 512 tokens")
    ap.add_argument("--plan-memory", action="store_true",
                    help="estimate peak memory per setting on fake tensors (no GPU, no weights): bench/MEMORY.md")
    ap.add_argument("--evaluation", action="store_true",
                    help="one model's TOFU evaluation by set and kind of work, against evaluate.py at --before: "
                         "bench/EVALUATION.md")
    ap.add_argument("--before", default=None, help="--evaluation: the git revision of the previous evaluate.py "
                                                   "(default: HEAD)")
    ap.add_argument("--out", default=None, help="default: bench/RESULTS.md (bench/MEMORY.md with --plan-memory, "
                                                "bench/EVALUATION.md with --evaluation)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        print(json.dumps(WORKERS[cfg.pop("kind")](cfg)))
        return
    try:
        compute = models.resolve_compute(args.device, args.precision.split(",")[0])
        for m in args.methods:
            methods.LOSSES.check(m)
        for name in args.models or []:
            if name not in ARCHS:
                models.check_name(name)
        out = Path(args.out or ROOT / "bench" / ("MEMORY.md" if args.plan_memory else
                                                 "EVALUATION.md" if args.evaluation else "RESULTS.md"))
        if out.is_dir():
            raise ValueError(f"--out {out}: is a directory, not a file")
        flags.check_out_dir(out.parent)   # writable: found out now, not after the whole benchmark
    except (ValueError, KeyError, ModelLoadError) as e:
        stages.fail(str(e))
    if args.plan_memory:
        return memplan.plan_memory_table(args, Path(args.out or ROOT / "bench" / "MEMORY.md"))
    if args.evaluation:
        return evaluation.table(args, out)
    args.out = args.out or str(ROOT / "bench" / "RESULTS.md")
    cuda = compute.device.startswith("cuda")
    model_names = args.models or (list(ARCHS) if cuda else ["smollm2-135m"])
    bs = args.batch_size if args.batch_size is not None else (8 if cuda else 4)
    steps = args.steps if args.steps is not None else (10 if cuda else 3)
    items = args.eval_items if args.eval_items is not None else (100 if cuda else 16)
    gcs = {"on": [True], "off": [False], "both": [False, True]}[args.gc or ("both" if cuda else "off")]
    dtype = torch.bfloat16 if cuda else torch.float32
    rate = estimate.matmul_rate(args.device, dtype, 8192 if cuda else 2048)
    lines = ["# Benchmark results\n",
             f"`python -m bench {' '.join(argv if argv is not None else sys.argv[1:])}` on {date.today()}, "
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
                first, *more = args.precision.split(",")  # the reference at the first; ours at each
                for impl, precision in [("ours", first), ("reference", first)] + [(f"ours ({p})", p) for p in more]:
                    res[impl] = spawn(dict(kind="train", impl=impl.split()[0], model=name, method=m, device=args.device,
                                           gc=gc, precision=precision, batch_size=bs, steps=steps))
                for impl, r in res.items():
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


def main_guarded() -> None:
    try:
        main()
    except KeyboardInterrupt:  # a worker process is a child: it gets the same Ctrl-C and ends too
        print("\ninterrupted: nothing written (the tables are written at the end)", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":  # a worker (measure.spawn); people run `python -m bench`
    main_guarded()
