"""The study's figures, from its results table (and each run's metrics.jsonl for the curves):

- loss_curves: training loss against tokens per run (one panel per variant, colour by size,
  line style by budget), final validation losses as points;
- isoflop: final validation loss against parameters for runs of one compute budget (one line
  per budget, one panel per variant), with the fitted law along each budget dashed;
- frontier: the fitted compute-optimal loss L(N*(C), D*(C)) and N*(C) per variant against
  compute, the runs as points.

Each is written as PNG and SVG with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from titans_train.study.collect import last_by_step, read_metrics
from titans_train.study.fit import compute_optimal, predict

LINE_STYLES = ("-", "--", ":", "-.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _variants(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r.get("variant") or "all") for r in rows))


def _panels(plt, count: int, title: str):
    figure, axes = plt.subplots(1, count, figsize=(5.2 * count, 4.2), squeeze=False, sharey=True)
    figure.suptitle(title)
    return figure, list(axes[0])


def _compute_groups(rows: list[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    """Runs by compute budget: the study's budget axis if it had one, else FLOPs binned to 1/4 decade."""
    groups: dict[float, list[dict[str, Any]]] = {}
    for row in rows:
        budget = row.get("compute_budget") or 10 ** (round(4 * math.log10(row["flops"])) / 4)
        groups.setdefault(float(budget), []).append(row)
    return dict(sorted(groups.items()))


def loss_curves(rows: list[dict[str, Any]]):
    plt = _pyplot()
    variants = _variants(rows)
    figure, axes = _panels(plt, len(variants), "Training loss per run (points: final validation loss)")
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(sizes), 1)))
    for axis, variant in zip(axes, variants):
        for row in (r for r in rows if str(r.get("variant") or "all") == variant):
            records = read_metrics(Path(row["run_dir"]))
            train = last_by_step(records, "train/loss")
            tokens = last_by_step(records, "train/tokens")
            steps = [s for s in sorted(train) if s in tokens]
            colour = colours[sizes.index(row["size"])]
            if steps:
                axis.plot([tokens[s] for s in steps], [train[s] for s in steps], color=colour,
                          linestyle=LINE_STYLES[budgets.index(row["budget"]) % len(LINE_STYLES)],
                          label=f"{row['size']}, {row['budget']} ({row['status']})")
            if row.get("status") == "finished" and row.get("val_loss") is not None:
                axis.plot([row["tokens"]], [row["val_loss"]], "o", color=colour)
        axis.set_xscale("log")
        axis.set_title(f"variant {variant}")
        axis.set_xlabel("training tokens (log scale)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, title="size, budget", title_fontsize=7, loc="upper right")  # curves fall left to right
    axes[0].set_ylabel("loss (nats per token)")
    figure.tight_layout()
    return figure


def isoflop(rows: list[dict[str, Any]], fits: dict[str, Any] | None = None):
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    finished = [r for r in rows if r.get("status", "finished") == "finished" and r.get("val_loss") is not None]
    variants = _variants(finished)
    figure, axes = _panels(plt, len(variants), "IsoFLOP profiles: final validation loss at fixed compute")
    groups = _compute_groups(finished)
    colours = plt.get_cmap("plasma")(np.linspace(0, 0.85, max(len(groups), 1)))
    for axis, variant in zip(axes, variants):
        fit = (fits or {}).get(variant)
        for colour, (budget, group) in zip(colours, groups.items()):
            points = sorted((r["params"], r["val_loss"], r["tokens"]) for r in group
                            if str(r.get("variant") or "all") == variant)
            if not points:
                continue
            n = [p[0] for p in points]
            axis.plot(n, [p[1] for p in points], "o-", color=colour, label=f"C = {budget:.2g} FLOPs")
            if fit is not None:
                grid = np.geomspace(min(n) / 1.5, max(n) * 1.5, 50)
                ratio = np.median([p[2] * p[0] for p in points])  # D = (N D) / N along the budget
                axis.plot(grid, predict(fit, grid, ratio / grid), "--", color=colour, alpha=0.7,
                          label=f"fit at C = {budget:.2g}")
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())  # less than a decade: minor labels collide
        axis.set_title(f"variant {variant}")
        axis.set_xlabel("parameters N (log scale)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    axes[0].set_ylabel("final validation loss (nats per token)")
    figure.tight_layout()
    return figure


def frontier(rows: list[dict[str, Any]], fits: dict[str, Any]):
    """`fits`: variant -> law (E, A, B, alpha, beta, and k of C = k N D)."""
    plt = _pyplot()
    figure, (loss_axis, size_axis) = plt.subplots(1, 2, figsize=(10.4, 4.2))
    figure.suptitle("Compute-optimal frontier of the fitted law, per variant")
    finished = [r for r in rows if r.get("status", "finished") == "finished" and r.get("val_loss") is not None]
    colours = plt.get_cmap("tab10").colors
    for index, (variant, law) in enumerate(fits.items()):
        colour = colours[index % len(colours)]
        runs = [r for r in finished if str(r.get("variant") or "all") == variant]
        compute = np.array([law["k"] * r["params"] * r["tokens"] for r in runs])
        span = np.geomspace(compute.min() / 2, compute.max() * 4, 60)
        n_opt, d_opt = compute_optimal(law, span, law["k"])
        loss_axis.plot(span, predict(law, n_opt, d_opt), "-", color=colour, label=f"{variant}: fitted frontier")
        loss_axis.plot(compute, [r["val_loss"] for r in runs], "o", color=colour, alpha=0.6, label=f"{variant}: runs")
        size_axis.plot(span, n_opt, "-", color=colour,
                       label=f"{variant}: N* ~ C^{law['beta'] / (law['alpha'] + law['beta']):.2f}")
        size_axis.plot(compute, [r["params"] for r in runs], "o", color=colour, alpha=0.6, label=f"{variant}: runs")
    k_text = ", ".join(f"{v}: {law['k']:.3g}" for v, law in fits.items())
    for axis in (loss_axis, size_axis):
        axis.set_xscale("log")
        axis.set_xlabel(f"compute C = k N D, FLOPs (log scale; k = {k_text})")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    loss_axis.set_title("loss at the compute-optimal N*, D*")
    loss_axis.set_ylabel("validation loss (nats per token)")
    size_axis.set_yscale("log")
    size_axis.set_title("compute-optimal parameters N*(C)")
    size_axis.set_ylabel("parameters (log scale)")
    figure.tight_layout()
    return figure


def laws_from_fit(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """variant -> {E, A, B, alpha, beta, k} from `fit_table`'s result."""
    return {variant: {**{name: fit[name]["value"] for name in ("E", "A", "B", "alpha", "beta")}, "k": fit["k"]}
            for variant, fit in result["variants"].items()}


def write_figures(rows: list[dict[str, Any]], out_dir: Path, fit_result: dict[str, Any] | None) -> list[Path]:
    """loss_curves, isoflop and (with a fit) frontier as PNG and SVG in `out_dir`; returns the paths."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    laws = laws_from_fit(fit_result) if fit_result else None
    figures = {"loss_curves": loss_curves(rows), "isoflop": isoflop(rows, laws)}
    if laws:
        figures["frontier"] = frontier(rows, laws)
    written = []
    for name, figure in figures.items():
        for suffix in ("png", "svg"):
            path = out_dir / f"{name}.{suffix}"
            temporary = out_dir / f".{name}.tmp.{suffix}"
            figure.savefig(temporary, dpi=120)
            temporary.replace(path)
            written.append(path)
        plt.close(figure)
    return written
