"""What the speed benchmark (bench/speed.py) and the memory planner (bench/memplan.py) share: the architectures
they build with random weights, measurements in fresh worker processes, the machine's description and
atomic report writing."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import models

ROOT = Path(__file__).resolve().parent.parent  # the repository

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


def spawn(cfg: dict, module: str, exact_peak: bool = True) -> dict:
    """Run one measurement in a fresh process (`python -m MODULE --worker JSON`, from the repository)
    and return its JSON result. With exact_peak, glibc's malloc serves every allocation above 128 KiB
    with mmap there, so a freed tensor leaves the resident set at once and the process's high-water
    mark (peak_memory_gb on CPU, memplan.worker_measure) is the peak of live memory; that costs time
    (each large allocation is fresh pages), so a measurement of time alone passes exact_peak=False."""
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if exact_peak else {})}
    p = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(cfg)],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"worker {cfg} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def argv_of(args) -> list[str]:
    return sys.argv[1:] if args is not None else []


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{models.TMP_PREFIX}{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads (torch {torch.__version__})")
