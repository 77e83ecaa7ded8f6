"""Run directories and stages: the object that owns a run (Run: its directory, locked and cleaned;
device and precision; seeds; stage keys derived from the resolved flags and data contents; cached
stages, damaged ones recovered; timings; the report), atomic writes, strict results, and the one
guard that turns known failures into one `error:` line. What each guarantees: docs/reliability.md.

    run = stages.Run(args, "runs/tofu-...")                 # a runner's main, with its method in between:
    path = run.stage("unlearn", "flat", target=target, rows=data.digest(forget))
    if run.missing(path):                                     # not cached (or damaged): compute it
        train.fit(run, path, ...)                             # ... which ends in run.save(path, ...)
    report = run.finish(results, unlearned, dirs)             # results.json, eval_items.json, plots
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file

import adapters
import distributed
import errors
import flags
import methods
import models
import plots
import protocol
import train
from bench import memplan
from errors import DataError, ModelLoadError, UnknownName, UsageError


def setup_run(args, default_out: str) -> tuple[Path, models.Compute]:
    """The run directory (created, locked against a second run, cleared of temporary directories a
    killed run left), device and precision (models.resolve_compute; under torchrun, this rank's
    device) and the Python and torch seeds."""
    out = Path(args.out or default_out)
    try:
        compute = models.resolve_compute(args.device, args.precision, args.gradient_checkpointing)
    except ValueError as e:
        raise UsageError(str(e)) from None
    flags.check_out_dir(out, args)
    compute = dataclasses.replace(compute, device=distributed.init(compute.device))
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        lock_run_dir(out)
        remove_stale_temporaries(out)
        if models.cache_dir().is_dir():  # another process may be converting the default model right now
            remove_stale_temporaries(models.cache_dir(), older_than_s=3600)
    distributed.barrier()
    from transformers.utils import logging as hf_logging  # heavy (seconds to import): where a model or config is built
    hf_logging.disable_progress_bar()  # one progress bar per training stage is enough
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return out, compute


class Run:
    """One run of a runner: everything that is not the method. Its directory (created, locked,
    cleaned; config.json written at once), device and precision (run.compute), torchrun ranks, the
    rows one optimiser step trains on, stage keys and caches, timings, and the report at the end."""

    def __init__(self, args, default_out: str):
        self.args = args
        self.out, self.compute = setup_run(args, default_out)
        self.world, self.is_main = distributed.world(), distributed.is_main()
        self.rows_per_step = args.batch_size * args.grad_accum * self.world
        self.times: dict[str, float] = {}
        self._stages: dict[Path, tuple[str, str]] = {}   # path -> (kind, name)
        self._started: dict[Path, float] = {}
        self._progress: protocol.Progress | None = None
        self._ticked: set[Path] = set()
        if self.is_main:
            write_json(self.out / "config.json", dataclasses.asdict(args))

    def say(self, msg: str) -> None:
        say(msg)

    def key(self, kind: str, args=None, **reads) -> dict:
        """A stage's key: every resolved flag of stage `kind` (flags.arg's only=) as `args` has them
        (default the run's; a grid's cell has its own learning rate and seed), the compute, and the
        data and upstream models it reads (a model by model_id; a read of None is left out)."""
        reads = {k: model_id(v) if isinstance(v, Path) or k in ("model", "original", "target") else v
                 for k, v in reads.items() if v is not None}
        return stage_key(args or self.args, kind, self.compute, **reads)

    def stage(self, kind: str, name: str, args=None, **reads) -> Path:
        """Where stage `kind` (flags.STAGES) of `name` lives: a directory (a model) or, for "eval",
        "attack" and "zeroshot", a JSON file, named by a hash of self.key(kind, args, **reads). The
        names are those of every earlier version of this project, so old run directories are reused."""
        prefix = {"finetune": name, "unlearn": f"unlearn-{safe_name(name)}", "eval": f"eval-{name}",
                  "attack": f"attack-{safe_name(name)}", "zeroshot": f"zeroshot-{safe_name(name)}"}[kind]
        path = stage_dir(self.out, prefix, self.key(kind, args, **reads))
        # appended, not with_suffix: a name with a dot in it (flat@lr=0.0001,...) would lose what follows the dot
        path = path.with_name(path.name + ".json") if kind in ("eval", "attack", "zeroshot") else path
        self._stages[path] = (kind, name)
        return path

    def stage_name(self, path: Path) -> str:
        """How logs and progress bars call a stage: finetune-target, unlearn-flat, ..."""
        kind, name = self._stages[path]
        return f"{kind}-{name}"

    def track(self, total: int) -> None:
        """From now on, a progress line after each unlearning and evaluation stage, cached or computed
        (a grid's many: `total` of them)."""
        self._progress = protocol.Progress(total, self.say, "unlearning and evaluation stages")

    def _tick(self, path: Path, computed: bool) -> None:
        if self._progress is not None and self._stages[path][0] in ("unlearn", "eval") and path not in self._ticked:
            self._ticked.add(path)  # once each: a stage may be asked for twice (the retain model's evaluation)
            self._progress.tick(self.stage_name(path), computed)

    def missing(self, path, read_by: Iterable[Path] = ()) -> bool:
        """Whether a stage must be computed (and its timer starts): not for a usable cached stage (a
        damaged one is moved aside, see load_cached_model_or_none and read_cache), nor for None or a
        model the user named (a str, not a stage Path). read_by: the stages that read a model; when
        they are all cached, a model whose weights were dropped (drop_weights) counts as cached."""
        if not isinstance(path, Path):
            return False
        read_by = list(read_by)
        dropped = path.suffix != ".json" and (path / WEIGHTS_DROPPED).exists() and bool(read_by) and all(
            read_cache(p, required=("summary", "items")) is not None for p in read_by)
        cached = (read_cache(path, required=("summary", "items")) is not None if path.suffix == ".json"
                  else dropped or load_cached_model_or_none(path))
        if cached and path.suffix != ".json":
            self.say(f"[cache] {self.stage_name(path)}: {path}" + (" (weights dropped; what reads them is cached)"
                                                                  if dropped else ""))
        if cached:
            self._tick(path, computed=False)
        else:
            self._started[path] = time.time()
        return not cached

    def _timed(self, path: Path) -> None:
        kind, name = self._stages[path]
        self.times[f"{kind}_{name}_s"] = round(time.time() - self._started.pop(path), 1)
        self._tick(path, computed=True)

    def fit(self, path: Path, start, method: methods.Method, params: methods.LossParams | None,
            epochs: Iterable[list[dict]], lr: float, progress: Callable | None = None,
            max_steps: int | None = None, args=None) -> None:
        """One training stage: the optimiser steps of `epochs` planned (train.plan_steps), checked to fit
        the GPU before any weights load (CUDA), a copy of the model `start` (and the method's frozen
        reference) built by training_model, trained by train.train with `method`, saved to `path`.
        max_steps: default --max-steps; args: the flags the loop reads (default the run's)."""
        args = args or self.args
        torch.manual_seed(args.seed)  # what the stage draws (LoRA's A, dropout) from its own seed, cached or not
        plan = train.plan_steps(epochs, args.batch_size, max_steps or args.max_steps, self.world, distributed.rank())
        memplan.check_fits(start, method.name, plan, self.compute, args, self.world)
        model, tok, ref = training_model(start, self.compute, args.trust_remote_code, reference=bool(method.reference),
                                         lora=flags.lora(args))
        log, evals = train.train(model, tok, plan, method, params, lr, args, self.compute, self.stage_name(path), ref,
                                 progress)
        self.save(path, model, tok, log, evals, args)

    def drop_weights(self, path: Path) -> None:
        """A comparison's selection run, once every stage that reads it is written
        (--drop-selection-weights): its weight files deleted, its logs, cost and tokenizer kept, and a
        marker left so that missing() reuses what read it. The marker goes first and the weights' sha256
        last: interrupted midway, the directory is reused only where what reads it is cached, and is
        otherwise recomputed (its weights incomplete or gone), never loaded half deleted."""
        if self.is_main and is_saved_model(path):
            write_json(path / WEIGHTS_DROPPED, {"dropped_at": time.strftime("%Y-%m-%d %H:%M:%S")})
            for f in [*path.glob("*.safetensors"), *path.glob("adapter/*.safetensors"), path / WEIGHT_SUMS]:
                f.unlink(missing_ok=True)

    def save(self, path: Path, model, tok, log: list[dict], evals: list[dict], args=None, **extra) -> None:
        """A trained model with its training log, in-training evaluations, flags (`args`, default the
        run's: a grid's cell records its own learning rate and seed) and what it cost (COST: the stage's
        wall-clock time from run.missing to here and its optimiser steps), atomically. `extra`: more
        JSON files (name without .json -> object)."""
        kind, name = self._stages[path]
        extra = {"train_log.json": log, COST: {"train_s": round(time.time() - self._started[path], 1),
                                               "optimizer_steps": log[-1]["step"] if log else 0},
                 **{f"{k}.json": v for k, v in extra.items()}}
        if kind == "unlearn":
            extra.update({"eval_log.json": evals, "run_config.json": {**dataclasses.asdict(args or self.args),
                                                                       "method": name}})
        save_model_atomic(model, tok, path, extra)
        self._timed(path)

    def write(self, path: Path, result: dict) -> None:
        """A computed evaluation, cached atomically."""
        write_cache(path, result)
        self._timed(path)

    def read(self, path) -> dict | None:
        return read_json(path) if isinstance(path, Path) and path.exists() else None

    def finish(self, results: dict[str, dict], unlearned: dict[str, Path], dirs: dict, **extra) -> dict:
        """The report: each evaluated model's summary (the unlearned ones under "methods", the one of a
        single --method also as "unlearned"), `extra` keys, training logs, timings and directories;
        written as results.json (strict: a non-finite number becomes null, listed in "warnings"),
        with every item under eval_items.json, config.json, and the pictures (plots.draw_all)."""
        one = next(iter(unlearned)) if len(unlearned) == 1 else None
        alias = lambda table: {"unlearned": table[one]} if one else {}  # noqa: E731
        methods = {label: results[label]["summary"] for label in unlearned}
        report = {**{n: r["summary"] for n, r in results.items() if n not in unlearned}, **extra,
                  "methods": methods, **alias(methods),
                  "training": {label: training_logs(p) for label, p in unlearned.items()}, "timings_s": self.times,
                  "dirs": {**{k: str(v) for k, v in dirs.items()}, **{k: str(p) for k, p in unlearned.items()},
                           **alias({k: str(p) for k, p in unlearned.items()})}}
        report, warnings = finite_report(report)
        report["warnings"] = warnings
        write_json(self.out / "config.json", dataclasses.asdict(self.args))
        write_json(self.out / "results.json", report)
        items, _ = finite_report({name: r["items"] for name, r in results.items()})  # strict too: null per item
        write_json(self.out / "eval_items.json", {**items, **alias(items)})
        plots.draw_all(report, self.out)
        if report.get("comparison"):  # grids that share one --out to reuse its runs each keep their own report
            kept = comparison_dir(self.out, report["comparison"])
            write_json(kept / "results.json", report)
            plots.frontier(report, kept / "frontier.png")
        return report


def comparison_dir(out: Path, comparison: dict) -> Path:
    """Where a grid's report is kept besides results.json, which the last command to write into `out`
    owns: comparisons/METHODS_lr_LRS_seeds_SEEDS_confirm_SEEDS/ (results.json, frontier.png)."""
    listed = lambda xs: ",".join(f"{x:g}" for x in xs)  # noqa: E731
    return out / "comparisons" / safe_name(f"{','.join(comparison['chosen'])}_lr_{listed(comparison['lrs'])}_seeds_"
                                           f"{listed(comparison['seeds'])}_confirm_{listed(comparison['confirm_seeds'])}")


def training_model(name, compute: models.Compute, trust_remote_code: bool = False, reference: bool = False,
                   lora: adapters.Lora | None = None):
    """(model, tokenizer, frozen reference or None) to train, in the run's precision, with gradient
    checkpointing as the run decided (models.resolve_compute). Without LoRA the reference is a frozen
    copy in the compute dtype; with it (--lora), the model itself with its adapters off. Under
    torchrun the models are sharded (distributed.shard) after the copy is made."""
    sharded = distributed.world() > 1
    model, tok = models.load_model(str(name), "cpu" if sharded else compute.device, compute.train_dtype,
                                   trust_remote_code=trust_remote_code)
    models.checkpointing(model, on=compute.gradient_checkpointing)
    if lora:
        model = adapters.with_lora(model, lora)
    ref = None
    if reference:
        ref = adapters.AdaptersOff(model) if lora else models.frozen_copy(model, compute.eval_dtype)
    if sharded:
        for m in (model, ref) if ref is not None and not lora else (model,):
            distributed.shard(m, frozen=m is ref)
            m.to(compute.device)
    return model, tok, ref


_LOCKS = []  # open lock files: the lock lasts as long as the process


def lock_run_dir(out: Path) -> None:
    """Hold an exclusive lock on OUT/.lock for the life of the process: a second run on the same
    directory fails at once instead of doing the same work and racing the first one's writes."""
    while _LOCKS:  # a process runs one run at a time (tests call several main()s in one process)
        _LOCKS.pop().close()
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UsageError(f"another run is using {out} (it holds {out / '.lock'}); wait for it to finish "
                           f"or pass another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS.append(f)


TMP_PREFIX = models.TMP_PREFIX


def remove_stale_temporaries(root: Path, older_than_s: float = 0.0) -> list[Path]:
    """Remove what an interrupted save left under root (this project's temporary names only, at
    the top level): under a locked run directory nothing else can be writing them."""
    removed = []
    now = time.time()
    for p in root.glob(TMP_PREFIX + "*"):
        if now - p.stat().st_mtime >= older_than_s:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        print(f"[cleanup] removed {len(removed)} temporary file(s) an interrupted run left in {root}")
    return removed


def safe_name(name: str) -> str:
    """A model name or path as one directory-name component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def main_guard(main) -> None:
    """Run a runner's main: known failures become one `error:` line and exit 2; Ctrl-C or SIGTERM
    exits 130 with every finished stage left usable (each is written atomically)."""
    handler = lambda signum, frame: errors.interrupted(signum)  # noqa: E731
    previous = signal.signal(signal.SIGTERM, handler), signal.signal(signal.SIGINT, handler)
    deferred = errors.interrupted_so_far()  # a Ctrl-C while the libraries imported (errors.defer_interrupts)
    errors.clear_interrupt()
    try:
        if deferred:
            print("\ninterrupted: nothing was started", file=sys.stderr)
            raise SystemExit(130)
        main()
        errors.stop_if_interrupted()  # a Ctrl-C that a library swallowed (in a __del__) still ends the run
    except KeyboardInterrupt:
        if distributed.is_main():  # under torchrun, one line for the run, not one per rank
            print("\ninterrupted: every finished stage is saved; the same command resumes from there",
                  file=sys.stderr)
        raise SystemExit(130)
    except (FloatingPointError, ModelLoadError, DataError, UsageError, UnknownName) as e:
        fail(str(e))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        fail(f"{e.filename or 'a file'}: {e.strerror}; every stage finished before is saved, the one being "
             f"written is not: free space, then run the same command")
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        errors.clear_interrupt()  # handled: nothing after this run may stop for it
        distributed.close()


def fail(msg: str) -> None:
    if distributed.is_main():  # under torchrun every rank finds the same error: rank 0 says it
        print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# Stages, results and files
# ---------------------------------------------------------------------------------------------

def stage_key(args, stage: str, compute: models.Compute, **extra) -> dict:
    """Everything a stage's output depends on: every resolved flag except those declared for other
    stages only (arg(..., only=...)) and the loss hyperparameters (an unlearning stage holds those
    its method reads, methods.Method.read_params, passed in `extra`); the device type and resolved
    precision; and `extra` (data digests, upstream stage names)."""
    loss_fields = {f.name for f in dataclasses.fields(methods.LossParams)}
    key = {}
    for f in dataclasses.fields(args):
        only, keyed = f.metadata.get("only"), f.metadata.get("keyed")
        if keyed is not None and not keyed(args):
            continue
        if f.name not in loss_fields and (only is None or stage in only):
            value = getattr(args, f.name)
            key[f.name] = model_id(value) if f.name in MODEL_FLAGS and value else value
    return {**key, "compute": f"{torch.device(compute.device).type}-{compute.precision}", **extra}


MODEL_FLAGS = ("model", "target_model", "retain_model", "judge", "similarity")  # may name a model directory
_CONTENT_IDS: dict = {}


def model_id(path) -> str:
    """How a stage key names a model: a stage directory by its name (a hash of its own key); a model
    directory of the user's by its contents (config.json and the sha256 of its weights), so that a
    model re-saved in place gets new stages and the same model at another path reuses them; an alias,
    a Hub id or another setting by what was passed. Hashes are kept per file sizes and times."""
    if isinstance(path, Path):
        return path.name
    p = str(path)
    if p in models.MODELS or not os.path.isdir(p) or not os.path.exists(os.path.join(p, "config.json")):
        return p
    files = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(p).iterdir()) if f.is_file())
    if (p, files) not in _CONTENT_IDS:
        h = hashlib.sha256(Path(p, "config.json").read_bytes() + json.dumps(weight_sums(Path(p))).encode())
        _CONTENT_IDS[(p, files)] = f"model-sha256:{h.hexdigest()[:16]}"
    return _CONTENT_IDS[(p, files)]


def stage_dir(root: Path, name: str, key: dict) -> Path:
    """A stage's directory, named by a hash of everything its output depends on, so that a rerun
    with the same settings finds it and other settings get their own."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return root / f"{name}-{digest}"


def is_saved_model(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def load_cached_model_or_none(path: Path) -> bool:
    """Whether a cached model directory is usable: it would load (models.check_model_dir: config,
    weights holding every parameter, tokenizer), its weights are the bytes that were saved (their
    sha256 in weights.sha256, written by save_model_atomic) and its logs parse. A damaged one is moved
    aside, reported, and the stage recomputed."""
    if not is_saved_model(path):
        return False
    try:
        models.check_model_dir(str(path))
        recorded = path / WEIGHT_SUMS
        if recorded.exists():  # stages saved before weights.sha256 existed are trusted as they are
            if read_json(recorded) != weight_sums(path):
                raise ValueError("its weights are not the bytes that were saved (sha256 differs)")
        for log in ("train_log.json", "eval_log.json"):
            if (path / log).exists():
                read_json(path / log)
        return True
    except Exception as e:  # anything that fails to check: the directory cannot be trusted
        aside = move_aside(path)
        print(f"[cache] {path}: damaged ({str(e).splitlines()[0]}); moved to {aside.name}, recomputing")
        return False


def move_aside(path: Path) -> Path:
    """Rename a damaged cache to NAME.damaged-TIME (-2, -3, ... when one of that second exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = path.with_name(f"{path.name}.damaged-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    os.replace(path, aside)
    return aside


WEIGHT_SUMS = "weights.sha256"
WEIGHTS_DROPPED = "weights.dropped.json"  # Run.drop_weights: a selection run kept as logs and evaluations


def weight_sums(path: Path) -> dict[str, str]:
    """sha256 of each safetensors file of a model directory (about 1 GB/s)."""
    sums = {}
    for f in sorted(path.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        sums[f.name] = h.hexdigest()
    return sums


def read_cache(path: Path, required: tuple[str, ...] = ()):
    """A cached JSON result, or None when there is none. One that does not parse (a truncated write
    from a tool other than this project, a full disk), or parses but lacks a `required` key (`{}`), is
    reported, moved aside and recomputed."""
    if not path.exists():
        return None
    try:
        obj, why = read_json(path), None
    except (ValueError, UnicodeDecodeError) as e:
        obj, why = None, f"does not parse ({e})"
    missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
    if why is None and missing:
        why = f"is incomplete (no {', '.join(missing)})"
    if why is None:
        return obj
    aside = move_aside(path)
    print(f"[cache] {path}: {why}; moved to {aside.name}, recomputing")
    return None


def save_model_atomic(model, tokenizer, path: Path, extra: dict[str, object]) -> None:
    """save_pretrained (safetensors) into a temporary directory renamed into place at the end, so an
    interrupted run never leaves a half-written model that a rerun would trust. Under torchrun every
    rank gathers the full state dict and rank 0 writes it."""
    state = distributed.full_state_dict(model) if distributed.is_sharded(model) else None
    lora = adapters.is_lora(model)
    if lora and distributed.is_main():  # merged into plain weights; the adapter itself saved beside them
        config = model.peft_config["default"]
        state, adapter = adapters.merge_lora(state if state is not None else model.state_dict(),
                                             config.lora_alpha / config.r)
        model = model.get_base_model()
    if state is not None and getattr(model.config, "tie_word_embeddings", False):
        for key in getattr(model, "_tied_weights_keys", None) or ():  # e.g. lm_head.weight: the embedding's copy
            state.pop(key, None)
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-"))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a saved model is an ordinary directory
        model.save_pretrained(tmp, state_dict=state)
        if lora:
            save_adapter(tmp / "adapter", config, adapter)
        tokenizer.save_pretrained(tmp)
        for name, obj in {**extra, WEIGHT_SUMS: weight_sums(tmp)}.items():
            write_json(tmp / name, obj)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    distributed.barrier()


def save_adapter(path: Path, config, adapter: dict) -> None:
    """The LoRA adapter as peft saves one (adapter_config.json, adapter_model.safetensors; keys without
    the adapter's name), for PeftModel.from_pretrained(base_model, path)."""
    path.mkdir()
    config.save_pretrained(path)
    save_file({k.replace(".default.", "."): v.contiguous() for k, v in adapter.items()},
              str(path / "adapter_model.safetensors"))


def write_cache(path: Path, obj) -> None:
    """A stage's cached result, written atomically. Python's own reader takes NaN, so a non-finite
    metric is kept as it came out (results.json, strict, turns it into null with a warning)."""
    write_json(path, obj, allow_nan=True)


def write_json(path: Path, obj, allow_nan: bool = False) -> None:
    """Write strict JSON atomically (temporary file, then rename). A non-finite float would be
    written as a bare NaN that strict parsers reject: it is an error here (see finite_report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str, allow_nan=allow_nan)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_report(report, path: str = "") -> tuple[object, list[str]]:
    """The report with every NaN or infinite number replaced by None, and the list of where they were
    (e.g. "unlearned.fluency_ppl"), so that results.json stays strict JSON and says what is missing."""
    warnings = []

    def clean(x, where):
        if isinstance(x, float) and not math.isfinite(x):
            warnings.append(f"{where}: {x}")
            return None
        if isinstance(x, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(x)]
        return x
    return clean(report, path), warnings


def say(msg: str) -> None:
    """Print on rank 0 only (every rank runs the same code under torchrun)."""
    if distributed.is_main():
        print(msg, flush=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


COST = "cost.json"  # in a trained stage's directory: what it cost when it ran (a cached stage keeps it)


def cost(stage) -> dict | None:
    """A trained stage's cost when it ran ({"train_s", "optimizer_steps", ...}); None for a model that is
    not a stage of this project or was trained before costs were recorded."""
    p = Path(stage) / COST
    return read_json(p) if isinstance(stage, Path) and p.exists() else None


def training_logs(stage: Path) -> dict:
    """A trained stage's logs: {"log": per-step records, "evals": in-training evaluations}."""
    return {"log": read_json(stage / "train_log.json"),
            "evals": read_json(stage / "eval_log.json") if (stage / "eval_log.json").exists() else []}


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
