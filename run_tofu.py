"""TOFU end to end (Maini et al. 2024): fine-tune a target model on the fictitious authors and a
retain model on all but the forget authors, unlearn the forget authors from the target with any
loss in flat.LOSSES, and evaluate the three models with TOFU's metrics.

    python run_tofu.py                                    # offline default (PRESETS["smollm2-135m"])
    python run_tofu.py --method npo --max-steps 2         # any loss, a smoke run
    python run_tofu.py --model opt-2.7b --split forget10  # the published protocol: GPU and Hub

Each stage is cached under --out in a directory named by a hash of its settings, so a rerun
reuses the fine-tuned models and their evaluations and redoes only what changed.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Optional


import data
import evaluate
import flat
import models
import train
from train import arg


@dataclass
class Args(train.LossFlags):
    model: str = arg("smollm2-135m", "model alias (models.MODELS), local directory or Hub id")
    method: str = arg("flat", "unlearning loss, a key of flat.LOSSES")
    split: str = arg("forget01", "forget split: forget01, forget05 or forget10")
    retain_authors: Optional[int] = arg(None, "fine-tune on the first N retain authors only (default: all)")
    eval_items: Optional[int] = arg(None, "score at most N items of the retain, real-author and world-fact sets")
    lr: Optional[float] = arg(None, "unlearning learning rate")
    epochs: Optional[int] = arg(None, "unlearning epochs over the forget set")
    batch_size: Optional[int] = arg(None, "forget examples per micro-batch (in every stage)")
    grad_accum: Optional[int] = arg(None, "micro-batches per optimiser step")
    finetune_lr: Optional[float] = arg(None, "learning rate of the target and retain fine-tuning")
    finetune_epochs: Optional[int] = arg(None, "epochs of the target and retain fine-tuning")
    weight_decay: float = arg(0.01, "AdamW weight decay (TOFU: 0.01)")
    warmup_epochs: float = arg(1.0, "linear warmup length in epochs, then linear decay to 0 (TOFU: 1)")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    max_steps: Optional[int] = arg(None, "cap on optimiser steps in every training stage (smoke runs)")
    max_new_tokens: int = arg(200, "greedy generation length for ROUGE")
    eval_batch_size: int = arg(64, "questions per generation batch (scoring batches hold half as many answers)")
    data_dir: Optional[str] = arg(None, "directory with TOFU JSON Lines files (default: the vendored copy)")
    out: Optional[str] = arg(None, "run directory (default: runs/tofu-MODEL-SPLIT)")
    device: Optional[str] = arg(None, "cuda or cpu (default: cuda when available)")
    precision: str = arg("mixed", "on CUDA: 'mixed' (fp32 weights, bf16 autocast) or 'bf16' (bf16 weights)")
    gradient_checkpointing: Optional[bool] = arg(None, "recompute activations in backward (default: on for CUDA)")
    trust_remote_code: bool = arg(False, "allow model code from the Hub")
    seed: int = arg(0, "seed of weights order, template and retain draws")
    log_every: int = arg(5, "optimiser steps between log lines")


# Settings that default per model. TOFU's protocol (Maini et al. 2024; open-unlearning): 5 epochs of
# fine-tuning on `full` at lr 1e-5 (phi-1.5: 2e-5), unlearning at lr 1e-5 for 5 epochs, effective
# batch 32, weight decay 0.01, one epoch of warmup.
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
    return train.fill_defaults(args, {**TOFU_PROTOCOL, **PRESETS.get(args.model, {})})


def main(argv=None) -> dict:
    args = resolve(train.parse_args(Args, argv))

    # -- check names and data before any model is loaded ------------------------------------------
    try:
        method = flat.LOSSES[args.method]
        flat.DIVERGENCES[args.divergence]
        if args.split not in data.SPLITS:
            raise flat.UnknownName(f"unknown split {args.split!r}; valid: {', '.join(data.SPLITS)}")
        retain_split = data.SPLITS[args.split]
        if args.precision not in ("mixed", "bf16"):
            raise flat.UnknownName(f"unknown precision {args.precision!r}; valid: mixed, bf16")
        models.check_name(args.model)
        forget = data.load_tofu(args.split, args.data_dir)
        retain = data.first_authors(data.load_tofu(retain_split, args.data_dir), args.retain_authors)
        templates = data.load_idk(args.data_dir) if method.template else None
        cap = slice(None, args.eval_items)
        n_retain_eval = None if args.retain_authors is None else args.retain_authors * data.AUTHOR_QA
        eval_sets = {
            "forget": data.load_tofu(f"{args.split}_perturbed", args.data_dir),
            "retain": data.load_tofu("retain_perturbed", args.data_dir)[:n_retain_eval][cap],
            "ra": data.load_tofu("real_authors_perturbed", args.data_dir)[cap],
            "wf": data.load_tofu("world_facts_perturbed", args.data_dir)[cap],
        }
    except (KeyError, data.DataError, models.ModelLoadError) as e:
        train.fail(str(e))
    if not forget:
        train.fail(f"the forget set {args.split} is empty")

    out, device, cuda, train_dtype = train.setup_run(args, f"runs/tofu-{train.safe_name(args.model)}-{args.split}")
    params = train.loss_params(args)
    times: dict[str, float] = {}
    print(f"[tofu] {args.model} | {args.split} ({len(forget)} forget QA) | retain {len(retain)} QA | "
          f"method {args.method} | device {device} | out {out}")

    # -- 1-2. target and retain models, fine-tuned from the base model (cached) --------------------
    finetune_key = dict(model=args.model, lr=args.finetune_lr, epochs=args.finetune_epochs, batch=args.batch_size,
                        accum=args.grad_accum, wd=args.weight_decay, warmup=args.warmup_epochs, seed=args.seed,
                        max_steps=args.max_steps, precision=args.precision if cuda else "fp32", data_dir=args.data_dir)
    # TOFU's target is trained on `full` = retain + forget; with --retain-authors, on the subset + forget.
    target_dir = train.stage_dir(out, "target", {**finetune_key, "data": [retain_split, args.retain_authors,
                                                                          args.split]})
    retain_dir = train.stage_dir(out, "retain", {**finetune_key, "data": [retain_split, args.retain_authors]})
    for name, stage_path, rows in [("target", target_dir, retain + forget), ("retain", retain_dir, retain)]:
        if train.is_saved_model(stage_path):
            print(f"[tofu] {name} model: cached in {stage_path}")
            continue
        with train.timed(times, f"finetune_{name}_s"):
            model, tok = models.load_model(args.model, device, train_dtype, args.gradient_checkpointing,
                                           args.trust_remote_code)
            style = models.prompt_style(args.model, tok)
            rng = random.Random(args.seed)
            log = train.train_loop(model, lambda epoch: data.finetune_epoch(tok, style, rows, args.batch_size, rng),
                             lambda m, batch: train.finetune_loss(m, batch, tok.pad_token_id),
                             len(rows), args.finetune_lr, args.finetune_epochs, args, f"finetune-{name}", device)
            train.save_model_atomic(model, tok, stage_path, {"train_log.json": log})
            del model

    # -- 3. unlearning, from the target model (cached) -----------------------------------------
    unlearn_dir = train.stage_dir(out, f"unlearn-{args.method}", dict(
        target=target_dir.name, method=args.method, params=asdict(params), lr=args.lr, epochs=args.epochs,
        batch=args.batch_size, accum=args.grad_accum, wd=args.weight_decay, warmup=args.warmup_epochs,
        clip=args.max_grad_norm, seed=args.seed, max_steps=args.max_steps, retain=[retain_split, args.retain_authors],
        data_dir=args.data_dir))
    if train.is_saved_model(unlearn_dir):
        print(f"[tofu] unlearned model: cached in {unlearn_dir}")
    else:
        with train.timed(times, "unlearn_s"):
            model, tok = models.load_model(str(target_dir), device, train_dtype, args.gradient_checkpointing)
            style = models.prompt_style(args.model, tok)
            ref = models.frozen_copy(model) if method.reference else None
            rng = random.Random(args.seed)
            retain_pool = retain if method.needs_retain(params) else None
            log = train.train_loop(model, lambda epoch: data.unlearning_epoch(tok, style, forget, templates, retain_pool,
                                                                         args.batch_size, rng),
                             lambda m, batch: train.batch_loss(m, batch, method, params, tok.pad_token_id, ref),
                             len(forget), args.lr, args.epochs, args, f"unlearn-{args.method}", device)
            train.save_model_atomic(model, tok, unlearn_dir, {"train_log.json": log, "run_config.json": asdict(args)})
            del model, ref

    # -- 4. evaluation of the three models (each cached next to its model) ----------------------
    eval_key = dict(split=args.split, retain=[args.retain_authors], items=args.eval_items,
                    max_new_tokens=args.max_new_tokens, data_dir=args.data_dir)
    results = {}
    for name, path in [("target", target_dir), ("retain", retain_dir), ("unlearned", unlearn_dir)]:
        cache = train.stage_dir(path, "eval", eval_key).with_suffix(".json")
        if cache.exists():
            results[name] = train.read_json(cache)
            continue
        with train.timed(times, f"eval_{name}_s"):
            model, tok = models.load_model(str(path), device, None, False)
            with train.autocast(device, cuda):
                summary, logs = evaluate.evaluate_tofu(model, tok, models.prompt_style(args.model, tok), eval_sets,
                                                       args.max_new_tokens, args.eval_batch_size)
            del model
        results[name] = {"summary": summary, "items": logs}
        train.write_json(cache, results[name])

    tr_retain = results["retain"]["items"]["forget"]["truth_ratio"]
    report = {}
    for name, r in results.items():
        report[name] = {"forget_quality": evaluate.forget_quality(r["items"]["forget"]["truth_ratio"], tr_retain),
                        **r["summary"]}
    report["timings_s"] = times
    report["dirs"] = {"target": str(target_dir), "retain": str(retain_dir), "unlearned": str(unlearn_dir)}
    train.write_json(out / "config.json", asdict(args))
    train.write_json(out / "results.json", report)
    train.write_json(out / "eval_items.json", {name: r["items"] for name, r in results.items()})
    print_table(report, args)
    return report


TABLE = [("FQ", "forget_quality", ".2e"), ("MU", "model_utility", ".3f"), ("forget P", "forget_Q_A_Prob", ".3f"),
         ("forget R", "forget_Q_A_ROUGE", ".3f"), ("forget TR", "forget_truth_ratio", ".3f"),
         ("retain P", "retain_Q_A_Prob", ".3f"), ("retain R", "retain_Q_A_ROUGE", ".3f"),
         ("RA P", "ra_Q_A_Prob_normalised", ".3f"), ("WF P", "wf_Q_A_Prob_normalised", ".3f")]


def print_table(report: dict, args: Args) -> None:
    print(f"\nTOFU {args.split} | {args.model} | {args.method}"
          + (f" ({args.divergence})" if args.method == "flat" else ""))
    print("| model | " + " | ".join(h for h, _, _ in TABLE) + " |")
    print("|---|" + "---|" * len(TABLE))
    for name in ["target", "retain", "unlearned"]:
        print(f"| {name} | " + " | ".join(format(report[name][k], f) for _, k, f in TABLE) + " |")


if __name__ == "__main__":
    try:
        main()
    except (FloatingPointError, models.ModelLoadError, data.DataError) as e:
        train.fail(str(e))
