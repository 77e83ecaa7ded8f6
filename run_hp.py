"""Copyright unlearning on book-length text (the Harry Potter protocol of Yao et al. 2024 and FLAT,
on any plain-text book) and on MUSE-News (Shi et al. 2024).

    python run_hp.py                                  # offline default: a public-domain book
    python run_hp.py --text my_book.txt --method npo  # any book(s), any loss in flat.LOSSES
    python run_hp.py --corpus muse-news               # MUSE-News: VerbMem and KnowMem

1. The text is cut into chunks of --chunk-tokens tokens; the end of the book (--held-out-fraction)
   is held out, and the first --n-chunks chunks of the rest are the forget set.
2. The original model is the base model fine-tuned on the forget chunks (cached), so that there
   is something to forget; the reference model is the base model, which never saw the text.
3. Unlearning (default FLAT-KL) treats each forget chunk as a prompt (its first --prompt-tokens
   tokens) and a continuation; the template continuation is a refusal or a WikiText passage.
4. Each model continues the prompts of forget and held-out chunks greedily; BLEU and ROUGE-L recall
   against the true continuation, FLAT's forget quality gap against the reference model, and
   perplexity on WikiText-2 and on a book never trained on.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

import data
import evaluate
import flat
import models
import train
from train import arg

CORPORA = ("book", "muse-news")
TEMPLATES = ("refusal", "wikitext")


@dataclass
class Args(train.LossFlags):
    model: str = arg("smollm2-135m", "model alias (models.MODELS), local directory or Hub id")
    method: str = arg("flat", "unlearning loss, a key of flat.LOSSES")
    corpus: str = arg("book", "'book' (--text files) or 'muse-news'")
    text: list[str] = field(default_factory=list, metadata={"help": "plain-text book file(s) to forget "
                                                                    "(default: the vendored Frankenstein)",
                                                            "nargs": "*"})
    chunk_tokens: Optional[int] = arg(None, "tokens per chunk")
    n_chunks: Optional[int] = arg(None, "forget chunks (FLAT: 400)")
    held_out_fraction: float = arg(0.2, "book: the end of the text held out for the unseen evaluation")
    prompt_tokens: Optional[int] = arg(None, "tokens of a chunk given as the prompt")
    eval_chunks: Optional[int] = arg(None, "forget and held-out chunks (MUSE: probes, questions) evaluated")
    max_new_tokens: Optional[int] = arg(None, "continuation length (default: the rest of a chunk; MUSE: 128)")
    template: str = arg("refusal", "template continuation: 'refusal' or 'wikitext'")
    ppl_chunks: int = arg(16, "WikiText-2 and held-out-book chunks scored for perplexity")
    lr: Optional[float] = arg(None, "unlearning learning rate")
    epochs: Optional[int] = arg(None, "unlearning epochs over the forget chunks")
    batch_size: Optional[int] = arg(None, "chunks per micro-batch")
    grad_accum: Optional[int] = arg(None, "micro-batches per optimiser step")
    finetune_lr: Optional[float] = arg(None, "learning rate of the original model's fine-tuning")
    finetune_epochs: Optional[int] = arg(None, "epochs of that fine-tuning")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    warmup_epochs: float = arg(0.0, "linear warmup in epochs, then linear decay to 0")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    max_steps: Optional[int] = arg(None, "cap on optimiser steps in every training stage (smoke runs)")
    eval_batch_size: int = arg(16, "prompts per generation batch")
    out: Optional[str] = arg(None, "run directory (default: runs/hp-MODEL-CORPUS)")
    device: Optional[str] = arg(None, "cuda or cpu (default: cuda when available)")
    precision: str = arg("mixed", "on CUDA: 'mixed' (fp32 weights, bf16 autocast) or 'bf16' (bf16 weights)")
    gradient_checkpointing: Optional[bool] = arg(None, "recompute activations in backward (default: on for CUDA)")
    trust_remote_code: bool = arg(False, "allow model code from the Hub")
    seed: int = arg(0, "seed of data order and template draws")
    log_every: int = arg(5, "optimiser steps between log lines")


# FLAT's HP setting: 400 chunks, lr 2e-7 (Llama-2), batch 4 x 4 x 2 GPUs, 5 epochs. Chunk and prompt
# lengths, and the fine-tuning that makes the original, are this project's choices (see README).
PAPER = dict(chunk_tokens=256, n_chunks=400, prompt_tokens=64, eval_chunks=100, max_new_tokens=None, lr=2e-7,
             epochs=5, batch_size=4, grad_accum=8, finetune_lr=1e-5, finetune_epochs=3)
PRESETS = {
    # The offline default, sized for a 2-core CPU.
    "smollm2-135m": dict(chunk_tokens=96, n_chunks=48, prompt_tokens=32, eval_chunks=32, lr=5e-5, epochs=4,
                         batch_size=8, grad_accum=1, finetune_lr=1e-4, finetune_epochs=8),
}
MUSE_SETTINGS = dict(max_new_tokens=128)


def resolve(args: Args) -> Args:
    return train.fill_defaults(args, {**PAPER, **PRESETS.get(args.model, {}),
                                      **(MUSE_SETTINGS if args.corpus == "muse-news" else {})})


def main(argv=None) -> dict:
    args = resolve(train.parse_args(Args, argv))
    try:
        method = flat.LOSSES[args.method]
        flat.DIVERGENCES[args.divergence]
        for name, value, valid in [("corpus", args.corpus, CORPORA), ("template", args.template, TEMPLATES),
                                   ("precision", args.precision, ("mixed", "bf16"))]:
            if value not in valid:
                raise flat.UnknownName(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        if args.corpus == "muse-news" and args.text:
            raise flat.UnknownName("--text and --corpus muse-news exclude each other")
        models.check_name(args.model)
        if args.corpus == "book":
            texts = [data.read_text(p) for p in (args.text or [data.DEFAULT_BOOK])]
        else:
            texts = data.read_json_list(data.MUSE_DIR / "raw" / "forget_subset.json")
            muse = {"verbmem": data.read_json_list(data.MUSE_DIR / "verbmem" / "forget.json", {"prompt": str, "gt": str})}
            for split in ("forget", "retain2"):
                for suffix in ("", "_icl"):
                    muse[f"{split}{suffix}"] = data.read_json_list(data.MUSE_DIR / "knowmem" / f"{split}_qa{suffix}.json",
                                                                   {"question": str, "answer": str})
        wikitext = data.read_text(data.WIKITEXT)
        held_out_book = data.read_text(data.HELD_OUT_BOOK)
    except (KeyError, data.DataError, models.ModelLoadError) as e:
        train.fail(str(e))
    if args.prompt_tokens >= args.chunk_tokens:
        train.fail(f"--prompt-tokens {args.prompt_tokens} must be below --chunk-tokens {args.chunk_tokens}")

    name = args.corpus if args.corpus == "muse-news" else "-".join(Path(p).stem for p in args.text) or "book"
    out, device, cuda, train_dtype = train.setup_run(args, f"runs/hp-{train.safe_name(args.model)}-{name}")
    params = train.loss_params(args)
    times: dict[str, float] = {}

    # -- data: chunks of the tokenised text ------------------------------------------------------------
    tok = models.load_tokenizer(args.model, args.trust_remote_code)
    encode = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    if args.corpus == "book":
        ids = [i for t in texts for i in encode(t)]
        forget, held = data.split_chunks(data.chunk_ids(ids, args.chunk_tokens), args.n_chunks, args.held_out_fraction,
                                         args.chunk_tokens)
    else:  # MUSE-News: the forget articles are all trained on; VerbMem probes are excerpts of them
        forget = [c for t in texts for c in data.chunk_ids(encode(t), args.chunk_tokens)
                  if len(c) == args.chunk_tokens][:args.n_chunks]
        held = []
    wiki = [c for c in data.chunk_ids(encode(wikitext), args.chunk_tokens) if len(c) == args.chunk_tokens]
    retain_pool, wiki_eval = wiki[:len(wiki) // 2], wiki[len(wiki) // 2:][:args.ppl_chunks]
    book_eval = [c for c in data.chunk_ids(encode(held_out_book), args.chunk_tokens)
                 if len(c) == args.chunk_tokens][:args.ppl_chunks]
    if args.template == "refusal":
        templates = [encode(" " + r) + [tok.eos_token_id] for r in data.TEXT_REFUSALS]
    else:  # WikiText passages as long as a continuation
        templates = [c[:args.chunk_tokens - args.prompt_tokens] for c in retain_pool]
    print(f"[hp] {args.model} | {args.corpus} | {len(forget)} forget chunks, {len(held)} held out, "
          f"{args.chunk_tokens} tokens each | method {args.method} | device {device} | out {out}")
    data_key = dict(corpus=args.corpus, text=[str(p) for p in args.text], chunk=args.chunk_tokens, n=args.n_chunks,
                    held=args.held_out_fraction)

    # -- 1. the original model: the base model fine-tuned on the forget chunks (cached) -----------------
    original = train.stage_dir(out, "original", dict(
        model=args.model, data=data_key, lr=args.finetune_lr, epochs=args.finetune_epochs, batch=args.batch_size,
        accum=args.grad_accum, wd=args.weight_decay, seed=args.seed, max_steps=args.max_steps,
        precision=args.precision if cuda else "fp32"))
    if train.is_saved_model(original):
        print(f"[hp] original model: cached in {original}")
    else:
        with train.timed(times, "finetune_s"):
            model, tok = models.load_model(args.model, device, train_dtype, args.gradient_checkpointing,
                                           args.trust_remote_code)
            rng = random.Random(args.seed)
            log = train.train_loop(model, lambda e: data.text_epoch(forget, args.batch_size, rng),
                                   lambda m, batch: train.finetune_loss(m, batch, tok.pad_token_id),
                                   len(forget), args.finetune_lr, args.finetune_epochs, args, "finetune-original",
                                   device)
            train.save_model_atomic(model, tok, original, {"train_log.json": log})
            del model

    # -- 2. unlearning from the original model (cached) ------------------------------------------------
    unlearn_dir = train.stage_dir(out, f"unlearn-{args.method}", dict(
        original=original.name, method=args.method, params=asdict(params), template=args.template,
        prompt=args.prompt_tokens, lr=args.lr, epochs=args.epochs, batch=args.batch_size, accum=args.grad_accum,
        wd=args.weight_decay, warmup=args.warmup_epochs, clip=args.max_grad_norm, seed=args.seed,
        max_steps=args.max_steps))
    if train.is_saved_model(unlearn_dir):
        print(f"[hp] unlearned model: cached in {unlearn_dir}")
    else:
        with train.timed(times, "unlearn_s"):
            model, tok = models.load_model(str(original), device, train_dtype, args.gradient_checkpointing)
            ref = models.frozen_copy(model) if method.reference else None
            rng = random.Random(args.seed)
            retain = retain_pool if method.needs_retain(params) else None
            log = train.train_loop(
                model, lambda e: data.chunk_unlearning_epoch(forget, args.prompt_tokens,
                                                             templates if method.template else None, retain,
                                                             args.batch_size, rng),
                lambda m, batch: train.batch_loss(m, batch, method, params, tok.pad_token_id, ref),
                len(forget), args.lr, args.epochs, args, f"unlearn-{args.method}", device)
            train.save_model_atomic(model, tok, unlearn_dir, {"train_log.json": log, "run_config.json": asdict(args)})
            del model, ref

    # -- 3. evaluation of the reference, original and unlearned models (each cached) -------------------
    n = args.eval_chunks
    eval_key = dict(data=data_key, n=n, prompt=args.prompt_tokens, new=args.max_new_tokens, ppl=args.ppl_chunks)
    results = {}
    for row, path in [("reference", args.model), ("original", str(original)), ("unlearned", str(unlearn_dir))]:
        cache = train.stage_dir(out, f"eval-{row}", {**eval_key, "model": path}).with_suffix(".json")
        if cache.exists():
            results[row] = train.read_json(cache)
            continue
        with train.timed(times, f"eval_{row}_s"):
            model, tok = models.load_model(path, device, None, False, args.trust_remote_code)
            with train.autocast(device, cuda):
                r = evaluate_continuations(model, tok, {"forget": forget[:n], "held_out": held[:n]}, args)
                if args.corpus == "muse-news":
                    r = merge(r, evaluate_muse(model, tok, muse, n, args))
                r["summary"]["wikitext_ppl"] = evaluate.perplexity(model, wiki_eval, tok.pad_token_id)
                r["summary"]["held_out_book_ppl"] = evaluate.perplexity(model, book_eval, tok.pad_token_id)
            del model
        results[row] = r
        train.write_json(cache, r)

    report = {row: r["summary"] for row, r in results.items()}
    for row in report:
        report[row]["forget_quality_gap"] = evaluate.forget_quality_gap(report[row], report["reference"])
    report["timings_s"] = times
    report["dirs"] = {"original": str(original), "unlearned": str(unlearn_dir)}
    train.write_json(out / "config.json", asdict(args))
    train.write_json(out / "results.json", report)
    train.write_json(out / "eval_items.json", {row: r["items"] for row, r in results.items()})
    print_table(report, args)
    return report


def merge(a: dict, b: dict) -> dict:
    return {"summary": {**a["summary"], **b["summary"]}, "items": {**a["items"], **b["items"]}}


def evaluate_continuations(model, tok, sets: dict[str, list[list[int]]], args: Args) -> dict:
    """Greedy continuation of each chunk's first prompt_tokens tokens, as long as the rest of the
    chunk (or --max-new-tokens); BLEU and ROUGE-L recall against the true continuation."""
    summary, items = {}, {}
    for name, chunks in sets.items():
        if not chunks:
            continue
        new = args.max_new_tokens or args.chunk_tokens - args.prompt_tokens
        prompts = [c[:args.prompt_tokens] for c in chunks]
        truth = [tok.decode(c[args.prompt_tokens:args.prompt_tokens + new]) for c in chunks]
        gens = [tok.decode(g, skip_special_tokens=True) for g in
                evaluate.generate_ids(model, tok, prompts, new, args.eval_batch_size, stop_at_eos=False)]
        b, r = evaluate.bleu(gens, truth), evaluate.rouge_l_recall(gens, truth)
        summary[f"{name}_bleu"], summary[f"{name}_rougeL"] = float(np.mean(b)), float(np.mean(r))
        items[name] = {"prompt": [tok.decode(p) for p in prompts], "truth": truth, "generation": gens,
                       "bleu": b, "rougeL_recall": r}
    return {"summary": summary, "items": items}


def evaluate_muse(model, tok, muse: dict, n: int, args: Args) -> dict:
    """MUSE's VerbMem (greedy 128 tokens after each probe's prompt, ROUGE-L F1 against the first 128
    tokens of its ground truth) and KnowMem (few-shot QA, 32 tokens, cut at the stop strings,
    ROUGE-L F1) on the forget and retain QA sets."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok("a").input_ids[0] == tok.bos_token_id else []
    probes = muse["verbmem"][:n]
    prompts = [bos + tok(p["prompt"], add_special_tokens=False).input_ids for p in probes]
    gens = [tok.decode(g, skip_special_tokens=True) for g in
            evaluate.generate_ids(model, tok, prompts, args.max_new_tokens, args.eval_batch_size)]
    truth = [tok.decode((bos + tok(p["gt"], add_special_tokens=False).input_ids)[:args.max_new_tokens],
                        skip_special_tokens=True) for p in probes]
    verb = evaluate.rouge_l_f1(gens, truth)
    summary = {"verbmem_forget": float(np.mean(verb))}
    items = {"verbmem": {"generation": gens, "truth": truth, "rougeL_f1": verb}}
    for split in ("forget", "retain2"):
        shots = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in muse[f"{split}_icl"])
        qa = muse[split][:n]
        prompts = [bos + tok(shots + f"Question: {q['question']}\nAnswer: ", add_special_tokens=False).input_ids
                   for q in qa]
        answers = [evaluate.cut_at_stops(tok.decode(g, skip_special_tokens=True))
                   for g in evaluate.generate_ids(model, tok, prompts, 32, args.eval_batch_size)]
        f1 = evaluate.rouge_l_f1(answers, [q["answer"] for q in qa])
        key = "knowmem_forget" if split == "forget" else "knowmem_retain"
        summary[key] = float(np.mean(f1))
        items[key] = {"question": [q["question"] for q in qa], "answer": answers, "rougeL_f1": f1}
    return {"summary": summary, "items": items}


TABLE = [("forget BLEU", "forget_bleu", ".3f"), ("forget ROUGE-L", "forget_rougeL", ".3f"),
         ("held-out BLEU", "held_out_bleu", ".3f"), ("held-out ROUGE-L", "held_out_rougeL", ".3f"),
         ("FQ gap", "forget_quality_gap", ".3f"), ("VerbMem", "verbmem_forget", ".3f"),
         ("KnowMem forget", "knowmem_forget", ".3f"), ("KnowMem retain", "knowmem_retain", ".3f"),
         ("WikiText ppl", "wikitext_ppl", ".2f"), ("held-out book ppl", "held_out_book_ppl", ".2f")]


def print_table(report: dict, args: Args) -> None:
    cols = [c for c in TABLE if c[1] in report["reference"]]
    print(f"\nCopyright unlearning | {args.corpus} | {args.model} | {args.method}"
          + (f" ({args.divergence})" if args.method == "flat" else "") + f" | template: {args.template}")
    print("| model | " + " | ".join(h for h, _, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for row in ["reference", "original", "unlearned"]:
        print(f"| {row} | " + " | ".join(format(report[row][k], f) for _, k, f in cols) + " |")


if __name__ == "__main__":
    try:
        main()
    except (FloatingPointError, models.ModelLoadError, data.DataError) as e:
        train.fail(str(e))
