"""The training loop: the steps it takes are the steps it plans, for every combination of examples,
batch size, accumulation, epochs and --max-steps; the schedule ends at 0 on the last logged step;
a step's rows weigh the same whether the step is full or short, and in one process or several."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import flags
import models
import stages
import train

# (examples, batch size, accumulation, epochs, max_steps); TOFU's published settings (batch 8,
# accumulation 4, 5 epochs) on forget01, forget05 and forget10 first.
GRID = [(40, 8, 4, 5, None), (200, 8, 4, 5, None), (400, 8, 4, 5, None),
        (40, 8, 1, 2, None), (7, 3, 2, 3, None), (10, 4, 3, 1, None), (9, 2, 5, 4, 7), (33, 4, 2, 3, 1),
        (5, 8, 4, 2, None), (1, 1, 1, 1, None), (64, 2, 1, 1, 64), (17, 3, 3, 2, 100)]


class Counter(torch.nn.Module):
    """A one-parameter model whose per-row loss is w * x_row."""
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


def loss_fn(model, batch, method=None, params=None, pad_id=0, ref=None):
    """Stands in for train.batch_loss: the loop calls it by name with the same arguments."""
    x = torch.tensor([r["x"] for r in batch["answer"]], dtype=torch.float32)
    return model.w * x, {"p_answer": x}


TOK = SimpleNamespace(pad_token_id=0)


def epochs_of(n, rows_per_step, epochs):
    """What a data builder gives plan_steps: each epoch a list of step batches of rows_per_step rows."""
    rows = [{"x": float(i + 1)} for i in range(n)]
    return ([{"answer": rows[s:s + rows_per_step]} for s in range(0, n, rows_per_step)] for _ in range(epochs))


ARGS = SimpleNamespace(weight_decay=0.0, warmup_epochs=1.0, max_grad_norm=1e9, log_every=3)


@pytest.mark.parametrize("n,bs,accum,epochs,max_steps", GRID)
def test_steps_taken_equal_steps_planned_and_the_schedule_ends_at_zero(n, bs, accum, epochs, max_steps, monkeypatch):
    per_epoch = math.ceil(n / (bs * accum))
    planned = min(per_epoch * epochs, max_steps or per_epoch * epochs)
    plan = train.plan_steps(epochs_of(n, bs * accum, epochs), bs, max_steps)
    assert len(plan.steps) == planned and plan.steps_per_epoch == per_epoch
    taken = []
    monkeypatch.setattr(train, "batch_loss", loss_fn)
    hook = register_optimizer_step_post_hook(lambda opt, *a: taken.append(1))
    try:
        log, _ = train.train(Counter(), TOK, plan, methods.FINETUNE, None, 0.1, ARGS, models.resolve_compute("cpu"), "test")
    finally:
        hook.remove()
    assert len(taken) == planned                     # every planned step is taken, no more
    assert log[-1]["step"] == planned                # the log holds the last step
    assert log[-1]["lr"] == 0.0                      # linear decay reaches exactly 0 there
    assert all(r["lr"] > 0 for r in log[:-1])
    # every window lies inside one epoch: its micro-batches hold consecutive rows of one epoch
    for micros, e in zip(plan.steps, plan.epoch):
        xs = [r["x"] for m in micros for r in m.batch["answer"]]
        assert xs == sorted(xs) and len(xs) <= bs * accum


@pytest.mark.parametrize("n,bs,accum,epochs,max_steps", GRID)
def test_a_steps_row_weights_sum_to_one_for_full_and_short_windows(n, bs, accum, epochs, max_steps):
    for world in (1, 2, 3):
        plans = [train.plan_steps(epochs_of(n, bs * accum * world, epochs), bs, max_steps, world, r) for r in range(world)]
        for s in range(len(plans[0].steps)):
            micro = [m for p in plans for m in p.steps[s]]
            assert len({len(p.steps[s]) for p in plans}) == 1   # every rank runs as many micro-batches
            assert sum(m.weight * len(m.batch["answer"]) for m in micro) == pytest.approx(1.0)
            rows = [r["x"] for m in micro if m.weight > 0 for r in m.batch["answer"]]
            assert len(rows) == len(set(rows))                 # no row counted twice, none lost
            assert all(len(m.batch["answer"]) <= bs for m in micro)


def test_a_short_window_is_the_mean_of_the_rows_it_has():
    """The gradient of a step is the mean of its rows' gradients, whatever the split into micro-batches:
    7 rows with accumulation 2 of batch 2 give a full step of 4 rows and a short one of 3."""
    plan = train.plan_steps(epochs_of(7, 4, 1), 2)
    assert [sum(len(m.batch["answer"]) for m in s) for s in plan.steps] == [4, 3]
    for micros, rows in zip(plan.steps, [[1, 2, 3, 4], [5, 6, 7]]):
        model = Counter()
        for m in micros:
            loss, _ = loss_fn(model, m.batch)
            (loss * m.weight).sum().backward()
        assert float(model.w.grad) == pytest.approx(sum(rows) / len(rows))


def test_the_published_tofu_settings_take_every_planned_step():
    """The old loop planned ceil(n_batches / accum) steps per epoch but let windows run across epochs:
    forget01 (40 examples, batch 8, accumulation 4, 5 epochs) took 7 of 10 steps."""
    plan = train.plan_steps(epochs_of(40, 32, 5), 8)
    assert len(plan.steps) == 10 and plan.epoch == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [sum(len(m.batch["answer"]) for m in s) for s in plan.steps] == [32, 8] * 5


# ---------------------------------------------------------------------------------------------
# Stage keys: derived from the resolved flags, never hand-listed
# ---------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402

import methods  # noqa: E402
import run_harmful  # noqa: E402
import run_hp  # noqa: E402
import run_tofu  # noqa: E402

CPU = models.resolve_compute("cpu")
# A changed value for every training flag the issue names (and the runners' own training flags)
CHANGES = {"lr": 3e-4, "epochs": 7, "steps": 9, "batch_size": 5, "grad_accum": 3, "weight_decay": 0.1,
           "warmup_epochs": 0.5, "max_grad_norm": 0.25, "seed": 11, "max_steps": 13, "finetune_lr": 7e-5,
           "finetune_epochs": 2, "max_answer_tokens": 17, "forget_items": 9, "retain_authors": 3,
           "chunk_tokens": 77, "n_chunks": 5, "prompt_tokens": 7, "template": "wikitext",
           "model": "other-model", "split": "forget05", "corpus": "muse-news", "task": "hallucination"}
EVAL_ONLY = {"max_new_tokens": 3, "eval_batch_size": 5, "eval_items": 4, "eval_chunks": 3, "ppl_chunks": 3,
             "eval_prompts": 3, "judge_l2": 2.0, "judge_train_items": 5, "log_every": 99, "out": "elsewhere"}
RUNNERS = [run_tofu, run_hp, run_harmful]  # each trains a finetune and an unlearn stage


def _keys(args, method="flat"):
    m = methods.LOSSES[method]
    params = m.read_params(flags.loss_params(args))  # what run.stage("unlearn", ...) is given
    return {stage: stages.stage_key(args, stage, CPU, **({"params": params} if stage == "unlearn" else {}))
            for stage in ("finetune", "unlearn", "eval")}


@pytest.mark.parametrize("runner", RUNNERS, ids=lambda r: r.__name__)
def test_every_training_flag_is_in_its_stages_key_and_eval_flags_are_not(runner):
    base = runner.resolve(runner.Args())
    fields = {f.name for f in dataclasses.fields(base)}
    before = _keys(base)
    for name, value in CHANGES.items():
        if name not in fields:
            continue
        changed = _keys(dataclasses.replace(base, **{name: value}))
        unlearn_only = name in ("lr", "epochs", "steps")
        finetune_only = name in ("finetune_lr", "finetune_epochs")
        assert changed["unlearn"] != before["unlearn"] or finetune_only, (runner.__name__, name)
        assert changed["finetune"] != before["finetune"] or unlearn_only, (runner.__name__, name)
    for name, value in EVAL_ONLY.items():
        if name in fields:
            changed = _keys(dataclasses.replace(base, **{name: value}))
            assert all(changed[s] == before[s] for s in ("finetune", "unlearn")), (runner.__name__, name)  # no retraining
    # precision: a resolved setting, in every key
    bf16 = dataclasses.replace(CPU, precision="bf16")
    assert stages.stage_key(base, "finetune", bf16) != stages.stage_key(base, "finetune", CPU)


def test_loss_parameters_enter_the_key_of_the_methods_that_read_them_only():
    base = run_tofu.resolve(run_tofu.Args())
    for method, name, value in [("flat", "divergence", "js"), ("npo", "beta", 0.5), ("dpo", "beta", 0.5),
                                ("llmu", "eps2", 2.0), ("gd", "retain_weight", 0.5), ("simnpo", "simnpo_delta", 1.0)]:
        assert _keys(base, method)["unlearn"] != _keys(dataclasses.replace(base, **{name: value}), method)["unlearn"]
    assert _keys(dataclasses.replace(base, npo_retain=True), "npo")["unlearn"] != \
        _keys(dataclasses.replace(base, npo_retain=True, retain_weight=0.5), "npo")["unlearn"]
    # a flag a method ignores does not split its cache (npo reads the retain weight only with --npo-retain)
    for method, name, value in [("npo", "divergence", "js"), ("ga", "beta", 0.5), ("flat", "eps1", 2.0),
                                ("npo", "retain_weight", 0.5), ("simnpo", "retain_weight", 0.5)]:
        assert _keys(base, method)["unlearn"] == _keys(dataclasses.replace(base, **{name: value}), method)["unlearn"]
