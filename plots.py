"""Pictures of a run, drawn from its results.json alone (no model): the trade-off between forgetting
and utility, one point per method with its in-training trajectory, and each method's training curves.

    python plots.py runs/tofu-smollm2-135m-forget01/results.json   # redraw tradeoff.png and curves.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# What each benchmark's trade-off plots: x = forgetting, y = utility, and the rows drawn as references.
AXES = {
    "tofu": dict(x="forget_quality", y="model_utility", xlog=True, refs=("target", "retain"),
                 xlabel="forget quality (KS-test p-value vs the retain model; log scale, higher is better)",
                 ylabel="model utility (harmonic mean, higher is better)"),
    "book": dict(x="forget_quality_gap", y="wikitext_ppl", xlog=False, refs=("reference", "original"),
                 xlabel="forget quality gap vs the reference model (BLEU + 100 ROUGE-L points; lower is better)",
                 ylabel="WikiText-2 perplexity (lower is better)"),
    "harmful": dict(x="harmful_unseen", y="truthfulqa_nll", xlog=False, refs=("base", "original"),
                    xlabel="harmful rate on unseen prompts (share of replies; lower is better)",
                    ylabel="TruthfulQA answer NLL (nats per token; lower is better)"),
    "hallucination": dict(x="hallucination_rate_unseen", y="truthfulqa_nll", xlog=False, refs=("base", "original"),
                          xlabel="hallucination rate on unseen questions (share of replies; lower is better)",
                          ylabel="TruthfulQA answer NLL (nats per token; lower is better)"),
}
STREAMS = ("p_forget", "p_template", "p_retain")


# What robustness.png shows of each attacked model: the forget metric each benchmark reads first
# (higher = more of the forgotten knowledge is there).
ATTACK_METRIC = {"tofu": ("forget_Q_A_Prob", "forget answer probability"),
                 "book": ("forget_rougeL", "forget ROUGE-L recall"),
                 "harmful": ("harmful_seen", "harmful rate on the forget prompts"),
                 "hallucination": ("hallucination_rate_seen", "hallucination rate on the forget questions")}


def draw_all(report: dict, out_dir: Path) -> list[Path]:
    """tradeoff.png and curves.png next to results.json, and robustness.png after --attacks."""
    out_dir = Path(out_dir)
    drawn = [tradeoff(report, out_dir / "tradeoff.png"), curves(report, out_dir / "curves.png")]
    return drawn + ([robustness(report, out_dir / "robustness.png")] if report.get("attacks") else [])


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
    for name, marker in zip(ax_spec["refs"], ("s", "D")):
        row = report.get(name)
        if row and row.get(ax_spec["x"]) is not None and row.get(ax_spec["y"]) is not None:
            ax.scatter(row[ax_spec["x"]], row[ax_spec["y"]], marker=marker, s=70, color="black", zorder=3,
                       label=name)
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


def curves(report: dict, path: Path) -> Path:
    """One panel per method: the training loss (left axis) and the mean token probability of each
    stream's answers (right axis) against the optimiser step, from the training logs."""
    plt = _pyplot()
    labels = list(report["methods"])
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
