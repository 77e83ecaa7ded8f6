"""run_tofu.py end to end on a tiny random-weight model: every method in one command (shared
fine-tuning, one row each), in-training evaluation, the new privacy keys, pictures; as a user runs it."""
import json
import math
import shutil
import struct
from pathlib import Path

from conftest import TOFU_SMOKE, run_script

import evaluate
import methods
import plots
import stages

KEYS = {"forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio",
        "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "privleak", "exact_memorization",
        "extraction_strength", *evaluate.UTILITY_KEYS}


def test_every_method_runs_once_with_shared_fine_tuning_and_reports_every_key(tofu_run):
    report, out = tofu_run.report, tofu_run.out
    assert list(report["methods"]) == list(methods.LOSSES)            # `all`, one row per method, in table order
    rows = {"target": report["target"], "retain": report["retain"], **report["methods"]}
    for name, row in rows.items():
        assert KEYS <= set(row), (name, KEYS - set(row))
        assert all(isinstance(row[k], float) and math.isfinite(row[k]) for k in KEYS), name
        assert f"| {name} |" in tofu_run.stdout
    assert report["retain"]["forget_quality"] == 1.0 and report["retain"]["privleak"] == 0.0
    assert report["warnings"] == []
    # each fine-tuning ran once, every method's unlearning once, each from the shared target
    assert tofu_run.stdout.count("[finetune-target] step     2/2") == 1
    assert tofu_run.stdout.count("[finetune-retain] step     2/2") == 1
    for method in methods.LOSSES:
        assert tofu_run.stdout.count(f"[unlearn-{method}] step     2/2") == 1, method
        log = json.loads((Path(report["dirs"][method]) / "train_log.json").read_text())
        assert [r["step"] for r in log] == [1, 2] and log[-1]["lr"] == 0.0
        config = json.loads((Path(report["dirs"][method]) / "run_config.json").read_text())
        assert config["method"] == method
    results = json.loads((out / "results.json").read_text())           # strict JSON, the same report
    assert results["methods"].keys() == report["methods"].keys()
    items = json.loads((out / "eval_items.json").read_text())
    assert set(items["target"]["mia"]) == {"loss", "zlib", "min_k", "min_k_plus_plus", "tokens"}
    assert set(items["target"]["mia"]["tokens"]["forget"][0]) == {"nll", "logp", "z", "hit"}
    assert len(items["target"]["mia"]["min_k"]["holdout"]) == 40 == len(items["target"]["forget"]["question"])


def test_eval_every_records_evaluations_at_step_0_and_every_step(tofu_run):
    for method, logs in tofu_run.report["training"].items():
        assert [e["step"] for e in logs["evals"]] == [0, 1, 2], method
        assert all(0 <= e["forget_quality"] <= 1 and 0 <= e["model_utility"] <= 1 for e in logs["evals"])
        assert {e["items"] for e in logs["evals"]} == {2}  # --eval-items 2: said, as the plot's title says it
        stage = Path(tofu_run.report["dirs"][method])
        assert json.loads((stage / "eval_log.json").read_text()) == logs["evals"]


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_pictures_are_valid_pngs_drawn_from_results_json_alone(tofu_run, tmp_path):
    for name in ("tradeoff.png", "curves.png"):
        w, h = _png_size(tofu_run.out / name)
        assert w >= 400 and h >= 300 and (tofu_run.out / name).stat().st_size < 300_000
    results = json.loads((tofu_run.out / "results.json").read_text())
    plots.draw_all(results, tmp_path)                              # no model: results.json is enough
    for name in ("tradeoff.png", "curves.png"):
        assert (tmp_path / name).read_bytes() == (tofu_run.out / name).read_bytes(), name


def test_the_cli_reuses_every_stage_and_retrains_only_what_a_changed_flag_reads(tofu_run, tiny_model_dir,
                                                                                  tmp_path):
    """As a user runs it (a new process): the same flags find every stage cached. Without --eval-every the
    fine-tunings are still cached (it is not theirs to read) and the unlearning is redone once; then a
    changed evaluation-only flag retrains nothing, and a changed clipping norm retrains every stage."""
    out = tmp_path / "run"
    shutil.copytree(tofu_run.out, out)
    base = ["--model", tiny_model_dir, "--method", "flat", "--out", str(out), "--grad-accum", "2", *TOFU_SMOKE]
    p = run_script("run_tofu.py", *base, "--eval-every", "1")
    assert "[finetune-" not in p.stdout and "[unlearn-" not in p.stdout
    assert json.loads((out / "results.json").read_text())["methods"]["flat"] == tofu_run.report["methods"]["flat"]
    p = run_script("run_tofu.py", *base)
    assert "[finetune-" not in p.stdout and "[unlearn-flat] step" in p.stdout
    p = run_script("run_tofu.py", *base, "--max-new-tokens", "3", "--eval-batch-size", "5")
    assert "[finetune-" not in p.stdout and "[unlearn-" not in p.stdout
    p = run_script("run_tofu.py", *base, "--max-grad-norm", "0.5")
    assert "[finetune-target] step" in p.stdout and "[finetune-retain] step" in p.stdout
    assert "[unlearn-flat] step" in p.stdout


def test_a_diverging_loss_stops_the_run_without_saving(tiny_model_dir, tmp_path):
    p = run_script("run_tofu.py", "--model", tiny_model_dir, "--out", str(tmp_path / "run"), *TOFU_SMOKE,
                   "--lr", "1e30", "--method", "ga", check=False)
    assert p.returncode == 2 and "stopping without saving" in p.stderr and "Traceback" not in p.stderr
    assert not list((tmp_path / "run").glob("unlearn-ga-*"))


def test_stage_names_are_hashes_of_their_keys(tofu_run):
    report = tofu_run.report
    for method in ("flat", "npo"):
        assert Path(report["dirs"][method]).name.startswith(f"unlearn-{stages.safe_name(method)}-")
