"""The `plot` command: figures of one or more editing runs from their results.json files, several
runs on one figure.

    encore-pl plot lightning_logs/version_0
    encore-pl plot runs/encore runs/memit runs/alphaedit --out figures/

From a checkout, `python scripts/plot_run.py ...` is the same.

Writes these PNGs (a figure is skipped, with a note, when no run has its data):

    norm_growth.png    ||W_edited|| / ||W_original|| per edited layer against the number of edits
    scores.png         Efficacy / Paraphrase / Neighborhood Scores against the number of edits (and,
                       in a second row, the generation scores: judged by the greedy answer), from
                       the run's retention curve; a dotted line is the run's pre-edit score
    probabilities.png  P(edited target) when its optimisation stopped vs P(true object) before editing
    z_steps.png        histogram of the optimisation steps each target vector z took
    downstream.png     downstream F1 per task (and perplexity) against the number of edits
    mlp_ratio.png      ||MLP output|| / ||residual stream|| per edited layer against the number of edits
    tradeoff.png       Efficacy / Paraphrase / Neighborhood Score against perplexity relative to before
                       editing, at each edit count where both were measured (0 edits included): what
                       edit success costs in general ability, one line per run

Runs are labelled by method, plus the run directory's name when a method appears more than once.
"""

import argparse
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from .reports import load_runs, run_labels  # noqa: E402

SCORES = {"efficacy_score": "Efficacy Score", "paraphrase_score": "Paraphrase Score",
          "neighborhood_score": "Neighborhood Score"}
GENERATION_SCORES = {"generation_efficacy": "Generation Efficacy", "generation_paraphrase": "Generation Paraphrase",
                     "generation_neighborhood": "Generation Neighborhood"}
NOT_TASKS = {"num_edits", "perplexity", "protocol"}  # downstream_history keys that are not F1 scores
LINESTYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P"]


# Figure helpers -------------------------------------------------------------------------------

def subplot_grid(n: int, title: str, sharex: bool = True, max_cols: int = 3, panel=(4.6, 3.2)):
    """A figure with n panels in a grid of at most max_cols columns; unused panels are hidden."""
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(panel[0] * cols, 6.4), panel[1] * rows + 0.8),
                             sharex=sharex, squeeze=False, layout="constrained")
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[:n]:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=13)
    return fig, axes[:n]


def finish(fig, axes, out: Path, written: list[Path], figure_legend: bool = True) -> None:
    """Add one legend below the panels (every run listed once), save the figure as out and close it."""
    handles, labels = {}, []
    for ax in axes if figure_legend else []:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in handles:
                handles[l] = h
                labels.append(l)
    if labels:
        fig.legend([handles[l] for l in labels], labels, loc="outside lower center",
                   ncol=min(len(labels), 4), frameon=False)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    written.append(out)
    print(f"wrote {out}")


def skip(name: str, why: str) -> None:
    print(f"skipped {name}: {why}")


def run_styles(n: int) -> list[dict]:
    """A colour, line style and marker per run, so that runs stay apart even where their curves overlap."""
    return [{"color": plt.get_cmap("tab10")(i % 10), "linestyle": LINESTYLES[i % len(LINESTYLES)],
             "marker": MARKERS[i % len(MARKERS)], "markersize": 4} for i in range(n)]


def layer_key(key: str):
    return (0, int(key)) if str(key).isdigit() else (1, str(key))


def per_layer_series(run: dict, field: str, start=None) -> dict[str, tuple[list, list]]:
    """{layer: (num_edits, values)} from history[*][field]; optionally starting at (0 edits, start)."""
    series: dict[str, tuple[list, list]] = {}
    for entry in run.get("history") or []:
        for layer, value in (entry.get(field) or {}).items():
            if str(layer) not in series:
                series[str(layer)] = ([0], [start]) if start is not None else ([], [])
            xs, ys = series[str(layer)]
            xs.append(entry["num_edits"])
            ys.append(value)
    return series


def plot_per_layer(runs, labels, styles, field, start, title, ylabel, out, written, name, note) -> None:
    """One panel per edited layer, one line per run, for a per-layer history field."""
    series = [per_layer_series(r, field, start) for r in runs]
    layers = sorted({l for s in series for l in s}, key=layer_key)
    if not layers:
        skip(name, note)
        return
    fig, axes = subplot_grid(len(layers), title)
    for ax, layer in zip(axes, layers):
        for s, label, style in zip(series, labels, styles):
            if layer in s:
                ax.plot(*s[layer], label=label, **style)
        if start is not None:
            ax.axhline(start, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"layer {layer}")
        ax.set_ylabel(ylabel)
        ax.set_xlabel("number of edits")
        ax.xaxis.set_tick_params(labelbottom=True)
    finish(fig, axes, out / name, written)


def histogram_fraction(ax, values, bins, color, label, **kwargs) -> None:
    """A histogram whose bars are the fraction of values in each bin (so runs of any size compare)."""
    values = np.asarray(values, dtype=float)
    ax.hist(values, bins=bins, weights=np.full(len(values), 1 / len(values)), color=color, label=label, **kwargs)
    ax.margins(y=0.3)  # headroom for the legend above the bars


# The figures ----------------------------------------------------------------------------------

def plot_norm_growth(runs, labels, styles, out, written) -> None:
    plot_per_layer(runs, labels, styles, "weight_norm_ratio", 1.0,
                   "Growth of the edited weights: ||W|| / ||W_original|| per layer",
                   "norm / original norm", out, written, "norm_growth.png", "no run has a history")


def plot_scores(runs, labels, styles, out, written) -> None:
    have = [(r, l, s) for r, l, s in zip(runs, labels, styles) if r.get("retention")]
    if not have:
        skip("scores.png", "no run has a non-empty retention")
        return
    panels = dict(SCORES)
    if any(key in e for r, _, _ in have for e in r["retention"] for key in GENERATION_SCORES):
        panels.update(GENERATION_SCORES)  # second row: the same, judged by the greedy answer
    fig, axes = subplot_grid(len(panels), "Scores on the edits made so far, against the number of edits (dotted: before editing)")
    for ax, (key, name) in zip(axes, panels.items()):
        for run, label, style in have:
            points = [(e["num_edits"], e[key]) for e in run["retention"] if key in e]
            if points:
                ax.plot(*zip(*points), label=label, **style)
            if key in run.get("pre", {}):  # the same score before editing: a dotted line
                ax.axhline(run["pre"][key], color=style["color"], linestyle=":", linewidth=1)
        ax.set_title(name)
        ax.set_ylabel(f"{name} (%)")
        ax.set_xlabel("number of edits")
        ax.set_ylim(-2, 102)
    finish(fig, axes, out / "scores.png", written)


def plot_probabilities(runs, labels, styles, out, written) -> None:
    have = [(r, l) for r, l in zip(runs, labels) if r.get("target_probs") or r.get("natural_probs")]
    if not have:
        skip("probabilities.png", "no run has target_probs or natural_probs")
        return
    bins = np.linspace(0, 1, 21)
    fig, axes = subplot_grid(len(have), "Probability of the new target vs the true object",
                             sharex=False)
    for ax, (run, label) in zip(axes, have):
        for key, name, color in (("natural_probs", "true object, unedited model", "tab:grey"),
                                 ("target_probs", "new target, when z stopped", "tab:blue")):
            values = run.get(key)
            if values:
                name = f"{name} (n={len(values)}, median {np.median(values):.2f})"
                histogram_fraction(ax, values, bins, color, name, alpha=0.55, edgecolor="white")
        ax.set_title(label)
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability")
        ax.set_ylabel("fraction of requests")
        ax.legend(fontsize=8, loc="upper right")  # the medians differ per run: one legend per panel
    finish(fig, axes, out / "probabilities.png", written, figure_legend=False)


def plot_z_steps(runs, labels, styles, out, written) -> None:
    have = [(r, l, s) for r, l, s in zip(runs, labels, styles) if r.get("z_steps")]
    if not have:
        skip("z_steps.png", "no run has z_steps")
        return
    all_steps = [s for r, _, _ in have for s in r["z_steps"]]
    bins = np.arange(min(all_steps) - 0.5, max(all_steps) + 1.5)  # one bar per integer step count
    fig, axes = subplot_grid(len(have), "Optimisation steps taken by each target vector z")
    for ax, (run, label, style) in zip(axes, have):
        steps = run["z_steps"]
        histogram_fraction(ax, steps, bins, style["color"], f"{len(steps)} requests", edgecolor="white")
        ax.axvline(np.mean(steps), color="black", linestyle="--", linewidth=1, label=f"mean {np.mean(steps):.1f}")
        ax.set_title(label)
        ax.legend(fontsize=8, loc="upper right")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("z optimisation steps")
        ax.set_ylabel("fraction of requests")
        ax.xaxis.set_tick_params(labelbottom=True)
    finish(fig, axes, out / "z_steps.png", written, figure_legend=False)


def plot_downstream(runs, labels, styles, out, written) -> None:
    histories = [r.get("downstream_history") or [] for r in runs]
    panels = sorted({k for h in histories for e in h for k in e if k not in NOT_TASKS})
    if any("perplexity" in e for h in histories for e in h):
        panels.append("perplexity")
    if not panels:
        skip("downstream.png", "no run has a downstream_history")
        return
    fig, axes = subplot_grid(len(panels), "Downstream performance against the number of edits")
    for ax, panel in zip(axes, panels):
        for history, label, style in zip(histories, labels, styles):
            points = [(e["num_edits"], e[panel]) for e in history if e.get(panel) is not None]
            if points:
                ax.plot(*zip(*points), label=label, **style)
        ax.set_title("perplexity" if panel == "perplexity" else f"{panel.upper()} F1")
        ax.set_ylabel("perplexity" if panel == "perplexity" else "F1 (%)")
        ax.set_xlabel("number of edits")
        ax.xaxis.set_tick_params(labelbottom=True)
    finish(fig, axes, out / "downstream.png", written)


def plot_mlp_ratio(runs, labels, styles, out, written) -> None:
    plot_per_layer(runs, labels, styles, "mlp_residual_ratio", None,
                   "MLP output norm / residual stream norm per edited layer",
                   "||MLP out|| / ||residual||", out, written, "mlp_ratio.png",
                   "no run has history[*].mlp_residual_ratio")


def tradeoff_points(run: dict) -> list[tuple[int, float, dict]]:
    """(num_edits, perplexity / perplexity before editing, scores) wherever the downstream history has a
    perplexity and the retention curve (or, at 0 edits, the pre-edit scores) has the scores."""
    perplexities = {e["num_edits"]: e["perplexity"] for e in run.get("downstream_history") or []
                    if e.get("perplexity") is not None}
    if 0 not in perplexities:
        return []
    scores = {0: run.get("pre") or {}, **{e["num_edits"]: e for e in run.get("retention") or []}}
    return [(n, perplexities[n] / perplexities[0], scores[n]) for n in sorted(perplexities)
            if all(key in scores.get(n, {}) for key in SCORES)]


def plot_tradeoff(runs, labels, styles, out, written) -> None:
    points = [tradeoff_points(r) for r in runs]
    if not any(len(p) > 1 for p in points):
        skip("tradeoff.png", "no run has scores and perplexity at the same edit count after 0 edits")
        return
    fig, axes = subplot_grid(len(SCORES), "Scores against perplexity (relative to before editing); "
                             "points labelled by the number of edits")
    for ax, (key, name) in zip(axes, SCORES.items()):
        for run_points, label, style in zip(points, labels, styles):
            if len(run_points) < 2:
                continue
            xs = [x for _, x, _ in run_points]
            ys = [s[key] for _, _, s in run_points]
            ax.plot(xs, ys, label=label, **style)
            for (n, x, _), y in zip(run_points, ys):
                ax.annotate(f"{n:,}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7,
                            color=style["color"])
        ax.set_title(name)
        ax.set_ylabel(f"{name} (%)")
        ax.set_xlabel("perplexity / perplexity before editing")
        ax.xaxis.set_tick_params(labelbottom=True)
    finish(fig, axes, out / "tradeoff.png", written)


# Main -----------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directory holding results.json")
    parser.add_argument("--out", type=Path, metavar="DIR", help="directory for the PNGs (default: the first run directory)")
    args = parser.parse_args(argv)

    runs = load_runs(parser, args.runs)
    labels = run_labels(args.runs, runs)
    styles = run_styles(len(runs))
    first = args.runs[0]
    out = args.out or (first.parent if first.name == "results.json" else first)
    out.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    for plot in (plot_norm_growth, plot_scores, plot_probabilities, plot_z_steps, plot_downstream, plot_mlp_ratio,
                 plot_tradeoff):
        plot(runs, labels, styles, out, written)
    return written

