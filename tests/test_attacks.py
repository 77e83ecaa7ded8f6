"""Attacks on finished models (attacks.py): quantization against its definition, the relearning split,
the jailbreak prefill, and each attack end to end on a tiny model in every runner, cached."""
import json
from pathlib import Path

import pytest
import torch
from conftest import BOOK_SMOKE, TOFU_SMOKE, run_in_process

import attacks
import data
import models
import run_harmful
import run_hp
import run_tofu
import stages


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_take_few_values_per_group_within_half_a_step(bits):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(11, 300), torch.nn.Linear(300, 7), torch.nn.LayerNorm(7))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    about = attacks.quantize_(net, bits, group_size=128)
    assert about["bits"] == bits and about["group_size"] == 128 and about["weights_quantized"] == 1
    w, w0 = net[1].weight.detach(), before["1.weight"]
    qmax = 2 ** (bits - 1) - 1
    for row in range(7):
        for start in range(0, 300, 128):                        # groups of 128 inputs, the last one of 44
            g, g0 = w[row, start:start + 128], w0[row, start:start + 128]
            step = g0.abs().max() / qmax
            assert len(torch.unique(g)) <= 2 ** bits
            assert torch.all((g - g0).abs() <= step / 2 + 1e-7), (row, start)
            torch.testing.assert_close(g / step, (g / step).round(), atol=1e-4, rtol=0)  # multiples of the step
    for name in ("0.weight", "1.bias", "2.weight", "2.bias"):     # not a linear layer's weight: untouched
        assert torch.equal(net.state_dict()[name], before[name]), name


def test_the_relearned_and_the_scored_halves_are_disjoint_and_seeded():
    learn, held = attacks.split_half(41, seed=3)
    assert len(learn) == 20 and len(held) == 21 and not set(learn) & set(held) and set(learn) | set(held) == set(range(41))
    assert attacks.split_half(41, 3) == (learn, held) and attacks.split_half(41, 4) != (learn, held)
    assert attacks.parse("all") == ["relearn", "quant8", "quant4", "paraphrase", "jailbreak"]
    assert attacks.parse("all", run_hp.ATTACKS) == ["relearn", "quant8", "quant4"] and attacks.parse("none") == []
    with pytest.raises(Exception, match="valid names"):
        attacks.parse("quant3")
    with pytest.raises(Exception, match="cannot run paraphrase"):
        attacks.parse("prompt", run_hp.ATTACKS)


def test_the_jailbreak_prefill_begins_the_answer_and_is_not_scored(tiny_model_dir):
    _, tok = models.load_model(tiny_model_dir, "cpu")
    style = data.prefilled("base", attacks.JAILBREAK)
    enc = data.encode_qa(tok, style, "Who wrote it?", "Basil did.")
    prompt = tok.decode([i for i, l in zip(enc["input_ids"], enc["labels"]) if l == -100])
    answer = tok.decode([i for i, l in zip(enc["input_ids"], enc["labels"]) if l != -100][:-1])
    assert prompt.endswith(f"Answer: {attacks.JAILBREAK}") and answer == " Basil did."
    n_prompt = enc["labels"].count(-100)
    assert data.encode_prompt(tok, style, "Who wrote it?") == enc["input_ids"][:n_prompt]  # generation starts there


@pytest.fixture(scope="module")
def tofu_attacked(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("attacks") / "run"
    argv = ["--model", tiny_model_dir, "--method", "flat,npo", "--attacks", "all", "--relearn-steps", "2",
            "--quant-group", "16", "--out", str(out), *TOFU_SMOKE]
    return argv, out, run_in_process(run_tofu.main, argv)


def test_tofu_attacks_report_every_model_and_compare_with_the_attacked_retain_model(tofu_attacked):
    _, out, r = tofu_attacked
    report = json.loads((out / "results.json").read_text())
    assert set(report["attacks"]) == {"retain", "flat", "npo"}
    for name, per in report["attacks"].items():
        assert list(per) == ["relearn", "quant8", "quant4", "paraphrase", "jailbreak"], name
        for e, row in per.items():
            assert {"forget_quality", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio"} <= set(row)
            assert row["about"]["attack"] == e
    for e, row in report["attacks"]["retain"].items():               # the retain model against itself
        assert row["forget_quality"] == 1.0, e
    # every model is relearned with the same rows, steps and learning rate
    assert len({json.dumps({k: v for k, v in per["relearn"]["about"].items() if k != "last_loss"}, sort_keys=True)
                for per in report["attacks"].values()}) == 1
    assert report["attacks"]["flat"]["quant4"]["about"]["bits"] == 4
    assert "Attack: relearn" in r.stdout and "Attack: jailbreak" in r.stdout and (out / "robustness.png").exists()


def test_relearning_never_changes_the_cached_unlearned_model_and_attacks_are_cached(tofu_attacked):
    argv, out, first = tofu_attacked
    for name in ("flat", "npo"):
        stage = Path(first.report["dirs"][name])
        assert json.loads((stage / stages.WEIGHT_SUMS).read_text()) == stages.weight_sums(stage), name
    again = run_in_process(run_tofu.main, argv)
    assert "[attack-" not in again.stdout and "[finetune-" not in again.stdout and "[unlearn-" not in again.stdout
    assert again.report["attacks"] == first.report["attacks"]
    changed = run_in_process(run_tofu.main, [*argv, "--quant-group", "32"])  # only the quant attacks again
    assert changed.report["attacks"]["flat"]["relearn"] == first.report["attacks"]["flat"]["relearn"]
    assert changed.report["attacks"]["flat"]["quant4"]["about"]["group_size"] == 32


def test_book_and_harmful_attacks_end_to_end(book_run, tiny_model_dir, tmp_path):
    r = run_in_process(run_hp.main, ["--model", book_run.model, "--text", str(book_run.book), "--out", str(tmp_path / "b"),
                                     "--method", "npo", "--batch-size", "2", "--attacks", "all", "--relearn-steps", "1",
                                     *BOOK_SMOKE])
    assert set(r.report["attacks"]) == {"reference", "npo"}
    assert list(r.report["attacks"]["npo"]) == ["relearn", "quant8", "quant4"]
    assert r.report["attacks"]["reference"]["quant8"]["forget_quality_gap"] == 0.0
    h = run_in_process(run_harmful.main, ["--model", tiny_model_dir, "--out", str(tmp_path / "h"), "--max-steps", "1",
                                          "--forget-items", "8", "--steps", "1", "--batch-size", "2", "--eval-prompts",
                                          "4", "--max-new-tokens", "2", "--judge-train-items", "40",
                                          "--judge-eval-items", "20", "--attacks", "all", "--relearn-steps", "1"])
    assert list(h.report["attacks"]["llmu"]) == ["relearn", "quant8", "quant4", "jailbreak"]
    assert all(0 <= row["harmful_seen"] <= 1 for per in h.report["attacks"].values() for row in per.values())
    assert "Attack: jailbreak" in h.stdout
