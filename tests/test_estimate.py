"""The plan a runner prints before its first stage (estimate.py): what it will compute and what is
cached, about how long on this device, the disk it writes, and a word for a phase too long for a CPU."""
from pathlib import Path

import pytest
from conftest import TOFU_SMOKE, run_in_process

import estimate
import run_tofu


def test_time_is_flops_over_the_measured_rate_at_the_measured_share():
    stage = estimate.Stage(None, trained=1000.0, forward=500.0)
    n, rate = 10**8, 2e11
    want = n * (6 * 1000 / estimate.SHARE["trained"] + 2 * 500 / estimate.SHARE["forward"]) / rate
    assert estimate.seconds(stage, n, rate) == pytest.approx(want)
    checkpointed = n * (8 * 1000 / estimate.SHARE["trained"] + 2 * 500 / estimate.SHARE["forward"]) / rate
    assert estimate.seconds(stage, n, rate, checkpointing=True) == pytest.approx(checkpointed)
    assert estimate.seconds(stage._replace(fixed_s=7.0), n, rate) == pytest.approx(want + 7.0)


def test_the_zero_shot_figures_of_issue_31_are_reproduced():
    """Full zero-shot (38,934 requests): about 10 min for a tiny random model, about 2 h for SmolLM2-135M,
    at the 255 GFLOP/s this CPU's matmul reaches alone."""
    import zeroshot
    n, chars, _ = zeroshot.requests(zeroshot.resolve("all"), None)
    assert n == 38934
    stage = estimate.Stage(None, forward=chars / 4, share="lm-eval", fixed_s=n * estimate.PER_REQUEST_S)
    assert 8 * 60 < estimate.seconds(stage, 4 * 10**5, 255e9) < 12 * 60
    assert 1.5 * 3600 < estimate.seconds(stage, 134_515_008, 255e9) < 2.5 * 3600


def test_a_long_phase_on_cpu_names_the_flag_that_shortens_it(tmp_path):
    cached = tmp_path / "eval-a.json"
    cached.write_text("{}")
    phases = [estimate.Phase("evaluation", [estimate.Stage(cached, forward=1e12), estimate.Stage(tmp_path / "eval-b.json",
                                                                                                forward=1e12)],
                             "--eval-items N"),
              estimate.Phase("unlearning", [estimate.Stage(estimate.LATER, trained=10.0, disk=10**9)]),
              estimate.Phase("not run", [])]
    lines = estimate.plan_lines(phases, 10**8, 1e11, "cpu")
    assert lines[0].startswith("[plan] evaluation: 1 of 2 stages to compute | about ")
    assert lines[0].endswith("over 30 min on CPU: --eval-items N shortens it")
    assert lines[1] == "[plan] unlearning: 1 of 1 stages to compute (1 named during the run) | about 0 s | writes 1.0 GB"
    assert len(lines) == 3 and lines[2].startswith("[plan] in all: about ") and "1.0 GB written" in lines[2]
    assert "over 30 min" not in estimate.plan_lines(phases, 10**8, 1e11, "cuda")[0]  # said for CPU runs only


def test_rows_trained_follow_epochs_and_the_step_cap():
    assert estimate.rows_trained(40, 2, 8, None) == 80
    assert estimate.rows_trained(40, 2, 8, 5) == 40       # 5 of the 10 steps
    assert estimate.rows_trained(40, 0, 8, None) == 0


def test_the_plan_comes_before_the_first_stage_and_a_rerun_finds_everything_cached(tiny_model_dir, tmp_path):
    argv = ["--model", tiny_model_dir, "--out", str(tmp_path / "r"), "--method", "flat,npo", *TOFU_SMOKE]
    first = run_in_process(run_tofu.main, argv).stdout.splitlines()
    plan = [i for i, line in enumerate(first) if line.startswith("[plan]")]
    assert plan == list(range(plan[0], plan[0] + 4)) and plan[-1] < min(i for i, l in enumerate(first) if "] step" in l)
    assert first[plan[0]].startswith("[plan] fine-tuning (target, retain): 2 of 2 stages to compute")
    assert first[plan[0] + 1].startswith("[plan] unlearning: 2 of 2 stages to compute")
    assert first[plan[0] + 2].startswith("[plan] evaluation: 4 of 4 stages to compute")
    again = [l for l in run_in_process(run_tofu.main, argv).stdout.splitlines() if l.startswith("[plan]")]
    assert again[:3] == ["[plan] fine-tuning (target, retain): 2 cached", "[plan] unlearning: 2 cached",
                         "[plan] evaluation: 4 cached"]
    assert again[3].startswith("[plan] in all: about 0 s, 0.0 GB written")
