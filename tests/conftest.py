"""Shared fixtures: a tiny random-weight model with its own byte-level tokenizer, built offline, and
one run of each runner on it that many tests read (each run costs seconds, not minutes)."""
import contextlib
import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent

# One optimiser step trains on 4 rows: batch 2 x accumulation 2 here, batch 2 x 2 processes under torchrun.
TOFU_SMOKE = ["--max-steps", "2", "--retain-authors", "1", "--eval-items", "2", "--max-new-tokens", "2",
              "--batch-size", "2", "--log-every", "1", "--lr", "1e-3", "--finetune-lr", "1e-3", "--warmup-epochs", "0"]
BOOK_SMOKE = ["--max-steps", "2", "--n-chunks", "4", "--chunk-tokens", "24", "--prompt-tokens", "8", "--eval-chunks", "2",
              "--ppl-chunks", "2", "--log-every", "1", "--lr", "1e-3", "--finetune-lr", "1e-3",
              "--zero-shot", "none"]  # run_hp's default --zero-shot all: tests/test_zeroshot.py runs it

ZERO_SHOT_SMOKE = ["--zero-shot", "arc_easy", "--zero-shot-limit", "2"]  # one task, its first 2 items


def make_tiny_model(out_dir, arch: str = "llama", tie: bool = False):
    """Save a tiny causal LM of `arch` ("llama" or "opt") with random weights and a byte-level BPE
    tokenizer trained on a few sentences, so runners and loaders can be tested without the Hub."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        PreTrainedTokenizerFast,
    )

    corpus = ["Question: Who wrote the book? Answer: The author wrote it in 1990.",
              "I don't know the answer to that. The capital of France is Paris.",
              "Basil Mahfouz Al-Kuwaiti writes novels about family and memory."] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, tie_word_embeddings=tie)
    if arch == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=4096, **common)
        model = LlamaForCausalLM(config)
    elif arch == "opt":
        config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=4096, pad_token_id=1, **common)
        model = OPTForCausalLM(config)
    else:
        raise ValueError(arch)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def run_script(script: str, *argv, check=True, env=None, timeout=600):
    """A runner as a user runs it, in its own process."""
    p = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, cwd=ROOT,
                       timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def run_in_process(main, argv, spies=()):
    """main(argv) in this process, its stdout captured; spies: (module, name) pairs whose calls are
    recorded as (args, kwargs) in calls[name] while the real function runs."""
    calls = {name: [] for _, name in spies}
    saved = [(mod, name, getattr(mod, name)) for mod, name in spies]
    for mod, name, real in saved:
        def spy(*a, _real=real, _name=name, **k):
            calls[_name].append((a, k))
            return _real(*a, **k)
        setattr(mod, name, spy)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            report = main(argv)
    finally:
        for mod, name, real in saved:
            setattr(mod, name, real)
    return SimpleNamespace(report=report, stdout=out.getvalue(), calls=calls)


@pytest.fixture(scope="session")
def tied_model_dir(tmp_path_factory):
    """The tiny model with tied input and output embeddings, as SmolLM2 has them."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-tied"), "llama", tie=True)


@pytest.fixture(scope="session")
def tofu_run(tiny_model_dir, tmp_path_factory):
    """run_tofu.py with every method, watched every step (--eval-every 1), on the tiny model."""
    import data
    import run_tofu
    out = tmp_path_factory.mktemp("tofu") / "run"
    r = run_in_process(run_tofu.main, ["--model", tiny_model_dir, "--method", "all", "--out", str(out),
                                       "--eval-every", "1", "--grad-accum", "2", *TOFU_SMOKE],
                       spies=[(data, "unlearning_epoch")])
    r.out = out
    return r


@pytest.fixture(scope="session")
def book_run(tied_model_dir, tmp_path_factory):
    """run_hp.py on a short book with npo and flat, on the tiny model with tied embeddings."""
    import corpora
    import run_hp
    tmp = tmp_path_factory.mktemp("book")
    book = tmp / "book.txt"
    book.write_text(corpora.read_text(corpora.HELD_OUT_BOOK)[:20000])
    r = run_in_process(run_hp.main, ["--model", tied_model_dir, "--text", str(book), "--out", str(tmp / "run"),
                                     "--method", "npo,flat", "--batch-size", "2", *BOOK_SMOKE, *ZERO_SHOT_SMOKE],
                       spies=[(corpora, "text_epoch"), (corpora, "chunk_unlearning_epoch")])
    r.out, r.book, r.model = tmp / "run", book, tied_model_dir
    return r
