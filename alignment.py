"""RLHF through trl, the alignment baseline Yao et al. compare unlearning with (run_harmful --method
rlhf, docs/harmful.md): a reward model fitted on preference pairs (trl's RewardTrainer), then RLOO
against it on the forget prompts (trl's RLOOTrainer). The standard recipe, not hand-written: the row
is there to say what that recipe costs and reaches next to unlearning. The other baselines (sft,
sft-normal, dpo-safe) are methods of this project's own loop (methods.ALIGNMENT).

    rlhf = setting(budget, held_out, excluded, forget_prompts, tok, style, seed)  # pairs no judge or evaluation sees
    rm, log, about = fit_reward_model(original, tok, style, rlhf.pairs, rlhf.held, budget, ...)
    policy, log, about = fit_rloo(original, rm, about["reward_sd"], tok, style, rlhf.prompts, rlhf.watched, ...)

(fit_stages runs the two as a runner's cached stages.)

Why RLOO: trl 1.16 ships no PPO trainer. RLOO (Ahmadian et al., ACL 2024, "Back to Basics") is
REINFORCE whose baseline for each of k samples of a prompt is the mean reward of the other k-1, with a
KL penalty to the original model; they report it matching or beating PPO as the RL step of RLHF, with
no value model. GRPO differs by normalising the advantages by their spread, which is not RLHF's.

The data. The probe judge is fitted on responses to the forget prompts and measured on responses to
held-out prompts; the evaluation asks the first --eval-prompts forget and held-out prompts. The reward
model's pairs (each held-out prompt's safe responses preferred to its harmful ones) come from the
held-out prompts none of those touch (judges.prompts_seen_by_judge, the evaluation's lists), split
80/20 by prompt with --seed: 80% fit the reward model, 20% measure it (pairwise accuracy) and are the
prompts whose mean reward decides when RLOO has plateaued.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

import data
import evaluate
import models
import stages
import train
from errors import DataError, UsageError


@dataclass(frozen=True)
class Budget:
    """What RLHF may spend: the reward model's epochs and learning rate, RLOO's step budget and learning
    rate, its k samples per prompt and KL weight, and the plateau rule (checked every check_every steps
    on the held-out prompts: stop when `patience` checks in a row gain less than min_gain reward sds over
    the best before them). `source`: where the numbers come from (the report prints it)."""
    reward_epochs: int
    reward_lr: float
    reward_batch: int
    rl_steps: int
    rl_lr: float
    samples: int           # k completions per prompt (RLOO's leave-one-out needs k >= 2)
    prompts_per_step: int
    kl: float              # beta: weight of the KL to the original model
    check_every: int
    patience: int
    min_gain: float        # in standard deviations of the reward over the held-out responses
    source: str

    def about(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------------------------

def reward_data(held_out: list[dict], excluded: set[str], seed: int) -> tuple[list, list]:
    """(fitting pairs, held-out pairs) of (prompt, preferred: safe, dispreferred: harmful): the held-out
    prompts not in `excluded`, shuffled with `seed` and split 80/20 by prompt. A prompt with s safe and
    h harmful responses gives max(s, h) pairs, each response in at least one."""
    prompts = [p for p in held_out if p["question"] not in excluded and p["safe_answers"] and p["harmful_answers"]]
    if len(prompts) < 5:
        raise DataError(f"rlhf: {len(prompts)} held-out prompts are left once the judge's and the evaluation's "
                        f"are taken out; the reward model needs at least 5 (pass fewer --eval-prompts)")
    random.Random(seed).shuffle(prompts)
    cut = len(prompts) - max(1, len(prompts) // 5)

    def pairs(ps):
        return [(p["question"], p["safe_answers"][i % len(p["safe_answers"])],
                 p["harmful_answers"][i % len(p["harmful_answers"])])
                for p in ps for i in range(max(len(p["safe_answers"]), len(p["harmful_answers"])))]
    return pairs(prompts[:cut]), pairs(prompts[cut:])


class Setting(NamedTuple):
    budget: Budget
    pairs: list        # (prompt, safe, harmful): the reward model's fitting pairs
    held: list         # the held-out pairs: its accuracy
    watched: list      # their prompts, each once: the plateau rule's
    prompts: list      # RLOO's prompts, each once: the forget prompts


def setting(budget: Budget, held_out: list[dict], excluded: set[str], forget_prompts: list[str], tok, style: str,
            seed: int) -> Setting:
    """RLHF's data (reward_data's pairs, RLOO's prompts), every prompt checked to reach trl as the evaluation
    asks it (check_prompts)."""
    pairs, held = reward_data(held_out, excluded, seed)
    prompts = list(dict.fromkeys(forget_prompts))
    check_prompts(tok, style, prompts + [q for q, _, _ in held])
    return Setting(budget, pairs, held, list(dict.fromkeys(q for q, _, _ in held)), prompts)


def prompt_text(tok, style: str, question: str) -> str:
    """The prompt as trl's trainers get it (text): what the evaluation's prompt ids decode from."""
    prompt, _ = data.prompt_and_answer(tok, style, question, "")
    return prompt


def check_prompts(tok, style: str, questions: list[str]) -> None:
    """trl tokenises a prompt text itself; it must give the ids this project's generation starts from,
    or RLOO would train on prompts the evaluation never asks."""
    for q in questions:
        if tok(prompt_text(tok, style, q)).input_ids != data.encode_prompt(tok, style, q):
            raise UsageError(f"rlhf: trl would tokenise the prompt of {q[:60]!r} differently from this project's "
                             f"evaluation (special tokens of prompt style {style!r}); this model cannot run rlhf")


def reward_ids(tok, style: str, question: str, answer: str, max_tokens: int) -> list[int]:
    """A (prompt, response) as the reward model reads it during RLOO: prompt text + response text,
    without special tokens (trl scores prompt + completion so), the response cut at max_tokens tokens
    (RLOO's completions are at most that long)."""
    prompt, answer = data.prompt_and_answer(tok, style, question, answer)
    p = len(tok(prompt, add_special_tokens=False).input_ids)
    return tok(prompt + answer, add_special_tokens=False).input_ids[:p + max_tokens]


# ---------------------------------------------------------------------------------------------
# The reward model
# ---------------------------------------------------------------------------------------------

def load_reward_model(start, compute: models.Compute, trust_remote_code: bool = False, seed: int = 0):
    """A sequence-classification model with one output (the reward) from `start`'s weights; its score
    head is new (drawn from `seed`), so transformers' "newly initialized" notice is silenced: it is
    trained next."""
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(seed)
    with _quiet():
        model = models.load_pretrained(AutoModelForSequenceClassification, str(start), compute.train_dtype,
                                       trust_remote_code, num_labels=1)
    return model.to(compute.device)


@torch.no_grad()
def rewards(model, tok, ids: list[list[int]], batch_size: int = 16) -> np.ndarray:
    """The reward of each token-id row (right-padded: the model reads the last real token)."""
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(ids), batch_size):
        b = data.collate([{"input_ids": r} for r in ids[s:s + batch_size]], tok.pad_token_id, side="right")
        out.append(model(input_ids=b["input_ids"].to(model.device),
                         attention_mask=b["attention_mask"].to(model.device)).logits[:, 0].float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def pairwise(model, tok, style: str, pairs: list, max_tokens: int) -> tuple[float, np.ndarray]:
    """The share of pairs whose preferred response gets the higher reward, and every response's reward."""
    chosen = rewards(model, tok, [reward_ids(tok, style, q, c, max_tokens) for q, c, _ in pairs])
    rejected = rewards(model, tok, [reward_ids(tok, style, q, r, max_tokens) for q, _, r in pairs])
    return float(np.mean(chosen > rejected)), np.concatenate([chosen, rejected])


def fit_reward_model(start, tok, style: str, pairs: list, held: list, budget: Budget, compute: models.Compute,
                     max_tokens: int, seed: int, max_steps: int | None, stage: str,
                     trust_remote_code: bool = False):
    """trl's RewardTrainer (Bradley-Terry: -log sigmoid(r(x, y+) - r(x, y-))) on `pairs`, from `start`'s
    weights. Returns (model, training log, about: its pairwise accuracy on the fitting and held-out pairs
    and the reward's sd over the held-out responses, the plateau rule's unit)."""
    import datasets
    from trl import RewardConfig, RewardTrainer
    model = load_reward_model(start, compute, trust_remote_code, seed)
    model.config.pad_token_id = tok.pad_token_id
    rows = [{"chosen_ids": reward_ids(tok, style, q, c, max_tokens),
             "rejected_ids": reward_ids(tok, style, q, r, max_tokens)} for q, c, r in pairs]
    with tempfile.TemporaryDirectory(prefix=models.TMP_PREFIX) as tmp, _quiet():
        config = RewardConfig(output_dir=tmp, num_train_epochs=budget.reward_epochs, learning_rate=budget.reward_lr,
                              per_device_train_batch_size=budget.reward_batch, max_steps=max_steps or -1,
                              max_length=None, lr_scheduler_type="linear", warmup_steps=0, seed=seed,
                              **_trainer_settings(compute))
        trainer = RewardTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tok, callbacks=[_Lines(stage, ("accuracy", "margin"))])
        _log_our_way(trainer)
        trainer.train()
    log = _log(trainer)
    train.check_finite_weights(model, len(log), stage, compute.device)
    fit_accuracy, _ = pairwise(model, tok, style, pairs, max_tokens)
    held_accuracy, held_rewards = pairwise(model, tok, style, held, max_tokens)
    about = {"pairs": len(pairs), "held_out_pairs": len(held), "accuracy": fit_accuracy,
             "held_out_accuracy": held_accuracy, "reward_sd": float(np.std(held_rewards)),
             "optimizer_steps": trainer.state.global_step}
    return model, log, about


# ---------------------------------------------------------------------------------------------
# RLOO
# ---------------------------------------------------------------------------------------------

def fit_rloo(start, reward_model, reward_sd: float, tok, style: str, prompts: list[str], held_prompts: list[str],
             budget: Budget, compute: models.Compute, max_new_tokens: int, seed: int, max_steps: int | None,
             stage: str, trust_remote_code: bool = False):
    """trl's RLOOTrainer from `start` on `prompts` against the reward model, k = budget.samples completions
    of at most max_new_tokens per prompt, KL budget.kl to `start`. It stops at budget.rl_steps (or
    --max-steps) or when the mean reward of greedy replies to `held_prompts` plateaus (Budget), whichever
    comes first. Returns (policy, training log, about: why it stopped, the held-out reward curve). The
    prompts were checked by setting()."""
    import datasets
    from trl import RLOOConfig, RLOOTrainer
    torch.manual_seed(seed)
    policy, _ = models.load_model(str(start), compute.device, compute.train_dtype, trust_remote_code=trust_remote_code)
    policy.generation_config.eos_token_id = tok.eos_token_id
    steps = min(budget.rl_steps, max_steps or budget.rl_steps)
    plateau = _Plateau(reward_model, reward_sd, tok, style, held_prompts, budget, max_new_tokens)
    trl_tok = _left_padded(tok)
    with tempfile.TemporaryDirectory(prefix=models.TMP_PREFIX) as tmp, _quiet():
        config = RLOOConfig(output_dir=tmp, max_steps=steps, learning_rate=budget.rl_lr,
                            per_device_train_batch_size=budget.samples * budget.prompts_per_step,
                            num_generations=budget.samples, max_completion_length=max_new_tokens, beta=budget.kl,
                            temperature=1.0, top_p=1.0, top_k=0, lr_scheduler_type="linear", warmup_steps=0,
                            seed=seed, **_trainer_settings(compute))
        trainer = RLOOTrainer(model=policy, reward_funcs=reward_model, args=config,
                              train_dataset=datasets.Dataset.from_list([{"prompt": prompt_text(tok, style, q)}
                                                                        for q in prompts]),
                              processing_class=trl_tok, reward_processing_classes=tok,
                              callbacks=[plateau, _Lines(stage, ("reward", "kl"))])
        _log_our_way(trainer)
        trainer.train()
    done = trainer.state.global_step
    train.check_finite_weights(policy, done, stage, compute.device)
    if not plateau.curve or plateau.curve[-1]["step"] != done:
        plateau.check(policy, done)
    about = {"stopped": "plateau" if plateau.stopped else "step budget", "optimizer_steps": done,
             "step_budget": steps, "held_out_prompts": len(held_prompts), "held_out_reward": plateau.curve}
    return policy, _log(trainer), about


def fit_stages(run: stages.Run, rlhf: Setting, original, tok, style: str, reward: tuple[Path, object],
               policy: tuple[Path, object]) -> None:
    """The reward model, then RLOO against it, as the runner's two cached stages ((path, flags) each)."""
    args, b, c = run.args, rlhf.budget, run.compute
    (reward_path, reward_args), (policy_path, policy_args) = reward, policy
    if run.missing(reward_path):
        rm, log, about = fit_reward_model(original, tok, style, rlhf.pairs, rlhf.held, b, c, args.max_new_tokens,
                                          args.seed, args.max_steps, run.stage_name(reward_path),
                                          args.trust_remote_code)
        run.say(f"[rlhf] reward model: pairwise accuracy {about['accuracy']:.3f} on its {about['pairs']} pairs, "
                f"{about['held_out_accuracy']:.3f} on {about['held_out_pairs']} held-out ones")
        run.save(reward_path, rm, tok, log, [], reward_args, reward_model=about)
    if run.missing(policy_path):
        about = stages.read_json(reward_path / "reward_model.json")
        rm = load_reward_model(reward_path, c, args.trust_remote_code)
        model, log, about = fit_rloo(original, rm, about["reward_sd"], tok, style, rlhf.prompts, rlhf.watched, b, c,
                                     args.max_new_tokens, args.seed, args.max_steps, run.stage_name(policy_path),
                                     args.trust_remote_code)
        run.say(f"[rlhf] RLOO stopped at step {about['optimizer_steps']} of {about['step_budget']} ({about['stopped']})")
        run.save(policy_path, model, tok, log, [], policy_args, rlhf=about)


def plateaued(curve: list[float], patience: int, min_gain: float) -> bool:
    """Whether the last `patience` values all fail to beat the best value before them by min_gain."""
    if len(curve) <= patience:
        return False
    return max(curve[-patience:]) < max(curve[:-patience]) + min_gain


class _Callback:
    """The TrainerCallback interface, every event a no-op (transformers' own class imports its trainer)."""

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


class _Plateau(_Callback):
    """The plateau rule of Budget: every check_every steps (and at step 0), the mean reward of greedy
    replies to the held-out prompts."""

    def __init__(self, reward_model, reward_sd, tok, style, prompts, budget: Budget, max_new_tokens: int):
        self.reward_model, self.sd, self.tok, self.style, self.prompts = reward_model, reward_sd, tok, style, prompts
        self.budget, self.max_new_tokens = budget, max_new_tokens
        self.curve, self.stopped = [], False

    def check(self, model, step: int) -> None:
        replies = evaluate.generate(model, self.tok, self.style, self.prompts, self.max_new_tokens,
                                    desc=f"rlhf: held-out reward at step {step}")
        ids = [reward_ids(self.tok, self.style, q, r, self.max_new_tokens) for q, r in zip(self.prompts, replies)]
        self.curve.append({"step": step, "reward": float(np.mean(rewards(self.reward_model, self.tok, ids)))})
        print(f"[rlhf] step {step}: mean reward {self.curve[-1]['reward']:.4f} on {len(self.prompts)} held-out prompts",
              flush=True)

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.check(model, 0)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.budget.check_every == 0:
            self.check(model, state.global_step)
            if plateaued([c["reward"] for c in self.curve], self.budget.patience, self.budget.min_gain * self.sd):
                self.stopped = control.should_training_stop = True
        return control


class _Lines(_Callback):
    """This project's log line per step (train.log_line) from trl's logs; a non-finite loss stops the stage
    without saving (as train.check_finite does in this project's loop)."""

    def __init__(self, stage: str, shown: tuple):
        self.stage, self.shown, self.last = stage, shown, None

    def on_step_begin(self, args, state, control, **kw):
        self.last = self.last or time.time()

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" not in logs:
            return
        train.check_finite(float(logs["loss"]), state.global_step, self.stage)
        now = time.time()
        seconds, self.last = now - (self.last or now), now
        shown = {"loss": float(logs["loss"]), **{k: float(logs[k]) for k in self.shown if k in logs}}
        tqdm.write(train.log_line(self.stage, state.global_step, state.max_steps,
                                  float(logs.get("learning_rate", 0.0)), seconds, shown))


def _log_our_way(trainer) -> None:
    """transformers' progress callback keeps its bar but leaves the log lines to _Lines (it would print
    each step's whole log dict)."""
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ in ("ProgressCallback", "PrinterCallback"):
            cb.on_log = lambda *a, **k: None


def _trainer_settings(compute: models.Compute) -> dict:
    """What every trl stage shares: no checkpoints or trackers, a log line per step, the run's device
    and precision (trl defaults to bf16 and gradient checkpointing; this project decides both)."""
    return dict(save_strategy="no", report_to=[], logging_steps=1, use_cpu=compute.device == "cpu",
                bf16=compute.precision in ("mixed", "bf16"), gradient_checkpointing=compute.gradient_checkpointing,
                disable_dropout=True, dataloader_num_workers=0)


def _log(trainer) -> list[dict]:
    """trl's per-step log entries as this project's training log ({"step", "loss", ...})."""
    return [{"step": e["step"], **{k: v for k, v in e.items() if k != "step" and isinstance(v, (int, float))
                                   and math.isfinite(v)}}
            for e in trainer.state.log_history if "loss" in e]


def _left_padded(tok):
    """A copy of the tokenizer that pads on the left, as trl's generation needs."""
    left = copy.copy(tok)
    left.padding_side = "left"
    return left


@contextlib.contextmanager
def _quiet():
    """transformers' Trainer reports through its logger what this project reports itself, and trl and
    transformers warn about their own deprecations (nothing a user of this project can act on)."""
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
