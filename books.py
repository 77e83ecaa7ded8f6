"""Copyright unlearning's two corpora, what differs between them and nothing else: a book (--text
files, default the vendored Frankenstein) and MUSE-News (Shi et al. 2024). Per corpus: the forget text in
chunks (what is fine-tuned on, what is forgotten, what is held out), and how a model's continuations
are scored (BLEU and ROUGE-L recall on book chunks; VerbMem, KnowMem and PrivLeak's texts on MUSE-News).
`args` is run_hp.Args.

    d = books.CORPORA[args.corpus](args, tok)   # {"finetune", "forget", "held", "muse", "name"}
    r = books.evaluate_continuations(model, tok, {"forget": d["forget"], "held_out": d["held"]}, args)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import corpora
import evaluate
import mia
import models
from errors import Choices, UsageError


def full_chunks(tok, text: str, chunk_tokens: int) -> list[list[int]]:
    """The text's consecutive chunks of exactly chunk_tokens tokens (a shorter last one dropped)."""
    return [c for c in corpora.chunk_ids(tok(text, add_special_tokens=False).input_ids, chunk_tokens)
            if len(c) == chunk_tokens]


def book_data(args, tok) -> dict:
    """A book (--text files, default the vendored Frankenstein) in chunks: the end held out
    (--held-out-fraction), the first --n-chunks chunks of the rest the forget set, fine-tuned on too."""
    ids = [i for p in (args.text or [corpora.DEFAULT_BOOK]) for i in tok(corpora.read_text(p),
                                                                       add_special_tokens=False).input_ids]
    check_context(args, args.chunk_tokens)
    forget, held = corpora.split_chunks(corpora.chunk_ids(ids, args.chunk_tokens), args.n_chunks,
                                        args.held_out_fraction, args.chunk_tokens)
    return {"finetune": forget, "forget": forget, "held": held, "muse": None,
            "name": "-".join(Path(p).stem for p in args.text) or "book"}


def muse_news_data(args, tok) -> dict:
    """MUSE-News: the articles the scored probes come from, joined as MUSE cut its probes from them, in
    chunks; every token is fine-tuned on (the short last chunk too), every chunk longer than a prompt is
    a forget chunk; the probes are scored in evaluate_muse, and nothing is held out as book chunks."""
    muse = corpora.muse_forget_set(corpora.load_muse(), args.muse_probes or None, args.privleak_texts or None)
    # a VerbMem prompt (about 900 tokens) and its continuation of up to 128 tokens must fit the context
    check_context(args, max([args.chunk_tokens] + [len(tok(p["prompt"], add_special_tokens=False).input_ids) + 129
                                                   for p in muse["verbmem"]]), ", MUSE's VerbMem prompts")
    chunks = corpora.chunk_ids(tok(muse["text"], add_special_tokens=False).input_ids, args.chunk_tokens)
    return {"finetune": chunks, "forget": [c for c in chunks if len(c) > args.prompt_tokens], "held": [],
            "muse": muse, "name": "muse-news"}


CORPORA = Choices("corpus", {"book": book_data, "muse-news": muse_news_data})


def check_context(args, longest: int, why: str = "") -> None:
    context = models.context_length(args.model, args.trust_remote_code)
    if context is not None and longest > context:
        raise UsageError(f"{args.model} reads at most {context} tokens; this run needs {longest} "
                               f"(--chunk-tokens {args.chunk_tokens}{why})")


def merge(a: dict, b: dict) -> dict:
    return {"summary": {**a["summary"], **b["summary"]}, "items": {**a["items"], **b["items"]}}


def evaluate_continuations(model, tok, sets: dict[str, list[list[int]]], args) -> dict:
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


def evaluate_muse(model, tok, muse: dict, args) -> dict:
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
