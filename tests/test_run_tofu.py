"""run_tofu.py end to end through subprocess on a tiny random-weight model, for every method."""
import json
import subprocess
import sys
from pathlib import Path


import evaluate
import flat

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--max-steps", "2", "--retain-authors", "1", "--eval-items", "3", "--max-new-tokens", "4",
         "--batch-size", "4", "--log-every", "1"]
KEYS = {"forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio",
        *evaluate.UTILITY_KEYS}


def run(*argv, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "run_tofu.py"), *argv], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def test_every_method_runs_end_to_end_and_reports_every_key(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    for i, method in enumerate(sorted(flat.LOSSES)):
        p = run("--model", tiny_model_dir, "--method", method, "--out", str(out), *SMOKE)
        report = json.loads((out / "results.json").read_text())
        for name in ["target", "retain", "unlearned"]:
            assert KEYS <= set(report[name]), (method, KEYS - set(report[name]))
            assert all(isinstance(report[name][k], float) and report[name][k] == report[name][k] for k in KEYS)
        assert report["retain"]["forget_quality"] == 1.0
        unlearned = Path(report["dirs"]["unlearned"])
        assert (unlearned / "model.safetensors").exists() and (unlearned / "train_log.json").exists()
        log = json.loads((unlearned / "train_log.json").read_text())
        assert [r["step"] for r in log] == [1, 2]
        assert f"[unlearn-{method}] step" in p.stdout and f"| {method} |" in p.stdout
        if i == 0:  # the fine-tuned models are cached: later methods reuse them
            assert "finetune-target" in p.stdout + p.stderr
        else:
            assert "target model: cached" in p.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == sorted(flat.LOSSES)[-1] and config["max_steps"] == 2


def test_bad_names_fail_before_any_model_is_loaded(tiny_model_dir, tmp_path):
    for argv, msg in [(["--method", "gd2"], "unknown loss 'gd2'"),
                      (["--divergence", "hellinger"], "unknown divergence 'hellinger'"),
                      (["--split", "forget02"], "unknown split 'forget02'"),
                      (["--model", "gpt-17"], "unknown model 'gpt-17'"),
                      (["--no-such-flag", "1"], "unknown arguments")]:
        p = run("--out", str(tmp_path / "x"), *argv, check=False)
        assert p.returncode == 2 and msg in p.stderr, (argv, p.stderr[-500:])
        assert not (tmp_path / "x").exists()


def test_malformed_or_empty_data_fails_with_the_file_and_line(tiny_model_dir, tmp_path):
    data_dir = tmp_path / "tofu"
    data_dir.mkdir()
    for f in (ROOT / "data" / "tofu").glob("*.jsonl"):
        (data_dir / f.name).write_bytes(f.read_bytes())
    (data_dir / "forget01.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": 3, "answer": "a"}\n')
    p = run("--model", tiny_model_dir, "--data-dir", str(data_dir), "--out", str(tmp_path / "x"), check=False)
    assert p.returncode == 2 and "forget01.jsonl:2: field 'question'" in p.stderr
    (data_dir / "forget01.jsonl").write_text("")
    p = run("--model", tiny_model_dir, "--data-dir", str(data_dir), "--out", str(tmp_path / "x"), check=False)
    assert p.returncode == 2 and "forget set forget01 is empty" in p.stderr


def test_a_diverging_loss_stops_the_run_without_saving(tiny_model_dir, tmp_path):
    p = run("--model", tiny_model_dir, "--out", str(tmp_path / "run"), *SMOKE, "--lr", "1e30", "--method", "ga",
            check=False)
    assert p.returncode != 0 and "stopping without saving" in p.stderr
    assert not list((tmp_path / "run").glob("unlearn-ga-*"))
