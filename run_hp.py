"""Copyright unlearning on book-length text (the Harry Potter protocol of Yao et al. 2024 and FLAT,
on any plain-text book) and on MUSE-News (Shi et al. 2024).

    python run_hp.py                                  # offline default: a public-domain book
    python run_hp.py --text my_book.txt --method npo  # any book(s), any loss(es) in flat.LOSSES
    python run_hp.py --corpus muse-news               # MUSE-News: VerbMem, KnowMem, PrivLeak

1. Book: the text is cut into chunks of --chunk-tokens tokens; the end of the book
   (--held-out-fraction) is held out, and the first --n-chunks chunks of the rest are the forget set.
   MUSE-News: the forget text is the articles the scored probes come from (all 889 with the paper
   preset), joined as MUSE cut its probes from them, in chunks.
2. The original model is the base model fine-tuned on the forget chunks (cached), so that there is
   something to forget; the reference model is the base model, which never saw the text.
3. Unlearning treats each forget chunk as a prompt (its first --prompt-tokens tokens) and a
   continuation; the template continuation is a refusal or a WikiText passage (llmu: a random
   WikiText passage, Yao et al.'s random normal answer).
4. Each model continues prompts greedily until EOS, capped at the true continuation's length; BLEU
   (0-100) and ROUGE-L recall against it, FLAT's forget quality gap against the reference model,
   PrivLeak (Min-K% AUC of forget vs held-out text, against the reference model's), perplexity on
   WikiText-2 and on a book never trained on; MUSE-News adds VerbMem and KnowMem. See docs/copyright.md.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np

import corpora
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
from flags import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, arg, one_of


@dataclass
class Args(flags.RunArgs):
    corpus: str = arg("book", "'book' (--text files) or 'muse-news'", check=one_of("book", "muse-news"))
    text: list[str] = field(default_factory=list, metadata={"help": "plain-text book file(s) to forget "
                                                                    "(default: the vendored Frankenstein)",
                                                            "only": None, "check": None})
    chunk_tokens: Optional[int] = arg(None, "tokens per chunk", check=flags.Check(lambda v: v >= 2, ">= 2"))
    n_chunks: Optional[int] = arg(None, "book: forget chunks (FLAT: 400)", check=AT_LEAST_1)
    held_out_fraction: float = arg(0.2, "book: the end of the text held out for the unseen evaluation",
                                   check=FRACTION)
    muse_probes: Optional[int] = arg(None, "muse-news: VerbMem probes scored, trained on with the articles they "
                                           "come from (0: all, and the whole forget corpus)", check=NON_NEGATIVE)
    privleak_texts: Optional[int] = arg(None, "muse-news: PrivLeak forget texts (and as many holdout texts) "
                                              "scored, trained on with their articles (0: all)", check=NON_NEGATIVE)
    prompt_tokens: Optional[int] = arg(None, "tokens of a chunk given as the prompt", check=AT_LEAST_1)
    eval_chunks: Optional[int] = arg(None, "book: forget and held-out chunks evaluated; muse-news: retain "
                                           "KnowMem questions", only=("eval",), check=AT_LEAST_1)
    template: str = arg("refusal", "template continuation of flat, idk, dpo: 'refusal' or 'wikitext'",
                        check=one_of("refusal", "wikitext"))
    max_new_tokens: Optional[int] = arg(None, "cap on a continuation's length, the reference cut to it too "
                                              "(default: the reference continuation's length; VerbMem: 128, as MUSE)",
                                        only=("eval",), check=AT_LEAST_1)
    ppl_chunks: int = arg(16, "WikiText-2 and held-out-book chunks scored for perplexity", only=("eval",),
                          check=AT_LEAST_1)
    lr: Optional[float] = arg(None, "unlearning learning rate", only=("unlearn",), check=POSITIVE)
    epochs: Optional[int] = arg(None, "unlearning epochs over the forget chunks", only=("unlearn",), check=AT_LEAST_1)
    batch_size: Optional[int] = arg(None, "chunks per micro-batch", check=AT_LEAST_1)
    grad_accum: Optional[int] = arg(None, "micro-batches per optimiser step", check=AT_LEAST_1)
    finetune_lr: Optional[float] = arg(None, "learning rate of the original model's fine-tuning",
                                       only=("finetune",), check=POSITIVE)
    finetune_epochs: Optional[int] = arg(None, "epochs of that fine-tuning", only=("finetune",), check=AT_LEAST_1)
    warmup_epochs: float = arg(0.0, "linear warmup in epochs, then linear decay to 0", check=NON_NEGATIVE)
    eval_batch_size: int = arg(16, "prompts per generation batch", only=("eval",), check=AT_LEAST_1)


# FLAT's HP setting: 400 chunks, lr 2e-7 (Llama-2), batch 4 x 4 x 2 GPUs, 5 epochs; FLAT used OPT-2.7B
# and Llama-2-7B for Harry Potter. Chunk and prompt lengths, and the fine-tuning that makes the
# original, are this project's choices (docs/copyright.md). MUSE trains on its whole forget corpus.
PAPER = dict(chunk_tokens=256, n_chunks=400, prompt_tokens=64, eval_chunks=100, lr=2e-7, epochs=5, batch_size=4,
             grad_accum=8, finetune_lr=1e-5, finetune_epochs=3, muse_probes=0, privleak_texts=0)
PRESETS = {
    # The offline default, sized for a 2-core CPU.
    "smollm2-135m": dict(chunk_tokens=96, n_chunks=48, prompt_tokens=32, eval_chunks=32, lr=5e-5, epochs=4,
                         batch_size=8, grad_accum=1, finetune_lr=1e-4, finetune_epochs=8),
}
# MUSE-News offline: 3 VerbMem probes and 2 PrivLeak texts with the 9-12 articles they come from, in
# longer chunks (a VerbMem prompt is about 900 tokens).
MUSE_PRESETS = {"smollm2-135m": dict(chunk_tokens=256, prompt_tokens=64, muse_probes=3, privleak_texts=2,
                                     finetune_epochs=6, eval_chunks=16)}


def resolve(args: Args) -> Args:
    muse = MUSE_PRESETS.get(args.model, {}) if args.corpus == "muse-news" else {}
    return flags.fill_defaults(args, {**PAPER, **PRESETS.get(args.model, {}), **muse})


def main(argv=None) -> dict:
    args = resolve(flags.parse_args(Args, argv))

    # -- every flag, name and data file is checked before any model is loaded -------------------
    flags.validate(args)
    variants = flags.methods(args.method)
    flat.DIVERGENCES[args.divergence]
    if args.corpus == "muse-news" and args.text:
        raise flags.UsageError("--text and --corpus muse-news exclude each other")
    if args.prompt_tokens >= args.chunk_tokens:
        raise flags.UsageError(f"--prompt-tokens {args.prompt_tokens} must be below --chunk-tokens {args.chunk_tokens}")
    if args.eval_every and distributed.launched():
        raise flags.UsageError("--eval-every runs in one process only (evaluation is not sharded)")
    models.check_name(args.model)
    if args.corpus == "book":
        texts = [corpora.read_text(p) for p in (args.text or [corpora.DEFAULT_BOOK])]
    else:
        muse = corpora.muse_forget_set(corpora.load_muse(), args.muse_probes or None, args.privleak_texts or None)
        texts = [muse["text"]]
    wikitext = corpora.read_text(corpora.WIKITEXT)
    held_out_book = corpora.read_text(corpora.HELD_OUT_BOOK)

    name = args.corpus if args.corpus == "muse-news" else "-".join(Path(p).stem for p in args.text) or "book"
    out, compute = stages.setup_run(args, f"runs/hp-{stages.safe_name(args.model)}-{name}")
    world = distributed.world()
    rows_per_step = args.batch_size * args.grad_accum * world
    times: dict[str, float] = {}

    # -- data: chunks of the tokenised text ------------------------------------------------------
    tok = models.load_tokenizer(args.model, args.trust_remote_code)
    encode = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    longest = max([args.chunk_tokens] + ([len(encode(p["prompt"])) + 129 for p in muse["verbmem"]]
                                         if args.corpus == "muse-news" else []))
    context = models.context_length(args.model, args.trust_remote_code)
    if context is not None and longest > context:
        raise flags.UsageError(f"{args.model} reads at most {context} tokens; this run needs {longest} "
                               f"(--chunk-tokens {args.chunk_tokens}" + (", MUSE's VerbMem prompts" if args.corpus ==
                                                                         "muse-news" else "") + ")")
    if args.corpus == "book":
        ids = [i for t in texts for i in encode(t)]
        forget, held = corpora.split_chunks(corpora.chunk_ids(ids, args.chunk_tokens), args.n_chunks,
                                            args.held_out_fraction, args.chunk_tokens)
        finetune_chunks = forget
    else:  # MUSE-News: every token of the forget text is trained on, its last chunk too
        finetune_chunks = corpora.chunk_ids(encode(muse["text"]), args.chunk_tokens)
        forget, held = [c for c in finetune_chunks if len(c) > args.prompt_tokens], []
    wiki = [c for c in corpora.chunk_ids(encode(wikitext), args.chunk_tokens) if len(c) == args.chunk_tokens]
    retain_pool, wiki_eval = wiki[:len(wiki) // 2], wiki[len(wiki) // 2:][:args.ppl_chunks]
    book_eval = [c for c in corpora.chunk_ids(encode(held_out_book), args.chunk_tokens)
                 if len(c) == args.chunk_tokens][:args.ppl_chunks]
    continuation = args.chunk_tokens - args.prompt_tokens
    wiki_passages = [c[:continuation] for c in retain_pool]  # random normal text of a continuation's length
    refusals = [encode(" " + r) + [tok.eos_token_id] for r in corpora.TEXT_REFUSALS]
    stages.say(f"[hp] {args.model} | {args.corpus} | {len(forget)} forget chunks, {len(held)} held out, "
              f"{args.chunk_tokens} tokens each | methods {', '.join(v[0] for v in variants)} | "
              f"{compute.device} {compute.precision} | {world} process(es) | out {out}")

    # -- 1. the original model: the base model fine-tuned on the forget chunks (cached) -----------
    original = stages.stage_dir(out, "original", stages.stage_key(args, "finetune", compute,
                                                                 text=data.digest(finetune_chunks)))
    if stages.load_cached_model_or_none(original):
        stages.say(f"[hp] original model: cached in {original}")
    else:
        with stages.timed(times, "finetune_s"):
            model, tok, _ = train.training_model(args.model, compute, args.trust_remote_code)
            rng = random.Random(args.seed)
            plan = train.plan_steps((corpora.text_epoch(finetune_chunks, rows_per_step, rng)
                                     for _ in range(args.finetune_epochs)), args.batch_size, args.max_steps,
                                    world, distributed.rank())
            log, _ = train.train(model, plan, partial(train.finetune_loss, pad_id=tok.pad_token_id),
                                 args.finetune_lr, args, "finetune-original", compute)
            stages.save_model_atomic(model, tok, original, {"train_log.json": log})
            del model

    # -- evaluation of one model (cached); rank 0 only --------------------------------------------
    n = args.eval_chunks
    sets = {"forget": forget[:n], "held_out": held[:n]}
    eval_key = stages.stage_key(args, "eval", compute, sets=data.digest(sets, wiki_eval, book_eval,
                                                                       muse if args.corpus == "muse-news" else None))

    def evaluation(row: str, path) -> dict:
        cache = stages.stage_dir(out, f"eval-{row}", {**eval_key, "model": stages.model_id(path)}).with_suffix(".json")
        cached = stages.read_cache(cache)
        if cached is not None:
            return cached
        with stages.timed(times, f"eval_{row}_s"):
            model, tok = models.load_model(str(path), compute.device, compute.eval_dtype, False, args.trust_remote_code)
            r = evaluate_continuations(model, tok, sets, args)
            if args.corpus == "muse-news":
                r = merge(r, evaluate_muse(model, tok, muse, args))
            r["summary"]["wikitext_ppl"] = evaluate.perplexity(model, wiki_eval, tok.pad_token_id)
            r["summary"]["held_out_book_ppl"] = evaluate.perplexity(model, book_eval, tok.pad_token_id)
        stages.write_cache(cache, r)
        return r

    reference = evaluation("reference", args.model)["summary"] if args.eval_every else None

    # -- 2. unlearning from the original model, one stage per method (cached) --------------------
    progress_at = train.once_at_step_0(book_progress)
    unlearned = {}
    for label, loss, divergence in variants:
        method = flat.LOSSES[loss]
        params = replace(flags.loss_params(args), divergence=divergence or args.divergence)
        templates = {"refusal": refusals if args.template == "refusal" else wiki_passages,
                     "random": wiki_passages, None: None}[method.template]
        retain = retain_pool if method.needs_retain(params) else None
        key = stages.stage_key(args, "unlearn", compute, original=original.name, method=loss,
                              params=method.read_params(params),
                              rows=data.digest(forget, retain, templates))
        if args.eval_every:
            key.update(eval_key=eval_key, eval_every=args.eval_every)
        unlearned[label] = path = stages.stage_dir(out, f"unlearn-{stages.safe_name(label)}", key)
        if stages.load_cached_model_or_none(path):
            stages.say(f"[hp] unlearned model ({label}): cached in {path}")
            continue
        with stages.timed(times, f"unlearn_{label}_s"):
            model, tok, ref = train.training_model(original, compute, args.trust_remote_code, bool(method.reference))
            rng = random.Random(args.seed)
            plan = train.plan_steps((corpora.chunk_unlearning_epoch(forget, args.prompt_tokens, templates, retain,
                                                                    rows_per_step, rng)
                                     for _ in range(args.epochs)), args.batch_size, args.max_steps, world,
                                    distributed.rank())
            progress = partial(progress_at, tok=tok, sets=sets, wiki_eval=wiki_eval, reference=reference, args=args)
            log, evals = train.train(model, plan, partial(train.batch_loss, method=method, params=params,
                                                          pad_id=tok.pad_token_id, ref_model=ref),
                                     args.lr, args, f"unlearn-{label}", compute, progress, args.eval_every)
            stages.save_model_atomic(model, tok, path, {"train_log.json": log, "eval_log.json": evals,
                                                       "run_config.json": {**asdict(args), "method": label}})
            del model, ref
    if not distributed.is_main():
        return {}

    # -- 3. evaluation of the reference, original and unlearned models ----------------------------
    results = {"reference": evaluation("reference", args.model), "original": evaluation("original", original)}
    results.update({label: evaluation(label, p) for label, p in unlearned.items()})
    ref = results["reference"]["summary"]
    report = {}
    for row, r in results.items():
        s = r["summary"]
        report[row] = {**s, "forget_quality_gap": evaluate.forget_quality_gap(s, ref),
                       "privleak": mia.privleak(s["mia_min_k"], ref["mia_min_k"])}
    methods = {label: report.pop(label) for label in unlearned}
    report = {**report, "methods": methods, **({"unlearned": methods[variants[0][0]]} if len(variants) == 1 else {}),
              "benchmark": "book", "title": f"{args.corpus} | {args.model}",
              "training": {label: stages.training_logs(p) for label, p in unlearned.items()},
              "timings_s": times, "dirs": {"original": str(original), **{label: str(p) for label, p in unlearned.items()},
                                           **({"unlearned": str(unlearned[variants[0][0]])} if len(variants) == 1
                                              else {})}}
    if args.corpus == "muse-news":
        report["muse_articles"] = len(muse["articles"])
    report, warnings = stages.finite_report(report)
    report["warnings"] = warnings
    stages.write_json(out / "config.json", asdict(args))
    stages.write_json(out / "results.json", report)
    stages.write_json(out / "eval_items.json", {**{row: r["items"] for row, r in results.items()},
                                               **({"unlearned": results[variants[0][0]]["items"]} if len(variants) == 1
                                                  else {})})
    plots.draw_all(report, out)
    print_table(report, args)
    return report


def merge(a: dict, b: dict) -> dict:
    return {"summary": {**a["summary"], **b["summary"]}, "items": {**a["items"], **b["items"]}}


def evaluate_continuations(model, tok, sets: dict[str, list[list[int]]], args: Args) -> dict:
    """Greedy continuation of each chunk's first prompt_tokens tokens, stopping at EOS and capped at
    the true continuation's length; BLEU (0-100) and ROUGE-L recall against it; and the
    membership-inference scores of the chunks (forget vs held-out) for PrivLeak."""
    summary, items = {}, {}
    for name, chunks in sets.items():
        if not chunks:
            continue
        prompts = [c[:args.prompt_tokens] for c in chunks]
        truth_ids = [c[args.prompt_tokens:][:args.max_new_tokens] for c in chunks]
        gens = [tok.decode(g, skip_special_tokens=True) for g in
                evaluate.generate_ids(model, tok, prompts, [len(t) for t in truth_ids], args.eval_batch_size)]
        truth = [tok.decode(t) for t in truth_ids]
        b, r = evaluate.bleu(gens, truth), evaluate.rouge_l_recall(gens, truth)
        summary[f"{name}_bleu"], summary[f"{name}_rougeL"] = float(np.mean(b)), float(np.mean(r))
        items[name] = {"prompt": [tok.decode(p) for p in prompts], "truth": truth, "generation": gens,
                       "bleu": b, "rougeL_recall": r}
    if sets["held_out"]:  # the book's own held-out chunks are the non-members
        scores = {side: [mia.min_k_score(s["logp"]) for s in evaluate.text_scores(model, sets[side], tok.pad_token_id)]
                  for side in ("forget", "held_out")}
        summary["mia_min_k"] = mia.mia_auc(scores["forget"], scores["held_out"])
        items["mia"] = {"min_k": {"forget": scores["forget"], "holdout": scores["held_out"]}}
    return {"summary": summary, "items": items}


def evaluate_muse(model, tok, muse: dict, args: Args) -> dict:
    """MUSE's VerbMem (greedy continuation of each probe's prompt until EOS, at most 128 tokens, ROUGE-L
    F1 against the first 128 tokens of its ground truth), KnowMem (few-shot QA, 32 tokens, cut at the
    stop strings, ROUGE-L F1) on the forget questions whose answers lie in the forget text and on the
    first --eval-chunks retain questions, and PrivLeak's Min-K% AUC of MUSE's forget vs holdout texts."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok("a").input_ids[0] == tok.bos_token_id else []
    probes = muse["verbmem"]
    prompts = [bos + tok(p["prompt"], add_special_tokens=False).input_ids for p in probes]
    truth_ids = [(bos + tok(p["gt"], add_special_tokens=False).input_ids)[:min(128, args.max_new_tokens or 128)]
                 for p in probes]
    gens = [tok.decode(g, skip_special_tokens=True) for g in
            evaluate.generate_ids(model, tok, prompts, [len(t) for t in truth_ids], args.eval_batch_size)]
    truth = [tok.decode(t, skip_special_tokens=True) for t in truth_ids]
    verb = evaluate.rouge_l_f1(gens, truth)
    summary = {"verbmem_forget": float(np.mean(verb)), "verbmem_items": len(probes)}
    items = {"verbmem": {"generation": gens, "truth": truth, "rougeL_f1": verb}}
    for split, qa in (("forget", muse["knowmem_forget"]), ("retain", muse["knowmem_retain"][:args.eval_chunks])):
        shots = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in muse[f"knowmem_{split}_icl"])
        prompts = [bos + tok(shots + f"Question: {q['question']}\nAnswer: ", add_special_tokens=False).input_ids
                   for q in qa]
        answers = [evaluate.cut_at_stops(tok.decode(g, skip_special_tokens=True))
                   for g in evaluate.generate_ids(model, tok, prompts, 32, args.eval_batch_size)]
        f1 = evaluate.rouge_l_f1(answers, [q["answer"] for q in qa])
        summary[f"knowmem_{split}"], summary[f"knowmem_{split}_items"] = float(np.mean(f1)), len(qa)
        items[f"knowmem_{split}"] = {"question": [q["question"] for q in qa], "answer": answers, "rougeL_f1": f1}
    texts = {"forget": muse["privleak_forget"], "holdout": muse["privleak_holdout"]}
    scores = {side: [mia.min_k_score(s["logp"]) for s in
                     evaluate.text_scores(model, [bos + tok(t, add_special_tokens=False).input_ids for t in texts[side]],
                                          tok.pad_token_id, batch_size=1)]
              for side in texts}
    summary["mia_min_k"] = mia.mia_auc(scores["forget"], scores["holdout"])
    summary["privleak_items"] = len(texts["forget"])
    items["mia"] = {"min_k": scores}
    return {"summary": summary, "items": items}


def book_progress(model, tok, sets: dict, wiki_eval: list, reference: dict, args: Args) -> dict:
    """The in-training evaluation (--eval-every): the forget quality gap against the reference model
    and WikiText perplexity, on the forget chunks."""
    r = evaluate_continuations(model, tok, {"forget": sets["forget"], "held_out": []}, args)["summary"]
    return {"forget_quality_gap": evaluate.forget_quality_gap(r, reference),
            "wikitext_ppl": evaluate.perplexity(model, wiki_eval, tok.pad_token_id)}


TABLE = [("forget BLEU", "forget_bleu", ".1f"), ("forget ROUGE-L", "forget_rougeL", ".3f"),
         ("held-out BLEU", "held_out_bleu", ".1f"), ("held-out ROUGE-L", "held_out_rougeL", ".3f"),
         ("FQ gap", "forget_quality_gap", ".1f"), ("VerbMem", "verbmem_forget", ".3f"),
         ("KnowMem forget", "knowmem_forget", ".3f"), ("KnowMem retain", "knowmem_retain", ".3f"),
         ("PrivLeak", "privleak", ".1f"), ("WikiText ppl", "wikitext_ppl", ".2f"),
         ("held-out book ppl", "held_out_book_ppl", ".2f")]


def print_table(report: dict, args: Args) -> None:
    cols = [c for c in TABLE if c[1] in report["reference"]]
    print(f"\nCopyright unlearning | {args.corpus} | {args.model} | template: {args.template} | BLEU and FQ gap "
          f"(|dBLEU| + 100 |dROUGE-L|) on 0-100, ROUGE-L recall and VerbMem/KnowMem ROUGE-L F1 on 0-1"
          + (f" | VerbMem on {report['reference']['verbmem_items']} probes, KnowMem forget on "
             f"{report['reference']['knowmem_forget_items']} questions, PrivLeak on {report['reference']['privleak_items']}"
             f" + {report['reference']['privleak_items']} texts, all from {report['muse_articles']} articles trained on"
             if args.corpus == "muse-news" else ""))
    print("| model | " + " | ".join(h for h, _, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, row in [("reference", report["reference"]), ("original", report["original"]),
                      *report["methods"].items()]:
        print(f"| {name} | " + " | ".join(stages.cell(row, k, f) for _, k, f in cols) + " |")
    for w in report["warnings"]:
        print(f"warning: not finite, written as null: {w}")


if __name__ == "__main__":
    stages.main_guard(main)
