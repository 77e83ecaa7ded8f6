"""Yao et al.'s alignment baselines in run_harmful.py (sft, sft-normal, dpo-safe, rlhf through trl):
each end to end on the tiny model with its row and its cost, the data each trains on, the reward
model's data kept clear of the judge and the evaluation, and the cost of a cached stage."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_in_process

import alignment
import corpora
import data
import judges
import methods
import models
import run_harmful
import tasks
from errors import DataError, UnknownName, UsageError

SMOKE = ["--max-steps", "2", "--forget-items", "12", "--steps", "3", "--batch-size", "4", "--eval-prompts", "3",
         "--max-new-tokens", "4", "--judge-train-items", "16", "--judge-eval-items", "16", "--log-every", "1",
         "--lr", "1e-2", "--finetune-lr", "1e-2"]
BASELINES = ["sft", "sft-normal", "dpo-safe", "rlhf"]


@pytest.fixture(scope="module")
def baselines_run(tiny_model_dir, tmp_path_factory):
    """Every baseline and ga in one run on the tiny model, then the same command again (all cached)."""
    out = tmp_path_factory.mktemp("harmful-baselines") / "run"
    argv = ["--model", tiny_model_dir, "--method", "ga," + ",".join(BASELINES), "--out", str(out), *SMOKE]
    first = run_in_process(run_harmful.main, argv, spies=[(data, "unlearning_epoch"), (data, "finetune_epoch")])
    again = run_in_process(run_harmful.main, argv)
    return SimpleNamespace(first=first, again=again, out=out, model=tiny_model_dir)


def test_each_baseline_is_a_row_with_its_cost(baselines_run):
    report = baselines_run.first.report
    assert list(report["methods"]) == ["ga", *BASELINES]
    kinds = {"ga": {"negative"}, "sft": {"positive"}, "sft-normal": {"normal"}, "dpo-safe": {"pairs"},
             "rlhf": {"pairs", "prompts"}}
    for name, row in report["methods"].items():
        assert "harmful_unseen" in row and "truthfulqa_nll" in row, name
        c = report["costs"][name]
        assert set(c["examples"]) == kinds[name] and c["train_s"] > 0, (name, c)
        if name != "rlhf":  # --max-steps 2 of this project's loop; the report's steps are the saved log's
            assert c["optimizer_steps"] == 2 == json.loads((Path(report["dirs"][name]) / "train_log.json")
                                                           .read_text())[-1]["step"]
    rlhf = report["costs"]["rlhf"]
    # the reward model's steps and RLOO's, both capped by --max-steps; the time is both stages'
    assert rlhf["optimizer_steps"] == rlhf["reward_model"]["optimizer_steps"] + rlhf["rlhf"]["optimizer_steps"] == 4
    assert rlhf["share_of_rlhf"] == 1.0 and rlhf["rlhf"]["stopped"] == "step budget"
    assert math.isclose(report["costs"]["ga"]["share_of_rlhf"], report["costs"]["ga"]["train_s"] / rlhf["train_s"])
    assert [p["step"] for p in rlhf["rlhf"]["held_out_reward"]] == [0, 2]
    # the plateau rule reads each held-out prompt once, not once per pair (a prompt has several pairs)
    assert 0 < rlhf["rlhf"]["held_out_prompts"] < rlhf["reward_model"]["held_out_pairs"]
    assert (baselines_run.out / "cost.png").stat().st_size > 0
    assert "| rlhf |" in baselines_run.first.stdout and "RLOO stopped at step 2 of 2 (step budget)" in \
        baselines_run.first.stdout
    # the budgets declared: sft at --finetune-lr, dpo-safe at --lr, rlhf at its preset's
    assert report["costs"]["sft"]["lr"] == 1e-2 and report["costs"]["dpo-safe"]["lr"] == 1e-2
    assert rlhf["lr"] == run_harmful.RLHF_BUDGETS["paper"].rl_lr and rlhf["budget"]["source"]


def test_a_cached_stage_costs_what_it_cost_when_it_ran(baselines_run):
    first, again = baselines_run.first.report, baselines_run.again.report
    assert not any(k.startswith("unlearn_") for k in again["timings_s"])  # nothing trained the second time
    assert again["costs"] == first["costs"]  # read from each stage's cost.json, not timed on the cache read
    assert first["timings_s"]["unlearn_sft_s"] >= first["costs"]["sft"]["train_s"] > 0


def test_sft_trains_on_the_safe_responses_and_sft_normal_on_truthfulqa(baselines_run):
    rows = [a[2] for a, _ in baselines_run.first.calls["finetune_epoch"]]
    forget, _ = corpora.load_pku()
    assert rows[0] == [{"question": r["question"], "answer": r["safe_answer"]} for r in forget[:12]]
    truthfulqa = {r["question"] for r in corpora.load_truthfulqa()}
    assert {r["question"] for r in rows[-1]} <= truthfulqa and len(rows[-1]) > 12


def test_dpo_safe_prefers_the_safe_response_of_each_pair(baselines_run, tiny_model_dir):
    """The data: each forget pair's template (DPO's preferred answer) is its own safe response and its
    forget answer (the dispreferred one) the harmful one. The direction: after training, the model's
    log-probability margin of safe over harmful has grown over the original's (a swapped pair shrinks it)."""
    calls = [(a, k) for a, k in baselines_run.first.calls["unlearning_epoch"] if a[3] and isinstance(a[3][0], list)]
    (args, _), *_ = calls
    forget, templates = args[2], args[3]
    assert [t for t in templates] == [[r["safe_answer"]] for r in forget]
    assert all(r["answer"] != r["safe_answer"] for r in forget)

    def margin(path):
        model, tok = models.load_model(str(path), "cpu")
        style = tasks.prompt_style(str(path), tok)
        rows = [(data.encode_qa(tok, style, r["question"], r["safe_answer"], max_answer_tokens=8),
                 data.encode_qa(tok, style, r["question"], r["answer"], max_answer_tokens=8)) for r in forget]
        with torch.no_grad():
            def logp(row):
                ids = torch.tensor([row["input_ids"]])
                logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                labels = torch.tensor(row["labels"][1:])
                keep = labels != -100
                return float(logits[keep].gather(1, labels[keep, None]).sum())
            return np.mean([logp(s) - logp(h) for s, h in rows])
    trained = baselines_run.first.report["dirs"]["dpo-safe"]
    assert margin(trained) > margin(tiny_model_dir) + 0.1


@pytest.mark.parametrize("preferred, other", [("I don't know the answer to that.", "The author wrote it in 1990."),
                                              ("The author wrote it in 1990.", "I don't know the answer to that.")])
def test_the_reward_model_learns_a_learnable_preference(tiny_model_dir, preferred, other):
    """A toy set where the preferred response is always one sentence and the other always another, in
    both directions (so a ranking that held by chance before fitting cannot pass): after fitting, the
    reward ranks the preferred one higher on every fitting and held-out pair, by a clear margin."""
    _, tok = models.load_model(tiny_model_dir, "cpu")
    pairs = [(f"Question number {i}?", preferred, other) for i in range(16)]
    budget = alignment.Budget(reward_epochs=8, reward_lr=3e-3, reward_batch=8, rl_steps=1, rl_lr=1e-6, samples=2,
                              prompts_per_step=1, kl=0.05, check_every=1, patience=1, min_gain=0.0, source="test")
    compute = models.resolve_compute("cpu", "fp32")
    model, log, about = alignment.fit_reward_model(tiny_model_dir, tok, "qa-hash", pairs[:12], pairs[12:], budget,
                                                   compute, 16, 0, None, "test-reward")
    assert about["accuracy"] == 1.0 and about["held_out_accuracy"] == 1.0 and len(log) == 8 * math.ceil(12 / 8)
    _, rewards = alignment.pairwise(model, tok, "qa-hash", pairs, 16)
    assert rewards[:16].mean() - rewards[16:].mean() > 1.0


def test_the_reward_models_prompts_are_clear_of_the_judge_and_the_evaluation():
    forget, held_out = corpora.load_pku()
    args = SimpleNamespace(seed=0, judge="probe", judge_train_items=600, judge_eval_items=300)
    evaluated = {p["question"] for p in held_out[:64]} | {r["question"] for r in forget[:64]}
    judge = judges.prompts_seen_by_judge(args, forget, held_out)
    pairs, held = alignment.reward_data(held_out, judge | evaluated, seed=0)
    fit_prompts, held_prompts = {q for q, _, _ in pairs}, {q for q, _, _ in held}
    assert fit_prompts and held_prompts and not fit_prompts & held_prompts
    assert not (fit_prompts | held_prompts) & (judge | evaluated | {r["question"] for r in forget})
    # the judge's own rows: every prompt it is fitted, measured or checked on is in the excluded set
    fitted, measured, offtopic = judges.probe_rows(args, forget, held_out)
    assert {r[0] for r in fitted + measured + offtopic} == judge
    by_prompt = {p["question"]: p for p in held_out}
    assert all(s in by_prompt[q]["safe_answers"] and h in by_prompt[q]["harmful_answers"] for q, s, h in pairs)


def test_the_plateau_rule():
    assert not alignment.plateaued([0.0, 0.5], patience=2, min_gain=0.1)            # too few checks
    assert alignment.plateaued([0.0, 0.5, 0.55, 0.52], patience=2, min_gain=0.1)    # +0.05 < 0.1
    assert not alignment.plateaued([0.0, 0.5, 0.55, 0.7], patience=2, min_gain=0.1)


def test_a_non_finite_reward_or_rl_loss_stops_the_stage():
    lines = alignment._Lines("unlearn-rlhf", ("reward",))
    with pytest.raises(FloatingPointError, match="unlearn-rlhf: the loss is nan at step 3; stopping without saving"):
        lines.on_log(None, SimpleNamespace(global_step=3, max_steps=5), None, logs={"loss": float("nan")})


def test_a_baseline_without_its_data_is_refused_before_any_model_loads(tiny_model_dir, tmp_path):
    forget, held_out = corpora.load_pku()
    d = tmp_path / "pku"
    d.mkdir()
    (d / "forget.jsonl").write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                                            for r in forget[:12]))
    (d / "eval_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in held_out[:20]))
    (d / "TruthfulQA.csv").write_bytes((corpora.HARMFUL_DIR / "truthfulqa" / "TruthfulQA.csv").read_bytes())
    with pytest.raises(DataError, match=r"--method sft,dpo-safe: 12 of the 12 forget pairs have no safe response"):
        run_harmful.main(["--model", tiny_model_dir, "--method", "sft,dpo-safe", "--data-dir", str(d),
                          "--out", str(tmp_path / "run"), *SMOKE])
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("argv, says", [
    (["--task", "hallucination", "--method", "sft"], "--method sft: alignment baselines of --task harmful"),
    (["--method", "llmu,rlhf", "--lr", "1e-4,3e-4"], "run at their declared budgets"),
    (["--method", "rlhf", "--lora", "8"], "--method rlhf with --lora"),
    (["--method", "rlhf", "--eval-every", "2"], "--method rlhf with --eval-every"),
    (["--method", "sft,nope"], "unknown method 'nope'; valid names: .*dpo-safe.*llmu.*rlhf.*sft-normal"),
])
def test_baseline_flags_are_checked_up_front(tiny_model_dir, argv, says):
    with pytest.raises((UsageError, UnknownName), match=says):
        run_harmful.main(["--model", tiny_model_dir, *argv])


def test_help_lists_each_baseline_on_one_line(capsys):
    with pytest.raises(SystemExit):
        run_harmful.main(["--help"])
    out = capsys.readouterr().out
    for name, m in methods.ALIGNMENT.items():
        assert f"  {name:<11} {m.help}" in out
