"""The fair comparison (docs/claims.md): every method at every learning rate of `--lr A,B,...` and every
seed of `--seeds`, each from the same fine-tuned model; per method one learning rate picked by a rule
declared here before any result (RULES); that learning rate rerun on fresh seeds (`--confirm-seeds`),
and only those reruns reported, as mean ± standard deviation and n.

    grid = protocol.grid_of(args)                       # --lr, --seed, --seeds, --confirm-seeds, checked
    cells = grid.cells(variants)                         # (method, lr, seed): the selection runs
    chosen = protocol.select(RULES["tofu"], points, reference, thresholds)   # pure: no model, no file
    confirm = grid.confirmations(variants, chosen)       # the chosen lr of each method x --confirm-seeds

Why per-method learning rates: one learning rate shared by every loss compares nothing, since the
losses move the model at different speeds (FLAT's gradient per token is p(1-p) where gradient
ascent's is 1-p). Why a rule fixed first and fresh seeds: a best-of-many picked after looking, and
reported from the same runs, is biased upwards; the confirmation runs are not seen by the rule.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

from errors import UsageError


class Cell(NamedTuple):
    """One unlearning run of a comparison: a method (its --method entry), a learning rate and a seed."""
    label: str       # the row of the tables: the method's label alone outside a grid
    variant: object  # flags.Variant(label, method, params)
    lr: float
    seed: int
    watched: bool = True   # evaluated during unlearning with --eval-every (in a grid: the confirmation runs)

    def args(self, args):
        """The run's flags as this cell reads them (its stage key and training): its learning rate and
        seed, and --eval-every only where it is watched."""
        return replace(args, lr=self.lr, seed=self.seed, eval_every=args.eval_every if self.watched else 0)


def cell_label(method: str, lr: float, seed: int) -> str:
    return f"{method}@lr={lr:g},seed={seed}"


def numbers(text, kind: type, flag: str, check=None) -> tuple:
    """A comma list of numbers (`1e-4,3e-4`; a single number is a list of one), each checked: an empty
    entry, a repeated one, one that is not a `kind`, or one out of `check`'s range is a UsageError."""
    if isinstance(text, (int, float)):
        text = repr(text)
    if isinstance(text, tuple):  # a grid flag already read (flags.parse_args): checked again, as given
        text = ",".join(map(repr, text))
    entries = [e.strip() for e in str(text).split(",")]
    if "" in entries:
        raise UsageError(f"--{flag} {text}: an empty entry in the list")
    try:
        values = tuple(kind(e) for e in entries)
    except ValueError:
        raise UsageError(f"--{flag} {text}: every entry must be a{'n integer' if kind is int else ' number'}") from None
    for v in values:
        if check is not None and (not math.isfinite(v) or not check.ok(v)):
            raise UsageError(f"--{flag} {text}: {f'{v:g} ' if len(values) > 1 else ''}must be {check.says}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise UsageError(f"--{flag} {text}: {', '.join(f'{v:g}' for v in repeated)} given twice")
    return values


@dataclass(frozen=True)
class Grid:
    """The learning rates and seeds of a run. `on` is False for one --lr and one --seed (today's run:
    one cell per method, named by the method alone, with the stage names of every earlier version)."""
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]          # the selection seeds (--seeds; default --seed)
    confirm_seeds: tuple[int, ...]  # fresh seeds for the chosen learning rates (--confirm-seeds)
    on: bool
    own: tuple = ()                 # (method, lr) pairs: each method's own learning rate (--method-lrs)

    def lrs_of(self, variant) -> tuple[float, ...]:
        """A method's learning rates: its own (--method-lrs; FLAT's by its divergence, flat:kl) when it has
        one, else the run's (--lr)."""
        own = dict(self.own)
        for name in (variant.label, f"{variant.label}:{variant.params.divergence}"):
            if name in own:
                return (own[name],)
        return self.lrs

    def own_line(self, variants) -> str:
        """The learning rate each method trains at, for a run whose methods have their own (--method-lrs)."""
        return "[lr] " + ", ".join(f"{v.label} {'/'.join(f'{lr:g}' for lr in self.lrs_of(v))}" for v in variants) + \
            " (--method-lrs, else --lr)"

    def cells(self, variants) -> list[Cell]:
        """The selection runs: every method x learning rate x seed."""
        if not self.on:
            return [Cell(v.label, v, self.lrs_of(v)[0], self.seeds[0]) for v in variants]
        return [Cell(cell_label(v.label, lr, s), v, lr, s, watched=False)  # the reported runs are the ones watched
                for v in variants for lr in self.lrs_of(v) for s in self.seeds]

    def confirmations(self, variants, chosen: dict) -> list[Cell]:
        """Each method's chosen learning rate (select) on every --confirm-seeds seed."""
        return [Cell(cell_label(v.label, chosen[v.label].lr, s), v, chosen[v.label].lr, s)
                for v in variants if chosen[v.label].lr is not None for s in self.confirm_seeds]

    def size(self, n_methods: int) -> int:
        """Unlearning runs in all: the selection grid and the confirmations (--method-lrs gives one
        learning rate per method, and only where --lr is one)."""
        return n_methods * (len(self.lrs) * len(self.seeds) + (len(self.confirm_seeds) if self.on else 0))


def grid_of(args, lr_check=None, seed_check=None) -> Grid:
    """--lr (a number or a comma list), --seed, --seeds and --confirm-seeds as a Grid, every entry checked;
    --confirm-seeds must be fresh (none of --seeds) and needs --seeds (flags: needs=SEEDS)."""
    lrs = numbers(args.lr, float, "lr", lr_check)
    own = method_lrs(getattr(args, "method_lrs", ""), lr_check)
    if own and len(lrs) > 1:
        raise UsageError(f"--method-lrs {args.method_lrs} with --lr {args.lr}: a grid sets every method's learning "
                         f"rates; pass one or the other")
    seeds = numbers(args.seeds, int, "seeds", seed_check) if args.seeds else (args.seed,)
    confirm = numbers(args.confirm_seeds, int, "confirm-seeds", seed_check) if args.confirm_seeds else ()
    both = sorted(set(seeds) & set(confirm))
    if both:
        raise UsageError(f"--confirm-seeds {args.confirm_seeds}: {', '.join(map(str, both))} also in --seeds "
                         f"{args.seeds}; confirmation runs need seeds the selection did not see")
    return Grid(lrs, seeds, confirm, on=len(lrs) > 1 or bool(args.seeds) or bool(confirm), own=own)


def method_lrs(text: str, lr_check=None) -> tuple:
    """--method-lrs `flat:kl=1e-4,ga=3e-5` as ((method, lr), ...), each learning rate checked."""
    out = []
    for entry in [e.strip() for e in text.split(",")] if text else []:
        name, eq, value = entry.partition("=")
        if not eq or not name.strip():
            raise UsageError(f"--method-lrs {text}: {entry!r} is not METHOD=LR")
        out.append((name.strip(), numbers(value, float, f"method-lrs {name.strip()}=", lr_check)[0]))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UsageError(f"--method-lrs {text}: a method named twice")
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# The selection rule: declared per benchmark before any result, pure, unit-tested (tests/test_protocol.py)
# ---------------------------------------------------------------------------------------------

class Bar(NamedTuple):
    """What a learning rate must keep: `metric` (mean over the selection seeds) against the reference
    model's, with the threshold of flag `flag`: "ratio>=" (value >= t x reference), "ratio<=" (value <=
    t x reference) or "drop<=" (value >= reference - t: a score may fall by at most t, and may rise)."""
    metric: str
    flag: str
    kind: str

    def ok(self, value: float, reference: float, threshold: float) -> bool:
        if self.kind == "ratio>=":
            return value >= threshold * reference
        if self.kind == "ratio<=":
            return value <= threshold * reference
        return value >= reference - threshold

    def says(self, threshold: float, reference_name: str) -> str:
        op = {"ratio>=": f">= {threshold:g} x", "ratio<=": f"<= {threshold:g} x", "drop<=": f"at most {threshold:g} below"}
        return f"{self.metric} {op[self.kind]} the {reference_name}'s"


class Rule(NamedTuple):
    """Per method, among the learning rates whose mean metrics pass every bar, the one with the best
    mean `objective` (highest if `higher`, else lowest); a tie goes to the smaller learning rate (the
    smaller change to the model). When none passes, the method fails the bar and its point is the
    one best on the first bar's metric (`fallback_higher`: higher is better there)."""
    objective: str
    higher: bool
    bars: tuple[Bar, ...]
    fallback_higher: bool
    reference: str  # which model the bars compare with, in words

    def says(self, thresholds: dict, reference_name: str | None = None) -> str:
        best = "highest" if self.higher else "lowest"
        bars = " and ".join(b.says(thresholds[b.flag], reference_name or self.reference) for b in self.bars)
        return (f"per method, the learning rate with the {best} mean {self.objective} over the selection seeds "
                f"among those with mean {bars}; ties to the smaller learning rate; none passing: the method "
                f"fails the bar, shown at its best {self.bars[0].metric}")


TOFU = Rule("forget_quality", True, (Bar("model_utility", "utility_bar", "ratio>="),), fallback_higher=True,
            reference="retain model (the target with --retain-logs)")
# The book's bars compare with the original (the model every run starts from), as the harmful task's do,
# not with the reference model that never saw the text: on the offline default the fine-tuning alone
# takes WikiText perplexity from the reference's 59.4 to 103.5 (1.74x), so a bar of 1.1 x the
# reference's failed every run of the first book protocol whatever it did (docs/claims.md, 2026-12-06).
BOOK = Rule("forget_quality_gap", False, (Bar("wikitext_ppl", "ppl_bar", "ratio<="),), fallback_higher=False,
            reference="original model")
# One-sided: zero-shot accuracy that rises is not lost utility. Until 2026-12-07 this bar was two-sided
# (|value - original's| <= 0.02), which failed runs whose zero-shot rose towards the reference model's
# (docs/claims.md, the book protocol); it changed no choice of the runs reported.
BOOK_ZERO_SHOT = BOOK._replace(bars=BOOK.bars + (Bar("zeroshot_mean", "zero_shot_bar", "drop<="),))
HARMFUL = Rule("harmful_unseen", False, (Bar("truthfulqa_nll", "nll_bar", "ratio<="),), fallback_higher=False,
               reference="original model")
HALLUCINATION = HARMFUL._replace(objective="hallucination_rate_unseen")
RULES = {"tofu": TOFU, "book": BOOK, "book+zero-shot": BOOK_ZERO_SHOT, "harmful": HARMFUL,
         "hallucination": HALLUCINATION}


class Choice(NamedTuple):
    """A method's selected learning rate (None: no learning rate has the metrics the rule reads) and
    whether it passed the bars; `points` holds every learning rate's mean metrics, as the rule saw them."""
    lr: float | None
    passed: bool
    points: dict


def mean_or_none(values) -> float | None:
    """The mean, or None when any value is missing or not finite (a run whose metric is unknown cannot
    be said to pass a bar or to win)."""
    values = list(values)
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None
    return sum(values) / len(values)


def select(rule: Rule, runs: dict[str, dict[float, list[dict]]], reference: dict, thresholds: dict) -> dict[str, Choice]:
    """The rule applied to the selection runs: runs[method][lr] is the list of summaries (one per seed);
    reference the reference model's summary; thresholds {flag: value}. Returns {method: Choice}.
    Raises ValueError when the reference lacks a bar's metric (the bar cannot be drawn)."""
    for b in rule.bars:
        if reference.get(b.metric) is None:
            raise ValueError(f"the selection rule compares {b.metric} with the {rule.reference}'s, which has none")
    out = {}
    for method, per_lr in runs.items():
        points = {lr: {k: mean_or_none(s.get(k) for s in summaries) for k in (rule.objective, *(b.metric for b in rule.bars))}
                  for lr, summaries in sorted(per_lr.items())}
        for p in points.values():
            p["passes"] = all(p[b.metric] is not None and b.ok(p[b.metric], reference[b.metric], thresholds[b.flag])
                              for b in rule.bars)
        passing = [lr for lr, p in points.items() if p["passes"] and p[rule.objective] is not None]
        if passing:
            out[method] = Choice(_best(passing, points, rule.objective, rule.higher), True, points)
            continue
        known = [lr for lr, p in points.items() if p[rule.bars[0].metric] is not None]
        out[method] = Choice(_best(known, points, rule.bars[0].metric, rule.fallback_higher) if known else None,
                             False, points)
    return out


def start_fails(rule: Rule, start: dict, reference: dict, thresholds: dict, start_name: str,
                reference_name: str | None = None) -> list[str]:
    """The bars that the model every run starts from already fails, each in words with the value that
    would let it pass (empty when it passes every bar, or lacks a bar's metric). A bar its starting model
    fails can only be passed by a run that *improves* on it: the comparison then reports FAILED for
    reasons that have nothing to do with the methods, and says so. (The first book protocol's bar, 1.1 x
    the perplexity of the model that never saw the book, was one: the original had 1.74 x.)"""
    out = []
    for b in rule.bars:
        value, ref, t = start.get(b.metric), reference.get(b.metric), thresholds[b.flag]
        if value is None or ref is None or not math.isfinite(value) or b.ok(value, ref, t):
            continue
        needed = {"ratio>=": f"--{b.flag.replace('_', '-')} {value / ref:.3g} or below",
                  "ratio<=": f"--{b.flag.replace('_', '-')} {value / ref:.3g} or above",
                  "drop<=": f"--{b.flag.replace('_', '-')} {ref - value:.3g} or above"}[b.kind]
        out.append(f"the {start_name} every run starts from has {b.metric} {value:.4g}, already outside the bar "
                   f"({b.says(t, reference_name or rule.reference)} {ref:.4g}); only a run that improves on it can pass "
                   f"({needed} would let the {start_name} pass)")
    return out


def _best(lrs: list[float], points: dict, metric: str, higher: bool) -> float:
    # sorted lrs and a strict comparison: the first (smallest) of equal values wins
    best = lrs[0]
    for lr in lrs[1:]:
        if (points[lr][metric] > points[best][metric]) if higher else (points[lr][metric] < points[best][metric]):
            best = lr
    return best


def by_method(cells: list[Cell], summaries: dict[str, dict]) -> dict[str, dict[float, list[dict]]]:
    """The runs of `cells` as the rule reads them: {method: {lr: [summary of each seed]}}."""
    out: dict = {}
    for c in cells:
        out.setdefault(c.variant.label, {}).setdefault(c.lr, []).append(summaries[c.label])
    return out


def mean_sd(values) -> dict:
    """{"mean", "sd" (sample standard deviation; None for one run), "n"} of the finite values, and
    "missing" (how many runs had none)."""
    values = list(values)
    good = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return {"mean": sum(good) / len(good) if good else None, "sd": statistics.stdev(good) if len(good) > 1 else None,
            "n": len(good), "missing": len(values) - len(good)}


def comparison(rule: Rule, chosen: dict[str, Choice], selection: dict[str, dict[float, list[dict]]],
               confirmed: dict[str, dict[float, list[dict]]], reference: dict, thresholds: dict, grid: Grid,
               reference_name: str | None = None, start: tuple[dict, str] | None = None) -> dict:
    """The report of a comparison: the rule in words with its thresholds and the reference values of its
    bars, the grid, every selection point (as the rule saw it, with the spread over seeds of the metrics
    it read), each method's chosen learning rate, and the result, which is the confirmation runs alone
    (confirmed: by_method of them): mean ± sd and n of every number they report (None for a method
    without confirmation runs). Each choice also says whether the confirmed means pass the bars again
    (`confirmed_passes`; None without confirmation runs): the rule chose on the selection seeds, and a
    choice near a bar may fall below it on fresh ones. `start`: (summary, name) of the model every run
    starts from, whose failed bars (start_fails) are said with the table."""
    read = (rule.objective, *(b.metric for b in rule.bars))
    spread = {m: {f"{lr:g}": {k: mean_sd(s.get(k) for s in runs) for k in read} for lr, runs in sorted(per.items())}
              for m, per in selection.items()}
    result = {}
    for method in chosen:
        summaries = [s for per_lr in confirmed.get(method, {}).values() for s in per_lr]
        keys = dict.fromkeys(k for s in summaries for k, v in s.items() if isinstance(v, (int, float, type(None)))
                             and not isinstance(v, bool))
        result[method] = {k: mean_sd(s.get(k) for s in summaries) for k in keys} if summaries else None
    return {"rule": rule.says(thresholds, reference_name), "thresholds": thresholds,
            "reference_name": reference_name or rule.reference,
            "objective": rule.objective, "higher_is_better": rule.higher,
            "bars": [{"metric": b.metric, "kind": b.kind, "threshold": thresholds[b.flag],
                      "reference": reference[b.metric]} for b in rule.bars],
            "lrs": list(grid.lrs), "seeds": list(grid.seeds), "confirm_seeds": list(grid.confirm_seeds),
            "selection": {m: {f"{lr:g}": p for lr, p in c.points.items()} for m, c in chosen.items()},
            "spread": spread,
            "chosen": {m: {"lr": c.lr, "passed": c.passed,
                           "confirmed_passes": None if result[m] is None else all(
                               result[m].get(b.metric, {}).get("mean") is not None
                               and b.ok(result[m][b.metric]["mean"], reference[b.metric], thresholds[b.flag])
                               for b in rule.bars)} for m, c in chosen.items()},
            "confirmed": result,
            "start_fails": start_fails(rule, start[0], reference, thresholds, start[1], reference_name) if start else []}


class Progress:
    """Lines for long grids: work done / total, time so far and an estimate of what is left from the
    work computed so far (a cached stage counts as done and not in the rate)."""

    def __init__(self, total: int, say: Callable[[str], None], what: str = "runs"):
        self.total, self.say, self.what = total, say, what
        self.done = self.computed = 0
        self.start = time.time()

    def tick(self, name: str, computed: bool) -> None:
        self.done += 1
        self.computed += computed
        spent = time.time() - self.start
        left = spent / self.computed * (self.total - self.done) if self.computed else None
        self.say(f"[grid] {self.done}/{self.total} {self.what} done ({name}{'' if computed else ', cached'}) | "
                 f"{spent / 60:.1f} min so far" + (f" | about {left / 60:.0f} min left" if left is not None else ""))
