"""Pictures of a run, drawn from its results.json alone (no model): the trade-off between forgetting
and utility, one point per method with its in-training trajectory, and each method's training curves.

    python plots.py runs/tofu-smollm2-135m-forget01/results.json   # redraw tradeoff.png and curves.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import protocol

# What each benchmark's trade-off plots: x = forgetting, y = utility, and the rows drawn as references.
AXES = {
    "tofu": dict(x="forget_quality", y="model_utility", xlog=True, refs=("target", "retain"),
                 xlabel="forget quality (KS-test p-value vs the retain model; log scale, higher is better)",
                 ylabel="model utility (harmonic mean, higher is better)"),
    "book": dict(x="forget_quality_gap", y="wikitext_ppl", xlog=False, ylog=True, refs=("reference", "original"),
                 xlabel="forget quality gap vs the reference model (BLEU + 100 ROUGE-L points; lower is better)",
                 ylabel="WikiText-2 perplexity (log scale; lower is better)"),  # a collapsed run's is 1e25
    "harmful": dict(x="harmful_unseen", y="truthfulqa_nll", xlog=False, ylog=True, refs=("base", "original"),
                    xlabel="harmful rate on unseen prompts (share of replies; lower is better)",
                    ylabel="TruthfulQA answer NLL (nats per token; log scale; lower is better)"),
    "hallucination": dict(x="hallucination_rate_unseen", y="truthfulqa_nll", xlog=False, ylog=True, refs=("base", "original"),
                          xlabel="hallucination rate on unseen questions (share of replies; lower is better)",
                          ylabel="TruthfulQA answer NLL (nats per token; log scale; lower is better)"),
}
STREAMS = ("p_forget", "p_template", "p_retain")


# What robustness.png shows of each attacked model: the forget metric each benchmark reads first
# (higher = more of the forgotten knowledge is there).
ATTACK_METRIC = {"tofu": ("forget_Q_A_Prob", "forget answer probability"),
                 "book": ("forget_rougeL", "forget ROUGE-L recall"),
                 "harmful": ("harmful_seen", "harmful rate on the forget prompts"),
                 "hallucination": ("hallucination_rate_seen", "hallucination rate on the forget questions")}


# What frontier.png's right panel follows during unlearning (--eval-every), per method at its chosen
# learning rate: TOFU's forget and retain answer probabilities; elsewhere the trade-off's two axes.
WATCHED = {"tofu": (("forget_Q_A_Prob", "forget P"), ("retain_Q_A_Prob", "retain P"))}


def draw_all(report: dict, out_dir: Path) -> list[Path]:
    """tradeoff.png and curves.png next to results.json, robustness.png after --attacks and frontier.png
    after a comparison (a grid of learning rates or seeds)."""
    out_dir = Path(out_dir)
    drawn = [tradeoff(report, out_dir / "tradeoff.png"), curves(report, out_dir / "curves.png")]
    drawn += [robustness(report, out_dir / "robustness.png")] if report.get("attacks") else []
    drawn += [cost(report, out_dir / "cost.png")] if "rlhf" in (report.get("costs") or {}) else []
    return drawn + ([frontier(report, out_dir / "frontier.png")] if report.get("comparison") else [])


def cost(report: dict, path: Path) -> Path:
    """Harmful rate on unseen prompts against training time, one point per trained model (run_harmful with
    rlhf among its methods), as Yao et al.'s Figure 1 pairs run time with alignment; the original model's
    rate as a dashed line. Each point says what its rate cost in utility: its TruthfulQA answer NLL as a
    multiple of the original's and its share of degenerate replies (a model that only babbles is never
    harmful)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=100)
    colors = plt.get_cmap("tab10")
    nll = (report.get("original") or {}).get("truthfulqa_nll")
    # (minutes, rate) of the points labelled so far: a label near one goes below it; a label runs right of its
    # point about half the axis' decades, so "near" is a factor of 8 in time either way
    placed = []
    for i, (name, c) in enumerate(report["costs"].items()):
        m = report["methods"].get(name, {})
        rate = m.get("harmful_unseen")
        if c["train_s"] is not None and rate is not None:
            ax.scatter(c["train_s"] / 60, rate, s=60, color=colors(i % 10), zorder=3)
            said = [f"NLL {m['truthfulqa_nll'] / nll:.2f}x" if nll and m.get("truthfulqa_nll") is not None else "",
                    f"degenerate {m['degenerate_unseen']:.0%}" if m.get("degenerate_unseen") is not None else ""]
            x = c["train_s"] / 60
            near = sum(abs(rate - r) < 0.02 and 1 / 8 < x / px < 8 for px, r in placed)
            placed.append((x, rate))
            ax.annotate(f"{name} ({', '.join(t for t in said if t)})", (x, rate), textcoords="offset points",
                        xytext=(5, 4 - 11 * near), fontsize=8, color=colors(i % 10))
    original = (report.get("original") or {}).get("harmful_unseen")
    if original is not None:
        ax.axhline(original, color="black", linestyle="--", linewidth=1, label="original model")
        ax.legend(fontsize=8, loc="best")
    ax.set_xscale("log")
    ax.margins(x=0.35, y=0.12)  # room for the labels right of the points
    ax.set_xlabel("training time (minutes, wall-clock of every stage the row needed; log scale)", fontsize=9)
    ax.set_ylabel("harmful rate on unseen prompts (lower is better)", fontsize=9)
    ax.set_title(f"{report.get('title', 'harmful')}: alignment against its cost\n"
                 f"(each point: TruthfulQA answer NLL as a multiple of the original's, degenerate unseen replies)",
                 fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def frontier(report: dict, path: Path) -> Path:
    """A comparison (report["comparison"]): every (method, learning rate) of the selection, its bar metric
    against its objective, mean over the selection seeds with ± sd bars, joined in learning-rate order;
    the bar drawn, each method's chosen point ringed (a cross when it failed the bar). Right, when the
    runs were watched (--eval-every): the watched metrics against the step of each method's first
    confirmation run."""
    plt = _pyplot()
    c, ax_spec = report["comparison"], AXES[report["benchmark"]]
    x_key, bar = c["objective"], c["bars"][0]
    y_key = bar["metric"]
    watched = WATCHED.get(report["benchmark"], ((x_key, x_key), (y_key, y_key)))
    confirm_seed = c["confirm_seeds"][0] if c["confirm_seeds"] else None
    evals = {m: (report.get("training", {}).get(protocol.cell_label(m, ch["lr"], confirm_seed), {}).get("evals") or [])
             for m, ch in c["chosen"].items() if ch["lr"] is not None and confirm_seed is not None}
    panels = 1 + any(evals.values())
    fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 5.5), dpi=100, squeeze=False)
    ax, colors = axes[0][0], plt.get_cmap("tab10")
    _reference_points(ax, report, x_key, y_key)  # where every run starts, against the bar
    for i, (method, per_lr) in enumerate(c["spread"].items()):
        pts = [(float(lr), m[x_key], m[y_key]) for lr, m in per_lr.items()
               if m[x_key]["mean"] is not None and m[y_key]["mean"] is not None]
        if not pts:
            continue
        color = colors(i % 10)
        ax.errorbar([p[1]["mean"] for p in pts], [p[2]["mean"] for p in pts],
                    xerr=[p[1]["sd"] or 0 for p in pts], yerr=[p[2]["sd"] or 0 for p in pts],
                    fmt="-o", color=color, markersize=4, linewidth=1, capsize=2, label=method)
        for lr, xm, ym in pts:
            ax.annotate(f"{lr:g}", (xm["mean"], ym["mean"]), textcoords="offset points", xytext=(4, 3), fontsize=6,
                        color=color)
        chosen = c["chosen"][method]
        if chosen["lr"] is not None and f"{chosen['lr']:g}" in per_lr:
            m = per_lr[f"{chosen['lr']:g}"]
            if m[x_key]["mean"] is not None and m[y_key]["mean"] is not None:
                ring = dict(facecolors="none", edgecolors=color, marker="o") if chosen["passed"] else \
                    dict(color=color, marker="x")  # an x has no face: an edge colour on it is a warning
                ax.scatter(m[x_key]["mean"], m[y_key]["mean"], s=200, linewidths=2, zorder=4, **ring)
    level = {"ratio>=": bar["threshold"] * bar["reference"], "ratio<=": bar["threshold"] * bar["reference"]}.get(
        bar["kind"], bar["reference"])
    says = f"{bar['threshold']:g} x" if bar["kind"] != "within" else f"within {bar['threshold']:g} of"
    ax.axhline(level, color="black", linestyle="--", linewidth=1,
               label=f"the bar: {bar['kind'][-2:] if bar['kind'] != 'within' else ''} {says} the "
                     f"{c.get('reference_name', 'reference')}'s {bar['reference']:.3g}")
    if ax_spec["xlog"] and x_key == ax_spec["x"]:
        ax.set_xscale("log")
    if ax_spec.get("ylog") and y_key == ax_spec["y"]:
        ax.set_yscale("log")
        top = 100 * level  # a collapsed run (perplexity 1e25) would squash every other point onto the bar
        off = [f"{m} {lr} ({v[y_key]['mean']:.2g})" for m, per_lr in c["spread"].items() for lr, v in per_lr.items()
               if v[y_key]["mean"] is not None and v[y_key]["mean"] > top]
        if off:
            ax.set_ylim(top=top)
            ax.text(0.01, 0.99, "above the scale: " + ", ".join(off), transform=ax.transAxes, fontsize=7, va="top")
    ax.set_xlabel(ax_spec["xlabel"] if x_key == ax_spec["x"] else x_key, fontsize=9)
    ax.set_ylabel(ax_spec["ylabel"] if y_key == ax_spec["y"] else y_key, fontsize=9)
    ax.set_title(f"every learning rate (mean ± sd over seeds {', '.join(map(str, c['seeds']))}); "
                 f"ringed: chosen, x: failed the bar", fontsize=9)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    if panels == 2:
        right = axes[0][1]
        for i, method in enumerate(c["spread"]):
            for (key, name), style in zip(watched, ("-", "--")):
                pts = [(e["step"], e[key]) for e in evals.get(method, []) if e.get(key) is not None]
                if pts:
                    right.plot(*zip(*pts), style, color=colors(i % 10), marker=".", label=f"{method}: {name}")
        right.set_xlabel("optimiser step", fontsize=9)
        right.set_ylabel(" / ".join(name for _, name in watched), fontsize=9)
        items = {e["items"] for es in evals.values() for e in es if "items" in e}  # the in-training evaluation's
        right.set_title(f"at the chosen learning rate, seed {confirm_seed} (--eval-every"
                        + (f"; first {max(items)} items of each set)" if items else ")"), fontsize=9)
        right.grid(True, alpha=0.3)
        right.legend(fontsize=7, loc="best", ncol=2)
    fig.suptitle(f"{report.get('title', report['benchmark'])}: {c['rule']}", fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def robustness(report: dict, path: Path) -> Path:
    """Per attacked model (the model that never saw the data first), its forget metric before (the
    main table) and after each attack: bars that rise after an attack show knowledge coming back."""
    plt = _pyplot()
    key, label = ATTACK_METRIC[report["benchmark"]]
    attacked = report["attacks"]
    names = list(attacked)
    evaluations = list(dict.fromkeys(e for per in attacked.values() for e in per))
    before = {**{n: report.get(n) or {} for n in names}, **report["methods"]}
    series = [("before", [before.get(n, {}).get(key) for n in names])]
    series += [(e, [attacked[n].get(e, {}).get(key) for n in names]) for e in evaluations]
    fig, ax = plt.subplots(figsize=(max(6.5, 2.0 + 0.22 * len(names) * len(series)), 4.8), dpi=100)
    width = 0.8 / len(series)
    colors = plt.get_cmap("tab10")
    for j, (name, values) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name,
               color="lightgray" if name == "before" else colors(j - 1), edgecolor="black", linewidth=0.4)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=9)
    ax.set_ylabel(label, fontsize=9)
    top = max([v for _, values in series for v in values if v is not None] + [1e-9])
    ax.set_ylim(0, top * 1.25)  # room for the legend above the bars
    ax.legend(fontsize=8, ncol=min(len(series), 6), loc="upper center")
    ax.set_title(f"{report.get('title', report['benchmark'])}: does the forgotten knowledge come back?\n"
                 f"{names[0]}: the model that never saw the data, attacked the same way", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib  # heavy: pictures only
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: pictures only
    return plt


def tradeoff(report: dict, path: Path) -> Path:
    """Utility against forgetting: each method's final point and, when the run evaluated during
    unlearning (--eval-every), its trajectory from step 0; the reference models as black markers."""
    plt = _pyplot()
    ax_spec = AXES[report["benchmark"]]
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=100)
    _reference_points(ax, report, ax_spec["x"], ax_spec["y"])
    colors = plt.get_cmap("tab10")
    for i, (label, row) in enumerate(report["methods"].items()):
        c = colors(i % 10)
        evals = report.get("training", {}).get(label, {}).get("evals") or []
        traj = [(e.get(ax_spec["x"]), e.get(ax_spec["y"])) for e in evals]
        traj = [(x, y) for x, y in traj if x is not None and y is not None]
        if traj:
            ax.plot(*zip(*traj), "-", color=c, alpha=0.5, linewidth=1.2, marker=".", markersize=5)
        if row.get(ax_spec["x"]) is not None and row.get(ax_spec["y"]) is not None:
            ax.scatter(row[ax_spec["x"]], row[ax_spec["y"]], s=60, color=c, zorder=3, label=label)
            ax.annotate(label, (row[ax_spec["x"]], row[ax_spec["y"]]), textcoords="offset points", xytext=(5, 4),
                        fontsize=7, color=c)
    if ax_spec["xlog"]:
        ax.set_xscale("log")
    if ax_spec.get("ylog"):
        ax.set_yscale("log")
    ax.set_xlabel(ax_spec["xlabel"], fontsize=9)
    ax.set_ylabel(ax_spec["ylabel"], fontsize=9)
    ax.set_title(f"{report.get('title', report['benchmark'])}: utility vs forgetting", fontsize=11)
    ax.grid(True, alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best", title="dots: final; lines: during unlearning", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def _reference_points(ax, report: dict, x_key: str, y_key: str) -> None:
    """The benchmark's reference models (AXES refs: the model that never saw the data, the one unlearning
    starts from) as black markers, where the report has both coordinates."""
    for name, marker in zip(AXES[report["benchmark"]]["refs"], ("s", "D")):
        row = report.get(name)
        if row and row.get(x_key) is not None and row.get(y_key) is not None:
            ax.scatter(row[x_key], row[y_key], marker=marker, s=70, color="black", zorder=3, label=name)


def curves(report: dict, path: Path) -> Path:
    """One panel per method: the training loss (left axis) and the mean token probability of each
    stream's answers (right axis) against the optimiser step, from the training logs. After a comparison,
    the confirmation runs only: they are the reported ones, and a grid's every run would be dozens of panels."""
    plt = _pyplot()
    labels = list(report["methods"])
    confirm = {str(s) for s in (report.get("comparison") or {}).get("confirm_seeds", [])}
    labels = [label for label in labels if label.rpartition(",seed=")[2] in confirm] or labels
    cols = min(3, max(1, len(labels)))
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.5, 4.2 * cols), 3.0 * rows + 0.6), dpi=90, squeeze=False)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    for ax, label in zip(axes.flat, labels):
        log = report.get("training", {}).get(label, {}).get("log") or []
        steps = [r["step"] for r in log]
        ax.plot(steps, [r["loss"] for r in log], color="black", linewidth=1.5, label="loss")
        ax.set_xlabel("optimiser step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        right = ax.twinx()
        for stream, color in zip(STREAMS, ("tab:red", "tab:green", "tab:blue")):
            if log and stream in log[0]:
                right.plot(steps, [r[stream] for r in log], color=color, linewidth=1.2, label=stream)
        right.set_ylim(0, 1)
        right.set_ylabel("mean token probability", fontsize=8)
        right.tick_params(labelsize=7)
        handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper right")
    fig.suptitle(f"{report.get('title', report['benchmark'])}: unlearning curves\n"
                 f"p_forget / p_template / p_retain: mean token probability of the forget, template and retain "
                 f"answers", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        results = Path(arg)
        for p in draw_all(json.loads(results.read_text()), results.parent):
            print(f"written {p}")
