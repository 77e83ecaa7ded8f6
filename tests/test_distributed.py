"""torchrun + FSDP2 on the CPU (gloo): two processes give the per-step losses and the weights of one
process with the same global batch, and save a directory one process loads; the memory planner
against a measurement, and its committed table complete."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BOOK_SMOKE, ROOT, TOFU_SMOKE
from safetensors.torch import load_file

import models
from bench import memplan


def torchrun(script: str, *argv):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), str(ROOT / script), *argv], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=600)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def assert_same_stage(one: Path, two: Path, base: Path):
    """Equal per-step losses and weights (to 1e-5 relative), and training really moved the weights."""
    log1, log2 = (json.loads((d / "train_log.json").read_text()) for d in (one, two))
    assert [r["step"] for r in log1] == [r["step"] for r in log2] and log1
    for a, b in zip(log1, log2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (one.name, a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    w1, w2, w0 = (load_file(d / "model.safetensors") for d in (one, two, base))
    assert w1.keys() == w2.keys(), one.name
    for k in w1:
        assert float((w1[k] - w2[k]).norm() / w1[k].norm()) < 1e-5, (one.name, k)
    assert max(float((w1[k] - w0[k]).norm() / w0[k].norm()) for k in w1 if k in w0) > 1e-3  # it trained


def test_two_processes_equal_one_with_the_same_global_batch_tofu(tofu_run, tiny_model_dir, tmp_path):
    # one process: batch 2 x accumulation 2 (the fixture); two processes: batch 2 x 2 processes
    out = tmp_path / "run"
    p = torchrun("run_tofu.py", "--model", tiny_model_dir, "--method", "flat,npo,llmu", "--out", str(out),
                 "--grad-accum", "1", *TOFU_SMOKE)
    assert "2 process(es), 4 examples per step" in p.stdout
    two = json.loads((out / "results.json").read_text())
    one = tofu_run.report
    base = Path(tiny_model_dir)
    for name in ("target", "retain", "flat", "npo", "llmu"):
        assert_same_stage(Path(one["dirs"][name]), Path(two["dirs"][name]), base)
    model, _ = models.load_model(two["dirs"]["npo"], "cpu")  # one process loads what two saved
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in models.load_model(tiny_model_dir, "cpu")[0].parameters())
    assert p.stdout.count("| target |") == 1                 # rank 0 alone prints the table


def test_two_processes_equal_one_with_the_same_global_batch_book_with_tied_embeddings(book_run, tmp_path):
    out = tmp_path / "run"
    torchrun("run_hp.py", "--model", book_run.model, "--text", str(book_run.book), "--out", str(out), "--method", "npo",
             "--batch-size", "1", *BOOK_SMOKE)
    two = json.loads((out / "results.json").read_text())
    for name in ("original", "npo"):
        assert_same_stage(Path(book_run.report["dirs"][name]), Path(two["dirs"][name]), Path(book_run.model))
    model, _ = models.load_model(two["dirs"]["npo"], "cpu")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_the_planner_estimates_a_cpu_step_within_15_percent_of_its_measured_peak():
    spec = ["llama", dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=8, vocab_size=16000, max_position_embeddings=1024)]
    row = dict(model=spec, method="flat", precision="fp32", gc=False)
    rows = [row, dict(row, method="npo")]
    flat_plan, npo_plan = memplan.spawn(dict(kind="plan", world=1, rows=rows, batch=4, length=128))["rows"]
    measured = memplan.spawn(dict(kind="measure", **row, batch=4, length=128))["measured"]
    assert 0.85 < flat_plan["total"] / measured < 1.15, (flat_plan["total"], measured)
    assert flat_plan["reference"] == 0 and npo_plan["reference"] == npo_plan["params"] > 0
    # the columns are what is alive at the peak: AdamW's two fp32 moments (made by the first step) always are
    for plan in (flat_plan, npo_plan):
        assert plan["optimizer"] >= 2 * plan["params"] and plan["grads"] <= plan["params"], plan


def test_the_committed_memory_table_has_every_row():
    text = (ROOT / "bench" / "MEMORY.md").read_text()
    main, *small = re.split(r"^## One 24 GB GPU: micro-batch of (\d+)", text.split("## Measured on a GPU")[0], flags=re.M)
    row = r"^\| (\S+) \| (\w+) \| (\w+) \| (on|off) \| (\d) \| (\d+|-) \|"
    rows = re.findall(row, main, re.M)
    want = {(r["model"], r["method"], r["precision"], "on" if r["gc"] else "off", str(r["world"]), str(r["lora"] or "-"))
            for r in memplan.plan_rows()}
    assert set(rows) == want and len(rows) == len(want) == 96 + 24
    # the 24 GB GPU's LoRA rows at smaller micro-batches, one section per size
    assert [int(b) for b in small[::2]] == list(memplan.SMALL_BATCHES)
    for section in small[1::2]:
        assert re.findall(row, section, re.M) == [("llama2-7b", m, "bf16", "on", "1", "16") for m in ("flat", "npo")]
    assert "Planner against a measurement" in text
