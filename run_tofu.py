"""TOFU end to end (Maini et al. 2024): fine-tune a target model on the fictitious authors and a
retain model on all but the forget authors, unlearn the forget authors from the target with one or
several losses of flat.LOSSES, and evaluate every model with TOFU's metrics, open-unlearning's
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

import random
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Optional

import data
import distributed
import evaluate
import flags
import flat
import mia
import models
import plots
import stages
import train
from flags import AT_LEAST_1, NON_NEGATIVE, POSITIVE, arg


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
    lr: Optional[float] = arg(None, "unlearning learning rate", only=("unlearn",), check=POSITIVE)
    epochs: Optional[int] = arg(None, "unlearning epochs over the forget set", only=("unlearn",), check=AT_LEAST_1)
    batch_size: Optional[int] = arg(None, "examples per micro-batch (in every training stage)", check=AT_LEAST_1)
    grad_accum: Optional[int] = arg(None, "micro-batches per optimiser step", check=AT_LEAST_1)
    finetune_lr: Optional[float] = arg(None, "learning rate of the target and retain fine-tuning",
                                       only=("finetune",), check=POSITIVE)
    finetune_epochs: Optional[int] = arg(None, "epochs of the target and retain fine-tuning", only=("finetune",),
                                         check=AT_LEAST_1)
    warmup_epochs: float = arg(1.0, "linear warmup length in epochs, then linear decay to 0 (TOFU: 1)",
                               check=NON_NEGATIVE)
    max_new_tokens: int = arg(200, "greedy generation length for ROUGE", only=("eval",), check=AT_LEAST_1)
    eval_batch_size: int = arg(64, "questions per generation batch (scoring batches hold half as many answers)",
                               only=("eval",), check=AT_LEAST_1)
    data_dir: Optional[str] = arg(None, "directory with TOFU JSON Lines files (default: the vendored copy)", only=())


# Settings that default per model. TOFU's protocol (Maini et al. 2024; open-unlearning): 5 epochs of
# fine-tuning on `full` at lr 1e-5 (phi-1.5: 2e-5), unlearning at lr 1e-5 for 5 epochs, effective
# batch 32, weight decay 0.01, one epoch of warmup. TOFU was published with Llama-2-7b-chat and
# phi-1.5; FLAT's TOFU tables use the same models.
TOFU_PROTOCOL = dict(lr=1e-5, epochs=5, batch_size=8, grad_accum=4, finetune_lr=1e-5, finetune_epochs=5,
                     retain_authors=None, eval_items=None)
PRESETS = {
    "phi-1.5": dict(finetune_lr=2e-5),
    # The offline default, sized for a 2-core CPU: forget01 (2 authors) and the first 2 retain
    # authors; the retain, real-author and world-fact sets are scored on their first 20 items.
    "smollm2-135m": dict(retain_authors=2, eval_items=20, finetune_lr=2e-4, finetune_epochs=5,
                         lr=1e-4, epochs=2, batch_size=8, grad_accum=1),
}


def resolve(args: Args) -> Args:
    return flags.fill_defaults(args, {**TOFU_PROTOCOL, **PRESETS.get(args.model, {})})


def main(argv=None) -> dict:
    args = resolve(flags.parse_args(Args, argv))

    # -- every flag, name and data file is checked before any model is loaded -------------------
    flags.validate(args)
    variants = flags.methods(args.method)
    flat.DIVERGENCES[args.divergence]
    retain_split = data.SPLITS[args.split]
    for name in filter(None, [args.model, args.target_model, args.retain_model]):
        models.check_name(name)
    if args.eval_every and distributed.launched():
        raise flags.UsageError("--eval-every runs in one process only (evaluation is not sharded)")
    forget = data.load_tofu(args.split, args.data_dir)
    if not forget:
        raise data.DataError(f"the forget set {args.split} is empty")
    retain = data.first_authors(data.load_tofu(retain_split, args.data_dir), args.retain_authors)
    idk = data.load_idk(args.data_dir)
    cap = slice(None, args.eval_items)
    n_retain_eval = None if args.retain_authors is None else args.retain_authors * data.AUTHOR_QA
    eval_sets = {
        "forget": data.load_tofu(f"{args.split}_perturbed", args.data_dir),
        "retain": data.load_tofu("retain_perturbed", args.data_dir)[:n_retain_eval][cap],
        "ra": data.load_tofu("real_authors_perturbed", args.data_dir)[cap],
        "wf": data.load_tofu("world_facts_perturbed", args.data_dir)[cap],
        "holdout": data.load_tofu(data.HOLDOUT[args.split], args.data_dir),  # membership inference
    }
    retain_logs = evaluate.read_retain_logs(args.retain_logs, eval_sets["forget"], args.split) \
        if args.retain_logs else None

    out, compute = stages.setup_run(args, f"runs/tofu-{stages.safe_name(args.model)}-{args.split}")
    world = distributed.world()
    rows_per_step = args.batch_size * args.grad_accum * world
    times: dict[str, float] = {}
    stages.say(f"[tofu] {args.model} | {args.split} ({len(forget)} forget QA) | retain {len(retain)} QA | "
             f"methods {', '.join(v[0] for v in variants)} | {compute.device} {compute.precision} | "
             f"{world} process(es), {rows_per_step} examples per step | out {out}")

    # -- 1-2. target and retain models, fine-tuned from the base model (cached) -------------------
    # TOFU's target is trained on `full` = retain + forget; with --retain-authors, on the subset + forget.
    finetune_key = partial(stages.stage_key, args, "finetune", compute)
    target = args.target_model or stages.stage_dir(out, "target", finetune_key(rows=data.digest(retain, forget)))
    retain_model = args.retain_model or (None if retain_logs else
                                         stages.stage_dir(out, "retain", finetune_key(rows=data.digest(retain))))
    for name, path, rows in [("target", target, retain + forget), ("retain", retain_model, retain)]:
        if not isinstance(path, Path) or stages.load_cached_model_or_none(path):
            if isinstance(path, Path):
                stages.say(f"[tofu] {name} model: cached in {path}")
            continue
        with stages.timed(times, f"finetune_{name}_s"):
            model, tok, _ = train.training_model(args.model, compute, args.trust_remote_code)
            style = models.prompt_style(args.model, tok)
            rng = random.Random(args.seed)
            plan = train.plan_steps((data.finetune_epoch(tok, style, rows, rows_per_step, rng)
                                     for _ in range(args.finetune_epochs)), args.batch_size, args.max_steps,
                                    world, distributed.rank())
            log, _ = train.train(model, plan, partial(train.finetune_loss, pad_id=tok.pad_token_id),
                                 args.finetune_lr, args, f"finetune-{name}", compute)
            stages.save_model_atomic(model, tok, path, {"train_log.json": log})
            del model

    # -- evaluation of one model (cached per model and evaluation setting); rank 0 only -----------
    eval_key = stages.stage_key(args, "eval", compute, sets=data.digest(eval_sets))

    def evaluation(name: str, path) -> dict:
        cache = stages.stage_dir(out, f"eval-{name}", {**eval_key, "model": stages.model_id(path)}).with_suffix(".json")
        cached = stages.read_cache(cache)
        if cached is not None:
            return cached
        with stages.timed(times, f"eval_{name}_s"):
            model, tok = models.load_model(str(path), compute.device, compute.eval_dtype, False,
                                           args.trust_remote_code)
            summary, items = evaluate.evaluate_tofu(model, tok, models.prompt_style(args.model, tok), eval_sets,
                                                    args.max_new_tokens, args.eval_batch_size)
        result = {"summary": summary, "items": items}
        stages.write_cache(cache, result)
        return result

    retain_tr = retain_logs["truth_ratio"] if retain_logs else None
    if args.eval_every and retain_tr is None:  # in-training forget quality needs the retain model's truth ratios
        retain_tr = evaluation("retain", retain_model)["items"]["forget"]["truth_ratio"]

    # -- 3. unlearning, from the target model, one stage per method (cached) ----------------------
    progress_at = train.once_at_step_0(tofu_progress)
    unlearned = {}
    for label, loss, divergence in variants:
        method = flat.LOSSES[loss]
        params = replace(flags.loss_params(args), divergence=divergence or args.divergence)
        # the second answer to each forget question: TOFU's "I don't know" lines, or (llmu, Yao et al.'s
        # L_rdn) the answer of a random retain question
        templates = {"refusal": idk, "random": [r["answer"] for r in retain], None: None}[method.template]
        retain_pool = retain if method.needs_retain(params) else None
        key = stages.stage_key(args, "unlearn", compute, target=stages.model_id(target), method=loss,
                              params=method.read_params(params), rows=data.digest(forget, retain_pool, templates))
        if args.eval_every:
            key.update(eval_key=eval_key, eval_every=args.eval_every)
        unlearned[label] = path = stages.stage_dir(out, f"unlearn-{stages.safe_name(label)}", key)
        if stages.load_cached_model_or_none(path):
            stages.say(f"[tofu] unlearned model ({label}): cached in {path}")
            continue
        with stages.timed(times, f"unlearn_{label}_s"):
            model, tok, ref = train.training_model(target, compute, args.trust_remote_code, bool(method.reference))
            style = models.prompt_style(args.model, tok)
            rng = random.Random(args.seed)
            plan = train.plan_steps((data.unlearning_epoch(tok, style, forget, templates, retain_pool, rows_per_step, rng)
                                     for _ in range(args.epochs)), args.batch_size, args.max_steps, world,
                                    distributed.rank())
            progress = partial(progress_at, tok=tok, style=style, sets=eval_sets, retain_tr=retain_tr, args=args)
            log, evals = train.train(model, plan, partial(train.batch_loss, method=method, params=params,
                                                          pad_id=tok.pad_token_id, ref_model=ref),
                                     args.lr, args, f"unlearn-{label}", compute, progress, args.eval_every)
            stages.save_model_atomic(model, tok, path, {"train_log.json": log, "eval_log.json": evals,
                                                       "run_config.json": {**asdict(args), "method": label}})
            del model, ref
    if not distributed.is_main():
        return {}  # the other ranks are done: evaluation runs on rank 0 alone

    # -- 4. evaluation of every model, forget quality and PrivLeak against the retain model -------
    rows = {"target": evaluation("target", target)}
    if retain_model is not None:
        rows["retain"] = evaluation("retain", retain_model)
    for label, path in unlearned.items():
        rows[label] = evaluation(label, path)
    if retain_logs:
        retain_tr, retain_auc = retain_logs["truth_ratio"], retain_logs["mia_min_k"]
    else:
        retain_tr, retain_auc = rows["retain"]["items"]["forget"]["truth_ratio"], rows["retain"]["summary"]["mia_min_k"]
    report = {}
    for name, r in rows.items():
        tr = r["items"]["forget"]["truth_ratio"][:len(retain_tr)]  # a retain log may hold the first items only
        report[name] = {"forget_quality": evaluate.forget_quality(tr, retain_tr), "forget_quality_items": len(tr),
                        "privleak": mia.privleak(r["summary"]["mia_min_k"], 0.5 if retain_auc is None else retain_auc),
                        **r["summary"]}
    if retain_logs:
        report["retain"] = {"forget_quality": 1.0, "forget_quality_items": retain_logs["n"],
                            "source": retain_logs["source"]}
    methods = {label: report.pop(label) for label in unlearned}
    report = {**report, "methods": methods, **({"unlearned": methods[variants[0][0]]} if len(variants) == 1 else {}),
              "benchmark": "tofu", "title": f"TOFU {args.split} | {args.model}",
              "training": {label: stages.training_logs(p) for label, p in unlearned.items()},
              "timings_s": times, "dirs": {"target": str(target), "retain": str(retain_model or args.retain_logs),
                                           **{label: str(p) for label, p in unlearned.items()},
                                           **({"unlearned": str(unlearned[variants[0][0]])} if len(variants) == 1
                                              else {})}}
    if retain_logs and retain_auc is None:
        report["privleak_reference"] = "0.5 (the retain logs hold no Min-K% AUC), as open-unlearning does"
    report, warnings = stages.finite_report(report)
    report["warnings"] = warnings
    stages.write_json(out / "config.json", asdict(args))
    stages.write_json(out / "results.json", report)
    stages.write_json(out / "eval_items.json", {**{name: r["items"] for name, r in rows.items()},
                                               **({"unlearned": rows[variants[0][0]]["items"]} if len(variants) == 1
                                                  else {})})
    plots.draw_all(report, out)
    print_table(report, args)
    return report


def tofu_progress(model, tok, style: str, sets: dict, retain_tr: list[float], args: Args) -> dict:
    """The in-training evaluation (--eval-every): forget quality against the retain model and model
    utility, on the first --eval-items items of every set."""
    cap = slice(None, args.eval_items)
    summary, items = evaluate.evaluate_tofu(model, tok, style, {k: v[cap] for k, v in sets.items() if k != "holdout"},
                                            args.max_new_tokens, args.eval_batch_size)
    tr = items["forget"]["truth_ratio"]
    return {"forget_quality": evaluate.forget_quality(tr, retain_tr[:len(tr)]), "model_utility": summary["model_utility"],
            "forget_Q_A_Prob": summary["forget_Q_A_Prob"]}


TABLE = [("FQ", "forget_quality", ".2e"), ("MU", "model_utility", ".3f"), ("forget P", "forget_Q_A_Prob", ".3f"),
         ("forget R", "forget_Q_A_ROUGE", ".3f"), ("forget TR", "forget_truth_ratio", ".3f"),
         ("retain P", "retain_Q_A_Prob", ".3f"), ("retain R", "retain_Q_A_ROUGE", ".3f"),
         ("RA P", "ra_Q_A_Prob_normalised", ".3f"), ("WF P", "wf_Q_A_Prob_normalised", ".3f"),
         ("MIA min-k", "mia_min_k", ".3f"), ("PrivLeak", "privleak", ".1f"), ("ES", "extraction_strength", ".3f")]


def print_table(report: dict, args: Args) -> None:
    print(f"\nTOFU {args.split} | {args.model} | divergence {args.divergence} unless named (flat:NAME)"
          + (f" | forget quality on {report['target']['forget_quality_items']} items" if args.retain_logs else ""))
    print("| model | " + " | ".join(h for h, _, _ in TABLE) + " |")
    print("|---|" + "---|" * len(TABLE))
    rows = [(n, report[n]) for n in ("target", "retain") if n in report] + list(report["methods"].items())
    for name, row in rows:
        print(f"| {name} | " + " | ".join(stages.cell(row, k, f) for _, k, f in TABLE) + " |")
    for w in report["warnings"]:
        print(f"warning: not finite, written as null: {w}")


if __name__ == "__main__":
    stages.main_guard(main)
