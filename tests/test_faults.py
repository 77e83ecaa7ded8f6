"""Fault injection: bad flags and data fail with one clear line before any work; caches are keyed by
content, damaged ones recomputed, stale temporaries removed; non-finite metrics never reach results
silently; one run per directory; Ctrl-C leaves every finished stage usable."""
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from conftest import BOOK_SMOKE, ROOT, TOFU_SMOKE, ZERO_SHOT_SMOKE, run_in_process, run_script

import run_harmful
import run_hp
import run_tofu
import stages
from bench import speed as bench


def fails_cleanly(main, argv, capsys, out: Path, *needles):
    """main(argv) exits 2 with exactly one `error:` line naming what is wrong, and creates nothing."""
    with pytest.raises(SystemExit) as e:
        stages.main_guard(partial(main, argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    for needle in needles:
        assert needle in lines[0], (argv, needle, lines[0])
    assert not out.exists(), argv


BAD_TOFU = [(["--max-grad-norm", "-1"], "--max-grad-norm -1.0: must be > 0"),
            (["--max-steps", "0"], "--max-steps 0: must be >= 1"), (["--epochs", "0"], "--epochs 0"),
            (["--batch-size", "-3"], "--batch-size -3"), (["--grad-accum", "-2"], "--grad-accum -2"),
            (["--weight-decay", "-1"], "--weight-decay -1.0: must be >= 0"), (["--lr", "-1"], "--lr -1: must be in (0, 3.4e38]"),
            (["--lr", "nan"], "--lr nan"), (["--eval-items", "0"], "--eval-items 0"),
            (["--max-new-tokens", "0"], "--max-new-tokens 0"), (["--eval-batch-size", "0"], "--eval-batch-size 0"),
            (["--retain-authors", "0"], "--retain-authors 0"), (["--eval-every", "-1"], "--eval-every -1"),
            (["--warmup-epochs", "-1"], "--warmup-epochs"), (["--precision", "fp16"], "--precision fp16"),
            (["--device", "foo"], "unknown device 'foo'"), (["--split", "forget02"], "unknown split 'forget02'"),
            (["--method", "flat,gd2"], "unknown loss 'gd2'"), (["--method", "flat:hellinger"], "unknown divergence"),
            (["--method", "npo:kl"], "only flat takes a divergence"), (["--divergence", "hellinger"], "unknown divergence"),
            (["--model", "gpt-17"], "unknown model 'gpt-17'"), (["--target-model", "./nowhere"], "unknown model"),
            (["--retain-logs", "missing/dir"], "file not found")]
BAD_HP = [(["--n-chunks", "-1"], "--n-chunks -1"), (["--held-out-fraction", "-0.2"], "--held-out-fraction -0.2"),
          (["--held-out-fraction", "1.5"], "in (0, 1)"), (["--prompt-tokens", "-5"], "--prompt-tokens -5"),
          (["--chunk-tokens", "1"], "--chunk-tokens 1"), (["--prompt-tokens", "30", "--chunk-tokens", "24"], "must be below"),
          (["--corpus", "books"], "--corpus books"), (["--template", "c4"], "--template c4"),
          (["--muse-probes", "-1"], "--muse-probes -1"), (["--epochs", "0"], "--epochs 0"),
          (["--corpus", "muse-news", "--text", "x.txt"], "does nothing without --corpus book")]
BAD_HARMFUL = [(["--steps", "0"], "--steps 0"), (["--eval-prompts", "0"], "--eval-prompts 0"),
               (["--task", "jokes"], "--task jokes"), (["--judge", "no/such-judge-dir/x"], "unknown model"),
               (["--forget-items", "0"], "--forget-items 0"), (["--method", "llmu2"], "unknown method 'llmu2'; valid names: dpo, dpo-safe")]


@pytest.mark.parametrize("argv,needle", BAD_TOFU, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_tofu_flags(argv, needle, tiny_model_dir, tmp_path, capsys):
    model = [] if "--model" in argv else ["--model", tiny_model_dir]
    fails_cleanly(run_tofu.main, [*model, "--out", str(tmp_path / "x"), *argv], capsys, tmp_path / "x", needle)


@pytest.mark.parametrize("argv,needle", BAD_HP, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_hp_flags(argv, needle, tiny_model_dir, tmp_path, capsys):
    fails_cleanly(run_hp.main, ["--model", tiny_model_dir, "--out", str(tmp_path / "x"), *argv], capsys,
                  tmp_path / "x", needle)


@pytest.mark.parametrize("argv,needle", BAD_HARMFUL, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_harmful_flags(argv, needle, tiny_model_dir, tmp_path, capsys):
    fails_cleanly(run_harmful.main, ["--model", tiny_model_dir, "--out", str(tmp_path / "x"), *argv], capsys,
                  tmp_path / "x", needle)


def test_a_judge_layer_the_model_does_not_have_fails_before_any_work(tiny_model_dir, tmp_path, capsys):
    fails_cleanly(run_harmful.main, ["--model", tiny_model_dir, "--out", str(tmp_path / "x"), "--judge-layer", "99"],
                  capsys, tmp_path / "x", "--judge-layer 99", "hidden states 0..2")


def test_bad_out_directories_fail_before_any_work(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--out", str(tmp_path / "file")], capsys,
                  tmp_path / "nothing", "--out", "is not a directory")
    fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--out", str(tmp_path / "file" / "sub")], capsys,
                  tmp_path / "nothing", "is not a directory")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--out", str(tmp_path / "ro" / "x")], capsys,
                      tmp_path / "ro" / "x", "not writable")


def test_a_directory_that_is_not_a_model_is_named(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    fails_cleanly(run_hp.main, ["--model", str(tmp_path / "notamodel"), "--out", str(tmp_path / "x")], capsys,
                  tmp_path / "x", "is a directory but not a model: it has no config.json")


def test_errors_are_one_line_without_a_traceback_from_the_command_line(tiny_model_dir, tmp_path):
    p = run_script("run_tofu.py", "--model", tiny_model_dir, "--out", str(tmp_path / "x"), "--lr", "-1", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.strip() == "error: --lr -1: must be in (0, 3.4e38] (a float32 number)"
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Data problems: DataErrors naming the file, before any model loads
# ---------------------------------------------------------------------------------------------

def _tofu_copy(tmp_path) -> Path:
    d = tmp_path / "tofu"
    d.mkdir()
    for f in (ROOT / "vendored" / "tofu").glob("*.jsonl"):
        (d / f.name).write_bytes(f.read_bytes())
    return d


def test_bad_data_files_fail_naming_the_file(tiny_model_dir, tmp_path, capsys):
    d = _tofu_copy(tmp_path)
    forget = (d / "forget01.jsonl").read_text().splitlines()
    cases = [
        ("forget01.jsonl", "\n".join(forget[:2] + [json.dumps({"question": "q", "answer": "  "})]), "forget01.jsonl:3",
         "field 'answer' is empty"),
        ("forget01.jsonl", "\n".join(forget[:2] + ['{"question": 3, "answer": "a"}']), "forget01.jsonl:3", "question"),
        ("forget01.jsonl", "", "the TOFU set forget01 is empty", ""),
    ]
    for name, text, *needles in cases:
        (d / name).write_text(text)
        fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--data-dir", str(d), "--out", str(tmp_path / "x")],
                      capsys, tmp_path / "x", *needles)
        (d / "forget01.jsonl").write_text("\n".join(forget))
    (d / "forget01.jsonl").write_bytes("\n".join(forget[:3]).encode("utf-16"))
    fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--data-dir", str(d), "--out", str(tmp_path / "x")],
                  capsys, tmp_path / "x", "forget01.jsonl:1: not UTF-8 (it looks like UTF-16)")
    (d / "forget01.jsonl").write_text("\n".join(forget))
    pert = [json.loads(line) for line in (d / "forget01_perturbed.jsonl").read_text().splitlines()]
    for bad, needle in [([], "'perturbed_answer' must be a non-empty list"), (pert[1]["perturbed_answer"][:3],
                                                                               "row 2 has 3 perturbed answers")]:
        rows = [dict(pert[0]), dict(pert[1], perturbed_answer=bad), *pert[2:]]
        (d / "forget01_perturbed.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--data-dir", str(d), "--out", str(tmp_path / "x")],
                      capsys, tmp_path / "x", "forget01_perturbed.jsonl", needle)


def test_bad_books_fail_naming_the_file(tiny_model_dir, tmp_path, capsys):
    text = "Alice was beginning to get very tired of sitting by her sister on the bank. " * 40 + " caf\u00e9"
    for name, content, needle in [("latin1.txt", text.encode("latin-1"), "not UTF-8"),
                                  ("utf16.txt", text.encode("utf-16"), "it looks like UTF-16"),
                                  ("nul.txt", b"\x00" * 4000, "NUL bytes"),
                                  ("binary.txt", bytes(range(1, 32)) * 200, "not printable"),
                                  ("empty.txt", b"  \n", "the file is empty")]:
        (tmp_path / name).write_bytes(content)
        fails_cleanly(run_hp.main, ["--model", tiny_model_dir, "--text", str(tmp_path / name), "--out",
                                    str(tmp_path / "x")], capsys, tmp_path / "x", name, needle)
    fails_cleanly(run_hp.main, ["--model", tiny_model_dir, "--text", str(tmp_path), "--out", str(tmp_path / "x")],
                  capsys, tmp_path / "x", "is a directory")


def test_bad_truthfulqa_csv_fails_naming_the_file(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "harm"
    d.mkdir()
    for f in (ROOT / "vendored" / "harmful" / "pku_saferlhf").glob("*.jsonl"):
        (d / f.name).write_bytes(f.read_bytes())
    (d / "TruthfulQA.csv").write_bytes("Question,Best Answer,Correct Answers,Incorrect Answers\nqu\u00e9,a,b,c\n"
                                       .encode("latin-1"))
    fails_cleanly(run_harmful.main, ["--model", tiny_model_dir, "--data-dir", str(d), "--out", str(tmp_path / "x")],
                  capsys, tmp_path / "x", "TruthfulQA.csv:2: not UTF-8")


# ---------------------------------------------------------------------------------------------
# Caches: keyed by content, damaged ones recomputed, temporaries removed, one run per directory
# ---------------------------------------------------------------------------------------------

def test_data_edited_in_place_retrains_and_damage_is_recovered(book_run):
    """The book run's directory: edit the book in place, damage a cached evaluation and a cached model,
    leave the temporary directory a killed save leaves, then rerun."""
    out, book = book_run.out, book_run.book
    argv = ["--model", book_run.model, "--text", str(book), "--out", str(out), "--method", "npo", "--batch-size", "2",
            *BOOK_SMOKE, *ZERO_SHOT_SMOKE]
    again = run_in_process(run_hp.main, argv)
    assert "[cache] finetune-original: " in again.stdout and "[cache] unlearn-npo: " in again.stdout
    evals = sorted(out.glob("eval-reference-*.json"))
    evals[0].write_text(evals[0].read_text()[:50])                    # a truncated evaluation cache
    stale = out / f"{stages.TMP_PREFIX}unlearn-npo-x-123"                # what a killed save leaves
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    npo_dir = Path(book_run.report["dirs"]["npo"])
    (npo_dir / "model.safetensors").write_bytes(b"\x00" * 64)          # a damaged model
    r = run_in_process(run_hp.main, argv)
    assert not stale.exists() and "[cleanup] removed 1 temporary" in r.stdout
    assert f"{evals[0]}: does not parse" in r.stdout and list(out.glob(f"{evals[0].name}.damaged-*"))
    assert f"{npo_dir}: damaged" in r.stdout and "[unlearn-npo] step" in r.stdout
    assert r.report["reference"] == book_run.report["reference"]       # recomputed, the same numbers
    book.write_text(book.read_text().replace("Alice", "Alicia"))       # the book edited in place
    r = run_in_process(run_hp.main, argv)
    assert "[finetune-original] step" in r.stdout and "[unlearn-npo] step" in r.stdout


def test_non_finite_metrics_are_null_with_a_warning(book_run, monkeypatch):
    import evaluate
    monkeypatch.setattr(evaluate, "perplexity", lambda *a, **k: float("nan"))
    argv = ["--model", book_run.model, "--text", str(book_run.book), "--out", str(book_run.out.parent / "nan"),
            "--method", "npo", "--batch-size", "2", *BOOK_SMOKE]
    r = run_in_process(run_hp.main, argv)
    results = json.loads((book_run.out.parent / "nan" / "results.json").read_text())  # strict JSON parses
    assert results["methods"]["npo"]["wikitext_ppl"] is None and results["reference"]["wikitext_ppl"] is None
    assert "methods.npo.wikitext_ppl: nan" in results["warnings"] and "reference.wikitext_ppl: nan" in results["warnings"]
    assert "NaN (!)" in r.stdout and "warning: not finite" in r.stdout


def test_a_second_run_on_the_same_directory_fails_clearly(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stages.lock_run_dir(out)  # this test process plays the first run
    try:
        p = run_script("run_tofu.py", "--model", tiny_model_dir, "--out", str(out), *TOFU_SMOKE, check=False)
    finally:
        stages._LOCKS.pop().close()
    assert p.returncode == 2 and f"another run is using {out}" in p.stderr and "Traceback" not in p.stderr
    assert not list(out.glob("target-*"))


def test_ctrl_c_exits_130_and_keeps_finished_stages(tiny_model_dir, tmp_path):
    """SIGINT during unlearning: the fine-tuned models, finished before, stay usable and a rerun
    starts from them."""
    out = tmp_path / "run"
    argv = ["--model", tiny_model_dir, "--out", str(out), "--retain-authors", "1", "--batch-size", "2",
            "--finetune-epochs", "1", "--finetune-lr", "1e-3"]
    p = subprocess.Popen([sys.executable, str(ROOT / "run_tofu.py"), *argv, "--epochs", "50"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob("retain-*/config.json")) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert stderr.strip().endswith("interrupted: every finished stage is saved; the same command resumes from there")
    assert "Traceback" not in stderr and not list(out.glob("unlearn-*"))
    target, retain = next(out.glob("target-*")), next(out.glob("retain-*"))
    assert stages.load_cached_model_or_none(target) and stages.load_cached_model_or_none(retain)
    again = run_script("run_tofu.py", *argv, "--epochs", "1", "--eval-items", "1", "--max-new-tokens", "1")
    assert f"[cache] finetune-target: {target}" in again.stdout
    assert f"[cache] finetune-retain: {retain}" in again.stdout


def test_bench_rejects_unknown_names_and_zero(tmp_path, capsys):
    for argv, needle in [(["--methods", "flatt"], "unknown loss 'flatt'"), (["--models", "gpt-17"], "unknown model"),
                         (["--steps", "0"], "must be >= 1"), (["--batch-size", "0"], "must be >= 1"),
                         (["--device", "tpu"], "device"), (["--out", str(tmp_path)], "is a directory, not a file"),
                         (["--out", str(tmp_path / "file" / "r.md")], "is not a directory")]:
        (tmp_path / "file").write_text("a file, not a directory")
        with pytest.raises(SystemExit) as e:
            bench.main(argv if "--out" in argv else [*argv, "--out", str(tmp_path / "r.md")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err, (argv, err)
    assert not (tmp_path / "r.md").exists()


def test_a_cached_evaluation_that_parses_but_is_incomplete_is_recomputed(tmp_path, capsys):
    cache = tmp_path / "eval-x-1234.json"
    cache.write_text("{}")
    assert stages.read_cache(cache, required=("summary", "items")) is None
    assert "is incomplete (no summary, items)" in capsys.readouterr().out and list(tmp_path.glob("*.damaged-*"))
    cache.write_text('{"summary": {}, "items": {}}')
    assert stages.read_cache(cache, required=("summary", "items")) == {"summary": {}, "items": {}}


def _broken_copy(src, dst, change) -> str:
    import shutil
    shutil.copytree(src, dst)
    change(Path(dst))
    return str(dst)


def test_a_model_directory_that_would_not_load_or_would_load_wrongly_fails_before_any_work(tiny_model_dir, tmp_path,
                                                                                           capsys):
    import safetensors.torch
    weights = Path(tiny_model_dir) / "model.safetensors"

    def rename_keys(d):
        state = safetensors.torch.load_file(str(d / "model.safetensors"))
        safetensors.torch.save_file({f"other.{k}": v for k, v in state.items()}, str(d / "model.safetensors"))

    def no_special_tokens(d):
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        for k in ("eos_token", "pad_token", "bos_token"):
            cfg.pop(k, None)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        (d / "special_tokens_map.json").unlink(missing_ok=True)
    cases = [
        ("config.json", lambda d: (d / "config.json").write_text("{not json"), "config.json does not describe a model"),
        ("config.json", lambda d: (d / "config.json").write_text("{}"), "config.json does not describe a model"),
        ("config.json", lambda d: (d / "config.json").write_text('{"model_type": "gpt17"}'), "does not describe"),
        ("no weights", lambda d: (d / "model.safetensors").unlink(), "no *.safetensors weights"),
        ("pickled", lambda d: ((d / "model.safetensors").rename(d / "pytorch_model.bin")), "are pickled"),
        ("truncated", lambda d: (d / "model.safetensors").write_bytes(weights.read_bytes()[:1000]), "is damaged"),
        ("foreign weights", rename_keys, "its weights lack"),
        ("no tokenizer", lambda d: [p.unlink() for p in d.glob("tokenizer*")], "tokenizer does not load"),
        ("no pad, no eos", no_special_tokens, "neither a pad nor an EOS token"),
    ]
    for i, (what, change, needle) in enumerate(cases):
        bad = _broken_copy(tiny_model_dir, tmp_path / f"bad{i}", change)
        fails_cleanly(run_tofu.main, ["--model", bad, "--out", str(tmp_path / "x")], capsys, tmp_path / "x", needle)
        fails_cleanly(run_tofu.main, ["--target-model", bad, "--out", str(tmp_path / "x")], capsys, tmp_path / "x",
                      needle)


def test_a_pipe_as_a_book_or_a_data_file_is_refused_at_once(tiny_model_dir, tmp_path, capsys):
    fifo = tmp_path / "book.txt"
    os.mkfifo(fifo)
    fails_cleanly(run_hp.main, ["--model", tiny_model_dir, "--text", str(fifo), "--out", str(tmp_path / "x")], capsys,
                  tmp_path / "x", "is not a regular file")
    d = _tofu_copy(tmp_path)
    (d / "forget01.jsonl").unlink()
    os.mkfifo(d / "forget01.jsonl")
    fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--data-dir", str(d), "--out", str(tmp_path / "x")],
                  capsys, tmp_path / "x", "is not a regular file")


def test_questions_and_answers_longer_than_the_context_fail_before_any_work(tiny_model_dir, tmp_path, capsys):
    def short_context(d):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 32}))
    small = _broken_copy(tiny_model_dir, tmp_path / "small", short_context)
    fails_cleanly(run_tofu.main, ["--model", small, "--out", str(tmp_path / "x")], capsys, tmp_path / "x",
                  "--max-new-tokens 200: ", "reads at most 32 tokens")
    fails_cleanly(run_tofu.main, ["--model", small, "--max-new-tokens", "4", "--out", str(tmp_path / "x")], capsys,
                  tmp_path / "x", "the model reads at most 32")


def test_odd_out_paths_and_a_full_disk_end_in_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import errno
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--out", str(dangling)], capsys, tmp_path / "nowhere",
                  "a symbolic link to nothing")
    fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--out", str(tmp_path / ("x" * 300))], capsys,
                  tmp_path / ("y" * 10), "longer than 255 bytes")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "results.json")
    monkeypatch.setattr(run_tofu.flags, "parse", full)
    with pytest.raises(SystemExit) as e:
        stages.main_guard(partial(run_tofu.main, []))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: results.json: No space left on device") and "\n" not in err


def test_stage_keys_hold_a_models_and_a_books_contents_not_their_paths(tiny_model_dir, book_run, tmp_path):
    import shutil

    import safetensors.torch
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "run"
    argv = ["--method", "ga", "--out", str(out), *TOFU_SMOKE]
    run_in_process(run_tofu.main, ["--model", str(model), *argv])
    moved = tmp_path / "elsewhere"
    shutil.copytree(model, moved)                                   # the same model at another path: reused
    r = run_in_process(run_tofu.main, ["--model", str(moved), *argv])
    assert "[finetune-" not in r.stdout and "[unlearn-" not in r.stdout
    state = safetensors.torch.load_file(str(model / "model.safetensors"))
    safetensors.torch.save_file({k: v * 1.01 for k, v in state.items()}, str(model / "model.safetensors"),
                                metadata={"format": "pt"})          # re-saved in place: every stage again
    r = run_in_process(run_tofu.main, ["--model", str(model), *argv])
    assert "[finetune-target] step" in r.stdout and "[unlearn-ga] step" in r.stdout
    # the same book at another path, and another held-out fraction (the forget chunks stay the same)
    book = tmp_path / "copy.txt"
    book.write_bytes(book_run.book.read_bytes())
    base = ["--model", book_run.model, "--out", str(book_run.out), "--method", "npo", "--batch-size", "2", *BOOK_SMOKE]
    r = run_in_process(run_hp.main, [*base, "--text", str(book)])
    assert "[finetune-" not in r.stdout and "[unlearn-" not in r.stdout
    r = run_in_process(run_hp.main, [*base, "--text", str(book), "--held-out-fraction", "0.3"])
    assert "[finetune-" not in r.stdout and "[unlearn-" not in r.stdout
    assert r.report["original"]["held_out_bleu"] is not None                 # evaluated on the new held-out part


def test_a_causal_lm_as_the_judge_is_refused_before_any_work(tiny_model_dir, tmp_path, capsys):
    fails_cleanly(run_harmful.main, ["--model", tiny_model_dir, "--judge", tiny_model_dir, "--out", str(tmp_path / "x")],
                  capsys, tmp_path / "x", f"--judge {tiny_model_dir}: not a harmfulness classifier")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowing is the point
def test_a_ctrl_c_that_a_library_swallows_still_ends_the_run(capsys):
    class Swallows:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)   # the KeyboardInterrupt is raised here, and Python drops it
            time.sleep(0.05)

    def main():
        Swallows()
        time.sleep(0.1)
        return "finished as if nothing happened"
    with pytest.raises(SystemExit) as e:
        stages.main_guard(main)
    assert e.value.code == 130 and "interrupted:" in capsys.readouterr().err


def ctrl_c_during_the_imports(tiny_model_dir, tmp_path, delay: float = 0.0):
    """run_tofu.py in a fresh process, SIGINT once it says its signals are deferred (FLAT_READY_FILE: the
    libraries are still importing then), plus `delay`: (exit code, stderr, whether --out was created)."""
    ready, out = tmp_path / "ready", tmp_path / "x"
    ready.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, str(ROOT / "run_tofu.py"), "--model", tiny_model_dir, "--out", str(out)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "FLAT_READY_FILE": str(ready)})
    deadline = time.time() + 60
    while not ready.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    return p.returncode, err, out.exists()


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])   # at once, and further into the imports (about 2 s alone)
def test_ctrl_c_while_the_libraries_import_is_one_line_and_exit_130(delay, tiny_model_dir, tmp_path):
    code, err, made = ctrl_c_during_the_imports(tiny_model_dir, tmp_path, delay)
    assert code == 130 and "Traceback" not in err and err.strip() == "interrupted: nothing was started", err
    assert not made


def test_a_cached_model_that_parses_but_is_damaged_is_recomputed(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["--model", tiny_model_dir, "--method", "ga", "--out", str(out), *TOFU_SMOKE]
    first = run_in_process(run_tofu.main, argv)

    def zero_the_weights(d):                      # the header intact, the tensor bytes zeroed
        raw = (d / "model.safetensors").read_bytes()
        header = 8 + int.from_bytes(raw[:8], "little")
        (d / "model.safetensors").write_bytes(raw[:header] + bytes(len(raw) - header))
    damages = [lambda d: (d / "config.json").write_text("{}"),
               lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text()[:100]),
               lambda d: (d / "train_log.json").write_text("[{"),
               zero_the_weights]
    for damage in damages:
        target = Path(first.report["dirs"]["target"])
        damage(target)
        r = run_in_process(run_tofu.main, argv)
        assert f"[cache] {target}: damaged" in r.stdout and "[finetune-target] step" in r.stdout, r.stdout[-2000:]
        assert r.report["target"] == first.report["target"]           # recomputed: the same numbers


def test_empty_tofu_sets_and_an_offline_hub_judge_fail_before_any_work(tiny_model_dir, tmp_path, capsys):
    d = _tofu_copy(tmp_path)
    for name in ("retain99", "holdout01", "world_facts_perturbed", "retain_perturbed"):
        text = (d / f"{name}.jsonl").read_text()
        (d / f"{name}.jsonl").write_text("")
        fails_cleanly(run_tofu.main, ["--model", tiny_model_dir, "--data-dir", str(d), "--out", str(tmp_path / "x")],
                      capsys, tmp_path / "x", f"the TOFU set {name} is empty")
        (d / f"{name}.jsonl").write_text(text)
    t = time.time()
    fails_cleanly(run_harmful.main, ["--model", tiny_model_dir, "--judge", "someorg/some-judge", "--out",
                                     str(tmp_path / "x")], capsys, tmp_path / "x", "the Hub is unreachable")
    assert time.time() - t < 30


def test_non_finite_per_item_values_are_null_in_eval_items(book_run, monkeypatch):
    import evaluate
    monkeypatch.setattr(evaluate, "bleu", lambda p, r: [float("nan")] * len(p))
    out = book_run.out.parent / "nan-items"
    r = run_in_process(run_hp.main, ["--model", book_run.model, "--text", str(book_run.book), "--out", str(out),
                                     "--method", "npo", "--batch-size", "2", *BOOK_SMOKE])
    items = json.loads((out / "eval_items.json").read_text())          # strict JSON: no NaN
    assert items["npo"]["forget"]["bleu"] == [None] * len(items["npo"]["forget"]["bleu"])
    assert any("forget_bleu" in w for w in r.report["warnings"])


def test_a_judge_cache_holding_nothing_is_refitted(tiny_model_dir, tmp_path):
    argv = ["--model", tiny_model_dir, "--out", str(tmp_path / "run"), "--max-steps", "1", "--forget-items", "8",
            "--steps", "1", "--batch-size", "2", "--eval-prompts", "2", "--max-new-tokens", "2",
            "--judge-train-items", "40", "--judge-eval-items", "20"]
    first = run_in_process(run_harmful.main, argv)
    cache = next((tmp_path / "run").glob("judge-probe-*.json"))
    cache.write_text("{}")
    again = run_in_process(run_harmful.main, argv)
    assert f"[cache] {cache}: is incomplete" in again.stdout
    assert again.report["judge"] == first.report["judge"]
