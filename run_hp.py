"""Copyright unlearning on book-length text (the Harry Potter protocol of Yao et al. 2024 and FLAT,
on any plain-text book) and on MUSE-News (Shi et al. 2024).

    python run_hp.py                                  # offline default: a public-domain book
    python run_hp.py --text my_book.txt --method npo  # any book(s), any loss(es) in methods.LOSSES
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

import errors

if __name__ == "__main__":  # a Ctrl-C while the libraries import: one line and exit 130 once they have (main_guard)
    errors.defer_interrupts()

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import attacks
import books
import corpora
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
from flags import AT_LEAST_1, FRACTION, NON_NEGATIVE, LEARNING_RATE, arg, one_of


BOOK = flags.Switch("--corpus book", lambda a: a.corpus == "book")
MUSE = flags.Switch("--corpus muse-news", lambda a: a.corpus == "muse-news")


GRID_ZERO_SHOT = flags.Switch("a grid (--lr A,B,... or --seeds) with --zero-shot",
                              lambda a: flags.GRID.on(a) and flags.ZERO_SHOT.on(a))


@dataclass
class Args(flags.RunArgs):
    corpus: str = arg("book", "'book' (--text files) or 'muse-news'", check=one_of("book", "muse-news"))
    text: list[str] = field(default_factory=list, metadata={"help": "plain-text book file(s) to forget "
                                                                    "(default: the vendored Frankenstein)",
                                                            "only": (), "check": None, "needs": BOOK})  # keys hold
    # its contents
    chunk_tokens: Optional[int] = arg(None, "tokens per chunk", check=flags.Check(lambda v: v >= 2, ">= 2"))
    n_chunks: Optional[int] = arg(None, "book: forget chunks (FLAT: 400)", check=AT_LEAST_1, needs=BOOK)
    held_out_fraction: float = arg(0.2, "book: the end of the text held out for the unseen evaluation",
                                   only=(), check=FRACTION, needs=BOOK)  # every stage's key holds the chunks it reads
    muse_probes: Optional[int] = arg(None, "muse-news: VerbMem probes scored, trained on with the articles they "
                                           "come from (0: all, and the whole forget corpus)", check=NON_NEGATIVE,
                                     needs=MUSE)
    privleak_texts: Optional[int] = arg(None, "muse-news: PrivLeak forget texts (and as many holdout texts) "
                                              "scored, trained on with their articles (0: all)", check=NON_NEGATIVE,
                                        needs=MUSE)
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
    ppl_bar: float = arg(1.1, "a comparison's selection rule: a learning rate qualifies when its mean WikiText "
                              "perplexity is at most this times the original model's (protocol.BOOK)", only=(),
                         check=flags.POSITIVE, needs=flags.GRID)
    zero_shot_bar: float = arg(0.02, "a comparison's selection rule with --zero-shot: and its mean zero-shot "
                                     "accuracy at most this below the original model's", only=(), check=NON_NEGATIVE,
                               needs=GRID_ZERO_SHOT)
    epochs: Optional[int] = arg(None, "unlearning epochs over the forget chunks", only=("unlearn",), check=AT_LEAST_1)
    batch_size: Optional[int] = arg(None, "chunks per micro-batch", check=AT_LEAST_1)
    grad_accum: Optional[int] = arg(None, "micro-batches per optimiser step", check=AT_LEAST_1)
    finetune_lr: Optional[float] = arg(None, "learning rate of the original model's fine-tuning",
                                       only=("finetune",), check=LEARNING_RATE)
    finetune_epochs: Optional[int] = arg(None, "epochs of that fine-tuning", only=("finetune",), check=AT_LEAST_1)
    warmup_epochs: float = arg(0.0, "linear warmup in epochs, then linear decay to 0", check=NON_NEGATIVE)
    eval_batch_size: int = arg(16, "prompts per generation batch", only=("eval",), check=AT_LEAST_1)
    zero_shot: str = arg("all", "zero-shot utility through lm-evaluation-harness, as FLAT reports it (zeroshot.py): task "
                                "names, a comma-separated list, 'all' (those with local files) or 'none'",
                         only=("zeroshot",))


# FLAT's HP setting: 400 chunks, lr 2e-7 (Llama-2), batch 4 x 4 x 2 GPUs, 5 epochs; FLAT used OPT-2.7B
# and Llama-2-7B for Harry Potter. Chunk and prompt lengths, and the fine-tuning that makes the
# original, are this project's choices (docs/copyright.md). MUSE trains on its whole forget corpus.
PAPER = dict(chunk_tokens=256, n_chunks=400, prompt_tokens=64, eval_chunks=100, lr=2e-7, epochs=5, batch_size=4,
             grad_accum=8, finetune_lr=1e-5, finetune_epochs=3, muse_probes=0, privleak_texts=0,
             relearn_lr=1e-5,  # relearning is fine-tuning: the original's learning rate
             zero_shot_limit=0)  # FLAT's zero-shot accuracy: every item of each task
PRESETS = {
    # The offline default, sized for a 2-core CPU.
    "smollm2-135m": dict(chunk_tokens=96, n_chunks=48, prompt_tokens=32, eval_chunks=32, lr=5e-5, epochs=4,
                         batch_size=8, grad_accum=1, finetune_lr=1e-4, finetune_epochs=8, relearn_lr=1e-4,
                         zero_shot_limit=20),  # the first 20 items of each zero-shot task: about 1 min per model
}
# MUSE-News offline: 3 VerbMem probes and 2 PrivLeak texts with the 9-12 articles they come from, in
# longer chunks (a VerbMem prompt is about 900 tokens).
MUSE_PRESETS = {"smollm2-135m": dict(chunk_tokens=256, prompt_tokens=64, muse_probes=3, privleak_texts=2,
                                     finetune_epochs=6, eval_chunks=16)}


# Each method's learning rate where the book protocol chose it (docs/claims.md: the clean protocol, seed 3
# among 1e-5, 2e-5, 5e-5, 1e-4, bars against the original model): without --lr, each method trains at its
# own; any other at the preset's. --lr sets one for every method.
PROTOCOL_LRS = {("smollm2-135m", "book"): "flat=5e-5,ga=2e-5,npo=5e-5"}


def resolve(args: Args) -> Args:
    """FLAT's HP setting, then the model's preset (and, for MUSE-News, its own), for every flag left unset;
    without --lr, each method's learning rate from the protocol (PROTOCOL_LRS)."""
    if args.lr is None and not args.method_lrs:
        args.method_lrs = PROTOCOL_LRS.get((args.model, args.corpus), "")
    muse = MUSE_PRESETS.get(args.model, {}) if args.corpus == "muse-news" else {}
    return flags.fill_defaults(args, {**PAPER, **PRESETS.get(args.model, {}), **muse})


ATTACKS = ("relearn", "quant8", "quant4")  # a continuation has no question to paraphrase or jailbreak


def check(args: Args) -> None:
    attacks.parse(args.attacks, ATTACKS)
    zeroshot.resolve(args.zero_shot, args.zero_shot_data)  # the task files, read and checked
    if args.prompt_tokens >= args.chunk_tokens:
        raise UsageError(f"--prompt-tokens {args.prompt_tokens} must be below --chunk-tokens {args.chunk_tokens}")


def main(argv=None) -> dict:
    args = flags.parse(Args, argv, resolve, check)  # every flag and name checked before any work

    # -- data: the forget text in chunks (prompt + continuation), held-out chunks, WikiText, refusals ------
    tok = models.load_tokenizer(args.model, args.trust_remote_code)  # every model of the run shares it
    d = books.CORPORA[args.corpus](args, tok)
    wiki = books.full_chunks(tok, corpora.read_text(corpora.WIKITEXT), args.chunk_tokens)
    retain_pool, wiki_eval = wiki[:len(wiki) // 2], wiki[len(wiki) // 2:][:args.ppl_chunks]
    book_eval = books.full_chunks(tok, corpora.read_text(corpora.HELD_OUT_BOOK), args.chunk_tokens)[:args.ppl_chunks]
    wiki_passages = [c[:args.chunk_tokens - args.prompt_tokens] for c in retain_pool]  # a continuation's length
    refusals = [tok(" " + r, add_special_tokens=False).input_ids + [tok.eos_token_id] for r in corpora.TEXT_REFUSALS]
    forget, sets = d["forget"], {"forget": d["forget"][:args.eval_chunks], "held_out": d["held"][:args.eval_chunks]}
    run = stages.Run(args, f"runs/hp-{stages.safe_name(args.model)}-{d['name']}")
    run.say(f"[hp] {args.model} | {args.corpus} | {len(forget)} forget chunks, {len(d['held'])} held out, "
            f"{args.chunk_tokens} tokens each | {run.compute.device} {run.compute.precision} | "
            f"{run.world} process(es) | out {run.out}")

    # -- 1. the original model: the base model fine-tuned on the forget text; the reference is the base model
    original = run.stage("finetune", "original", text=data.digest(d["finetune"]))
    ev = Evaluation(run, sets, wiki_eval, book_eval, d["muse"])
    grid, variants = flags.grid(args), flags.variants(args)
    if grid.own:
        run.say(grid.own_line(variants))
    stage = lambda cell: unlearning_stage(run, cell, original, forget, refusals, wiki_passages, retain_pool, ev)  # noqa: E731
    estimate.say_plan(run.say, hp_plan(run, tok, d, original, ev, grid, variants,
                                       {c.label: stage(c)[0] for c in grid.cells(variants)}),
                      models.parameter_count(args.model, args.trust_remote_code), run.compute)  # before any stage
    if run.missing(original):
        run.fit(original, args.model, methods.FINETUNE, None, lr=args.finetune_lr, epochs=(
            corpora.text_epoch(d["finetune"], run.rows_per_step, rng)
            for rng in data.epoch_rngs(args.finetune_epochs, args.seed)))

    # -- 2. unlearning from the original model: each forget chunk's prompt, its continuation and a template
    def unlearn(cell: protocol.Cell, reuse_dropped: bool = False) -> Path:
        path, cell_args, templates, retain = stage(cell)
        if run.missing(path, read_by=ev.readers(cell.label, path) if reuse_dropped else ()):
            _, method, params = cell.variant
            run.fit(path, original, method, params, lr=cell.lr, args=cell_args,
                    progress=ev.progress if cell_args.eval_every else None, epochs=(
                        corpora.chunk_unlearning_epoch(forget, args.prompt_tokens, templates, retain,
                                                       run.rows_per_step, rng)
                        for rng in data.epoch_rngs(args.epochs, cell.seed)))
        return path

    if grid.on:  # a line per unlearning and evaluation stage: done / total, time, estimate left
        run.track(2 * grid.size(len(variants)) + 2)
    unlearned = {}
    for cell in grid.cells(variants):
        unlearned[cell.label] = unlearn(cell, reuse_dropped=args.drop_selection_weights)
        if grid.on:  # each run evaluated as it finishes (zero-shot too): an interrupted grid leaves readable results
            zeroshot.add_zero_shot(run, {cell.label: ev(cell.label, unlearned[cell.label])}, unlearned)
            if args.drop_selection_weights:  # its evaluations written, its weights are no longer read
                run.drop_weights(unlearned[cell.label])
    if not run.is_main:
        return {}  # under torchrun, rank 0 alone evaluates

    # -- 3. evaluation; FLAT's forget quality gap and MUSE's PrivLeak against the reference model --------
    results = evaluated(ev, {"reference": args.model, "original": original, **unlearned})
    ref = results["reference"]["summary"]

    # -- 4. a comparison (a grid): per method the learning rate protocol.BOOK picks on the selection seeds,
    #       rerun on --confirm-seeds; those reruns alone are the result (docs/claims.md)
    compared = {}
    if grid.on:
        zero_shot = flags.ZERO_SHOT.on(args)
        rule = protocol.BOOK_ZERO_SHOT if zero_shot else protocol.BOOK
        thresholds = {"ppl_bar": args.ppl_bar, **({"zero_shot_bar": args.zero_shot_bar} if zero_shot else {})}
        summaries = {name: r["summary"] for name, r in results.items()}
        start = summaries["original"]  # the bars compare with it; the forget quality gap with the reference model
        chosen = protocol.select(rule, protocol.by_method(grid.cells(variants), summaries), start, thresholds)
        confirm = grid.confirmations(variants, chosen)
        confirmed = {cell.label: unlearn(cell) for cell in confirm}
        results.update(evaluated(ev, confirmed, ref))
        unlearned.update(confirmed)
        summaries = {name: r["summary"] for name, r in results.items()}
        compared = {"comparison": protocol.comparison(
            rule, chosen, protocol.by_method(grid.cells(variants), summaries), protocol.by_method(confirm, summaries),
            start, thresholds, grid, start=(start, "original model"))}
    attacked = robustness(run, {"reference": args.model, **unlearned}, ev)  # --attacks
    report = run.finish(results, unlearned, {"original": original}, benchmark="book", **attacked, **compared,
                        title=f"{args.corpus} | {args.model}", **({"muse_articles": len(d["muse"]["articles"])}
                                                                   if d["muse"] else {}))
    print_table(report, args)
    return report


def unlearning_stage(run: stages.Run, cell: protocol.Cell, original, forget: list, refusals: list,
                     wiki_passages: list, retain_pool: list, ev: "Evaluation") -> tuple:
    """A cell's unlearning stage: where it lives, the flags it reads (its learning rate and seed; in a grid,
    --eval-every on the confirmation runs only), its template continuations and its retain chunks."""
    args, (_, method, params) = run.args, cell.variant
    templates = {"refusal": refusals if args.template == "refusal" else wiki_passages,
                 "random": wiki_passages, None: None}[method.template]  # llmu: a random WikiText passage
    retain = retain_pool if method.needs_retain(params) else None
    cell_args = cell.args(args)
    return run.stage("unlearn", cell.label, cell_args, original=original, method=method.name,
                     params=method.read_params(params), rows=data.digest(forget, retain, templates),
                     eval_key=ev.key if cell_args.eval_every else None), cell_args, templates, retain


def hp_plan(run: stages.Run, tok, d: dict, original, ev: "Evaluation", grid: protocol.Grid, variants: list,
            unlearned: dict) -> list[estimate.Phase]:
    """What main will compute, for estimate.say_plan: the original's fine-tuning, each unlearning run (a
    grid's confirmation runs too, decided during the run), each model's evaluation and zero-shot scores.
    Every stream of a method is counted at the chunk length; MUSE's texts at 4 characters a token."""
    args, rps = run.args, run.rows_per_step
    size = models.saved_bytes(args.model, args.precision, args.trust_remote_code)
    chunk = args.chunk_tokens
    finetuned = [estimate.Stage(original, estimate.rows_trained(len(d["finetune"]), args.finetune_epochs, rps,
                                                                args.max_steps) * chunk, disk=size)]
    # an evaluation: each forget and held-out chunk continued from its prompt and scored; perplexity chunks;
    # MUSE's VerbMem prompts continued to 128 tokens, KnowMem's few-shot prompts to 32, PrivLeak's texts
    per_eval = 2 * chunk * sum(len(v) for v in ev.sets.values()) + chunk * (len(ev.wiki_eval) + len(ev.book_eval))
    muse = d["muse"]
    if muse:
        shots = {s: sum(len(q["question"]) + len(q["answer"]) for q in muse[f"knowmem_{s}_icl"]) for s in ("forget", "retain")}
        per_eval += sum(len(p["prompt"]) / 4 + 128 for p in muse["verbmem"])
        per_eval += sum((shots["forget"] + len(q["question"])) / 4 + 32 for q in muse["knowmem_forget"])
        per_eval += sum((shots["retain"] + len(q["question"])) / 4 + 32 for q in muse["knowmem_retain"][:args.eval_chunks])
        per_eval += sum(len(t) / 4 for t in muse["privleak_forget"] + muse["privleak_holdout"])
    rows = estimate.rows_trained(len(d["forget"]), args.epochs, rps, args.max_steps)
    watched = 2 * chunk * len(ev.sets["forget"]) + chunk * len(ev.wiki_eval)

    kept = lambda confirm: 0 if args.drop_selection_weights and not confirm else size  # noqa: E731 (disk a run keeps)

    def cost(path, variant, confirm: bool) -> estimate.Stage:
        m = variant.method
        streams = 1 + (m.template is not None) + m.needs_retain(variant.params)
        evals = rows / rps // args.eval_every if args.eval_every and (confirm or not grid.on) else 0
        return estimate.Stage(path, rows * chunk * streams, rows * chunk * len(m.reference) + evals * watched,
                              kept(confirm))
    confirm = [(estimate.LATER, v) for v in variants for _ in grid.confirm_seeds] if grid.on else []
    runs = [cost(p, c.variant, False) for c, p in zip(grid.cells(variants), unlearned.values())]
    runs += [cost(p, v, True) for p, v in confirm]
    named = {"reference": args.model, "original": original, **unlearned}
    evaluations = [estimate.Stage(ev.stage(n, p), forward=per_eval) for n, p in named.items()]
    evaluations += [estimate.Stage(estimate.LATER, forward=per_eval) for _ in confirm]
    phases = [estimate.Phase("fine-tuning (original)", finetuned, "--max-steps N"),
              estimate.Phase("unlearning", runs, "--max-steps N"),
              estimate.Phase("evaluation", evaluations, "--eval-chunks N, --ppl-chunks N")]
    return phases + zeroshot.plan(run, named, len(confirm))


def evaluated(ev: "Evaluation", paths: dict, ref: dict | None = None) -> dict:
    """Every model's evaluation (zero-shot too, with --zero-shot), with FLAT's forget quality gap and
    MUSE's PrivLeak against the reference model's summary `ref` (default: the "reference" in paths)."""
    results = {name: ev(name, path) for name, path in paths.items()}
    zeroshot.add_zero_shot(ev.run, results, paths)  # --zero-shot: lm-eval's accuracy, FLAT's utility
    ref = ref or results["reference"]["summary"]
    for r in results.values():
        r["summary"] = {**r["summary"], "forget_quality_gap": evaluate.forget_quality_gap(r["summary"], ref),
                        "privleak": mia.privleak(r["summary"]["mia_min_k"], ref["mia_min_k"])}
    return results


def robustness(run: stages.Run, targets: dict, ev: Evaluation) -> dict:
    """--attacks on the reference model and every unlearned one (attacks.py): per model and attack, the
    continuations of the forget chunks (relearn: of the half not relearned) and FLAT's forget quality
    gap against the reference model attacked the same way."""
    args, evaluations = run.args, attacks.parse(run.args.attacks, ATTACKS)
    if not evaluations:
        return {}
    rows_per_step = args.batch_size * args.grad_accum
    out = attacks.attack_models(
        run, targets, evaluations, ev.sets["forget"],
        lambda m, t, e, rows: books.evaluate_continuations(m, t, {"forget": rows, "held_out": []}, args),
        lambda rows, n: (corpora.text_epoch(rows, rows_per_step, rng) for rng in data.epoch_rngs(n, args.seed)),
        eval=ev.key)
    ref = {e: r["summary"] for e, r in out["reference"].items()}
    return {"attacks": {name: {e: {**r["summary"], "forget_quality_gap": evaluate.forget_quality_gap(r["summary"], ref[e]),
                                   "about": r["about"]} for e, r in per.items()} for name, per in out.items()}}


class Evaluation:
    """Each model's evaluation, cached per model and evaluation setting: continuations of the forget and
    held-out chunks (BLEU, ROUGE-L, Min-K% AUC), MUSE's metrics on MUSE-News, WikiText-2 and held-out
    book perplexity; and the in-training evaluation of --eval-every (progress)."""

    def __init__(self, run: stages.Run, sets: dict, wiki_eval: list, book_eval: list, muse: dict | None):
        self.run, self.sets, self.wiki_eval, self.book_eval, self.muse = run, sets, wiki_eval, book_eval, muse
        self.key = run.key("eval", sets=data.digest(sets, wiki_eval, book_eval, muse))
        self._watch = None

    def stage(self, name: str, path) -> Path:
        """Where the evaluation of model `path` lives."""
        return self.run.stage("eval", name, sets=data.digest(self.sets, self.wiki_eval, self.book_eval, self.muse),
                              model=path)

    def readers(self, name: str, path) -> list[Path]:
        """The stages that read a model: its evaluation and, with --zero-shot, its zero-shot scores."""
        return [self.stage(name, path), *zeroshot.stages(self.run, name, path)]

    def __call__(self, name: str, path) -> dict:
        run, args, c = self.run, self.run.args, self.run.compute
        cache = self.stage(name, path)
        if run.missing(cache):
            model, tok = models.load_model(str(path), c.device, c.eval_dtype,
                                           trust_remote_code=args.trust_remote_code)
            r = books.evaluate_continuations(model, tok, self.sets, args)
            if self.muse:
                r = books.merge(r, books.evaluate_muse(model, tok, self.muse, args))
            r["summary"]["wikitext_ppl"] = evaluate.perplexity(model, self.wiki_eval, tok.pad_token_id)
            r["summary"]["held_out_book_ppl"] = evaluate.perplexity(model, self.book_eval, tok.pad_token_id)
            run.write(cache, r)
        return run.read(cache)

    @property
    def progress(self):
        """--eval-every: the forget quality gap against the reference model (evaluated first, before a
        model is loaded to train) and WikiText perplexity, on the forget chunks."""
        if self._watch is None:
            reference = self("reference", self.run.args.model)["summary"]

            def progress(model, tok) -> dict:
                r = books.evaluate_continuations(model, tok, {"forget": self.sets["forget"], "held_out": []}, self.run.args)
                return {"forget_quality_gap": evaluate.forget_quality_gap(r["summary"], reference),
                        "wikitext_ppl": evaluate.perplexity(model, self.wiki_eval, tok.pad_token_id)}
            self._watch = train.once_at_step_0(progress)
        return self._watch


TABLE = [("forget BLEU", "forget_bleu", ".1f"), ("forget ROUGE-L", "forget_rougeL", ".3f"),
         ("held-out BLEU", "held_out_bleu", ".1f"), ("held-out ROUGE-L", "held_out_rougeL", ".3f"),
         ("FQ gap", "forget_quality_gap", ".1f"), ("VerbMem", "verbmem_forget", ".3f"),
         ("KnowMem forget", "knowmem_forget", ".3f"), ("KnowMem retain", "knowmem_retain", ".3f"),
         ("PrivLeak", "privleak", ".1f"), ("WikiText ppl", "wikitext_ppl", ".2f"),
         ("held-out book ppl", "held_out_book_ppl", ".2f"), zeroshot.COLUMN]


def print_table(report: dict, args: Args) -> None:
    ref = report["reference"]
    muse = (f" | VerbMem on {ref['verbmem_items']} probes, KnowMem forget on {ref['knowmem_forget_items']} questions, "
            f"PrivLeak on {ref['privleak_items']} + {ref['privleak_items']} texts, all from "
            f"{report['muse_articles']} articles trained on") if "muse_articles" in report else ""
    tables.print_table(f"Copyright unlearning | {args.corpus} | {args.model} | template: {args.template} | BLEU and "
                       f"FQ gap (|dBLEU| + 100 |dROUGE-L|) on 0-100, ROUGE-L recall and VerbMem/KnowMem ROUGE-L F1 "
                       f"on 0-1{muse}", report, ("reference", "original"), TABLE)
    zeroshot.print_table(report, ("reference", "original"))
    tables.print_attack_tables(report, [("forget BLEU", "forget_bleu", ".1f"), ("forget ROUGE-L", "forget_rougeL", ".3f"),
                                        ("FQ gap", "forget_quality_gap", ".1f")],
                               "FQ gap against the reference model attacked the same way")
    tables.print_comparison(report, TABLE)


if __name__ == "__main__":
    stages.main_guard(main)
