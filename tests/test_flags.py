"""Every flag of every runner, walked from its declaration so that a flag added tomorrow is checked too:
a numeric one has a range and refuses 0, -1, NaN, inf, huge values and words outside it; a setting of
a feature that is off is refused; a loss hyperparameter is accepted only with a method that reads it."""
import dataclasses
import math
import re
import typing
from functools import partial
from pathlib import Path

import pytest
from test_faults import fails_cleanly

import flags
import methods
import run_harmful
import run_hp
import run_tofu
import stages
from errors import ModelLoadError, UnknownName, UsageError

# ---------------------------------------------------------------------------------------------
# Every numeric flag of every runner, derived from the declarations: a flag added tomorrow is walked too
# ---------------------------------------------------------------------------------------------

RUNNERS = {"run_tofu": run_tofu, "run_hp": run_hp, "run_harmful": run_harmful}
CHECKED_ELSEWHERE = {("run_harmful", "judge_layer")}   # negative layers count from the end: checked against the model


def numeric_flags(runner):
    hints = typing.get_type_hints(runner.Args)
    for f in dataclasses.fields(runner.Args):
        if any(t in (int, float) for t in typing.get_args(hints[f.name]) or (hints[f.name],)):
            yield f


@pytest.mark.parametrize("name", RUNNERS)
def test_every_numeric_flag_declares_a_range(name):
    missing = [f.name for f in numeric_flags(RUNNERS[name]) if f.metadata.get("check") is None
               and (name, f.name) not in CHECKED_ELSEWHERE]
    assert not missing, f"{name}: numeric flags without a declared range: {missing}"


@pytest.mark.parametrize("name", RUNNERS)
def test_every_numeric_flag_at_0_minus_1_nan_inf_huge_and_a_word_is_refused_or_in_range(name, capsys):
    """parse() either refuses a value (one line, exit 2) or the value it returns lies in the flag's
    declared range: a loss term's sign is never silently flipped, a NaN never reaches training."""
    runner = RUNNERS[name]
    for f in numeric_flags(runner):
        for value in ("0", "-1", "nan", "inf", "1e300", "1e20", str(10**20), "word"):
            try:
                args = flags.parse(runner.Args, [f"--{f.name.replace('_', '-')}", value], runner.resolve, runner.check)
            except SystemExit as e:                       # argparse: not a number of the flag's type
                assert e.code == 2, (f.name, value)
                continue
            except (UsageError, UnknownName, ModelLoadError) as e:
                assert str(e).count("\n") == 0, (f.name, value, str(e))
                continue
            got = getattr(args, f.name)
            check = f.metadata.get("check")
            assert not (isinstance(got, float) and not math.isfinite(got)), (f.name, value)
            if check is not None:
                ok, says = check
                assert ok(got), (f.name, value, says)
    capsys.readouterr()


def test_loss_hyperparameters_that_would_flip_a_term_are_refused():
    for flag, value in [("--beta", "-1"), ("--beta", "0"), ("--simnpo-beta", "0"), ("--retain-weight", "-1"),
                        ("--eps1", "-1"), ("--eps2", "-0.5"), ("--eps3", "-1"), ("--simnpo-delta", "nan"),
                        ("--seed", "-1"), ("--seed", str(2**40)), ("--lr", "1e300"), ("--finetune-lr", "1e39")]:
        with pytest.raises(UsageError, match=f"^{flag} "):
            flags.parse(run_tofu.Args, [flag, value, "--method", "all"], run_tofu.resolve, run_tofu.check)
    with pytest.raises(UsageError, match="reads at most"):
        flags.parse(run_tofu.Args, ["--max-new-tokens", str(10**9)], run_tofu.resolve, run_tofu.check)


def test_out_may_not_be_or_hold_an_input(tiny_model_dir, tmp_path, capsys):
    config = (Path(tiny_model_dir) / "config.json").read_bytes()
    for out in (Path(tiny_model_dir), Path(tiny_model_dir).parent):
        with pytest.raises(SystemExit) as e:
            stages.main_guard(partial(run_tofu.main, ["--model", tiny_model_dir, "--out", str(out)]))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(f"error: --out {out}: it holds --model"), err
    assert (Path(tiny_model_dir) / "config.json").read_bytes() == config          # the model is untouched
    book = tmp_path / "book.txt"
    book.write_text("text " * 100)
    fails_cleanly(run_hp.main, ["--model", tiny_model_dir, "--text", str(book), "--out", str(tmp_path)], capsys,
                  tmp_path / "never", "it holds --text")


def test_flags_that_were_silently_resolved_are_explicit(capsys):
    assert flags.parse_args(run_hp.Args, ["--text", "a.txt", "--text", "b.txt", "c.txt"]).text == ["a.txt", "b.txt",
                                                                                                    "c.txt"]
    with pytest.raises(SystemExit) as e:                              # --text with no book is an error
        flags.parse_args(run_hp.Args, ["--text"])
    assert e.value.code == 2 and "--text: expected at least one argument" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--retain-logs and --retain-model"):
        flags.parse(run_tofu.Args, ["--retain-logs", "x", "--retain-model", "y"], run_tofu.resolve, run_tofu.check)


# ---------------------------------------------------------------------------------------------
# Every flag acts or is refused: a setting of a feature that is off would do nothing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("runner,argv,needle", [
    (run_tofu, ["--lora-alpha", "16", "--lora-targets", "q_proj"], "--lora-alpha 16.0 does nothing without --lora R"),
    (run_tofu, ["--relearn-steps", "5", "--quant-group", "7"], "--relearn-steps 5 does nothing without --attacks relearn"),
    (run_hp, ["--quant-group", "7", "--attacks", "relearn"], "--quant-group 7 does nothing without --attacks quant8"),
    (run_tofu, ["--zero-shot-limit", "5"], "--zero-shot-limit 5 does nothing without --zero-shot TASKS"),
    (run_hp, ["--zero-shot", "none", "--zero-shot-limit", "5"], "--zero-shot-limit 5 does nothing"),
    (run_tofu, ["--beta", "0.5"], "--beta 0.5 does nothing for --method flat: only dpo, npo read it"),
    (run_tofu, ["--method", "npo", "--retain-weight", "2"], "--retain-weight 2.0 does nothing for --method npo"),
    (run_harmful, ["--task", "hallucination", "--judge-layer", "1"], "--judge-layer 1 does nothing without --task harmful"),
    (run_harmful, ["--similarity", "hidden"], "--similarity hidden does nothing without --task hallucination"),
    (run_hp, ["--corpus", "muse-news", "--n-chunks", "4"], "--n-chunks 4 does nothing without --corpus book")],
    ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_a_setting_whose_feature_is_off_is_one_error_line(runner, argv, needle, tiny_model_dir, tmp_path, capsys):
    fails_cleanly(runner.main, ["--model", tiny_model_dir, "--out", str(tmp_path / "x"), *argv], capsys,
                  tmp_path / "x", needle)


def _switches():
    return {flags.LORA: (["--lora", "4"], []), flags.RELEARN: (["--attacks", "relearn"], ["--attacks", "quant8"]),
            flags.QUANT: (["--attacks", "quant4"], ["--attacks", "relearn"]),
            flags.ZERO_SHOT: (["--zero-shot", "arc_easy"], ["--zero-shot", "none"]),
            run_hp.BOOK: ([], ["--corpus", "muse-news"]), run_hp.MUSE: (["--corpus", "muse-news"], []),
            run_harmful.HARMFUL: ([], ["--task", "hallucination"]),
            run_harmful.PROBE: ([], ["--judge", "some/judge"]),
            run_harmful.HALLUCINATION: (["--task", "hallucination"], []),
            flags.SEEDS: (["--seeds", "0,1"], []), flags.GRID: (["--lr", "1e-4,3e-4"], ["--lr", "1e-4"]),
            run_hp.GRID_ZERO_SHOT: (["--seeds", "0", "--zero-shot", "arc_easy"], ["--zero-shot", "arc_easy"])}
    # switch on, switch off


SAMPLE = {"lora_targets": "q_proj", "similarity": "hidden", "judge": "some/judge", "text": "x.txt",
          "zero_shot_data": "dir", "confirm_seeds": "5"}
FEATURES = ("lora", "zero_shot", "relearn", "quant", "judge")                    # flag names of a feature
SCOPES = ("book:", "muse-news:", "probe:", "harmful:", "hallucination:", "zero-shot:", "LoRA:",  # helps of one
          "a comparison's")
BOTH = {"eval_chunks": "book and muse-news", "data_dir": "harmful and hallucination",
        "hub_data": "both tasks (TruthfulQA)"}                                 # scoped helps that apply to every value


@pytest.mark.parametrize("name", RUNNERS)
def test_every_setting_of_a_feature_declares_its_switch_and_is_refused_without_it(name):
    """Walk every flag: one that belongs to a feature (by its name or its help) declares the switch (needs=),
    is refused with the switch off and accepted with it on. Loss hyperparameters are checked against --method."""
    runner, loss_fields = RUNNERS[name], {f.name for f in dataclasses.fields(methods.LossParams)}
    hints = typing.get_type_hints(runner.Args)
    switches = _switches()
    for f in dataclasses.fields(runner.Args):
        needs = f.metadata.get("needs")
        help_text = f.metadata.get("help", "")
        scoped = f.name.startswith(FEATURES) or help_text.startswith(SCOPES)
        if f.name in loss_fields or f.name in BOTH or f.name in ("lora", "zero_shot", "seeds"):
            continue
        assert needs is not None or not scoped, f"{name}: --{f.name} belongs to a feature but declares no switch"
        if needs is None:
            continue
        typ = next((t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)))
        value = SAMPLE.get(f.name) or {int: "3", float: "0.5", bool: "true"}.get(typ) or "x"
        on, off = switches[needs]
        flag = f"--{f.name.replace('_', '-')}"
        with pytest.raises(UsageError, match=f"^{flag} .* does nothing without {re.escape(needs.says)}"):
            flags.check_switches(flags.parse_args(runner.Args, [*off, flag, value]))
        flags.check_switches(flags.parse_args(runner.Args, [*on, flag, value]))  # with its switch on: accepted


def test_every_loss_setting_at_1e300_is_refused_up_front_with_its_range():
    """Above float32's largest number a setting is inf in the loss: refused before any work, not at the
    first unlearning step (methods.py derives each range; tests/test_flat.py checks its edges)."""
    for runner in RUNNERS.values():
        for f in dataclasses.fields(methods.LossParams):
            if f.type not in (float, "float"):
                continue
            reader = next(n for n, m in methods.LOSSES.items() if f.name in m.params)
            extra = ["--npo-retain"] if f.name == "retain_weight" and reader in ("npo", "simnpo") else []
            flag = f"--{f.name.replace('_', '-')}"
            with pytest.raises(UsageError, match=rf"^{flag} 1e\+300: must be in \[.*3\.4e38\]"):
                flags.parse(runner.Args, ["--method", reader, flag, "1e300", *extra], runner.resolve, runner.check)


def test_every_loss_hyperparameter_is_accepted_with_a_method_that_reads_it():
    for f in dataclasses.fields(methods.LossParams):
        value = "true" if f.type in (bool, "bool") else ("js" if f.name == "divergence" else "0.5")
        readers = [n for n, m in methods.LOSSES.items() if f.name in m.params]
        extra = ["--npo-retain"] if f.name == "retain_weight" and readers[0] in ("npo", "simnpo") else []
        flags.check_switches(flags.parse_args(run_tofu.Args, ["--method", readers[0], f"--{f.name.replace('_', '-')}",
                                                              value, *extra]))
