"""--lora: only the adapters train; the reference is the base model (adapters off, no second copy);
the saved model is plain weights that transformers loads without peft, equal to the adapted model;
every method runs end to end with it; gradient checkpointing and two processes change nothing."""
import json
from pathlib import Path

import pytest
import torch
from conftest import TOFU_SMOKE, run_in_process
from safetensors.torch import load_file
from test_distributed import assert_same_stage, torchrun

import adapters
import flags
import models
import run_tofu
import stages
import train
from bench import memplan
from errors import UsageError

LORA_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # tiny llama's linears


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """run_tofu.py with every method and --lora 4 on the tiny model (the same smoke settings as tofu_run)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    r = run_in_process(run_tofu.main, ["--model", tiny_model_dir, "--method", "all", "--out", str(out), "--lora", "4",
                                       "--grad-accum", "2", *TOFU_SMOKE])
    r.out = out
    return r


def adapted_model(tiny_model_dir, seed=1):
    """The tiny model with rank-4 adapters whose B is random (at creation B = 0: nothing would differ)."""
    model, tok = models.load_model(tiny_model_dir, "cpu")
    model = adapters.with_lora(model, adapters.Lora(4, 8.0))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), tok


def test_only_the_adapters_train_and_the_reference_is_the_base_model(tiny_model_dir):
    compute = models.Compute("cpu", "fp32", False)
    model, tok, ref = stages.training_model(tiny_model_dir, compute, reference=True, lora=adapters.Lora(4, 8.0))
    assert isinstance(ref, adapters.AdaptersOff) and ref.model is model  # no second copy of the weights
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, _ = train.optimizer_and_schedule(model, 1e-2, 0.01, 0, 3)
    x = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".lora_A." in n or ".lora_B." in n for n in moved)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in before if ".lora_" in n}
    base, _ = models.load_model(tiny_model_dir, "cpu")
    model.train()
    with torch.no_grad():
        got, want = ref(input_ids=x).logits, base(input_ids=x).logits
        adapted = model(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-6) and model.training  # base logits; the mode restored
    assert (adapted - want).abs().max() > 1e-3  # and the adapters did change the model


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's, when it loads an adapter
def test_the_saved_model_is_plain_weights_equal_to_the_adapted_model(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model, tok = adapted_model(tiny_model_dir)
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        want = model(input_ids=x).logits
    stages.save_model_atomic(model, tok, tmp_path / "saved", {})
    weights = load_file(tmp_path / "saved" / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k or k.startswith("base_model") for k in weights)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")  # plain transformers, no peft
    assert not adapters.is_lora(plain)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, want, atol=1e-5)
    base, _ = models.load_model(tiny_model_dir, "cpu")  # the adapter saved beside it loads with peft
    with torch.no_grad():
        again = PeftModel.from_pretrained(base, tmp_path / "saved" / "adapter").eval()(input_ids=x).logits
    assert torch.allclose(again, want, atol=1e-6)
    # merge_lora against a hand computation: W + (alpha / r) B A for one layer
    W = load_file(Path(tiny_model_dir) / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    A = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach()
    B = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.detach()
    assert torch.allclose(weights["model.layers.0.self_attn.q_proj.weight"], W + 2.0 * B @ A, atol=1e-6)


def test_every_method_runs_with_lora_and_changes_only_adapted_layers(lora_run, tofu_run, tiny_model_dir):
    report = lora_run.report
    assert set(report["methods"]) == set(tofu_run.report["methods"])
    target = load_file(Path(report["dirs"]["target"]) / "model.safetensors")
    for name, d in report["dirs"].items():
        if name in ("target", "retain", "unlearned"):
            continue
        assert (Path(d) / "adapter" / "adapter_model.safetensors").exists(), name
        saved = load_file(Path(d) / "model.safetensors")
        assert saved.keys() == target.keys(), name
        changed = {k for k in saved if not torch.equal(saved[k], target[k])}
        assert changed and all(k.split(".")[-2] in LORA_LAYERS for k in changed), (name, changed - {""})
    config = json.loads((lora_run.out / "config.json").read_text())
    assert config["lora"] == 4 and flags.lora(flags.parse_args(run_tofu.Args, ["--lora", "4"])).alpha == 8.0
    # a run without --lora keys its stages as before --lora existed; with it, its own stages
    assert Path(report["dirs"]["flat"]).name != Path(tofu_run.report["dirs"]["flat"]).name


def test_lora_with_gradient_checkpointing_and_two_processes_equals_one(lora_run, tiny_model_dir, tmp_path):
    # one process without checkpointing (lora_run) against two processes with it: both must change nothing
    out = tmp_path / "two"
    torchrun("run_tofu.py", "--model", tiny_model_dir, "--method", "npo,flat", "--out", str(out), "--lora", "4",
             "--grad-accum", "1", "--gradient-checkpointing", *TOFU_SMOKE)
    two = json.loads((out / "results.json").read_text())
    for name in ("target", "npo", "flat"):
        assert_same_stage(Path(lora_run.report["dirs"][name]), Path(two["dirs"][name]), Path(tiny_model_dir))
        assert (Path(two["dirs"][name]) / "adapter" / "adapter_config.json").exists()


def test_a_stage_planned_over_the_free_memory_stops_before_loading_weights(tiny_model_dir, tmp_path, monkeypatch):
    planned = []
    real_spawn = memplan.spawn
    monkeypatch.setattr(memplan, "spawn", lambda cfg: planned.append(cfg) or real_spawn(cfg))
    monkeypatch.setattr(memplan, "free_bytes", lambda device: 2**20)  # a device with 1 MiB free
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    argv = ["--model", tiny_model_dir, "--method", "npo", "--out", str(tmp_path / "run"), *TOFU_SMOKE]
    with pytest.raises(UsageError) as e:
        run_tofu.main(argv)
    msg = str(e.value)
    assert msg.startswith("this training stage needs about ") and "GiB per process on cpu" in msg, msg
    assert "finetune, fp32, checkpointing off" in msg and "0.0 GiB is free" in msg and "--skip-memory-check" in msg
    # the plan was of the stage's own largest micro-batch: the target's fine-tuning, batch 2
    assert len(planned) == 1 and [len(v) for v in planned[0]["batch_rows"].values()] == [2]
    # the same stage with 1 TiB free passes; with --skip-memory-check nothing is planned
    plan = train.plan_steps([[{"answer": [{"input_ids": [3, 4, 5], "labels": [-100, 4, 5]}] * 2}]], 2)
    compute, args = models.Compute("cpu", "fp32", False), flags.parse_args(run_tofu.Args, [])
    monkeypatch.setattr(memplan, "free_bytes", lambda device: 2**40)
    memplan.check_fits(tiny_model_dir, "finetune", plan, compute, args, 1)
    monkeypatch.setattr(memplan, "free_bytes", lambda device: 2**20)
    memplan.check_fits(tiny_model_dir, "finetune", plan, compute, flags.parse_args(
        run_tofu.Args, ["--skip-memory-check"]), 1)
    assert len(planned) == 2


def test_the_advice_names_the_settings_its_estimates_fit():
    G = 2**30
    est = dict(params=10 * G, grads=10 * G, optimizer=20 * G, reference=10 * G, activations=5 * G, total=55 * G)
    assert memplan.alternatives(est, "mixed", 0, 1, 30 * G) == [("--lora 16", 15.0),
                                                                  ("torchrun --nproc_per_node 2", 30.0)]
    assert memplan.alternatives(est, "mixed", 0, 1, 36 * G)[0] == ("--precision bf16", 35.0)
    assert memplan.alternatives(est, "bf16", 16, 8, 4 * G) == []  # nothing: the message says to cut the batch


def test_the_adapters_start_from_their_own_seed_whatever_was_drawn_before(tiny_model_dir):
    # a stage's adapters must not depend on the stages (or anything) the process ran before it
    first = adapters.with_lora(models.load_model(tiny_model_dir, "cpu")[0], adapters.Lora(4, 8.0, seed=3))
    torch.rand(1000)
    again = adapters.with_lora(models.load_model(tiny_model_dir, "cpu")[0], adapters.Lora(4, 8.0, seed=3))
    other = adapters.with_lora(models.load_model(tiny_model_dir, "cpu")[0], adapters.Lora(4, 8.0, seed=4))
    a, b, c = (dict(m.named_parameters()) for m in (first, again, other))
    key = next(k for k in a if ".lora_A." in k)
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_the_reference_is_kept_in_the_compute_dtype_and_the_planner_counts_it_so(tiny_model_dir):
    ref = stages.training_model(tiny_model_dir, models.Compute("cpu", "mixed", False), reference=True)[2]
    model = stages.training_model(tiny_model_dir, models.Compute("cpu", "mixed", False))[0]
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16} and not any(p.requires_grad for p in ref.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the trained weights stay fp32 masters
    spec = ["llama", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=8000, max_position_embeddings=1024)]
    rows = [dict(model=spec, method="npo", precision="mixed", gc=True, lora=r) for r in (0, 8)]
    full, lora = memplan.spawn(dict(kind="plan", world=1, rows=rows, batch=2, length=64))["rows"]
    assert full["reference"] == full["params"] / 2  # bf16 against fp32: half the bytes
    assert lora["reference"] == 0 and lora["optimizer"] < full["optimizer"] / 20  # no copy; moments of adapters only
    assert lora["total"] < full["total"]


@pytest.mark.parametrize("argv,needle", [
    (["--lora", "4096"], "--lora 4096: above the rank of every targeted layer of "),
    (["--lora", "1000000000"], "pass --lora 32 or less"),
    (["--lora", "8", "--lora-targets", "foo_proj"], "no linear layer named foo_proj; its linear layers: down_proj, "
                                                    "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")])
def test_lora_settings_the_model_cannot_take_are_refused_before_any_weights_load(argv, needle, tiny_model_dir, tmp_path,
                                                                                  capsys, monkeypatch):
    """From the model's config on the meta device: tiny llama's layers are at most 32 wide (q 32x32, k and v
    32x16, the MLP 32x64), and it has no foo_proj. Nothing loads, --out is not created."""
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        stages.main_guard(lambda: run_tofu.main(["--model", tiny_model_dir, "--out", str(out), *argv]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_a_rank_whose_adapters_outgrow_a_layer_is_one_warning_line(tiny_model_dir, capsys):
    adapters.check_lora(tiny_model_dir, adapters.Lora(16, 32.0))   # k_proj, v_proj: 16 x (32 + 16) = 768 > 32 x 16 = 512
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("warning: --lora 16: the adapters of 4 of the 14 targeted layers"), out
    adapters.check_lora(tiny_model_dir, adapters.Lora(4, 8.0, targets="q_proj,v_proj"))  # 4 x 48 < 512: nothing said
    assert capsys.readouterr().out == ""
