"""The tables a runner prints at the end (markdown), from the report it wrote (results.json)."""
from __future__ import annotations


def print_table(header: str, report: dict, refs: tuple[str, ...], columns: list[tuple[str, str, str]]) -> None:
    """The run's table (markdown): the reference rows of `refs` the report has, then one row per
    method; columns are (heading, results.json key, format), a column no row has left out. Then a line
    per non-finite metric."""
    rows = [(n, report[n]) for n in refs if n in report] + list(report["methods"].items())
    columns = [c for c in columns if any(c[1] in row for _, row in rows)]
    print(f"\n{header}")
    print("| model | " + " | ".join(h for h, _, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in rows:
        print(f"| {name} | " + " | ".join(cell(row, k, f) for _, k, f in columns) + " |")
    for w in report["warnings"]:
        print(f"warning: not finite, written as null: {w}")


def print_attack_tables(report: dict, columns: list[tuple[str, str, str]], note: str = "") -> None:
    """One table per attack (report["attacks"], --attacks): each attacked model's forget metrics before
    (its row of the main table) and after the attack."""
    attacked = report.get("attacks") or {}
    rows_before = {**{n: r for n, r in report.items() if isinstance(r, dict) and n in attacked}, **report["methods"]}
    for evaluation in dict.fromkeys(e for per in attacked.values() for e in per):
        table = {"methods": {name: {**{f"before:{k}": rows_before.get(name, {}).get(k) for _, k, _ in columns},
                                    **per[evaluation]} for name, per in attacked.items() if evaluation in per},
                 "warnings": []}
        cols = [c for h, k, f in columns for c in ((f"{h} before", f"before:{k}", f), (f"{h} after", k, f))]
        print_table(f"Attack: {evaluation}" + (f" | {note}" if note else ""), table, (), cols)


def cell(row: dict, key: str, spec: str) -> str:
    """A table cell: "-" for a metric the row does not have, "NaN (!)" for one that came out non-finite
    (written as null, see finite_report)."""
    if key not in row:
        return "-"
    return "NaN (!)" if row[key] is None else format(row[key], spec)


def print_comparison(report: dict, columns: list[tuple[str, str, str]]) -> None:
    """A comparison's result (report["comparison"], protocol.comparison): per method the learning rate
    the rule chose, whether it passed the bar (on the selection seeds, and whether the confirmation runs'
    means pass it again), and the confirmation runs' mean ± sd (n) of each column."""
    c = report.get("comparison")
    if not c:
        return
    print(f"\nComparison: each method at its own learning rate | rule: {c['rule']}")
    print(f"selection: lr {', '.join(f'{lr:g}' for lr in c['lrs'])} x seeds {', '.join(map(str, c['seeds']))} | "
          f"reported: seeds {', '.join(map(str, c['confirm_seeds'])) or 'none (pass --confirm-seeds)'}, runs the "
          f"rule did not see | every run starts from the same model: the spread is the unlearning's, not the fine-tuning's")
    columns = [col for col in columns if any(r and col[1] in r for r in c["confirmed"].values())]
    print("| method | lr | bar | n | " + " | ".join(h for h, _, _ in columns) + " |")
    print("|---|---|---|---|" + "---|" * len(columns))
    for method, chosen in c["chosen"].items():
        row = c["confirmed"].get(method) or {}
        n = max((m["n"] for m in row.values()), default=0)
        lr = "-" if chosen["lr"] is None else f"{chosen['lr']:g}"
        bar = ("FAILED" if not chosen["passed"] else
               "passed; below it on the confirmation seeds" if chosen.get("confirmed_passes") is False else "passed")
        print(f"| {method} | {lr} | {bar} | {n} | "
              + " | ".join(mean_sd_cell(row.get(k), f) for _, k, f in columns) + " |")
    for note in c.get("start_fails", []):
        print(f"Note: {note}.")


def mean_sd_cell(m: dict | None, spec: str) -> str:
    """"mean ± sd" ("mean" alone for one run, "-" for none, "NaN (!) in k" when k runs had none)."""
    if not m or m["mean"] is None:
        return "-"
    text = format(m["mean"], spec) + (f" ± {format(m['sd'], spec)}" if m["sd"] is not None else "")
    return text + (f" (NaN in {m['missing']})" if m["missing"] else "")


def print_costs(report: dict) -> None:
    """What each trained model cost (report["costs"], run_harmful): what it learns from, its learning rate,
    optimiser steps, wall-clock training time when it ran, and that time as a share of RLHF's; then RLHF's
    reward model, why RLOO stopped, and where its budget comes from."""
    costs = report.get("costs")
    if not costs:
        return
    print("\nCost | training time: wall-clock of every stage the row needed, measured when it ran "
          "(rlhf: reward model + RLOO)")
    print("| model | learns from (examples) | lr | optimiser steps | training time | share of RLHF's time |")
    print("|---|---|---|---|---|---|")
    for name, c in costs.items():
        learns = ", ".join(f"{n} {kind}" for kind, n in c["examples"].items())
        lr = f"{c['lr']:g}" + (f" (reward model {c['reward_lr']:g})" if "reward_lr" in c else "")
        time_s = "-" if c["train_s"] is None else f"{c['train_s']:.0f} s"
        steps = "-" if c["optimizer_steps"] is None else str(c["optimizer_steps"])
        share = "-" if c["share_of_rlhf"] is None else f"{c['share_of_rlhf']:.1%}"
        print(f"| {name} | {learns} | {lr} | {steps} | {time_s} | {share} |")
    for name, c in costs.items():
        if "rlhf" in c:
            rm, rl, b = c["reward_model"], c["rlhf"], c["budget"]
            print(f"{name}: reward model pairwise accuracy {rm['accuracy']:.3f} on its {rm['pairs']} pairs, "
                  f"{rm['held_out_accuracy']:.3f} on {rm['held_out_pairs']} held-out ones; RLOO stopped at step "
                  f"{rl['optimizer_steps']} of {rl['step_budget']} ({rl['stopped']}); budget: {b['source']}")
