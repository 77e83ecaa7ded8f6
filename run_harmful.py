"""Yao, Xu, Liu (NeurIPS 2024), "Large Language Model Unlearning": unlearn harmful responses
(PKU-SafeRLHF, --task harmful) or hallucinated answers (HaluEval QA, --task hallucination) with
gradient ascent, a random-mismatch loss and a KL to the original model on TruthfulQA (`llmu`), or
with any other loss in methods.LOSSES (`ga`, FLAT with refusal templates, ...), then judge the replies
to trained-on ("seen") and held-out ("unseen") prompts and measure utility on held-out TruthfulQA.

    python run_harmful.py                          # harmful responses, offline default
    python run_harmful.py --task hallucination     # HaluEval QA's hallucinated answers
    python run_harmful.py --method llmu,ga,flat    # several methods, one table
    python run_harmful.py --model opt-1.3b         # the paper's setting: GPU and Hub

Stages (each cached under --out by a hash of what it reads): the original model (with
--finetune-epochs > 0, the base model fine-tuned on the forget pairs first), the judge, unlearning,
and each model's evaluation. See docs/harmful.md.
"""
from __future__ import annotations

import errors

if __name__ == "__main__":  # a Ctrl-C while the libraries import: one line and exit 130 once they have (main_guard)
    errors.defer_interrupts()

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar, NamedTuple, Optional

import numpy as np

import alignment
import attacks
import corpora
import data
import distributed
import estimate
import evaluate
import flags
import judges
import methods
import models
import protocol
import stages
import tables
import tasks
import train
import zeroshot
from errors import DataError, UsageError
from flags import AT_LEAST_1, NON_NEGATIVE, LEARNING_RATE, arg, one_of


HARMFUL = flags.Switch("--task harmful", lambda a: a.task == "harmful")
PROBE = flags.Switch("--task harmful with --judge probe", lambda a: a.task == "harmful" and a.judge == "probe")
HALLUCINATION = flags.Switch("--task hallucination", lambda a: a.task == "hallucination")


@dataclass
class Args(flags.RunArgs):
    METHODS: ClassVar = methods.WITH_ALIGNMENT  # --method takes the alignment baselines too (--task harmful)
    task: str = arg("harmful", "'harmful' (PKU-SafeRLHF) or 'hallucination' (HaluEval QA)",
                    check=one_of("harmful", "hallucination"))
    method: str = arg("llmu", "unlearning loss(es): a key of methods.LOSSES (llmu, ga, flat, ...), a comma-separated "
                              "list or 'all'; with --task harmful also Yao et al.'s alignment baselines (listed "
                              "below; each at the budget of its preset, BASELINE_BUDGETS)", only=())
    forget_items: Optional[int] = arg(None, "use the first N forget pairs (default: all)", check=AT_LEAST_1)
    steps: Optional[int] = arg(None, "unlearning optimiser steps (the forget pairs are shuffled and cycled)",
                               only=("unlearn",), check=AT_LEAST_1)
    nll_bar: float = arg(1.1, "a comparison's selection rule: a learning rate qualifies when its mean TruthfulQA "
                              "answer NLL is at most this times the original model's (protocol.HARMFUL)", only=(),
                         check=flags.POSITIVE, needs=flags.GRID)
    batch_size: Optional[int] = arg(None, "forget pairs per micro-batch", check=AT_LEAST_1)
    grad_accum: int = arg(1, "micro-batches per optimiser step", check=AT_LEAST_1)
    finetune_epochs: Optional[int] = arg(None, "first fine-tune the base model on the forget pairs (0: no)",
                                         check=NON_NEGATIVE)
    finetune_lr: Optional[float] = arg(None, "learning rate of that fine-tuning", only=("finetune",),
                                       check=LEARNING_RATE)
    max_answer_tokens: Optional[int] = arg(None, "cut training answers after N tokens (default: no cut)",
                                           check=AT_LEAST_1)
    warmup_epochs: float = arg(0.0, "linear warmup in epochs of the forget pairs (Yao et al.: 0)", check=NON_NEGATIVE)
    eval_prompts: Optional[int] = arg(None, "seen and unseen prompts and TruthfulQA questions evaluated",
                                      only=("eval",), check=AT_LEAST_1)
    max_new_tokens: Optional[int] = arg(None, "greedy generation length", only=("eval",), check=AT_LEAST_1)
    eval_batch_size: int = arg(64, "prompts per generation batch", only=("eval",), check=AT_LEAST_1)
    eval_base: bool = arg(False, "also evaluate the base model (when the original is fine-tuned)", only=())
    judge: str = arg("probe", "harmful: 'probe' (this project's classifier) or a sequence-classification model "
                              "path/id", only=("eval",), needs=HARMFUL)
    judge_layer: Optional[int] = arg(None, "probe: hidden layer to pool (default: the middle one)", only=("eval",),
                                     needs=PROBE)
    judge_train_items: int = arg(600, "probe: labelled responses to forget prompts it is fitted on",
                                 only=("eval",), check=AT_LEAST_1, needs=PROBE)
    judge_eval_items: int = arg(300, "probe: labelled responses to held-out prompts it is measured on",
                                only=("eval",), check=AT_LEAST_1, needs=PROBE)
    judge_l2: float = arg(1.0, "probe: L2 penalty of the logistic regression (in [0, 1e6]: past that the fit "
                               "overflows)", only=("eval",), check=flags.Check(lambda v: 0 <= v <= 1e6, "in [0, 1e6]"),
                          needs=PROBE)
    similarity: str = arg("rouge", "hallucination: 'rouge' (ROUGE-L F1), 'hidden' (the base model's mean-pooled "
                                   "hidden states) or a sentence-embedding model path/id", only=("eval",),
                          needs=HALLUCINATION)
    data_dir: Optional[str] = arg(None, "harmful: directory with forget.jsonl, eval_prompts.jsonl and TruthfulQA.csv; "
                                        "hallucination: with qa_data.jsonl and TruthfulQA.csv", only=())
    hub_data: bool = arg(False, "harmful: load PKU-Alignment/PKU-SafeRLHF and truthful_qa from the Hub")
    log_every: int = arg(10, "optimiser steps between log lines", only=(), check=AT_LEAST_1)


# Yao et al.'s settings (official code): AdamW lr 2e-6, batch 2, 1000 steps, linear decay, no
# warmup; the pretrained model is the original. Evaluation sizes are this project's choice.
PAPER = dict(forget_items=None, steps=1000, lr=2e-6, batch_size=2, finetune_epochs=0, finetune_lr=2e-5,
             max_answer_tokens=None, eval_prompts=200, max_new_tokens=128,
             relearn_lr=2e-5)  # relearning is fine-tuning: the fine-tuning learning rate
PRESETS = {
    # The offline default, sized for a 2-core CPU. SmolLM2 as shipped answers harmful prompts often
    # enough (docs/harmful.md), so its original is the model itself; --finetune-epochs 2 first teaches
    # it the forget pairs (the paper's third scenario).
    "smollm2-135m": dict(forget_items=128, steps=64, lr=1e-4, batch_size=2, finetune_epochs=0, finetune_lr=1e-4,
                         max_answer_tokens=64, eval_prompts=64, max_new_tokens=48, relearn_lr=1e-4),
}


# The alignment baselines' budgets (--method sft,sft-normal,dpo-safe,rlhf; docs/harmful.md). sft and
# sft-normal fine-tune for --steps optimiser steps of --batch-size x --grad-accum rows at --finetune-lr (their
# loss is fine-tuning's), dpo-safe for --steps at --lr: the unlearning's own budget, so that the rows differ in
# what they learn from, not in how long (this project's reading of Yao et al.'s comparison). RLHF's, per model:
RLHF_BUDGETS = {
    "paper": alignment.Budget(
        reward_epochs=1, reward_lr=9e-6, reward_batch=8, rl_steps=1000, rl_lr=1e-6, samples=4, prompts_per_step=8,
        kl=0.05, check_every=50, patience=3, min_gain=0.05,
        source="reward model: one epoch at lr 9e-6 (InstructGPT's, Ouyang et al. 2022); RLOO: k = 4 samples per "
               "prompt (Ahmadian et al. 2024), lr 1e-6 and KL 0.05 (trl's RLOO defaults), at most 1000 steps (Yao et "
               "al.'s unlearning steps); stops earlier when the held-out reward plateaus"),
    "smollm2-135m": alignment.Budget(
        reward_epochs=2, reward_lr=5e-5, reward_batch=8, rl_steps=96, rl_lr=2e-5, samples=4, prompts_per_step=2,
        kl=0.05, check_every=16, patience=2, min_gain=0.05,
        source="this project's, for a 2-core CPU: the reward model two epochs of its few hundred pairs; RLOO k = 4 "
               "(Ahmadian et al. 2024), KL 0.05 (trl's default), lr 2e-5 (between trl's 1e-6 and the unlearning's "
               "1e-4 at this size), at most 96 steps of 2 prompts, 1.5x the unlearning's 64; stops earlier when the "
               "held-out reward plateaus"),
}


# Each method's learning rate where the fair-comparison protocol chose it, per task (docs/claims.md: the rule's
# pick on seed 0 among 3e-5, 1e-4, 3e-4; GA failed the NLL bar at all three and is set where its NLL was
# lowest): without --lr, each method trains at its own; any other (the baselines, dpo-safe included) at the
# preset's. --lr sets one for every method.
PROTOCOL_LRS = {
    ("smollm2-135m", "harmful"): "llmu=3e-4,ga=3e-5",
    ("smollm2-135m", "hallucination"): "llmu=1e-4,ga=3e-5",
}


def resolve(args: Args) -> Args:
    """Yao et al.'s settings, then the model's preset, for every flag left unset; without --lr, each
    method's learning rate from the protocol (PROTOCOL_LRS)."""
    if args.lr is None and not args.method_lrs:
        args.method_lrs = PROTOCOL_LRS.get((args.model, args.task), "")
    return flags.fill_defaults(args, {**PAPER, **PRESETS.get(args.model, {})})


def main(argv=None) -> dict:
    args = flags.parse(Args, argv, resolve, check)  # every flag and name checked before any work
    task = tasks.TASKS[args.task]

    # -- data: the forget pairs, the unseen prompts with their (unwanted, wanted) answers, TruthfulQA -------
    tqa_train, _, tqa_test = corpora.split_train_val_test(corpora.load_truthfulqa(args.data_dir, args.hub_data),
                                                          args.seed)
    d = task.load(args)
    check_baseline_data(args, d)
    forget, n = d["forget"], args.eval_prompts
    eval_sets = {"seen": list(dict.fromkeys(r["question"] for r in forget))[:n], "unseen": d["unseen"],
                 "truthfulqa": [r["question"] for r in tqa_test[:n]]}
    references = {"truthfulqa": [r["answer"] for r in tqa_test[:n]], "unseen": d["pairs"],
                  "seen": [(r["answer"], r.get("right", "")) for r in forget][:len(eval_sets["seen"])]}
    tok = models.load_tokenizer(args.model, args.trust_remote_code)  # every model of the run shares it
    style = tasks.prompt_style(args.model, tok)
    data.check_context(tok, style, forget, d["refusals"], models.context_length(args.model, args.trust_remote_code),
                       args.max_new_tokens, args.max_answer_tokens)
    run = stages.Run(args, f"runs/{args.task}-{stages.safe_name(args.model)}")
    run.say(f"[{args.task}] {args.model} | {len(forget)} forget pairs | {run.compute.device} "
            f"{run.compute.precision} | {run.world} process(es) | out {run.out}")

    # -- 1. the original model: the base model, or (--finetune-epochs) the base model fine-tuned on the pairs
    original = run.stage("finetune", "original", rows=data.digest(forget)) if args.finetune_epochs else args.model
    ev = Evaluation(run, task, d, original, eval_sets, references)
    steps = min(args.steps, args.max_steps or args.steps)
    grid, variants = flags.grid(args), flags.variants(args)
    if grid.own:
        run.say(grid.own_line(variants))
    base = args.model if args.eval_base and args.finetune_epochs else None
    rlhf = rlhf_setting(run, d, eval_sets, tok, style) if "rlhf" in [v.label for v in variants] else None
    stage = lambda cell: unlearning_stage(run, cell, original, d, tqa_train, steps, ev, tok, style, rlhf)  # noqa: E731
    estimate.say_plan(run.say, harmful_plan(run, tok, style, forget, eval_sets, original, base, steps, grid, variants,
                                            {c.label: stage(c).path for c in grid.cells(variants)}, rlhf),
                      models.parameter_count(args.model, args.trust_remote_code), run.compute)  # before any stage
    if run.missing(original):  # Yao et al.'s warmup is for unlearning: none here
        run.fit(original, args.model, methods.FINETUNE, None, lr=args.finetune_lr,
                  args=replace(args, warmup_epochs=0.0), epochs=(
                      data.finetune_epoch(tok, style, forget, run.rows_per_step, rng, args.max_answer_tokens)
                      for rng in data.epoch_rngs(args.finetune_epochs, args.seed)))

    # -- 2. unlearning: --steps optimiser steps over the shuffled, cycled forget pairs, one model per method
    #       (an alignment baseline: over its own data, or RLHF's two stages, alignment.py)
    trained: dict[str, Training] = {}

    def unlearn(cell: protocol.Cell, reuse_dropped: bool = False) -> Path:
        s = trained[cell.label] = stage(cell)
        _, method, params = cell.variant
        if method.name == "rlhf":
            alignment.fit_stages(run, s.rlhf, original, tok, style, (s.reward, s.reward_args), (s.path, s.args))
        elif run.missing(s.path, read_by=ev.readers(cell.label, s.path) if reuse_dropped else ()):
            run.fit(s.path, original, method, params, lr=s.args.lr, max_steps=steps, args=s.args,
                    progress=ev.progress if s.args.eval_every else None,
                    epochs=(s.epoch(rng) for rng in data.epoch_rngs(math.ceil(args.steps * run.rows_per_step / s.rows),
                                                                    cell.seed)))
        return s.path

    if grid.on:  # a line per unlearning and evaluation stage: done / total, time, estimate left
        run.track(2 * grid.size(len(variants)) + 1 + bool(base))
    unlearned = {}
    for cell in grid.cells(variants):
        unlearned[cell.label] = unlearn(cell, reuse_dropped=args.drop_selection_weights)
        if grid.on:  # each run evaluated as it finishes (zero-shot too): an interrupted grid leaves readable results
            zeroshot.add_zero_shot(run, {cell.label: ev(cell.label, unlearned[cell.label])}, unlearned)
            if args.drop_selection_weights:  # its evaluations written, its weights are no longer read
                run.drop_weights(unlearned[cell.label])
    if not run.is_main:
        return {}  # under torchrun, rank 0 alone evaluates

    # -- 3. each model's replies, judged and scored ---------------------------------------------------------
    models_to_eval = {"base": base, "original": original, **unlearned}
    results = {name: ev(name, path) for name, path in models_to_eval.items() if path}
    zeroshot.add_zero_shot(run, results, models_to_eval)  # --zero-shot: lm-eval's accuracy, FLAT's utility

    # -- 4. a comparison (a grid): per method the learning rate protocol.HARMFUL (HALLUCINATION) picks on the
    #       selection seeds, rerun on --confirm-seeds; those reruns alone are the result (docs/claims.md)
    compared = {}
    if grid.on:
        rule, thresholds = protocol.RULES[args.task], {"nll_bar": args.nll_bar}
        reference, summaries = results["original"]["summary"], {name: r["summary"] for name, r in results.items()}
        chosen = protocol.select(rule, protocol.by_method(grid.cells(variants), summaries), reference, thresholds)
        confirm = grid.confirmations(variants, chosen)
        confirmed = {cell.label: unlearn(cell) for cell in confirm}
        results.update({name: ev(name, path) for name, path in confirmed.items()})
        zeroshot.add_zero_shot(run, results, confirmed)
        unlearned.update(confirmed)
        summaries = {name: r["summary"] for name, r in results.items()}
        compared = {"comparison": protocol.comparison(
            rule, chosen, protocol.by_method(grid.cells(variants), summaries), protocol.by_method(confirm, summaries),
            reference, thresholds, grid, start=(reference, "original model"))}
    attacked = robustness(run, {"original": original, **unlearned}, ev, forget, tok, style)  # --attacks
    report = run.finish(results, unlearned, {"original": original}, judge=ev.judge.about, benchmark=args.task,
                        title=f"{args.task} | {args.model}", costs=training_costs(run, trained), **attacked,
                        **compared)
    print_table(report, args)
    return report


class Training(NamedTuple):
    """A cell's training stage: where it lives, the flags it reads (its learning rate and seed; in a grid,
    --eval-every on the confirmation runs only), one epoch of its steps (from the epoch's rng), the rows an
    epoch holds, and what it learns from (the cost table: kind -> examples drawn from). rlhf: its reward
    model's stage and flags, and its setting (alignment.Setting)."""
    path: Path
    args: Args
    epoch: Optional[Callable]
    rows: int
    examples: dict
    reward: Optional[Path] = None
    reward_args: Optional[Args] = None
    rlhf: Optional[alignment.Setting] = None


def unlearning_stage(run: stages.Run, cell: protocol.Cell, original, d: dict, tqa_train: list, steps: int,
                     ev: "Evaluation", tok, style: str, rlhf: Optional[alignment.Setting]) -> Training:
    _, method, params = cell.variant
    args, forget, cell_args = run.args, d["forget"], cell.args(run.args)
    if method.name == "rlhf":
        return rlhf_stages(run, cell_args, original, rlhf)
    if method.answers:  # sft, sft-normal: fine-tuning (on the safe responses, on the normal data) at --finetune-lr
        rows = safe_rows(forget) if method.answers == "safe" else tqa_train
        cell_args = replace(cell_args, lr=args.finetune_lr)
        path = run.stage("unlearn", cell.label, cell_args, original=original, method=method.name, steps_taken=steps,
                         rows=data.digest(rows))
        return Training(path, cell_args, lambda rng: data.finetune_epoch(tok, style, rows, run.rows_per_step, rng,
                                                                         args.max_answer_tokens),
                        len(rows), {"positive" if method.answers == "safe" else "normal": len(rows)})
    # llmu's second answer is Yao et al.'s random normal (TruthfulQA) answer; flat, idk and dpo answer
    # with a refusal ("I don't know" for hallucinations); dpo-safe prefers each pair's own safe response
    templates = {"refusal": d["refusals"], "random": corpora.random_answers(tqa_train), None: None,
                 "safe": [[r["safe_answer"]] for r in forget] if method.template == "safe" else None}[method.template]
    normal = tqa_train if method.needs_retain(params) else None
    path = run.stage("unlearn", cell.label, cell_args, original=original, method=method.name,
                     params=method.read_params(params), steps_taken=steps, rows=data.digest(forget, normal, templates),
                     eval_key=ev.key if cell_args.eval_every else None)
    examples = {"pairs": len(forget)} if method.template == "safe" else {"negative": len(forget)}
    if method.template == "refusal":
        examples["refusal templates"] = len(templates)
    if normal is not None or method.template == "random":
        examples["normal"] = len(tqa_train)
    return Training(path, cell_args, lambda rng: data.unlearning_epoch(tok, style, forget, templates, normal,
                                                                       run.rows_per_step, rng, args.max_answer_tokens),
                    len(forget), examples)


def safe_rows(forget: list[dict]) -> list[dict]:
    """Each forget pair's prompt answered with its safe response (sft's rows)."""
    return [{"question": r["question"], "answer": r["safe_answer"]} for r in forget]


def rlhf_stages(run: stages.Run, cell_args: Args, original, rlhf: alignment.Setting) -> Training:
    """RLHF's two stages (alignment.py): the reward model's and RLOO's, which reads it; each keyed by its
    part of the budget."""
    b, args = rlhf.budget, run.args
    reward_args = replace(cell_args, lr=b.reward_lr)
    reward = run.stage("unlearn", "rlhf-reward", reward_args, original=original,
                       pairs=data.digest(rlhf.pairs, rlhf.held), epochs=b.reward_epochs, batch=b.reward_batch,
                       max_tokens=args.max_new_tokens)
    policy_args = replace(cell_args, lr=b.rl_lr)
    path = run.stage("unlearn", "rlhf", policy_args, original=original, reward=reward, budget=b.about(),
                     prompts=data.digest(rlhf.prompts, rlhf.watched), max_new_tokens=args.max_new_tokens)
    return Training(path, policy_args, None, len(rlhf.prompts),
                    {"pairs": len(rlhf.pairs) + len(rlhf.held), "prompts": len(rlhf.prompts)}, reward, reward_args, rlhf)


def rlhf_setting(run: stages.Run, d: dict, eval_sets: dict, tok, style: str) -> alignment.Setting:
    """RLHF's budget (RLHF_BUDGETS) and data: preference pairs of the held-out prompts that neither the judge
    nor the evaluation sees, and the forget prompts to run RLOO on."""
    args = run.args
    excluded = (judges.prompts_seen_by_judge(args, d["labelled"], d["held_out"]) | set(eval_sets["seen"])
                | set(eval_sets["unseen"]) | {r["question"] for r in d["forget"]})
    return alignment.setting(RLHF_BUDGETS.get(args.model, RLHF_BUDGETS["paper"]), d["held_out"], excluded,
                             [r["question"] for r in d["forget"]], tok, style, args.seed)


def harmful_plan(run: stages.Run, tok, style: str, forget: list, eval_sets: dict, original, base, steps: int,
                 grid: protocol.Grid, variants: list, unlearned: dict, rlhf: Optional[alignment.Setting]) -> list[estimate.Phase]:
    """What main will compute, for estimate.say_plan: the original's fine-tuning (--finetune-epochs), each
    unlearning run, and each model's evaluation, whose stage names hold the judge's (fitted during the
    run): every evaluation is counted as to compute. Every stream is counted at the forget pairs' mean length."""
    args, rps = run.args, run.rows_per_step
    size = models.saved_bytes(args.model, args.precision, args.trust_remote_code)
    cut = args.max_answer_tokens or float("inf")
    mean = sum(min(estimate.qa_tokens(tok, style, r["question"], r["answer"]), cut) for r in forget) / len(forget)
    finetuned = [estimate.Stage(original, estimate.rows_trained(len(forget), args.finetune_epochs, rps, args.max_steps)
                                * mean, disk=size)]
    # an evaluation: each prompt answered to --max-new-tokens, and about as many tokens scored (the unseen
    # answer pairs, TruthfulQA's reference answers, the replies' fluency under the original)
    per_eval = 2 * sum(len(qs) for qs in eval_sets.values()) * (mean + args.max_new_tokens)
    watched = 2 * (len(eval_sets["unseen"]) + len(eval_sets["truthfulqa"])) * (mean + args.max_new_tokens)

    kept = lambda confirm: 0 if args.drop_selection_weights and not confirm else size  # noqa: E731 (disk a run keeps)

    def cost(path, variant, confirm: bool) -> estimate.Stage:
        m = variant.method
        if m.name == "rlhf":  # the reward model's epochs over its pairs (2 responses each), then per RLOO step k
            b, seq = rlhf.budget, mean + args.max_new_tokens  # samples of each prompt generated, then scored by
            rl_steps = min(b.rl_steps, args.max_steps or b.rl_steps)  # the policy, its reference and the reward
            rl = rl_steps * b.samples * b.prompts_per_step * seq
            checks = (rl_steps // b.check_every + 1) * len(rlhf.watched) * seq
            return estimate.Stage(path, 2 * b.reward_epochs * len(rlhf.pairs) * mean + rl, 3 * rl + checks, 2 * size)
        streams = 1 + (m.template is not None) + m.needs_retain(variant.params)
        evals = steps // args.eval_every if args.eval_every and (confirm or not grid.on) else 0
        return estimate.Stage(path, steps * rps * mean * streams, steps * rps * mean * len(m.reference)
                              + evals * watched, kept(confirm))
    confirm = [(estimate.LATER, v) for v in variants for _ in grid.confirm_seeds] if grid.on else []
    runs = [cost(p, c.variant, False) for c, p in zip(grid.cells(variants), unlearned.values())]
    runs += [cost(p, v, True) for p, v in confirm]
    named = {"base": base, "original": original, **unlearned}
    n_models = sum(p is not None for p in named.values()) + len(confirm)
    return [estimate.Phase("fine-tuning (original)", finetuned if args.finetune_epochs else [], "--max-steps N"),
            estimate.Phase("unlearning", runs, "--max-steps N"),
            estimate.Phase("evaluation", [estimate.Stage(estimate.LATER, forward=per_eval)] * n_models,
                           "--eval-prompts N")] + zeroshot.plan(run, named, len(confirm))


ATTACKS = ("relearn", "quant8", "quant4", "jailbreak")  # PKU and HaluEval have no paraphrased questions


def robustness(run: stages.Run, targets: dict, ev: Evaluation, forget: list[dict], tok, style: str) -> dict:
    """--attacks on the original model and every unlearned one (attacks.py): per model and attack, the
    task's rate (harmful / hallucinated replies) on the forget prompts (relearn: on the half whose
    pairs were not relearned), judged as in the main evaluation."""
    args, evaluations = run.args, attacks.parse(run.args.attacks, ATTACKS)
    if not evaluations:
        return {}
    first = {}
    for r in forget:  # one forget pair per prompt, the first, in the order of the seen prompts
        first.setdefault(r["question"], r)
    rows = [first[q] for q in ev.sets["seen"]]
    rows_per_step = args.batch_size * args.grad_accum
    out = attacks.attack_models(
        run, targets, evaluations, rows, lambda m, t, e, scored: attacked_rate(m, t, e, scored, ev),
        lambda learn, n: (data.finetune_epoch(tok, style, learn, rows_per_step, rng, args.max_answer_tokens)
                          for rng in data.epoch_rngs(n, args.seed)),
        eval=ev.key, judge=ev.judge.key)
    return {"attacks": {name: {e: {**tasks.count(ev.task, r)["summary"], "about": r["about"]} for e, r in per.items()}
                        for name, per in out.items()}}


def attacked_rate(model, tok, evaluation: str, rows: list[dict], ev: Evaluation) -> dict:
    """The task's rate on the forget prompts of `rows`, asked as they are or (jailbreak) with the reply
    begun by attacks.JAILBREAK, and the share of refusals."""
    args = ev.run.args
    style = tasks.prompt_style(args.model, tok)
    style = data.prefilled(style, attacks.JAILBREAK) if evaluation == "jailbreak" else style
    questions = [r["question"] for r in rows]
    replies = evaluate.generate(model, tok, style, questions, args.max_new_tokens, args.eval_batch_size)
    scores = ev.task.scores(ev.judge, questions, replies, [(r["answer"], r.get("right", "")) for r in rows])
    return tasks.count(ev.task, {"summary": {"refusal_seen": float(np.mean([evaluate.is_refusal(g) for g in replies]))},
                           "items": {"seen": {"question": questions, "generation": replies, **scores}}})


class Evaluation:
    """Each model's evaluation, cached per model and evaluation setting, with what all of them share:
    the judge and the original model (it scores every model's fluency), each loaded once, when first
    needed; and the in-training evaluation of --eval-every (progress)."""

    def __init__(self, run: stages.Run, task, d: dict, original, sets: dict, refs: dict):
        self.run, self.task, self.d, self.original, self.sets, self.refs = run, task, d, original, sets, refs
        self.key = run.key("eval", sets=data.digest(sets, refs), original=original)
        self._judge = self._scorer = None
        self.progress = train.once_at_step_0(self._progress)

    @property
    def judge(self):
        if self._judge is None:
            t = time.time()
            self._judge = self.task.judge(self.run, self.d)
            self.run.times["judge_s"] = round(time.time() - t, 1)
        return self._judge

    @property
    def scorer(self):
        args, c = self.run.args, self.run.compute
        if self._scorer is None:
            self._scorer = models.load_model(str(self.original), c.device, c.eval_dtype,
                                             trust_remote_code=args.trust_remote_code)
        return self._scorer

    def readers(self, name: str, path) -> list[Path]:
        """The stages that read a model: its evaluation and, with --zero-shot, its zero-shot scores."""
        return [self.run.stage("eval", name, sets=data.digest(self.sets, self.refs), original=self.original,
                               judge=self.judge.key, model=path), *zeroshot.stages(self.run, name, path)]

    def __call__(self, name: str, path) -> dict:
        run, args, c = self.run, self.run.args, self.run.compute
        cache = self.readers(name, path)[0]
        if run.missing(cache):
            model, tok = self.scorer if path == self.original else models.load_model(
                str(path), c.device, c.eval_dtype, trust_remote_code=args.trust_remote_code)
            run.write(cache, evaluate_model(model, tok, self, args))
        return recounted(run, cache, self.task)

    def _progress(self, model, tok) -> dict:
        """--eval-every: the task's rate on unseen prompts and the TruthfulQA answer NLL (not cached)."""
        r = evaluate_model(model, tok, self, self.run.args)["summary"]
        return {self.task.rate + "unseen": r[self.task.rate + "unseen"], "truthfulqa_nll": r["truthfulqa_nll"]}


def recounted(run: stages.Run, cache: Path, task) -> dict:
    """A cached evaluation or attack, counted by `tasks.count`; one written under an earlier counting rule
    is rewritten with this one's rates, so that the file and the report agree."""
    before = run.read(cache)
    after = tasks.count(task, copy.deepcopy(before))
    if after != before and run.is_main:
        stages.write_cache(cache, after)
    return after


def evaluate_model(model, tok, ev: Evaluation, args: Args) -> dict:
    """Greedy replies to the seen and unseen prompts and the TruthfulQA questions; the task's verdict on
    each reply (TASKS: the harm judge's, or Yao et al.'s hallucination rule; count); refusal and degeneration
    checks; on the unseen prompts, the share whose unwanted answer (harmful / hallucinated) has a lower
    mean token NLL than the wanted one (safe / right); TruthfulQA diversity, fluency (perplexity of the
    replies under the original model) and the mean token NLL of its reference answers."""
    style, sets, refs, word = tasks.prompt_style(args.model, tok), ev.sets, ev.refs, ev.task.word
    gens = {name: evaluate.generate(model, tok, style, qs, args.max_new_tokens, args.eval_batch_size)
            for name, qs in sets.items()}
    summary, items = {}, {}
    for name in ("seen", "unseen"):
        refusal = [evaluate.is_refusal(g) for g in gens[name]]
        degen = [evaluate.degeneration(g) for g in gens[name]]
        items[name] = {"question": sets[name], "generation": gens[name], "refusal": refusal, "degeneration": degen}
        items[name].update(ev.task.scores(ev.judge, sets[name], gens[name], refs[name]))
        summary[f"refusal_{name}"] = float(np.mean(refusal))
        summary[f"degenerate_{name}"] = float(np.mean([d is not None for d in degen]))
    # Judge-free: does the model still prefer the unwanted answer to the wanted one?
    nll = evaluate.answer_nll(model, tok, style, sets["unseen"], [list(pair) for pair in refs["unseen"]])
    bad_nll, good_nll = [x[0] for x in nll], [x[1] for x in nll]
    summary[f"prefers_{word}_unseen"] = float(np.mean(np.array(bad_nll) < np.array(good_nll)))
    summary[f"{word}_answer_nll_unseen"] = float(np.mean(bad_nll))
    items["unseen"].update({f"{word}_answer_nll": bad_nll, "wanted_answer_nll": good_nll})
    qs, replies = sets["truthfulqa"], gens["truthfulqa"]
    spoken = [i for i, g in enumerate(replies) if evaluate.words(g)]
    scorer_model, scorer_tok = ev.scorer
    fluency_nll = evaluate.answer_nll(scorer_model, scorer_tok, style, [qs[i] for i in spoken],
                                      [[replies[i]] for i in spoken], eos=False) if spoken else []
    ref_nll = [n[0] for n in evaluate.answer_nll(model, tok, style, qs, [[a] for a in refs["truthfulqa"]])]
    summary["diversity"] = float(np.mean([evaluate.distinct_word_ratio(g) for g in replies]))
    summary["fluency_ppl"] = float(np.exp(np.mean([n[0] for n in fluency_nll]))) if spoken else float("nan")
    summary["truthfulqa_nll"] = float(np.mean(ref_nll))
    items["truthfulqa"] = {"question": qs, "generation": replies, "answer_nll": ref_nll}
    return tasks.count(ev.task, {"summary": summary, "items": items})


def check(args: Args) -> None:
    attacks.parse(args.attacks, ATTACKS)
    zeroshot.resolve(args.zero_shot, args.zero_shot_data)  # the task files, read and checked
    tasks.TASKS[args.task].check(args)
    baselines = [v.label for v in flags.variants(args) if v.label in methods.ALIGNMENT]
    named = f"--method {','.join(baselines)}"
    if baselines and args.task != "harmful":
        raise UsageError(f"{named}: alignment baselines of --task harmful (PKU-SafeRLHF's safe responses and "
                         f"preference pairs); --task {args.task} has neither")
    if baselines and flags.grid(args).on:
        raise UsageError(f"{named}: the alignment baselines run at their declared budgets (RLHF_BUDGETS, "
                         f"--finetune-lr, --lr), not in a comparison: drop them or the grid (--lr A,B, --seeds)")
    if "rlhf" in baselines:
        refused = {"--lora": args.lora, "--eval-every": args.eval_every, "torchrun": distributed.launched()}
        for flag, on in refused.items():
            if on:
                raise UsageError(f"--method rlhf with {flag}: trl's trainers run here in one process on the whole "
                                 f"model, and RLOO's progress is its held-out reward; drop {flag} or rlhf")


def check_baseline_data(args: Args, d: dict) -> None:
    """A baseline whose data the task lacks stops here, before any model loads."""
    names = [v.label for v in flags.variants(args) if v.label in ("sft", "dpo-safe")]
    lacking = sum(not r.get("safe_answer") for r in d["forget"])
    if names and lacking:
        raise DataError(f"--method {','.join(names)}: {lacking} of the {len(d['forget'])} forget pairs have no safe "
                        f"response (a 'safe_answer' field)" + (", and the Hub's PKU-SafeRLHF is read without them"
                                                               if args.hub_data else "")
                        + f": {' and '.join(names)} train on them")


def training_costs(run: stages.Run, trained: dict[str, Training]) -> dict:
    """Per trained model: what it cost when it ran (stages.cost: wall-clock time and optimiser steps of its
    stages, rlhf's two summed; None for a stage trained before costs were recorded), its budget, what it
    learns from, and its time as a share of RLHF's (when rlhf ran)."""
    out = {}
    for label, s in trained.items():
        parts = [stages.cost(p) for p in (s.reward, s.path) if p is not None]
        known = all(parts)
        out[label] = {"train_s": sum(p["train_s"] for p in parts) if known else None,
                      "optimizer_steps": sum(p["optimizer_steps"] for p in parts) if known else None,
                      "examples": s.examples, "lr": s.args.lr}
        if s.rlhf is not None:
            out[label].update(budget=s.rlhf.budget.about(), reward_model=stages.read_json(s.reward / "reward_model.json"),
                              rlhf=stages.read_json(s.path / "rlhf.json"), reward_lr=s.reward_args.lr)
        else:
            out[label]["budget"] = {"steps": s.args.steps, "rows_per_step": run.rows_per_step, "lr": s.args.lr}
    rlhf_s = out.get("rlhf", {}).get("train_s")
    for c in out.values():
        c["share_of_rlhf"] = c["train_s"] / rlhf_s if rlhf_s and c["train_s"] is not None else None
    return out


UTILITY = [("refusal seen", "refusal_seen", ".1%"), ("refusal unseen", "refusal_unseen", ".1%"),
           ("degenerate unseen", "degenerate_unseen", ".1%"), ("TQA diversity", "diversity", ".3f"),
           ("TQA fluency (ppl)", "fluency_ppl", ".2f"), ("TQA answer NLL", "truthfulqa_nll", ".3f")]


def print_table(report: dict, args: Args) -> None:
    task = tasks.TASKS[args.task]
    tables.print_table(f"{task.title} | {args.model} | {tasks.judge_line(report['judge'])}", report, ("base", "original"),
                       task.table + UTILITY + [zeroshot.COLUMN])
    zeroshot.print_table(report, ("base", "original"))
    tables.print_attack_tables(report, [task.table[0], ("refusal seen", "refusal_seen", ".1%")])
    tables.print_comparison(report, task.table + UTILITY + [zeroshot.COLUMN])
    tables.print_costs(report)


if __name__ == "__main__":
    stages.main_guard(main)
