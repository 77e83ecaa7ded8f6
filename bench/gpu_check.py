"""The GPU check: one command for a machine lent with one H100/H200 for a few minutes, no network,
and its own torch and transformers. It downloads nothing and writes one markdown file.

    python bench/gpu_check.py                      # on the GPU machine: bench/GPU_CHECK.md, about 7 minutes
    python bench/gpu_check.py --dry-run --out F    # the same wiring on the CPU with tiny models (tests)

1. Versions and the device. A package missing there (peft) is installed from wheels carried in
   bench/wheels/ (`pip download --no-deps -d bench/wheels peft==VERSION` beforehand), without its
   dependencies and without the network.
2. run_tofu.py end to end on CUDA, every method, on a random-weight model of SmolLM2-135M's size
   (its configuration and tokenizer are vendored: vendored/smollm2_tokenizer), a few steps each;
   then flat and npo with --lora 8.
3. bench/speed.py's training step for the OPT-2.7B architecture (random weights): speed and MFU, bf16 and
   mixed precision, gradient checkpointing off and on.
4. Peak memory of one training step, measured (torch.cuda.max_memory_allocated) beside the memory
   planner's (fake tensors, on the CPU, in parallel), for OPT-2.7B and Llama-2-7B: mixed, bf16 and
   bf16 + LoRA 16; FLAT and NPO; checkpointing on; 8 forget rows x 512 tokens.

Each part runs in its own processes under its own time limit, and the file is rewritten after each
part, so a part that fails or runs out of time leaves the others' results and says what happened.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOLLM2 = ROOT / "vendored" / "smollm2_tokenizer"
WHEELS = ROOT / "bench" / "wheels"
TINY = {"llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048),
        "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                    vocab_size=49152, max_position_embeddings=2048)}
LIMITS = {"tofu": 170, "bench": 110, "memory": 170}  # seconds per part: 7.5 minutes in all, with start-up


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, one step: checks the wiring")
    ap.add_argument("--out", default=None, help="default: bench/GPU_CHECK.md, the GPU's record; with --dry-run "
                                                "bench/GPU_CHECK.dry-run.md, so that a dry run never overwrites it")
    args = ap.parse_args(argv)
    default = "GPU_CHECK.dry-run.md" if args.dry_run else "GPU_CHECK.md"
    out, start = Path(args.out or ROOT / "bench" / default), time.time()
    report = [f"# GPU check{' (dry run: CPU, tiny models)' if args.dry_run else ''}\n",
              f"`python bench/gpu_check.py{' --dry-run' if args.dry_run else ''}` on {date.today()}.\n"]
    report += environment(args.dry_run)
    write(out, report)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        planner = start_planner(memory_rows(args.dry_run), args.dry_run, tmp)  # CPU work beside the GPU parts
        for title, part in (("End to end: run_tofu.py", tofu_part), ("Training step: bench/speed.py", bench_part),
                            ("Peak memory: measured and planned", lambda d, t: memory_part(d, t, planner))):
            t = time.time()
            try:
                lines = part(args.dry_run, tmp)
            except Exception as e:  # a part's failure is a result: record it, go on with the next part
                lines = [f"**failed**: {type(e).__name__}: {str(e)[-2000:]}"]
            report += [f"\n## {title} ({time.time() - t:.0f} s)\n", *lines]
            write(out, report)
            print(f"[gpu-check] {title}: {time.time() - t:.0f} s", flush=True)
    report.append(f"\nTotal: {time.time() - start:.0f} s.")
    write(out, report)
    print(f"written to {out}")


def write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def run(cmd: list[str], limit: float) -> tuple[int, str, str, float]:
    """A command under a time limit: (exit status, 124 when it ran out of time; its standard output;
    the tail of its standard error; seconds)."""
    t = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=limit)
        return p.returncode, p.stdout, p.stderr[-3000:], time.time() - t
    except subprocess.TimeoutExpired as e:
        text = lambda b: (b or b"").decode(errors="replace") if isinstance(b or b"", bytes) else b  # noqa: E731
        return 124, text(e.stdout), text(e.stderr)[-3000:], time.time() - t


# ---------------------------------------------------------------------------------------------
# 1. The machine
# ---------------------------------------------------------------------------------------------

def environment(dry_run: bool) -> list[str]:
    import importlib.util
    installed = []
    if importlib.util.find_spec("peft") is None:  # carried wheels, without dependencies or network
        wheels = sorted(WHEELS.glob("*.whl"))
        if wheels:
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *map(str, wheels)],
                           check=True, capture_output=True)
            installed = [w.name for w in wheels]
    import torch  # after environment() installed peft's carried wheels
    import transformers
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "accelerate", "datasets"):
        spec = importlib.util.find_spec(name)
        versions[name] = __import__(name).__version__ if spec else "missing"
    device = "CPU (dry run)" if dry_run else torch.cuda.get_device_name(0) + \
        f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"
    return [f"Device: {device}. " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."
            + (f" Installed from bench/wheels: {', '.join(installed)}." if installed else "")]


def random_model(tmp: Path, dry_run: bool) -> Path:
    """A random-weight model of SmolLM2-135M's configuration (dry run: 2 narrow layers) with its tokenizer."""
    import torch  # after environment() installed peft's carried wheels
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    config = AutoConfig.from_pretrained(SMOLLM2)
    if dry_run:
        for k, v in TINY["llama"].items():
            setattr(config, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp / "smollm2-random"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(SMOLLM2).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# 2.-4. The parts
# ---------------------------------------------------------------------------------------------

def tofu_part(dry_run: bool, tmp: Path) -> list[str]:
    """run_tofu.py with every method, then flat and npo with --lora 8: exit status, time, the table."""
    model = random_model(tmp, dry_run)
    device = ["--device", "cpu", "--gradient-checkpointing"] if dry_run else ["--device", "cuda"]  # CUDA: on
    small = ["--max-steps", "1" if dry_run else "3", "--retain-authors", "1", "--eval-items", "2" if dry_run else "8",
             "--max-new-tokens", "2" if dry_run else "16", "--batch-size", "2" if dry_run else "4"]
    lines, limit = [], LIMITS["tofu"] / 2 if not dry_run else 600
    runs = [("every method", ["--method", "all"]), ("--lora 8", ["--method", "flat,npo", "--lora", "8"])]
    for i, (label, extra) in enumerate(runs if not dry_run else [("--lora 8", ["--method", "npo", "--lora", "8"])]):
        cmd = [sys.executable, "run_tofu.py", "--model", str(model), "--out", str(tmp / f"tofu-{i}"),
               *device, *small, *extra]
        code, stdout, err, secs = run(cmd, limit)
        table = [line for line in stdout.splitlines() if line.startswith("|")]
        lines += [f"`{' '.join(['python', *cmd[1:]])}`: exit {code}, {secs:.0f} s.\n", *table, ""]
        if code != 0:
            lines += ["```", err[-1500:], "```"]
    return lines


def bench_part(dry_run: bool, tmp: Path) -> list[str]:
    """bench/speed.py's training step, OPT-2.7B, FLAT, bf16 and mixed, checkpointing off and on."""
    lines = []
    if dry_run:
        model = tiny_dir(tmp, "opt")
        runs = [["--device", "cpu", "--models", str(model), "--precision", "fp32", "--gc", "off", "--steps", "1"]]
    else:
        runs = [["--device", "cuda", "--models", "opt-2.7b", "--precision", p, "--gc", "both", "--steps", "5"]
                for p in ("bf16", "mixed")]
    for i, extra in enumerate(runs):
        cmd = [sys.executable, "-m", "bench", *extra, "--methods", "flat", "--no-eval", "--out", str(tmp / f"bench{i}.md")]
        code, stdout, err, secs = run(cmd, LIMITS["bench"] / len(runs) if not dry_run else 600)
        table = [line for line in stdout.splitlines() if line.startswith("|")]
        rate = [line for line in stdout.splitlines() if line.startswith("Matrix-multiply rate")]
        lines += [f"`{' '.join(['python', *cmd[1:]])}`: exit {code}, {secs:.0f} s.\n", *rate, "", *table, ""]
        if code != 0:
            lines += ["```", err[-1500:], "```"]
    return lines


def tiny_dir(tmp: Path, kind: str) -> Path:
    """A tiny random model of `kind` saved with SmolLM2's tokenizer (dry run only)."""
    # after environment() installed peft's carried wheels
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, OPTConfig
    path = tmp / f"tiny-{kind}"
    if not path.exists():
        config = (OPTConfig if kind == "opt" else LlamaConfig)(**TINY[kind])
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        AutoTokenizer.from_pretrained(SMOLLM2).save_pretrained(path)
    return path


def memory_rows(dry_run: bool) -> list[dict]:
    if dry_run:  # each architecture, method, precision and LoRA on or off once: every code path
        return [dict(model=["opt", TINY["opt"]], method="flat", precision="mixed", gc=True, lora=0),
                dict(model=["llama", TINY["llama"]], method="npo", precision="bf16", gc=True, lora=16)]
    return [dict(model=m, method=meth, precision=p, gc=True, lora=lora) for m in ("opt-2.7b", "llama2-7b")
            for meth in ("flat", "npo") for p, lora in (("mixed", 0), ("bf16", 0), ("bf16", 16))]


BATCH, LENGTH = 8, 512


def start_planner(rows: list[dict], dry_run: bool, tmp: Path) -> subprocess.Popen:
    """The planner's rows in one background process on the CPU (memplan.worker_plan), started first."""
    cfg = dict(kind="plan", world=1, rows=rows, batch=2 if dry_run else BATCH, length=32 if dry_run else LENGTH)
    return subprocess.Popen([sys.executable, "-m", "bench.memplan", "--worker", json.dumps(cfg)], cwd=ROOT,
                            stdout=open(tmp / "plan.json", "w"), stderr=open(tmp / "plan.err", "w"))


def memory_part(dry_run: bool, tmp: Path, planner: subprocess.Popen) -> list[str]:
    """Each row's measured peak (memplan.worker_measure on CUDA, one process each) beside the planner's."""
    rows, deadline = memory_rows(dry_run), time.time() + LIMITS["memory"]
    device, batch, length = ("cpu", 2, 32) if dry_run else ("cuda", BATCH, LENGTH)
    measured = []
    for row in rows:
        left = deadline - time.time() - 20  # keep time to collect the plan
        if left <= 0:
            measured.append("not run: out of time")
            continue
        cfg = dict(kind="measure", **row, device=device, batch=batch, length=length)
        code, stdout, _, _ = run([sys.executable, "-m", "bench.memplan", "--worker", json.dumps(cfg)], min(left, 90))
        measured.append(json.loads(stdout.strip().splitlines()[-1])["measured"] if code == 0 else f"failed (exit {code})")
    try:
        planner.wait(timeout=max(1.0, deadline - time.time()))
        plans = json.loads((tmp / "plan.json").read_text().strip().splitlines()[-1])["rows"]
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        planner.kill()
        plans = [None] * len(rows)
    gib = lambda b: f"{b / 2**30:.2f}" if isinstance(b, (int, float)) else ("OOM" if b is None else b)  # noqa: E731
    lines = [f"{batch} forget rows (+ {batch} template rows for FLAT) x {length} tokens, AdamW, checkpointing on; "
             f"measured: torch.cuda.max_memory_allocated over two steps; planned: memplan.plan_step_memory.\n",
             "| model | method | precision | LoRA | measured (GiB) | planned (GiB) | planned / measured |",
             "|---|---|---|---|---|---|---|"]
    for row, m, p in zip(rows, measured, plans):
        name = row["model"] if isinstance(row["model"], str) else f"tiny {row['model'][0]}"
        planned = p["total"] if p else "not planned"
        ratio = f"{planned / m:.3f}" if isinstance(m, (int, float)) and m and isinstance(planned, (int, float)) else "-"
        lines.append(f"| {name} | {row['method']} | {row['precision']} | {row['lora'] or '-'} | {gib(m)} | "
                     f"{gib(planned)} | {ratio} |")
    return lines


if __name__ == "__main__":
    main()
