"""TOFU end to end (Maini et al. 2024): fine-tune a target model on the fictitious authors and a
retain model on all but the forget authors, unlearn the forget authors from the target with one or
several losses of methods.LOSSES, and evaluate every model with TOFU's metrics, open-unlearning's
membership-inference AUCs, PrivLeak, exact memorisation and extraction strength.

    python run_tofu.py                                         # offline default (PRESETS["smollm2-135m"])
    python run_tofu.py --method flat,npo,ga --eval-every 2     # several methods, watched as they unlearn
    python run_tofu.py --model llama2-7b --split forget10 --target-model locuslab/tofu_ft_llama2-7b \\
        --retain-logs tests/fixtures/tofu_logs/ft_epoch5_lr1e-05_llama2-7b_retain90_wd0.01   # TOFU's release
    torchrun --nproc_per_node 2 run_tofu.py --model llama2-7b --split forget10             # FSDP2, 2 GPUs

Each stage is cached under --out in a directory named by a hash of everything it reads (flags and
data contents), so a rerun reuses the fine-tuned models and their evaluations and redoes only what
changed. See docs/tofu.md.
"""
from __future__ import annotations

import errors

if __name__ == "__main__":  # a Ctrl-C while the libraries import: one line and exit 130 once they have (main_guard)
    errors.defer_interrupts()

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import attacks
import data
import estimate
import evaluate
import flags
import methods
import mia
import models
import protocol
import stages
import tables
import train
import zeroshot
from errors import UsageError
from flags import AT_LEAST_1, GRID, NON_NEGATIVE, LEARNING_RATE, arg


@dataclass
class Args(flags.RunArgs):
    split: str = arg("forget01", "forget split: forget01, forget05 or forget10")
    target_model: Optional[str] = arg(None, "start unlearning from this model (directory or Hub id, e.g. TOFU's "
                                            "released one) instead of fine-tuning one")
    retain_model: Optional[str] = arg(None, "evaluate this retain model (directory or Hub id) instead of "
                                            "fine-tuning one")
    retain_logs: Optional[str] = arg(None, "forget quality against this retain model's saved evaluation instead "
                                           "of a retain model: a TOFU log directory, open-unlearning's "
                                           "TOFU_EVAL.json or this project's eval_items.json", only=())
    retain_authors: Optional[int] = arg(None, "fine-tune on the first N retain authors only (default: all)",
                                        check=AT_LEAST_1)
    eval_items: Optional[int] = arg(None, "score at most N items of the retain, real-author and world-fact sets "
                                          "(and of every set in in-training evaluations)", only=("eval",),
                                    check=AT_LEAST_1)
    epochs: Optional[int] = arg(None, "unlearning epochs over the forget set", only=("unlearn",), check=AT_LEAST_1)
    batch_size: Optional[int] = arg(None, "examples per micro-batch (in every training stage)", check=AT_LEAST_1)
    grad_accum: Optional[int] = arg(None, "micro-batches per optimiser step", check=AT_LEAST_1)
    finetune_lr: Optional[float] = arg(None, "learning rate of the target and retain fine-tuning",
                                       only=("finetune",), check=LEARNING_RATE)
    finetune_epochs: Optional[int] = arg(None, "epochs of the target and retain fine-tuning", only=("finetune",),
                                         check=AT_LEAST_1)
    warmup_epochs: float = arg(1.0, "linear warmup length in epochs, then linear decay to 0 (TOFU: 1)",
                               check=NON_NEGATIVE)
    max_new_tokens: int = arg(200, "greedy generation length for ROUGE", only=("eval",), check=AT_LEAST_1)
    eval_batch_size: int = arg(64, "questions per generation batch (scoring batches hold half as many answers)",
                               only=("eval",), check=AT_LEAST_1)
    data_dir: Optional[str] = arg(None, "directory with TOFU JSON Lines files (default: the vendored copy)", only=())
    utility_bar: float = arg(0.9, "a comparison's selection rule: a learning rate qualifies when its mean model "
                                  "utility is at least this times the retain model's (protocol.TOFU)", only=(),
                             check=NON_NEGATIVE, needs=GRID)


# Settings that default per model. TOFU's protocol (Maini et al. 2024; open-unlearning): 5 epochs of
# fine-tuning on `full` at lr 1e-5 (phi-1.5: 2e-5), unlearning at lr 1e-5 for 5 epochs, effective
# batch 32, weight decay 0.01, one epoch of warmup. TOFU was published with Llama-2-7b-chat and
# phi-1.5; FLAT's TOFU tables use the same models.
# The relearning attack follows open-unlearning's metric study: one epoch of (half) the forget set at 2e-5.
TOFU_PROTOCOL = dict(lr=1e-5, epochs=5, batch_size=8, grad_accum=4, finetune_lr=1e-5, finetune_epochs=5,
                     retain_authors=None, eval_items=None, relearn_lr=2e-5)
PRESETS = {
    "phi-1.5": dict(finetune_lr=2e-5),
    # The offline default, sized for a 2-core CPU: forget01 (2 authors) and the first 2 retain
    # authors; the retain, real-author and world-fact sets are scored on their first 20 items.
    "smollm2-135m": dict(retain_authors=2, eval_items=20, finetune_lr=2e-4, finetune_epochs=5,
                         lr=1e-4, epochs=2, batch_size=8, grad_accum=1, relearn_lr=1e-4),
}


# Each method's learning rate where the fair-comparison protocol chose it (docs/claims.md: the rule's pick
# on seeds 0 and 1 among 1e-5, 3e-5, 1e-4, 3e-4): without --lr, each method trains at its own, and a method
# the protocol did not run at the preset's lr. --lr sets one for every method.
PROTOCOL_LRS = {
    "smollm2-135m": "flat:kl=1e-4,flat:js=1e-4,flat:pearson=1e-4,flat:tv=1e-4,ga=1e-4,npo=1e-4,simnpo=1e-4,"
                    "idk=1e-5,dpo=1e-5,gd=1e-4,llmu=3e-5,kl=1e-4",
}


def resolve(args: Args) -> Args:
    """TOFU's protocol, then the model's preset, for every flag left unset; without --lr, each method's
    learning rate from the protocol (PROTOCOL_LRS)."""
    if args.lr is None and not args.method_lrs:
        args.method_lrs = PROTOCOL_LRS.get(args.model, "")
    return flags.fill_defaults(args, {**TOFU_PROTOCOL, **PRESETS.get(args.model, {})})


def check(args: Args) -> None:
    attacks.parse(args.attacks)
    zeroshot.resolve(args.zero_shot, args.zero_shot_data)  # the task files, read and checked
    if args.attacks not in ("", "none") and args.retain_logs:
        raise UsageError("--attacks compares each attacked model with the attacked retain model: it needs "
                               "a retain model, not --retain-logs")
    if args.retain_logs and args.retain_model:
        raise UsageError("--retain-logs and --retain-model both name the retain model's evaluation; pass one")
    for name in filter(None, [args.target_model, args.retain_model]):
        models.check_name(name, args.trust_remote_code)
    data.SPLITS.check(args.split)


def main(argv=None) -> dict:
    args = flags.parse(Args, argv, resolve, check)  # every flag and name checked before any work

    # -- data: the forget authors, the retain authors, TOFU's "I don't know" answers, the evaluation sets
    forget = data.load_tofu(args.split, args.data_dir)
    retain = data.first_authors(data.load_tofu(data.SPLITS[args.split], args.data_dir), args.retain_authors)
    idk = data.load_idk(args.data_dir)
    eval_sets = tofu_eval_sets(args)
    retain_logs = args.retain_logs and evaluate.read_retain_logs(args.retain_logs, eval_sets["forget"], args.split)
    tok = models.load_tokenizer(args.model, args.trust_remote_code)  # every model of the run shares it
    style = models.prompt_style(args.model, tok)
    data.check_context(tok, style, forget + retain + [r for s in eval_sets.values() for r in s], idk,
                       models.context_length(args.model, args.trust_remote_code), args.max_new_tokens)
    run = stages.Run(args, f"runs/tofu-{stages.safe_name(args.model)}-{args.split}")
    run.say(f"[tofu] {args.model} | {args.split} ({len(forget)} forget QA) | retain {len(retain)} QA | "
            f"{run.compute.device} {run.compute.precision} | {run.world} process(es), {run.rows_per_step} "
            f"examples per step | out {run.out}")

    # -- 1-2. target: the base model fine-tuned on retain + forget (TOFU's `full`); retain model: on retain
    target = args.target_model or run.stage("finetune", "target", rows=data.digest(retain, forget))
    retain_model = args.retain_model or (None if retain_logs else run.stage("finetune", "retain",
                                                                            rows=data.digest(retain)))
    grid, variants = flags.grid(args), flags.variants(args)
    if grid.own:
        run.say(grid.own_line(variants))
    watched = run.key("eval", sets=data.digest(eval_sets)) if args.eval_every else None  # joins unlearning keys
    stage = lambda cell: unlearning_stage(run, cell, target, forget, retain, idk, watched)  # noqa: E731
    estimate.say_plan(run.say, tofu_plan(run, tok, style, forget, retain, eval_sets, target, retain_model, grid,
                                         variants, {c.label: stage(c)[0] for c in grid.cells(variants)}),
                      models.parameter_count(args.model, args.trust_remote_code), run.compute)  # before any stage
    for path, rows in [(target, retain + forget), (retain_model, retain)]:
        if run.missing(path):
            run.fit(path, args.model, methods.FINETUNE, None, lr=args.finetune_lr, epochs=(
                data.finetune_epoch(tok, style, rows, run.rows_per_step, rng)
                for rng in data.epoch_rngs(args.finetune_epochs, args.seed)))

    # -- 3. unlearning: one model per --method (and per learning rate and seed of a grid), each from the target
    progress = tofu_progress(run, eval_sets, retain_model, retain_logs) if args.eval_every else None

    def unlearn(cell: protocol.Cell, reuse_dropped: bool = False) -> Path:
        path, cell_args, templates, retain_rows = stage(cell)
        if run.missing(path, read_by=readers(run, cell.label, path, eval_sets) if reuse_dropped else ()):
            _, method, params = cell.variant
            run.fit(path, target, method, params, lr=cell.lr, args=cell_args,
                    progress=progress if cell_args.eval_every else None, epochs=(
                        data.unlearning_epoch(tok, style, forget, templates, retain_rows, run.rows_per_step, rng)
                        for rng in data.epoch_rngs(args.epochs, cell.seed)))
        return path

    if grid.on:  # a line per unlearning and evaluation stage: done / total, time, estimate left
        run.track(2 * grid.size(len(variants)) + 2 - bool(retain_logs))
    unlearned = {}
    for cell in grid.cells(variants):
        unlearned[cell.label] = unlearn(cell, reuse_dropped=args.drop_selection_weights)
        if grid.on:  # a grid's runs evaluated as they finish: an interrupted grid leaves readable results
            evaluated(run, {cell.label: unlearned[cell.label]}, eval_sets)
            if args.drop_selection_weights:  # its evaluation written, its weights are no longer read
                run.drop_weights(unlearned[cell.label])
    if not run.is_main:
        return {}  # under torchrun, rank 0 alone evaluates (and trains a grid's confirmation runs)

    # -- 4. evaluation: TOFU's metrics; forget quality and PrivLeak against the retain model -------------
    results = evaluated(run, {"target": target, "retain": retain_model, **unlearned}, eval_sets)
    retain_tr, retain_auc = (retain_logs["truth_ratio"], retain_logs["mia_min_k"]) if retain_logs else \
        (results["retain"]["items"]["forget"]["truth_ratio"], results["retain"]["summary"]["mia_min_k"])
    add_forget_quality(results, retain_tr, retain_auc)

    # -- 5. a comparison (a grid): per method the learning rate protocol.TOFU picks on the selection seeds,
    #       rerun on --confirm-seeds; those reruns alone are the result (docs/claims.md)
    compared = {}
    if grid.on:
        reference, thresholds = results["target" if retain_logs else "retain"]["summary"], {"utility_bar": args.utility_bar}
        summaries = {name: r["summary"] for name, r in results.items()}
        chosen = protocol.select(protocol.TOFU, protocol.by_method(grid.cells(variants), summaries), reference,
                                 thresholds)
        confirm = grid.confirmations(variants, chosen)
        confirmed = {cell.label: unlearn(cell) for cell in confirm}
        results.update(add_forget_quality(evaluated(run, confirmed, eval_sets), retain_tr, retain_auc))
        unlearned.update(confirmed)
        summaries = {name: r["summary"] for name, r in results.items()}
        compared = {"comparison": protocol.comparison(
            protocol.TOFU, chosen, protocol.by_method(grid.cells(variants), summaries),
            protocol.by_method(confirm, summaries), reference, thresholds, grid,
            "target" if retain_logs else "retain model", start=(results["target"]["summary"], "target"))}
    attacked = robustness(run, {"retain": retain_model, **unlearned}, eval_sets, tok, style)  # --attacks
    report = run.finish(results, unlearned, {"target": target, "retain": retain_model or args.retain_logs},
                        benchmark="tofu", title=f"TOFU {args.split} | {args.model}", **retain_logs_rows(retain_logs),
                        **attacked, **compared)
    print_table(report, args)
    return report


def unlearning_stage(run: stages.Run, cell: protocol.Cell, target, forget: list, retain: list, idk: list,
                     watched: dict | None) -> tuple:
    """A cell's unlearning stage: where it lives, the flags it reads (its learning rate and seed; in a grid,
    --eval-every on the confirmation runs only), its template answers and its retain rows."""
    _, method, params = cell.variant
    # the second answer to each forget question: TOFU's "I don't know" lines, or (llmu, Yao et al.'s
    # L_rdn) the answer of a random retain question
    templates = {"refusal": idk, "random": [r["answer"] for r in retain], None: None}[method.template]
    retain_rows = retain if method.needs_retain(params) else None
    cell_args = cell.args(run.args)
    return run.stage("unlearn", cell.label, cell_args, target=target, method=method.name,
                     params=method.read_params(params), rows=data.digest(forget, retain_rows, templates),
                     eval_key=watched if cell_args.eval_every else None), cell_args, templates, retain_rows


def tofu_plan(run: stages.Run, tok, style: str, forget: list, retain: list, eval_sets: dict, target, retain_model,
              grid: protocol.Grid, variants: list, unlearned: dict) -> list[estimate.Phase]:
    """What main will compute, for estimate.say_plan: the fine-tunings, each unlearning run (a grid's
    confirmation runs too, decided during the run), each model's evaluation and zero-shot scores, with
    the tokens each reads. Every stream of a method is counted at the forget answers' mean length."""
    args = run.args
    size = models.saved_bytes(args.model, args.precision, args.trust_remote_code)
    mean = lambda rows: sum(estimate.qa_tokens(tok, style, r["question"], r["answer"]) for r in rows) / len(rows)  # noqa: E731
    trained = lambda rows, epochs: estimate.rows_trained(len(rows), epochs, run.rows_per_step, args.max_steps) * mean(rows)  # noqa: E731
    finetuned = [estimate.Stage(target, trained(retain + forget, args.finetune_epochs), disk=size)]
    finetuned += [estimate.Stage(retain_model, trained(retain, args.finetune_epochs), disk=size)] if retain_model else []
    # an evaluation: every answer scored (the answer, its paraphrase, its perturbations), every question of the
    # four generation sets answered to --max-new-tokens
    scored = lambda sets: sum(mean(rows) * sum(1 + len(r.get("perturbed_answer", [])) + ("paraphrased_answer" in r)  # noqa: E731
                                               for r in rows) + (len(rows) * args.max_new_tokens if name != "holdout" else 0)
                              for name, rows in sets.items() if rows)
    per_eval = scored(eval_sets)
    watched = scored({k: v[:args.eval_items] for k, v in eval_sets.items() if k != "holdout"})
    steps = estimate.rows_trained(len(forget), args.epochs, run.rows_per_step, args.max_steps) / run.rows_per_step

    kept = lambda confirm: 0 if args.drop_selection_weights and not confirm else size  # noqa: E731 (disk a run keeps)

    def cost(path, variant, confirm: bool) -> estimate.Stage:
        m = variant.method
        streams = 1 + (m.template is not None) + m.needs_retain(variant.params)
        evals = steps // args.eval_every if args.eval_every and (confirm or not grid.on) else 0
        rows = trained(forget, args.epochs) / mean(forget)
        return estimate.Stage(path, rows * mean(forget) * streams,
                              rows * mean(forget) * len(m.reference) + evals * watched, kept(confirm))
    confirm = [(estimate.LATER, v) for v in variants for _ in grid.confirm_seeds] if grid.on else []
    runs = [cost(p, c.variant, False) for c, p in zip(grid.cells(variants), unlearned.values())]
    runs += [cost(p, v, True) for p, v in confirm]
    named = {"target": target, "retain": retain_model, **unlearned}
    sets = data.digest(eval_sets)
    evaluations = [estimate.Stage(run.stage("eval", n, sets=sets, model=p), forward=per_eval) for n, p in named.items() if p]
    evaluations += [estimate.Stage(estimate.LATER, forward=per_eval) for _ in confirm]
    phases = [estimate.Phase("fine-tuning (target, retain)", finetuned, "--max-steps N"),
              estimate.Phase("unlearning", runs, "--max-steps N"),
              estimate.Phase("evaluation", evaluations, "--eval-items N")]
    return phases + zeroshot.plan(run, named, len(confirm))


def tofu_eval_sets(args: Args) -> dict[str, list[dict]]:
    """TOFU's evaluation sets: the forget set with paraphrased and perturbed answers; the retain,
    real-author and world-fact sets capped at --eval-items (the retain set at the authors trained
    on); and the holdout set of the same size as the forget set, for membership inference."""
    cap = slice(None, args.eval_items)
    n_retain = None if args.retain_authors is None else args.retain_authors * data.AUTHOR_QA
    forget = data.load_tofu(f"{args.split}_perturbed", args.data_dir)
    if "paraphrase" in attacks.parse(args.attacks) and not all(r.get("paraphrased_question") for r in forget):
        raise data.DataError(f"--attacks prompt asks the forget questions in paraphrase: {args.split}_perturbed "
                             f"needs a paraphrased_question in every row")
    return {"forget": forget,
            "retain": data.load_tofu("retain_perturbed", args.data_dir)[:n_retain][cap],
            "ra": data.load_tofu("real_authors_perturbed", args.data_dir)[cap],
            "wf": data.load_tofu("world_facts_perturbed", args.data_dir)[cap],
            "holdout": data.load_tofu(data.HOLDOUT[args.split], args.data_dir)}


def evaluated(run: stages.Run, paths: dict, eval_sets: dict) -> dict:
    """TOFU's metrics of every model of `paths` (a None path skipped), and lm-eval's with --zero-shot."""
    results = {name: evaluation(run, name, path, eval_sets) for name, path in paths.items() if path}
    zeroshot.add_zero_shot(run, results, paths)  # --zero-shot: lm-eval's accuracy, FLAT's utility
    return results


def add_forget_quality(results: dict, retain_tr: list, retain_auc) -> dict:
    """Each model's forget quality (KS test of its forget truth ratios against the retain model's) and
    PrivLeak (its Min-K% AUC against the retain model's, 0.5 when the retain logs hold none), in place."""
    for r in results.values():
        tr = r["items"]["forget"]["truth_ratio"][:len(retain_tr)]  # a retain log may hold the first items only
        r["summary"] = {"forget_quality": evaluate.forget_quality(tr, retain_tr), "forget_quality_items": len(tr),
                        "privleak": mia.privleak(r["summary"]["mia_min_k"], 0.5 if retain_auc is None else retain_auc),
                        **r["summary"]}
    return results


def readers(run: stages.Run, name: str, path, eval_sets: dict) -> list:
    """The stages that read a model: its evaluation and, with --zero-shot, its zero-shot scores."""
    return [run.stage("eval", name, sets=data.digest(eval_sets), model=path), *zeroshot.stages(run, name, path)]


def evaluation(run: stages.Run, name: str, path, eval_sets: dict) -> dict:
    """TOFU's metrics of one model ({"summary", "items"}), cached per model and evaluation setting."""
    cache = readers(run, name, path, eval_sets)[0]
    if run.missing(cache):
        args, compute = run.args, run.compute
        model, tok = models.load_model(str(path), compute.device, compute.eval_dtype,
                                       trust_remote_code=args.trust_remote_code)
        summary, items = evaluate.evaluate_tofu(model, tok, models.prompt_style(args.model, tok), eval_sets,
                                                args.max_new_tokens, args.eval_batch_size)
        run.write(cache, {"summary": summary, "items": items})
    return run.read(cache)


def tofu_progress(run: stages.Run, eval_sets: dict, retain_model, retain_logs) -> Callable:
    """The in-training evaluation (--eval-every): forget quality against the retain model (its cached
    evaluation, or --retain-logs) and model utility, on the first --eval-items items of every set."""
    args = run.args
    retain_tr = retain_logs["truth_ratio"] if retain_logs else \
        evaluation(run, "retain", retain_model, eval_sets)["items"]["forget"]["truth_ratio"]
    cap = slice(None, args.eval_items)

    def progress(model, tok) -> dict:
        summary, items = evaluate.evaluate_tofu(model, tok, models.prompt_style(args.model, tok),
                                                {k: v[cap] for k, v in eval_sets.items() if k != "holdout"},
                                                args.max_new_tokens, args.eval_batch_size)
        tr = items["forget"]["truth_ratio"]
        return {"forget_quality": evaluate.forget_quality(tr, retain_tr[:len(tr)]),
                "model_utility": summary["model_utility"], "forget_Q_A_Prob": summary["forget_Q_A_Prob"],
                "retain_Q_A_Prob": summary["retain_Q_A_Prob"], "items": len(tr)}  # fewer than the final evaluation's
    return train.once_at_step_0(progress)


def robustness(run: stages.Run, targets: dict, eval_sets: dict, tok, style: str) -> dict:
    """--attacks on the retain model and every unlearned one (attacks.py): per model and attack, TOFU's
    forget metrics on the rows the attack scores (relearn: the forget half not relearned) and forget
    quality against the retain model attacked the same way, with the same rows, steps and seed."""
    args, forget = run.args, eval_sets["forget"]
    evaluations = attacks.parse(args.attacks)
    if not evaluations:
        return {}
    rows_per_step = args.batch_size * args.grad_accum
    out = attacks.attack_models(
        run, targets, evaluations, forget, lambda m, t, e, rows: attacked_forget(m, t, e, rows, args),
        lambda rows, n: (data.finetune_epoch(tok, style, rows, rows_per_step, rng) for rng in data.epoch_rngs(n, args.seed)),
        eval=run.key("eval", sets=data.digest(eval_sets)))
    retain_tr = {e: out["retain"][e]["items"]["forget"]["truth_ratio"] for e in evaluations}
    return {"attacks": {name: {e: {"forget_quality": evaluate.forget_quality(r["items"]["forget"]["truth_ratio"],
                                                                             retain_tr[e]),
                                   **r["summary"], "about": r["about"]} for e, r in per.items()}
                        for name, per in out.items()}}


def attacked_forget(model, tok, evaluation: str, rows: list[dict], args: Args) -> dict:
    """TOFU's forget metrics of an attacked model: the questions as they are, in paraphrase
    (TOFU's paraphrased_question), or with the answer begun by attacks.JAILBREAK."""
    style = models.prompt_style(args.model, tok)
    if evaluation == "paraphrase":
        rows = [dict(r, question=r["paraphrased_question"]) for r in rows]
    if evaluation == "jailbreak":
        style = data.prefilled(style, attacks.JAILBREAK)
    summary, items = evaluate.evaluate_tofu_set(model, tok, style, "forget", rows, args.max_new_tokens,
                                                args.eval_batch_size)
    items.pop("details", None)
    return {"summary": summary, "items": {"forget": items}}


def retain_logs_rows(retain_logs) -> dict:
    """With --retain-logs, the retain row of the report: forget quality 1 by definition, and its source."""
    if not retain_logs:
        return {}
    rows = {"retain": {"forget_quality": 1.0, "forget_quality_items": retain_logs["n"], "source": retain_logs["source"]}}
    if retain_logs["mia_min_k"] is None:
        rows["privleak_reference"] = "0.5 (the retain logs hold no Min-K% AUC), as open-unlearning does"
    return rows


TABLE = [("FQ", "forget_quality", ".2e"), ("MU", "model_utility", ".3f"), ("forget P", "forget_Q_A_Prob", ".3f"),
         ("forget R", "forget_Q_A_ROUGE", ".3f"), ("forget TR", "forget_truth_ratio", ".3f"),
         ("retain P", "retain_Q_A_Prob", ".3f"), ("retain R", "retain_Q_A_ROUGE", ".3f"),
         ("RA P", "ra_Q_A_Prob_normalised", ".3f"), ("WF P", "wf_Q_A_Prob_normalised", ".3f"),
         ("MIA min-k", "mia_min_k", ".3f"), ("PrivLeak", "privleak", ".1f"), ("ES", "extraction_strength", ".3f"),
         zeroshot.COLUMN]


ATTACK_TABLE = [("FQ", "forget_quality", ".2e"), ("forget P", "forget_Q_A_Prob", ".3f"),
                ("forget R", "forget_Q_A_ROUGE", ".3f"), ("forget TR", "forget_truth_ratio", ".3f")]


def print_table(report: dict, args: Args) -> None:
    items = f" | forget quality on {report['target']['forget_quality_items']} items" if args.retain_logs else ""
    tables.print_table(f"TOFU {args.split} | {args.model} | divergence {args.divergence} unless named (flat:NAME)"
                       f"{items}", report, ("target", "retain"), TABLE)
    zeroshot.print_table(report, ("target", "retain"))
    tables.print_attack_tables(report, ATTACK_TABLE, "FQ against the retain model attacked the same way")
    tables.print_comparison(report, TABLE)


if __name__ == "__main__":
    stages.main_guard(main)
