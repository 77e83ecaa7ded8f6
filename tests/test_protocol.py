"""The comparison protocol (protocol.py, docs/claims.md): the selection rule on synthetic results with a
known answer, the grid flags and their bad input, and a grid x seeds run end to end on the tiny model,
whose reported numbers must be the confirmation runs' and nothing else."""
import dataclasses
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
from conftest import BOOK_SMOKE, TOFU_SMOKE, ZERO_SHOT_SMOKE, run_in_process
from test_faults import fails_cleanly
from test_harmful import SMOKE as HARMFUL_SMOKE

import flags
import models
import protocol
import run_tofu
import stages
from errors import UsageError

RULE, BAR = protocol.TOFU, {"utility_bar": 0.9}
REF = {"model_utility": 0.5}  # the retain model's: the bar is 0.45


def runs(**per_method):
    """{method: {lr: [(fq, mu) per seed]}} -> the summaries select() reads."""
    return {m: {lr: [{"forget_quality": fq, "model_utility": mu} for fq, mu in seeds] for lr, seeds in per_lr.items()}
            for m, per_lr in per_method.items()}


def test_the_rule_picks_the_best_forget_quality_among_those_that_keep_utility():
    chosen = protocol.select(RULE, runs(flat={1e-4: [(0.01, 0.50), (0.03, 0.48)],    # mean fq 0.02, mu 0.49: passes
                                              3e-4: [(0.50, 0.46), (0.30, 0.46)],    # mean fq 0.40, mu 0.46: passes, best
                                              1e-3: [(0.90, 0.10), (0.95, 0.00)]}),  # best fq, but mu 0.05: fails
                             REF, BAR)
    assert chosen["flat"].lr == 3e-4 and chosen["flat"].passed
    assert chosen["flat"].points[1e-3]["passes"] is False and chosen["flat"].points[1e-4]["passes"] is True
    assert chosen["flat"].points[3e-4]["forget_quality"] == pytest.approx(0.40)


def test_the_bar_reads_the_mean_over_seeds_not_the_best_seed():
    # one seed far above the bar, one far below: the mean 0.40 < 0.45 fails
    chosen = protocol.select(RULE, runs(ga={1e-4: [(0.2, 0.70), (0.2, 0.10)], 1e-5: [(0.1, 0.5), (0.1, 0.5)]}), REF, BAR)
    assert chosen["ga"].lr == 1e-5


def test_a_tie_goes_to_the_smaller_learning_rate():
    for order in ([1e-3, 1e-4, 3e-4], [1e-4, 3e-4, 1e-3]):  # whatever order the grid was given in
        chosen = protocol.select(RULE, runs(npo={lr: [(0.3, 0.5)] for lr in order}), REF, BAR)
        assert chosen["npo"].lr == 1e-4


def test_no_learning_rate_passing_fails_the_method_at_its_best_utility():
    chosen = protocol.select(RULE, runs(flat={1e-4: [(0.9, 0.30)], 3e-4: [(0.99, 0.10)], 1e-3: [(0.5, 0.40)]}), REF, BAR)
    assert chosen["flat"] == protocol.Choice(1e-3, False, chosen["flat"].points)  # highest mean utility, 0.40


def test_one_learning_rate_is_chosen_or_fails_on_its_own():
    assert protocol.select(RULE, runs(ga={1e-4: [(0.1, 0.5)]}), REF, BAR)["ga"][:2] == (1e-4, True)
    assert protocol.select(RULE, runs(ga={1e-4: [(0.1, 0.1)]}), REF, BAR)["ga"][:2] == (1e-4, False)


def test_a_missing_or_nan_metric_can_neither_pass_nor_win():
    chosen = protocol.select(RULE, runs(flat={1e-4: [(0.2, 0.5)], 3e-4: [(0.9, None)], 1e-3: [(float("nan"), 0.5)],
                                              3e-3: [(0.95, 0.5), (0.95, float("inf"))]}), REF, BAR)
    assert chosen["flat"].lr == 1e-4
    assert chosen["flat"].points[3e-4]["model_utility"] is None and not chosen["flat"].points[3e-4]["passes"]
    assert chosen["flat"].points[1e-3]["passes"]  # passes the bar, but has no objective: cannot win
    nothing = protocol.select(RULE, runs(flat={1e-4: [(0.2, None)]}), REF, BAR)
    assert nothing["flat"][:2] == (None, False)  # no learning rate to confirm


def test_the_reference_must_have_the_bar_metric():
    with pytest.raises(ValueError, match="model_utility"):
        protocol.select(RULE, runs(flat={1e-4: [(0.2, 0.5)]}), {"model_utility": None}, BAR)


def test_each_benchmark_rule_reads_its_own_direction_and_bars():
    summaries = {"ga": {1e-5: [{"forget_quality_gap": 30.0, "wikitext_ppl": 20.0, "zeroshot_mean": 0.50}],
                        1e-4: [{"forget_quality_gap": 10.0, "wikitext_ppl": 21.0, "zeroshot_mean": 0.47}],   # zero-shot off by 0.03
                        1e-3: [{"forget_quality_gap": 5.0, "wikitext_ppl": 30.0, "zeroshot_mean": 0.50}]}}  # ppl 1.5 x
    ref = {"wikitext_ppl": 20.0, "zeroshot_mean": 0.50}
    assert protocol.select(protocol.BOOK, summaries, ref, {"ppl_bar": 1.1})["ga"].lr == 1e-4   # lowest gap, ppl <= 22
    with_zs = protocol.select(protocol.BOOK_ZERO_SHOT, summaries, ref, {"ppl_bar": 1.1, "zero_shot_bar": 0.02})
    assert with_zs["ga"].lr == 1e-5
    # zero-shot that rises is not lost utility: a point 0.03 above the original's passes (the clean book
    # protocol's FLAT at 2e-5 rose by 0.0204 and was failed by the two-sided bar it ran under)
    summaries["ga"][1e-4][0]["zeroshot_mean"] = 0.53
    assert protocol.select(protocol.BOOK_ZERO_SHOT, summaries, ref, {"ppl_bar": 1.1, "zero_shot_bar": 0.02})["ga"].lr == 1e-4
    assert "zeroshot_mean at most 0.02 below the original model's" in protocol.BOOK_ZERO_SHOT.says(
        {"ppl_bar": 1.1, "zero_shot_bar": 0.02})
    harmful = {"llmu": {1e-5: [{"harmful_unseen": 0.3, "truthfulqa_nll": 2.0}],
                        1e-4: [{"harmful_unseen": 0.1, "truthfulqa_nll": 2.5}]}}
    assert protocol.select(protocol.HARMFUL, harmful, {"truthfulqa_nll": 2.0}, {"nll_bar": 1.1})["llmu"].lr == 1e-5
    assert protocol.select(protocol.HARMFUL, harmful, {"truthfulqa_nll": 2.0}, {"nll_bar": 1.3})["llmu"].lr == 1e-4


def test_the_comparison_says_when_the_confirmation_runs_fall_below_the_bar(capsys):
    """The rule chooses on the selection seeds; a choice just above the bar may fall below it on fresh
    seeds, and the table must not call that run 'passed' alone."""
    import tables
    selection = runs(ga={1e-4: [(0.05, 0.46), (0.05, 0.47)]}, npo={1e-4: [(0.04, 0.48), (0.04, 0.50)]},
                     idk={1e-4: [(0.9, 0.1)]})
    confirmed = runs(ga={1e-4: [(0.06, 0.44), (0.07, 0.45)]},   # mean utility 0.445 < 0.45
                     npo={1e-4: [(0.04, 0.45), (0.05, 0.46)]})  # 0.455: passes again
    chosen = protocol.select(RULE, selection, REF, BAR)
    grid = protocol.Grid((1e-4,), (0, 1), (2, 3), True)
    c = protocol.comparison(RULE, chosen, selection, confirmed, REF, BAR, grid)
    assert {m: (v["passed"], v["confirmed_passes"]) for m, v in c["chosen"].items()} == {
        "ga": (True, False), "npo": (True, True), "idk": (False, None)}
    tables.print_comparison({"comparison": c}, [("MU", "model_utility", ".3f")])
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[2] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "---" not in line and "method" not in line}
    assert rows == {"ga": "passed; below it on the confirmation seeds", "npo": "passed", "idk": "FAILED"}


def test_a_bar_the_starting_model_already_fails_is_said_with_the_value_that_would_pass_it(capsys):
    """The book's original, fine-tuned on the text, has 1.74x the base model's WikiText perplexity on the
    offline default: with a bar at 1.1x the base model's, every method FAILS whatever it does, and the
    comparison must say that the bar, not the methods, decided it."""
    import tables
    book = {"ppl_bar": 1.1, "zero_shot_bar": 0.02}
    ref, start = {"wikitext_ppl": 59.42, "zeroshot_mean": 0.40}, {"wikitext_ppl": 103.52, "zeroshot_mean": 0.37}
    notes = protocol.start_fails(protocol.BOOK_ZERO_SHOT, start, ref, book, "original model")
    assert len(notes) == 2 and "wikitext_ppl 103.5," in notes[0] and "--ppl-bar 1.74 or above" in notes[0]
    assert "--zero-shot-bar 0.03 or above" in notes[1]                                # 0.40 - 0.37
    above = protocol.start_fails(protocol.BOOK_ZERO_SHOT, {**start, "zeroshot_mean": 0.45}, ref, book, "original model")
    assert len(above) == 1 and "wikitext_ppl" in above[0]                            # 0.05 above: no note
    assert protocol.start_fails(protocol.BOOK, {"wikitext_ppl": 65.0}, ref, book, "original model") == []  # 1.094x
    assert protocol.start_fails(protocol.BOOK, {"wikitext_ppl": None}, ref, book, "original model") == []
    assert protocol.start_fails(RULE, {"model_utility": 0.5}, REF, BAR, "target") == []            # the bar: 0.45
    low = protocol.start_fails(RULE, {"model_utility": 0.4}, REF, BAR, "target", "retain model")
    assert len(low) == 1 and "--utility-bar 0.8 or below" in low[0] and "the retain model's 0.5" in low[0]
    selection = runs(ga={1e-4: [(0.05, 0.46)]})
    c = protocol.comparison(RULE, protocol.select(RULE, selection, REF, BAR), selection, {}, REF, BAR,
                            protocol.Grid((1e-4,), (0,), (), True), "retain model", start=({"model_utility": 0.4}, "target"))
    assert c["start_fails"] == low
    tables.print_comparison({"comparison": c}, [("MU", "model_utility", ".3f")])
    assert f"Note: {low[0]}." in capsys.readouterr().out


def test_the_book_frontier_draws_perplexity_on_a_log_scale_without_warnings(tmp_path, monkeypatch):
    """A collapsed run's WikiText perplexity (8e25 for GA at 2e-4 on the offline book) squashed every
    other point onto the bar on a linear axis, and a FAILED method's cross raised a matplotlib warning."""
    import warnings
    import matplotlib.pyplot as plt
    import plots
    rule, th = protocol.BOOK, {"ppl_bar": 1.1}
    ref, original = {"wikitext_ppl": 59.4, "forget_quality_gap": 0.0}, {"wikitext_ppl": 103.5, "forget_quality_gap": 28.5}
    point = lambda gap, ppl: [{"forget_quality_gap": gap, "wikitext_ppl": ppl}]  # noqa: E731
    selection = {"flat": {5e-5: point(2.6, 95.9), 2e-4: point(15.4, 1120.0)},
                 "ga": {1e-5: point(22.3, 102.8), 2e-4: point(17.0, 8.4e25)}, "npo": {2e-4: point(2.0, 374.0)}}
    chosen = protocol.select(rule, selection, original, th)  # the bars compare with the original: 113.85
    assert {m: (ch.lr, ch.passed) for m, ch in chosen.items()} == {"flat": (5e-5, True), "ga": (1e-5, True),
                                                                   "npo": (2e-4, False)}
    c = protocol.comparison(rule, chosen, selection, {}, original, th, protocol.Grid((1e-5, 5e-5, 2e-4), (0,), (), True))
    report = {"benchmark": "book", "comparison": c, "reference": ref, "original": original, "methods": {}}
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.frontier(report, tmp_path / "frontier.png")
    ax = figures[0].axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylim()[1] == pytest.approx(100 * 1.1 * 103.5)
    assert [t.get_text() for t in ax.texts if t.get_text().startswith("above")] == ["above the scale: ga 0.0002 (8.4e+25)"]
    labels = ax.get_legend_handles_labels()[1]
    assert {"reference", "original"} <= set(labels)  # where every run starts, drawn
    assert "the bar: <= 1.1 x the original model's 104" in labels  # the bar is drawn against the model it names


def test_mean_sd_is_the_sample_standard_deviation_of_the_finite_runs():
    assert protocol.mean_sd([1.0, 2.0, 4.0]) == {"mean": 7 / 3, "sd": statistics.stdev([1.0, 2.0, 4.0]), "n": 3,
                                                 "missing": 0}
    assert protocol.mean_sd([1.0, None, float("nan")]) == {"mean": 1.0, "sd": None, "n": 1, "missing": 2}


@pytest.mark.parametrize("text, says", [("1e-4,,3e-4", "an empty entry"), ("1e-4,1e-4", "given twice"),
                                        ("1e-4,abc", "must be a number"), ("1e-4,-1", "must be in (0, 3.4e38]"),
                                        ("1e-4,nan", "must be in (0, 3.4e38]")])
def test_a_bad_learning_rate_list_is_one_line_before_any_work(tiny_model_dir, tmp_path, capsys, text, says):
    fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--out", str(tmp_path / "x"), "--lr", text], capsys,
                  tmp_path / "x", says)


@pytest.mark.parametrize("argv, says", [
    (["--seeds", "0,1", "--confirm-seeds", "1,2"], "1 also in --seeds"),
    (["--confirm-seeds", "3"], "does nothing without --seeds"),
    (["--seeds", "0,0"], "given twice"),
    (["--seeds", "0,-1"], "must be in [0, 2^32)"),
    (["--utility-bar", "0.8"], "does nothing without a grid"),
    (["--drop-selection-weights"], "does nothing without a grid"),
    (["--lr", "1e-4,1e-3", "--drop-selection-weights", "--attacks", "relearn"], "with --attacks: the attacks start")])
def test_bad_seed_lists_and_bars_are_one_line_before_any_work(tiny_model_dir, tmp_path, capsys, argv, says):
    fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--out", str(tmp_path / "x"), *argv], capsys,
                  tmp_path / "x", says)


def test_a_grid_larger_than_the_free_disk_is_refused(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "saved_bytes", lambda *a, **k: 10**15)  # a petabyte per model
    fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--out", str(tmp_path / "x"), "--lr", "1e-4,1e-3"], capsys,
                  tmp_path / "x", "the grid saves 2 more unlearned models")
    # dropping the selection runs' weights, a grid keeps one selection model at a time and each confirmation run's
    monkeypatch.setattr(models, "saved_bytes", lambda *a, **k: shutil.disk_usage(tmp_path).free // 4)
    grid = ["--model", tiny_model_dir, "--out", str(tmp_path / "y"), "--lr", "1e-4,1e-3,1e-2", "--seeds", "0,1",
            "--confirm-seeds", "2,3"]
    fails_cleanly(run_tofu.main, grid, capsys, tmp_path / "y", "the grid saves 8 more unlearned models")
    fails_cleanly(run_tofu.main, [*grid, "--confirm-seeds", "2,3,4,5", "--drop-selection-weights"], capsys,
                  tmp_path / "y", "the grid saves 5 more unlearned models")
    assert flags.parse(run_tofu.Args, [*grid, "--drop-selection-weights"], run_tofu.resolve).drop_selection_weights


def test_each_method_trains_at_its_own_learning_rate_and_the_rest_at_lr(tiny_model_dir):
    args = flags.parse(run_tofu.Args, ["--model", tiny_model_dir, "--method", "flat,flat:tv,ga,npo", "--lr", "2e-4",
                                       "--method-lrs", "flat:kl=1e-5,flat:tv=3e-5,ga=1e-4"], run_tofu.resolve)
    cells = flags.grid(args).cells(flags.variants(args))
    # flat reads --divergence kl: flat:kl's rate; npo is not named: --lr's
    assert [(c.label, c.lr) for c in cells] == [("flat", 1e-5), ("flat:tv", 3e-5), ("ga", 1e-4), ("npo", 2e-4)]
    assert [c.args(args).lr for c in cells] == [1e-5, 3e-5, 1e-4, 2e-4]  # what each stage is keyed and trained by


def test_the_tofu_runner_trains_each_method_at_the_learning_rate_the_tofu_protocol_chose():
    methods = "flat,flat:js,flat:pearson,flat:tv,ga,npo,simnpo,idk,dpo,gd,llmu,kl"
    args = flags.parse(run_tofu.Args, ["--method", methods], run_tofu.resolve)
    assert [(c.label, c.lr) for c in flags.grid(args).cells(flags.variants(args))] == [
        ("flat", 1e-4), ("flat:js", 1e-4), ("flat:pearson", 1e-4), ("flat:tv", 1e-4), ("ga", 1e-4), ("npo", 1e-4),
        ("simnpo", 1e-4), ("idk", 1e-5), ("dpo", 1e-5), ("gd", 1e-4), ("llmu", 3e-5), ("kl", 1e-4)]
    args = flags.parse(run_tofu.Args, ["--method", methods, "--lr", "2e-4"], run_tofu.resolve)
    assert {c.lr for c in flags.grid(args).cells(flags.variants(args))} == {2e-4}


@pytest.mark.parametrize("task, llmu", [("harmful", 3e-4), ("hallucination", 1e-4)])
def test_the_harmful_runner_trains_each_method_at_the_learning_rate_its_task_protocol_chose(task, llmu):
    import run_harmful
    argv = ["--task", task, "--method", "llmu,ga,dpo-safe"]
    args = flags.parse(run_harmful.Args, argv, run_harmful.resolve)
    cells = flags.grid(args).cells(flags.variants(args))
    # GA failed the bar at every learning rate and sits where its NLL was lowest; dpo-safe, a baseline, at the preset's
    assert [(c.label, c.lr) for c in cells] == [("llmu", llmu), ("ga", 3e-5), ("dpo-safe", 1e-4)]
    args = flags.parse(run_harmful.Args, [*argv, "--lr", "2e-4"], run_harmful.resolve)
    assert [c.lr for c in flags.grid(args).cells(flags.variants(args))] == [2e-4] * 3


def test_the_book_runner_trains_each_method_at_the_learning_rate_the_book_protocol_chose():
    import run_hp
    args = flags.parse(run_hp.Args, ["--method", "flat,ga,npo,simnpo"], run_hp.resolve)
    assert [(c.label, c.lr) for c in flags.grid(args).cells(flags.variants(args))] == \
        [("flat", 5e-5), ("ga", 2e-5), ("npo", 5e-5), ("simnpo", 5e-5)]   # simnpo: not in the protocol, the preset's
    args = flags.parse(run_hp.Args, ["--method", "flat,ga", "--corpus", "muse-news"], run_hp.resolve)
    assert [c.lr for c in flags.grid(args).cells(flags.variants(args))] == [5e-5, 5e-5]  # no MUSE protocol run


@pytest.mark.parametrize("argv, says", [
    (["--method-lrs", "flta=1e-4"], "unknown loss 'flta'"),
    (["--method-lrs", "flat:kk=1e-4"], "unknown divergence 'kk'"),
    (["--method-lrs", "ga=-1"], "must be in (0, 3.4e38]"),
    (["--method-lrs", "ga"], "'ga' is not METHOD=LR"),
    (["--method-lrs", "ga=1e-4,ga=2e-4"], "a method named twice"),
    (["--method-lrs", "ga=1e-4", "--lr", "1e-4,3e-4"], "a grid sets every method's learning rates")])
def test_bad_method_lrs_are_one_line_before_any_work(tiny_model_dir, tmp_path, capsys, argv, says):
    fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--out", str(tmp_path / "x"), *argv], capsys,
                  tmp_path / "x", says)


def test_one_lr_and_one_seed_keep_the_stage_key_and_name_of_a_run_without_a_grid(tiny_model_dir):
    args = flags.parse(run_tofu.Args, ["--model", tiny_model_dir, "--lr", "2e-4", "--seed", "3"], run_tofu.resolve)
    grid = flags.grid(args)
    cell = grid.cells(flags.variants(args))[0]
    assert not grid.on and (cell.label, cell.lr, cell.seed) == ("flat", 2e-4, 3)
    compute = models.resolve_compute("cpu", "fp32", None)
    for eval_every in (0, 5):
        args.eval_every = eval_every
        before = stages.stage_key(args, "unlearn", compute, rows="digest")             # what a run without a grid keyed
        assert stages.stage_key(cell.args(args), "unlearn", compute, rows="digest") == before
    assert stages.stage_key(grid.cells(flags.variants(args))[0].args(args), "unlearn", compute) != \
        stages.stage_key(dataclasses.replace(args, lr=3e-4), "unlearn", compute)    # the key does hold the rate


def test_every_stage_of_a_grid_has_its_own_file_even_with_dots_in_its_name(tmp_path):
    # with_suffix(".json") on "eval-flat@lr=0.0001,seed=0-HASH" kept "eval-flat@lr=0" alone: every cell one file
    names = {stages.stage_dir(tmp_path, f"eval-{protocol.cell_label('flat', lr, s)}", {"lr": lr, "seed": s})
             for lr in (1e-4, 1e-3) for s in (0, 1)}
    assert len(names) == 4


def test_a_stage_named_with_dots_gets_its_whole_name_and_json(tmp_path, tiny_model_dir):
    args = flags.parse(run_tofu.Args, ["--model", tiny_model_dir, "--out", str(tmp_path / "r")], run_tofu.resolve)
    run = stages.Run(args, str(tmp_path / "r"))
    a, b = (run.stage("eval", protocol.cell_label("flat", lr, 0), model="m") for lr in (1e-4, 1e-3))
    assert a != b and a.name.startswith("eval-flat@lr=0.0001,seed=0-") and a.suffix == b.suffix == ".json"


@pytest.fixture(scope="module")
def grid_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "run"
    argv = ["--model", tiny_model_dir, "--out", str(out), "--method", "flat,ga", *TOFU_SMOKE, "--lr", "1e-4,1e-2",
            "--seeds", "0,1", "--confirm-seeds", "7,8", "--eval-every", "1"]
    first = run_in_process(run_tofu.main, argv)
    again = run_in_process(run_tofu.main, argv)
    return first, again, out


def test_a_grid_trains_every_method_lr_and_seed_from_one_target_then_the_chosen_lr_on_fresh_seeds(grid_run):
    first, _, out = grid_run
    report = first.report
    assert first.stdout.count("[finetune-target] step     2/2") == 1 and first.stdout.count("[finetune-retain] step     2/2") == 1
    chosen = report["comparison"]["chosen"]
    expected = [protocol.cell_label(m, lr, s) for m in ("flat", "ga") for lr in (1e-4, 1e-2) for s in (0, 1)]
    expected += [protocol.cell_label(m, chosen[m]["lr"], s) for m in ("flat", "ga") for s in (7, 8)]
    assert list(report["methods"]) == expected
    target = report["dirs"]["target"]
    for label in expected:
        config = json.loads((Path(report["dirs"][label]) / "run_config.json").read_text())
        method, rest = label.split("@")
        assert (config["method"], f"lr={config['lr']:g},seed={config['seed']}") == (label, rest)
        assert config["target_model"] is None and Path(target).exists()
    # each cell its own evaluation, and the seed changes what unlearning drew
    evals = sorted(out.glob("eval-*.json"))
    assert len(evals) == len(expected) + 2
    logs = [json.loads((Path(report["dirs"][protocol.cell_label("ga", 1e-2, s)]) / "train_log.json").read_text())
            for s in (0, 1)]
    assert logs[0][0]["p_forget"] != logs[1][0]["p_forget"]


def test_the_reported_numbers_are_the_confirmation_runs_alone(grid_run):
    report = grid_run[0].report
    c = report["comparison"]
    for method, ch in c["chosen"].items():
        confirm = [report["methods"][protocol.cell_label(method, ch["lr"], s)] for s in (7, 8)]
        selection = [report["methods"][protocol.cell_label(method, ch["lr"], s)] for s in (0, 1)]
        for key in ("forget_quality", "model_utility", "forget_Q_A_Prob", "mia_min_k"):
            values = [r[key] for r in confirm]
            assert c["confirmed"][method][key]["mean"] == pytest.approx(sum(values) / 2, rel=1e-12, abs=0)
            assert c["confirmed"][method][key]["sd"] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-15)
            assert c["confirmed"][method][key]["n"] == 2
        assert [r["mia_min_k"] for r in confirm] != [r["mia_min_k"] for r in selection]  # other runs, other numbers
        # the rule saw the selection seeds only
        seen = c["selection"][method][f"{ch['lr']:g}"]["forget_quality"]
        assert seen == pytest.approx(sum(r["forget_quality"] for r in selection) / 2)
    assert "Comparison: each method at its own learning rate" in grid_run[0].stdout
    for label, logs in report["training"].items():  # --eval-every watched the confirmation runs alone
        assert [e["step"] for e in logs["evals"]] == ([0, 1, 2] if label.endswith(("seed=7", "seed=8")) else []), label
    assert (grid_run[2] / "frontier.png").stat().st_size > 10_000
    from PIL import Image  # curves.png: the 4 confirmation runs (2 rows of 3 panels), not all 12 runs (4 rows)
    assert Image.open(grid_run[2] / "curves.png").height == round((3.0 * 2 + 0.6) * 90)


def test_a_rerun_of_a_grid_recomputes_nothing_and_reports_the_same(grid_run):
    first, again, _ = grid_run
    assert "] step " not in again.stdout  # no training stage logged a step
    assert again.report["timings_s"] == {}                      # no stage computed
    assert again.report["comparison"] == first.report["comparison"]
    assert "stages done" in again.stdout and ", cached)" in again.stdout


def test_grids_sharing_one_out_each_keep_their_report(grid_run, tiny_model_dir):
    first, _, out = grid_run
    kept = out / "comparisons" / "flat_ga_lr_0.0001_0.01_seeds_0_1_confirm_7_8"
    assert json.loads((kept / "results.json").read_text())["comparison"] == first.report["comparison"]
    assert (kept / "frontier.png").stat().st_size > 10_000
    # a second grid into the same --out (flat alone: every run cached) owns results.json, and the first keeps its own
    argv = ["--model", tiny_model_dir, "--out", str(out), "--method", "flat", *TOFU_SMOKE, "--lr", "1e-4,1e-2",
            "--seeds", "0,1", "--confirm-seeds", "7,8", "--eval-every", "1"]
    second = run_in_process(run_tofu.main, argv)
    assert list(json.loads((out / "results.json").read_text())["comparison"]["chosen"]) == ["flat"]
    assert list(json.loads((kept / "results.json").read_text())["comparison"]["chosen"]) == ["flat", "ga"]
    assert (out / "comparisons" / "flat_lr_0.0001_0.01_seeds_0_1_confirm_7_8" / "results.json").exists()
    assert second.report["timings_s"] == {}


def test_dropped_selection_weights_keep_the_report_and_are_retrained_not_loaded_when_a_new_reader_needs_them(
        grid_run, tiny_model_dir, tmp_path, monkeypatch):
    first, _, out = grid_run
    loads, load = [], models.load_model

    def load_checked(path, *a, **k):  # every model loaded has its weights: a dropped run is never read
        assert not Path(path).is_dir() or stages.is_saved_model(Path(path)), path
        loads.append(Path(path).name)
        return load(path, *a, **k)
    monkeypatch.setattr(models, "load_model", load_checked)
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    argv = ["--model", tiny_model_dir, "--out", str(copy), "--method", "flat,ga", *TOFU_SMOKE, "--lr", "1e-4,1e-2",
            "--seeds", "0,1", "--confirm-seeds", "7,8", "--eval-every", "1", "--drop-selection-weights"]
    dropped = run_in_process(run_tofu.main, argv)  # every stage cached: the selection runs' weights go
    assert dropped.report["comparison"] == first.report["comparison"] and dropped.report["timings_s"] == {}
    dirs = {label: copy / Path(d).name for label, d in first.report["dirs"].items() if label in first.report["methods"]}
    confirmation = {label for label in dirs if label.endswith(("seed=7", "seed=8"))}
    for label, d in dirs.items():  # weights kept by the confirmation runs alone; every run keeps its logs
        assert bool(list(d.glob("*.safetensors"))) == (label in confirmation), label
        assert (d / "train_log.json").exists() and (d / "config.json").exists()
    assert len(confirmation) == 4 and len(dirs) == 12
    loads.clear()
    again = run_in_process(run_tofu.main, argv)  # their evaluations reused: nothing trains, nothing loads
    assert again.report["comparison"] == first.report["comparison"] and again.report["timings_s"] == {}
    assert again.stdout.count("(weights dropped; what reads them is cached)") == 8 and loads == []
    # a new reader of every model (zero-shot scores): a dropped run is retrained for it, never loaded without weights
    new = run_in_process(run_tofu.main, [*argv, *ZERO_SHOT_SMOKE])
    trained = sorted(k for k in new.report["timings_s"] if k.startswith("unlearn_"))
    assert trained == sorted(f"unlearn_{label}_s" for label in dirs if label not in confirmation)
    assert {d.name for d in dirs.values()} <= set(loads)  # each scored, with its weights (load_checked)
    assert all(bool(list(d.glob("*.safetensors"))) == (label in confirmation) for label, d in dirs.items())


def test_the_grid_progress_counts_every_unlearning_and_evaluation_stage(grid_run):
    lines = [line for line in grid_run[0].stdout.splitlines() if "[grid]" in line]
    total = 2 * (2 * 2 * 2 + 2 * 2) + 2  # train and evaluate each run, and the target and retain evaluations
    counts = [int(line.split("[grid] ")[1].split("/")[0]) for line in lines]
    assert counts == list(range(1, total + 1)) and f"/{total} " in lines[-1]
    assert all(math.isfinite(float(line.split("|")[1].split()[0])) for line in lines)


@pytest.mark.parametrize("runner, smoke, objective, bar", [
    ("run_hp", [*BOOK_SMOKE, "--ppl-bar", "0.5"], "forget_quality_gap", "wikitext_ppl"),
    ("run_harmful", HARMFUL_SMOKE, "harmful_unseen", "truthfulqa_nll")])
def test_the_book_and_harmful_runners_compare_by_their_own_rule(runner, smoke, objective, bar, tiny_model_dir, tmp_path):
    main = __import__(runner).main
    argv = ["--model", tiny_model_dir, "--out", str(tmp_path / "r"), *smoke, "--method", "ga", "--lr", "1e-4,1e-2",
            "--seeds", "0", "--confirm-seeds", "1", "--drop-selection-weights"]
    r = run_in_process(main, argv)
    c = r.report["comparison"]
    assert c["objective"] == objective and [b["metric"] for b in c["bars"]] == [bar]
    original = r.report["original"]
    assert c["bars"][0]["reference"] == original[bar]  # the bars compare with the model every run starts from
    if runner == "run_hp":  # a bar at half the original's perplexity: the original itself fails it, and the table says so
        assert len(c["start_fails"]) == 1 and "--ppl-bar 1 or above" in c["start_fails"][0]
        assert f"Note: {c['start_fails'][0]}." in r.stdout
    else:
        assert c["start_fails"] == []
    lr = c["chosen"]["ga"]["lr"]
    assert list(r.report["methods"]) == ["ga@lr=0.0001,seed=0", "ga@lr=0.01,seed=0", protocol.cell_label("ga", lr, 1)]
    confirmed = r.report["methods"][protocol.cell_label("ga", lr, 1)]
    assert c["confirmed"]["ga"][objective] == {"mean": confirmed[objective], "sd": None, "n": 1, "missing": 0}
    # --drop-selection-weights: the confirmation run alone keeps its weights, and a rerun reuses every evaluation
    kept = [bool(list(Path(r.report["dirs"][label]).glob("*.safetensors"))) for label in r.report["methods"]]
    assert kept == [False, False, True]
    again = run_in_process(main, argv)
    assert not [k for k in again.report["timings_s"] if k.startswith(("unlearn_", "eval_", "zeroshot_"))]
    assert again.report["comparison"] == c
