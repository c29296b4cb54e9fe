"""The scaling-law fit recovers a known law from noisy synthetic runs and refuses too little
data; the plots are valid images carrying the expected series."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

from titans_train.config import ConfigError
from titans_train.study.collect import write_table
from titans_train.study.fit import (LOG_COEFFICIENT_CAP, _objective, compute_optimal, fit_law, fit_table, format_fit,
                                    law_parameters, predict)

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al.'s estimates
SIZES = [3e5, 1e6, 3e6, 1e7]
TOKENS = [1e7, 3e7, 1e8, 3e8]


def _synthetic(law: dict, noise: float, seed: int):
    generator = np.random.default_rng(seed)
    n = np.repeat(SIZES, len(TOKENS))
    d = np.tile(TOKENS, len(SIZES))
    return n, d, predict(law, n, d) * np.exp(generator.normal(0.0, noise, len(n)))


def test_fit_recovers_a_known_law_from_noisy_runs():
    n, d, loss = _synthetic(TRUE, noise=0.002, seed=1)  # 0.2% multiplicative noise
    fit = fit_law(n, d, loss, resamples=25, seed=0)
    # Stated tolerance: exponents within 0.05, E within 5%, each true value inside its 95% interval.
    assert abs(fit.law["alpha"] - TRUE["alpha"]) < 0.05, fit.law
    assert abs(fit.law["beta"] - TRUE["beta"]) < 0.05, fit.law
    assert fit.law["E"] == pytest.approx(TRUE["E"], rel=0.05)
    for name in ("E", "alpha", "beta"):
        low, high = fit.intervals[name]
        assert low <= TRUE[name] <= high, (name, fit.intervals[name])
    assert fit.resamples == 25
    # Compute-optimal allocation follows the closed form: N* minimises L along k N D = C.
    entry = fit.optimal[-1]
    grid = np.geomspace(entry["N"] / 10, entry["N"] * 10, 2001)
    best = grid[np.argmin(predict(fit.law, grid, entry["compute"] / (6 * grid)))]
    assert best == pytest.approx(entry["N"], rel=0.01)
    assert entry["N"] * entry["D"] * 6 == pytest.approx(entry["compute"])


def test_objective_gradient_matches_finite_differences():
    n, d, loss = _synthetic(TRUE, noise=0.02, seed=2)
    logs = (np.log(n), np.log(d), np.log(loss))
    theta = np.array([5.0, 6.0, 0.4, 0.3, 0.25])
    _, gradient = _objective(theta, *logs)
    for i in range(5):
        step = np.zeros(5)
        step[i] = 1e-6
        numeric = (_objective(theta + step, *logs)[0] - _objective(theta - step, *logs)[0]) / 2e-6
        assert numeric == pytest.approx(gradient[i], rel=1e-4, abs=1e-9)


def test_compute_optimal_closed_form_minimises_the_law():
    n_opt, d_opt = compute_optimal(TRUE, 1e21, 6.0)
    for factor in (0.8, 1.25):
        assert predict(TRUE, n_opt * factor, d_opt / factor) > predict(TRUE, n_opt, d_opt)


def test_too_small_a_table_is_refused_with_a_clear_error():
    n, d, loss = _synthetic(TRUE, noise=0.0, seed=0)
    with pytest.raises(ConfigError) as error:
        fit_law(n[:5], d[:5], loss[:5], label="variant mac", key="results.csv")
    assert error.value.key == "results.csv"
    assert "variant mac: 5 usable runs" in str(error.value) and ">= 6 runs" in str(error.value)
    same_size = [1e6] * 8
    with pytest.raises(ConfigError, match="1 distinct parameter counts"):
        fit_law(same_size, d[:8], loss[:8])


def _table(tmp_path: Path) -> list[dict]:
    """Two variants of a 3 x 3 study with metrics.jsonl curves; one run unfinished."""
    rows = []
    for variant, law in (("mac", TRUE), ("transformer", {**TRUE, "E": 1.8})):
        for size in (1e6, 3e6, 1e7):
            for budget in (1e18, 3e18, 1e19):
                tokens = budget / (6 * size)
                name = f"{variant}-{size:g}-{budget:g}"
                run_dir = tmp_path / name
                run_dir.mkdir()
                steps = np.geomspace(tokens / 20, tokens, 5)
                curve = [{"step": i + 1, "train/loss": float(predict(law, size, t)) + 0.1, "train/tokens": float(t)}
                         for i, t in enumerate(steps)]
                (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
                unfinished = variant == "transformer" and size == 1e7 and budget == 1e19
                rows.append({"run": name, "variant": variant, "size": f"{size:g}", "budget": f"c{budget:g}", "lr": 1e-3,
                             "status": "unfinished" if unfinished else "finished", "params": size,
                             "non_embedding_params": size * 0.9, "tokens": tokens, "flops": 6.5 * size * tokens,
                             "flops_6nd": 6 * size * tokens, "compute_budget": budget, "steps": 5, "last_step": 5,
                             "val_loss": None if unfinished else float(predict(law, size, tokens)), "val_step": 5,
                             "train_loss": 0.0, "exit_code": 0, "run_dir": str(run_dir)})
    return rows


def test_fit_table_fits_per_variant_and_leaves_out_unfinished_runs(tmp_path):
    rows = _table(tmp_path)
    write_table(rows, tmp_path / "results.csv")
    from titans_train.study.collect import read_table

    result = fit_table(read_table(tmp_path / "results.csv"), resamples=5)
    assert set(result["variants"]) == {"mac", "transformer"}
    assert result["variants"]["transformer"]["excluded"] == 1 and result["variants"]["transformer"]["rows"] == 8
    for name in ("E", "A", "B", "alpha", "beta"):
        item = result["variants"]["mac"][name]
        assert item["low"] is not None and item["low"] <= item["high"]
    assert result["variants"]["transformer"]["E"]["value"] > result["variants"]["mac"]["E"]["value"]
    flops = fit_table(rows, resamples=0, compute="flops")
    assert flops["variants"]["mac"]["k"] == pytest.approx(6.5)
    with pytest.raises(ConfigError) as error:
        fit_table(rows, n_column="width")
    assert error.value.key == "--n-column"


def test_plots_are_valid_images_with_the_expected_series(tmp_path):
    import matplotlib.image

    from titans_train.study.plot import frontier, isoflop, laws_from_fit, loss_curves, write_figures

    rows = _table(tmp_path)
    result = fit_table(rows, resamples=0)
    paths = write_figures(rows, tmp_path / "plots", result)
    assert sorted(p.name for p in paths) == sorted(f"{n}.{s}" for n in ("loss_curves", "isoflop", "frontier")
                                                    for s in ("png", "svg"))
    for path in paths:
        if path.suffix == ".png":
            image = matplotlib.image.imread(path)
            assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0.01
        else:
            assert ElementTree.parse(path).getroot().tag.endswith("svg")

    curves = loss_curves(rows)
    axes = [a for a in curves.axes]
    assert [a.get_title() for a in axes] == ["variant mac", "variant transformer"]
    labels = [line.get_label() for line in axes[1].get_lines() if not line.get_label().startswith("_")]
    assert len(labels) == 9 and "1e+07, c1e+19 (unfinished)" in labels
    assert "tokens" in axes[0].get_xlabel() and "nats" in axes[0].get_ylabel()

    laws = laws_from_fit(result)
    profile = isoflop(rows, laws)
    mac_lines = {line.get_label(): line for line in profile.axes[0].get_lines()}
    for budget in ("1e+18", "3e+18", "1e+19"):
        measured = mac_lines[f"C = {budget} FLOPs"]
        assert len(measured.get_xdata()) == 3  # three sizes per budget
        assert f"fit at C = {budget}" in mac_lines
    transformer_lines = {line.get_label(): line for line in profile.axes[1].get_lines()}
    assert len(transformer_lines["C = 1e+19 FLOPs"].get_xdata()) == 2  # the unfinished run left out

    edge = frontier(rows, laws)
    loss_axis, size_axis = edge.axes
    labels = [line.get_label() for line in loss_axis.get_lines()]
    assert labels == ["mac: fitted frontier", "mac: runs", "transformer: fitted frontier", "transformer: runs"]
    fitted = loss_axis.get_lines()[0]
    c, loss = fitted.get_xdata(), fitted.get_ydata()
    n_opt, d_opt = compute_optimal(laws["mac"], c, 6.0)
    assert np.allclose(loss, predict(laws["mac"], n_opt, d_opt))
    assert np.all(np.diff(loss) < 0)  # more compute, lower optimal loss
    assert size_axis.get_yscale() == "log" and "FLOPs" in size_axis.get_xlabel()
    assert math.isclose(laws["mac"]["k"], 6.0)


def test_an_ill_determined_fit_reports_unbounded_intervals_as_json_nulls():
    """Loss independent of N: alpha and A are not identified and resamples run off to infinity
    (as in docs/scaling-study.md's CPU study); the result stays valid JSON."""
    n, d, _ = _synthetic(TRUE, noise=0.0, seed=0)
    loss = (2.0 + 50.0 * d ** -0.25) * np.exp(np.random.default_rng(3).normal(0.0, 0.01, len(d)))
    rows = [{"params": a, "tokens": b, "val_loss": c} for a, b, c in zip(n, d, loss)]
    result = fit_table(rows, resamples=20)
    text = json.dumps(result, allow_nan=False)  # no Infinity/NaN tokens
    fit = json.loads(text)["variants"]["all"]
    assert fit["bootstrap"]["resamples"] == 20 and fit["bootstrap"]["degenerate"] > 0
    assert fit["A"]["high"] is None  # unbounded, said so rather than dropped
    assert fit["beta"]["low"] <= 0.25 <= fit["beta"]["high"]  # the identified part is still right
    assert "all: 16 runs" in format_fit(result) and "unbounded" in format_fit(result)


def test_a_log_coefficient_at_its_cap_reads_as_infinite_and_below_it_as_its_exponential():
    """The fit bounds a = log A and b = log B at the cap: a run-off ends there, on every CPU."""
    capped = law_parameters(np.array([LOG_COEFFICIENT_CAP, LOG_COEFFICIENT_CAP, 0.5, 0.3, 0.3]))
    assert capped["A"] == math.inf and capped["B"] == math.inf and not math.isinf(capped["E"])
    below = law_parameters(np.array([LOG_COEFFICIENT_CAP - 1.0, 5.0, 0.5, 0.3, 0.3]))
    assert below["A"] == pytest.approx(math.exp(LOG_COEFFICIENT_CAP - 1.0)) and below["B"] == pytest.approx(math.exp(5.0))
