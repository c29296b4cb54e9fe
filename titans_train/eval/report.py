"""Evaluation results out: a console table, a JSON file (atomic), heatmaps as PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(results: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(temporary, path)


def table(results: dict) -> str:
    """One block per task: ppl by length (and position buckets of the longest), accuracy by cell."""
    lines = [f"eval of {results['source']} (step {results['step']}, seed {results['seed']})"]
    for task, result in results["tasks"].items():
        if task == "ppl":
            lines.append(f"ppl: loss {result['loss']:.4f} | ppl {result['ppl']:.2f} at the training length "
                         f"{result['seq_len']}")
            lines.append(f"  {'length':>8} {'tokens':>10} {'loss':>8} {'ppl':>10}")
            for entry in result["by_length"]:
                lines.append(f"  {entry['length']:>8} {entry['tokens']:>10} {entry['loss']:>8.4f} {entry['ppl']:>10.2f}")
            longest = result["by_length"][-1]
            lines.append(f"  loss by position at length {longest['length']}: " + ", ".join(
                f"[{b['start']},{b['stop']}) {b['loss']:.3f}" for b in longest["buckets"]))
            continue
        lines.append(f"{task}: accuracy {result['accuracy']:.3f} over {result['probes']} probes")
        for cell in result["cells"]:
            where = " ".join(f"{key}={value}" for key, value in cell.items() if key not in ("accuracy", "probes"))
            lines.append(f"  {where:<28} {cell['accuracy']:.3f} ({cell['probes']})")
    return "\n".join(lines)


def heatmap(result: dict, column_key: str, path: str | Path, title: str) -> Path:
    """Accuracy by length (rows) and `column_key` (columns, e.g. depth) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = result["cells"]
    rows = sorted({cell["length"] for cell in cells})
    columns = sorted({cell[column_key] for cell in cells}, key=str)
    grid = np.full((len(rows), len(columns)), np.nan)
    for cell in cells:
        grid[rows.index(cell["length"]), columns.index(cell[column_key])] = cell["accuracy"]
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(columns), 1.0 + 0.5 * len(rows)))
    image = axes.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(columns)), [str(c) for c in columns])
    axes.set_yticks(range(len(rows)), [str(r) for r in rows])
    axes.set_xlabel(column_key)
    axes.set_ylabel("length (tokens)")
    axes.set_title(title)
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    figure.colorbar(image, ax=axes, label="exact match")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
    return path


HEATMAP_COLUMNS = {"niah": "depth", "babilong": "qa"}
