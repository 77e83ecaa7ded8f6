"""Flags: one dataclass per runner, each field with its help, the stages whose output it changes
(for stage keys, stages.stage_key) and its valid range, checked before any work (validate).

    @dataclass
    class Args(flags.RunArgs):                     # RunArgs: the flags every runner has
        lr: float | None = arg(None, "unlearning learning rate", only=("unlearn",), check=POSITIVE)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Callable, NamedTuple

import adapters
import distributed
import methods
import models
import protocol
from errors import NON_NEGATIVE, POSITIVE, Check, UnknownName, UsageError

STAGES = ("finetune", "unlearn", "eval", "attack", "zeroshot")


AT_LEAST_1 = Check(lambda v: v >= 1, ">= 1")
FRACTION = Check(lambda v: 0 < v < 1, "in (0, 1)")
# A learning rate is multiplied into fp32 (and bf16, same exponent range) updates: past 3.4e38 it overflows.
LEARNING_RATE = Check(lambda v: 0 < v <= 3.4e38, "in (0, 3.4e38] (a float32 number)")
SEED = Check(lambda v: 0 <= v < 2**32, "in [0, 2^32) (numpy's and torch's seed range)")


def one_of(*names: str) -> Check:
    return Check(lambda v: v in names, "one of " + ", ".join(names))


class Switch(NamedTuple):
    """The feature a flag belongs to: how an error names the switch that turns it on, and whether it is on."""
    says: str
    on: Callable[[object], bool]


def _attack_named(*names: str) -> Callable:
    return lambda a: a.attacks == "all" or bool(set(names) & {s.strip() for s in a.attacks.split(",")})


LORA = Switch("--lora R", lambda a: a.lora > 0)
RELEARN = Switch("--attacks relearn (or all)", _attack_named("relearn"))
QUANT = Switch("--attacks quant8 or quant4 (or all)", _attack_named("quant8", "quant4"))
ZERO_SHOT = Switch("--zero-shot TASKS", lambda a: a.zero_shot not in ("", "none"))
SEEDS = Switch("--seeds S,S,... (the selection seeds)", lambda a: bool(a.seeds))
# a comparison: several learning rates or seeds per method (protocol.py); on the flags as given
GRID = Switch("a grid: --lr A,B,... or --seeds S,S,...", lambda a: isinstance(a.lr, tuple) or bool(a.seeds))


def arg(default, help: str, only: tuple | None = None, check: Check | None = None, keyed: Callable | None = None,
        needs: Switch | None = None, grid: bool = False):
    """A flag: a dataclass field with its one-line help. only: the stages (STAGES) whose output the
    flag changes, for stage keys; None means every stage (the safe default: a flag wrongly left
    in a key costs a cache miss, one wrongly left out a stale result). check: its valid range.
    keyed(args): whether the flag is in keys at all (a feature's flags only while it is on, so
    that adding the feature renamed no stage of a run without it). needs: the feature the flag
    belongs to; set while that feature is off, it would do nothing, and is refused (check_switches).
    grid: the flag also takes a comma list (--lr 1e-4,3e-4: one run per value, protocol.py); one value
    stays a number, so that a run without a grid reads and keys it as before."""
    unknown = set(only or ()) - set(STAGES)
    if unknown:  # a typo here would leave the flag out of its stage's key: a stale cache, silently
        raise ValueError(f"flag {help[:40]!r}: only={only} names no stage {sorted(unknown)}; "
                         f"stages: {', '.join(STAGES)}")
    return dataclasses.field(default=default, metadata={"help": help, "only": only, "check": check, "keyed": keyed,
                                                        "needs": needs, "grid": grid})


TRAINING = ("finetune", "unlearn", "attack")  # the stages that train a model
lora_on = lambda args: args.lora > 0  # noqa: E731


@dataclasses.dataclass
class RunArgs(methods.LossParams):
    """The flags every runner has; each runner's Args extends this (and methods.LossParams, whose fields
    are the loss hyperparameters)."""
    model: str = arg("smollm2-135m", "model alias (models.MODELS), local directory or Hub id")
    method: str = arg("flat", "unlearning loss(es): a key of methods.LOSSES, a comma-separated list "
                              "(flat:kl,flat:js,npo: FLAT with each divergence) or 'all'", only=())
    lr: float | None = arg(None, "unlearning learning rate, or a comma list of them: a comparison of methods, each at "
                                 "its own learning rate (docs/claims.md)", only=("unlearn",), check=LEARNING_RATE,
                           grid=True)
    method_lrs: str = arg("", "each method's own learning rate, METHOD=LR,... (flat:kl=1e-4,ga=3e-5); methods not "
                              "named use --lr (default: the protocol's choices for the model, when its runner has them "
                              "and --lr is not given; docs/claims.md)", only=())
    weight_decay: float = arg(0.01, "AdamW weight decay", check=NON_NEGATIVE)
    max_grad_norm: float = arg(1.0, "gradient clipping norm", check=POSITIVE)
    max_steps: int | None = arg(None, "cap on optimiser steps in every training stage (smoke runs)", check=AT_LEAST_1)
    eval_every: int = arg(0, "evaluate every N optimiser steps of unlearning, and at step 0 (0: never)",
                          only=("unlearn",), check=NON_NEGATIVE)
    out: str | None = arg(None, "run directory (default: runs/RUNNER-MODEL-...)", only=())
    device: str | None = arg(None, "cpu, cuda or cuda:N (default: cuda when available)", only=())
    precision: str = arg("auto", "fp32, mixed (fp32 weights, bf16 autocast) or bf16 (bf16 weights); auto: mixed "
                                 "on CUDA, fp32 elsewhere", only=(), check=Check(lambda v: v in models.PRECISIONS,
                                                                                 "one of " + ", ".join(models.PRECISIONS)))
    gradient_checkpointing: bool | None = arg(None, "recompute activations in backward (default: on for CUDA)",
                                              only=())
    trust_remote_code: bool = arg(False, "allow model code from the Hub", only=())
    seed: int = arg(0, "seed of data order and random draws (of every stage; with --seeds, of the fine-tuning "
                       "and the attacks)", check=SEED)
    seeds: str = arg("", "a comparison's selection seeds, a comma list: every method x --lr x seed is an "
                         "unlearning run from the same fine-tuned model (docs/claims.md)", only=())
    confirm_seeds: str = arg("", "fresh seeds (none of --seeds) on which each method's learning rate chosen by "
                                 "the selection rule is rerun; only these runs are the reported result", only=(),
                             needs=SEEDS)
    drop_selection_weights: bool = arg(False, "a comparison: delete each selection run's weights once it is "
                                              "evaluated, keeping its logs and evaluation (a rerun reuses them), so "
                                              "that only the confirmation runs' models stay on disk; not with "
                                              "--attacks", only=(), needs=GRID)
    log_every: int = arg(5, "optimiser steps between log lines", only=(), check=AT_LEAST_1)
    attacks: str = arg("none", "after evaluation, attack every unlearned model and the one that never saw the data: "
                               "relearn, quant8, quant4, prompt (paraphrase and jailbreak, where the data has "
                               "questions), a comma-separated list, 'all' or 'none' (docs/robustness.md)", only=())
    relearn_steps: int | None = arg(None, "relearn attack: optimiser steps on half the forget set (default: one epoch "
                                          "of it)", only=("attack",), check=AT_LEAST_1, needs=RELEARN)
    relearn_lr: float | None = arg(None, "relearn attack: learning rate (default: the runner's preset)",
                                   only=("attack",), check=LEARNING_RATE, needs=RELEARN)
    quant_group: int = arg(128, "quant attacks: weights per quantization group", only=("attack",), check=AT_LEAST_1,
                           needs=QUANT)
    lora: int = arg(0, "LoRA rank in every training stage (0: off, full fine-tuning): only the adapters train, "
                       "a reference model is the same model with them off, the saved model has them merged",
                    only=TRAINING, check=NON_NEGATIVE, keyed=lora_on)
    lora_alpha: float | None = arg(None, "LoRA alpha, the adapters' scale being alpha / rank (default: 2 x rank)",
                                   only=TRAINING, check=POSITIVE, keyed=lora_on, needs=LORA)
    lora_dropout: float = arg(0.0, "LoRA dropout on the adapters' input", only=TRAINING,
                              check=Check(lambda v: 0 <= v < 1, "in [0, 1)"), keyed=lora_on, needs=LORA)
    lora_targets: str = arg("all-linear", "LoRA: the linear layers adapted, 'all-linear' (all but the output layer) "
                                          "or comma-separated module names (q_proj,v_proj)", only=TRAINING,
                            keyed=lora_on, needs=LORA)
    skip_memory_check: bool = arg(False, "on CUDA, train even when the memory planner says a stage will not fit "
                                          "the GPU's free memory", only=())
    zero_shot: str = arg("none", "zero-shot utility of every evaluated model through lm-evaluation-harness (FLAT's "
                                 "tasks, zeroshot.py): boolq, rte, winogrande, arc_challenge, arc_easy, openbookqa, piqa, "
                                 "truthfulqa_mc1, truthfulqa_mc2 or any lm-eval task (from the Hub), a comma-separated "
                                 "list, 'all' (those with local files) or 'none'", only=("zeroshot",))
    zero_shot_limit: int | None = arg(None, "zero-shot: the first N items of each task (0: all)", only=("zeroshot",),
                                      check=NON_NEGATIVE, needs=ZERO_SHOT)
    zero_shot_data: str | None = arg(None, "zero-shot: a folder laid out as vendored/zeroshot, read before it (rte, "
                                           "whose licence keeps it out of the repository: rte/validation.jsonl)",
                                     only=(), needs=ZERO_SHOT)  # the stage key holds the files' sha256


def parse_args(cls, argv=None):
    """Parse flags into the dataclass `cls`: one flag per field (--max-steps and --max_steps both work),
    its help and default in --help. Unknown flags fail."""
    hints = typing.get_type_hints(cls)
    extra = [f"  {name:<11} {m.help}" for name, m in getattr(cls, "METHODS", {}).items() if m.help]
    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0],
                                     epilog="--method also takes:\n" + "\n".join(extra) if extra else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if typing.get_origin(typ) in (typing.Union, types.UnionType):
            typ = next(t for t in typing.get_args(typ) if t is not type(None))      # Optional[X] -> X
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "from the model's preset" if default is None else repr(default)
        kwargs = dict(default=default, dest=f.name, help=f"{f.metadata.get('help', '')} (default: {shown})")
        if f.metadata.get("grid"):
            kwargs.update(type=str)  # a number or a comma list, read by _grid_value below
        elif typ is bool:
            kwargs.update(type=_boolean, nargs="?", const=True)
        elif typing.get_origin(typ) is list:  # --text A B and --text A --text B both give [A, B]
            kwargs.update(type=typing.get_args(typ)[0], nargs="+", action="extend")
        else:
            kwargs.update(type=typ)
        names = dict.fromkeys([f"--{f.name.replace('_', '-')}", f"--{f.name}"])
        parser.add_argument(*names, **kwargs)
    args, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unknown arguments {rest}")
    for f in dataclasses.fields(cls):
        if f.metadata.get("grid") and isinstance(getattr(args, f.name), str):
            setattr(args, f.name, _grid_value(getattr(args, f.name), f))
    return cls(**vars(args))


def _grid_value(text: str, f: dataclasses.Field):
    """A grid flag's value: one number as a float, a comma list as a tuple of floats (each checked)."""
    values = protocol.numbers(text, float, f.name.replace("_", "-"), f.metadata.get("check"))
    return values[0] if len(values) == 1 else values


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def validate(args) -> None:
    """Every flag against its declared range, before any work: raises ValueError naming the flag,
    its value and the valid range."""
    for f in dataclasses.fields(args):
        value, check = getattr(args, f.name), f.metadata.get("check")
        if check is None or value is None:
            continue
        ok, says = check  # a Check, or flat's (test, text) pair for the loss hyperparameters
        for v in value if isinstance(value, tuple) else (value,):  # a grid flag's list: every entry
            bad_number = isinstance(v, float) and not math.isfinite(v)
            if bad_number or not ok(v):
                raise UsageError(f"--{f.name.replace('_', '-')} {v}: must be {says}")


def given(args, f: dataclasses.Field) -> bool:
    """Whether a flag was set to something other than its default (what the command line said)."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return getattr(args, f.name) != default


def check_switches(args) -> None:
    """Every flag acts or is refused: a setting of a feature that is off (arg's needs=), or a loss
    hyperparameter that no method of --method reads, would do nothing while config.json recorded it."""
    for f in dataclasses.fields(args):
        needs = f.metadata.get("needs")
        if needs is not None and given(args, f) and not needs.on(args):
            raise UsageError(f"--{f.name.replace('_', '-')} {getattr(args, f.name)} does nothing without "
                             f"{needs.says}: pass that too, or drop it")
    read = {name for v in variants(args) for name in v.method.read_params(v.params)}
    for f in dataclasses.fields(methods.LossParams):
        if given(args, f) and f.name not in read:
            readers = [n for n, m in methods.LOSSES.items() if f.name in m.params]
            raise UsageError(f"--{f.name.replace('_', '-')} {getattr(args, f.name)} does nothing for --method "
                             f"{args.method}: only {', '.join(readers)} read it"
                             + (" (npo and simnpo with --npo-retain)" if f.name == "retain_weight" else ""))


def parse(cls, argv=None, resolve: Callable | None = None, check: Callable | None = None):
    """Every flag, preset and name a runner reads, checked before any work: parse_args, then
    resolve(args) (the runner's protocol and the model's preset fill the flags left at None), the
    declared ranges (validate), the loss and divergence names, the model name, and check(args) for
    what only that runner has. Raises UsageError (or UnknownName) with one line to show."""
    args = parse_args(cls, argv)
    check_switches(args)  # on the flags as given: presets below fill settings of features that are off
    if resolve is not None:
        args = resolve(args)
    validate(args)
    methods.DIVERGENCES.check(args.divergence)
    for name, _ in grid(args).own:  # a misspelt method would silently train at --lr
        table, (loss, _, divergence) = getattr(args, "METHODS", methods.LOSSES), name.partition(":")
        table.check(loss)
        if divergence:
            methods.DIVERGENCES.check(divergence)
    variants(args)
    models.check_name(args.model, args.trust_remote_code)
    if args.lora:
        adapters.check_lora(args.model, lora(args), args.trust_remote_code)  # from its config: no weights
    new_tokens = getattr(args, "max_new_tokens", None)
    context = new_tokens and models.context_length(args.model, args.trust_remote_code)
    if context and new_tokens >= context:
        raise UsageError(f"--max-new-tokens {new_tokens}: {args.model} reads at most {context} tokens, the prompt "
                         f"included")
    if args.eval_every and distributed.launched():
        raise UsageError("--eval-every runs in one process only (evaluation is not sharded)")
    if grid(args).on and distributed.launched():
        raise UsageError("a comparison (--lr A,B,... or --seeds) runs in one process: its confirmation runs are "
                         "chosen after the evaluations, which are not sharded")
    if args.out:
        check_out_dir(Path(args.out), args)
    if args.drop_selection_weights and args.attacks not in ("", "none"):
        raise UsageError("--drop-selection-weights with --attacks: the attacks start from every unlearned model's "
                         "weights; drop one of them")
    if grid(args).on:
        check_grid_disk(args)
    if check is not None:
        check(args)
    return args


INPUT_FLAGS = ("model", "target_model", "retain_model", "retain_logs", "data_dir", "text", "judge", "similarity",
               "zero_shot_data")


def check_out_dir(out: Path, args=None) -> None:
    """Fail unless `out` is, or can be created as, a writable directory (nothing is created here) that
    neither is nor contains an input the flags name (a model directory, a book, a data directory):
    the run writes config.json and results there, which would overwrite a model's own config."""
    for name in INPUT_FLAGS:
        value = getattr(args, name, None)
        for given in value if isinstance(value, list) else [value]:
            if isinstance(given, str) and os.path.exists(given):
                p, o = Path(given).resolve(), out.resolve()
                if p == o or o in p.parents:
                    raise UsageError(f"--out {out}: it holds --{name.replace('_', '-')} {given}; pass another --out")
    if any(len(part.encode()) > 255 for part in out.parts):
        raise UsageError(f"--out {out}: a name in it is longer than 255 bytes")
    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out {out}: a symbolic link to nothing ({os.readlink(out)})")
    p = out
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if p == out and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if not p.is_dir():
        raise UsageError(f"--out {out}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {p} is not writable")


def check_grid_disk(args) -> None:
    """A comparison saves one model per unlearning run (selection and confirmation): refused up front
    when they would not fit the free space where the run directory is (or would be). Unlearned models
    already in --out count as saved (a resumed grid needs room for the rest only); with
    --drop-selection-weights, one selection model at a time and the confirmation runs' need room."""
    p = Path(args.out or ".").resolve()
    g, n = grid(args), len(variants(args))
    saved = len(list(p.glob("unlearn-*/config.json"))) if args.out else 0
    runs = max(0, g.size(n) - saved)
    if args.drop_selection_weights:
        runs = min(runs, 1 + n * len(g.confirm_seeds))
    each = models.saved_bytes(args.model, args.precision, args.trust_remote_code)
    while not p.exists():
        p = p.parent
    free = shutil.disk_usage(p).free
    if runs * each > free:
        raise UsageError(f"the grid saves {runs} more unlearned models of about {each / 1e9:.2f} GB each, "
                         f"{runs * each / 1e9:.1f} GB, and {p} has {free / 1e9:.1f} GB free: fewer learning rates, "
                         f"seeds or methods, --drop-selection-weights, or another --out")


def lora(args) -> adapters.Lora | None:
    """--lora and its settings (None when off); alpha defaults to twice the rank."""
    if not args.lora:
        return None
    return adapters.Lora(args.lora, args.lora_alpha or 2.0 * args.lora, args.lora_dropout, args.lora_targets, args.seed)


def loss_params(args) -> methods.LossParams:
    return methods.LossParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(methods.LossParams)})


def fill_defaults(args, defaults: dict):
    """Set each flag left at None to its value in `defaults` (a protocol, then a model's preset)."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def grid(args) -> protocol.Grid:
    """The run's learning rates and seeds (protocol.Grid): one cell per method unless --lr is a list or
    --seeds is given."""
    return protocol.grid_of(args, LEARNING_RATE, SEED)


class Variant(NamedTuple):
    """One entry of --method: its label (the row of the table), the loss and its hyperparameters."""
    label: str
    method: methods.Method
    params: methods.LossParams


def variants(args) -> list[Variant]:
    """--method as a list of Variant(label, Method, LossParams): "flat", "npo,ga", "flat:kl,flat:js"
    (FLAT with each divergence) or "all" (every loss in methods.LOSSES); a runner whose Args has a
    METHODS table takes its names too (run_harmful: the alignment baselines). A name without a
    divergence uses --divergence. Unknown names raise with the valid ones."""
    spec, table = args.method, getattr(args, "METHODS", methods.LOSSES)  # run_harmful adds methods.ALIGNMENT
    names = list(methods.LOSSES) if spec == "all" else [s.strip() for s in spec.split(",")]
    out = []
    for name in names:
        loss, _, divergence = name.partition(":")
        table.check(loss)
        if divergence:
            if loss != "flat":
                raise UnknownName(f"{name!r}: only flat takes a divergence (flat:kl, flat:js, ...)")
            methods.DIVERGENCES.check(divergence)
        params = dataclasses.replace(loss_params(args), divergence=divergence or args.divergence)
        out.append(Variant(name, table[loss], params))
    if len({v.label for v in out}) != len(out):
        raise UnknownName(f"--method {spec!r} names a method twice")
    return out
