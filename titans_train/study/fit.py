"""The parametric scaling law L(N, D) = E + A N^-alpha + B D^-beta, fitted as Hoffmann et al.
2022 (Chinchilla) approach 3, with bootstrap intervals as Besiroglu et al. 2024 recommend.

Method (the variant used here, stated because the details change the answer):
- parametrisation: log L_hat = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b,
  E = e^e (log-sum-exp, as in the paper);
- objective: sum over runs of Huber_delta(log L_hat - log L), delta = 1e-3;
- optimiser: L-BFGS (scipy.optimize.minimize, method L-BFGS-B without bounds, analytic gradient,
  tight tolerances: Besiroglu et al. traced part of the original's misfit to early stopping),
  started from the best `starts` points (default 20) of the paper's initialisation grid
  alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25} (4500 points,
  all evaluated), keeping the lowest objective. The paper started L-BFGS from every grid point;
  taking the best grid points first is our shortcut, cheap enough to repeat per bootstrap sample;
- intervals: nonparametric bootstrap (runs resampled with replacement, `resamples` refits, each
  from the full fit's optimum and the best 5 grid points of the resample), percentile intervals.
  Besiroglu et al. found the paper's intervals far too narrow; with a handful of runs these are
  wide, and should be;
- compute-optimal allocation under C = k N D, k = 6 (the usual 6ND) or k = the median over the
  runs of our FLOP count / (N D) (`compute="flops"`): N*(C) = G (C/k)^(beta/(alpha+beta)),
  D*(C) = (C/k) / N*(C), G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from titans_train.config import InvalidValueError

HUBER_DELTA = 1e-3
PARAMETERS = ("E", "A", "B", "alpha", "beta")
MIN_ROWS = 6  # more runs than the law's 5 parameters
MIN_DISTINCT = 3  # a power law plus a constant along an axis needs three distinct values on it
# An ill-determined fit (loss independent of N, say) lowers its objective by running a = log A off
# along a ray with alpha -> 0; where the optimiser then stops (overflow, or a finite 1e213) is up to
# the CPU's floating point. Capping log A and log B makes every run-off stop at the cap, which reads
# as unbounded; a real law's coefficient is nowhere near e^200.
LOG_COEFFICIENT_CAP = 200.0
N_COLUMNS = ("params", "parameters", "N", "n_params")
D_COLUMNS = ("tokens", "D", "n_tokens")
LOSS_COLUMNS = ("val_loss", "loss", "L", "final_val_loss")


def initialisation_grid() -> np.ndarray:
    """(4500, 5) starting points (a, b, e, alpha, beta): Hoffmann et al.'s grid."""
    exponents = np.arange(0.0, 2.01, 0.5)
    offsets = np.arange(-1.0, 1.01, 0.5)
    scales = np.arange(0.0, 25.1, 5.0)
    return np.array([(a, b, e, alpha, beta) for a, b, e, alpha, beta in
                     itertools.product(scales, scales, offsets, exponents, exponents)])


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray) -> tuple[float, np.ndarray]:
    """Huber objective and its gradient at theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, R)
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    residual = top + np.log(total) - log_loss  # (R,)
    weights /= total  # d LSE / d term
    small = np.abs(residual) <= HUBER_DELTA
    loss = np.where(small, 0.5 * residual**2, HUBER_DELTA * (np.abs(residual) - 0.5 * HUBER_DELTA)).sum()
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)  # d Huber / d residual
    gradient = np.array([
        (slope * weights[0]).sum(), (slope * weights[1]).sum(), (slope * weights[2]).sum(),
        -(slope * weights[0] * log_n).sum(), -(slope * weights[1] * log_d).sum(),
    ])
    return float(loss), gradient


def _grid_objective(grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    """The Huber objective at every grid point at once: (G,)."""
    a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    predicted = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)  # (G, R)
    residual = np.abs(predicted - log_loss)
    return np.where(residual <= HUBER_DELTA, 0.5 * residual**2, HUBER_DELTA * (residual - 0.5 * HUBER_DELTA)).sum(axis=1)


def _minimise(starts: np.ndarray, log_n, log_d, log_loss) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    best, best_value = None, math.inf
    for start in starts:
        result = minimize(_objective, start, args=(log_n, log_d, log_loss), jac=True, method="L-BFGS-B",
                          bounds=[(None, LOG_COEFFICIENT_CAP)] * 2 + [(None, None)] * 3,
                          options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12})
        if np.all(np.isfinite(result.x)) and result.fun < best_value:
            best, best_value = result.x, float(result.fun)
    return best, best_value


def _best_grid_points(grid: np.ndarray, count: int, log_n, log_d, log_loss) -> np.ndarray:
    return grid[np.argsort(_grid_objective(grid, log_n, log_d, log_loss))[:count]]


def law_parameters(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = theta

    def coefficient(log_value):  # a run-off to the cap is an infinite coefficient
        return math.inf if log_value >= LOG_COEFFICIENT_CAP else float(np.exp(log_value))

    with np.errstate(over="ignore"):
        return {"E": float(np.exp(e)), "A": coefficient(a), "B": coefficient(b), "alpha": float(alpha),
                "beta": float(beta)}


def predict(law: dict[str, float], n, d):
    return law["E"] + law["A"] * np.asarray(n, float) ** -law["alpha"] + law["B"] * np.asarray(d, float) ** -law["beta"]


def compute_optimal(law: dict[str, float], compute, k: float) -> tuple[np.ndarray, np.ndarray]:
    """(N*, D*) minimising L(N, D) subject to k N D = compute; NaN when the law has no such
    minimum (an exponent <= 0, or a coefficient infinite or zero)."""
    alpha, beta = law["alpha"], law["beta"]
    budget = np.asarray(compute, float) / k
    if not _has_optimum(law):
        return np.full_like(budget, np.nan), np.full_like(budget, np.nan)
    scale = (alpha * law["A"] / (beta * law["B"])) ** (1.0 / (alpha + beta))
    n_opt = scale * budget ** (beta / (alpha + beta))
    return n_opt, budget / n_opt


def _has_optimum(law: dict[str, float]) -> bool:
    values = [law[name] for name in PARAMETERS]
    return all(math.isfinite(v) for v in values) and law["alpha"] > 0 and law["beta"] > 0 and law["A"] > 0 and law["B"] > 0


@dataclass
class LawFit:
    label: str
    rows: int
    law: dict[str, float]
    objective: float
    k: float
    compute: str  # "6ND" or "flops"
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    resamples: int = 0
    degenerate: int = 0  # resamples whose law has no compute optimum (a parameter infinite, an exponent <= 0)
    optimal: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def item(name):
            low, high = self.intervals.get(name, (None, None))
            return {"value": _finite(self.law[name]), "low": _finite(low), "high": _finite(high)}

        optimal = [{k: ([_finite(x) for x in v] if isinstance(v, tuple) else _finite(v)) for k, v in entry.items()}
                   for entry in self.optimal]
        return {
            "rows": self.rows, "objective": self.objective, "compute": self.compute, "k": self.k,
            **{name: item(name) for name in (*PARAMETERS, "a", "b")},
            "bootstrap": {"resamples": self.resamples, "degenerate": self.degenerate, "level": 0.95},
            "optimal": optimal,
        }


def _finite(value):
    """JSON has no infinity: an unbounded or undefined value is null (with bootstrap resamples > 0,
    a null interval end means unbounded)."""
    return value if value is None or math.isfinite(value) else None


def fit_law(n: Sequence[float], d: Sequence[float], loss: Sequence[float], label: str = "all",
            resamples: int = 200, starts: int = 20, seed: int = 0, flops: Sequence[float] | None = None,
            compute: str = "6ND", key: str = "table") -> LawFit:
    """Fit the law to runs (N, D, L); bootstrap intervals; compute-optimal N*, D* across the runs' compute."""
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    distinct_n, distinct_d = len(np.unique(n)), len(np.unique(d))
    if len(n) < MIN_ROWS or distinct_n < MIN_DISTINCT or distinct_d < MIN_DISTINCT:
        raise InvalidValueError(key, f"{label}: {len(n)} usable runs with {distinct_n} distinct parameter counts and "
                                     f"{distinct_d} distinct token counts; fitting the 5-parameter law needs >= {MIN_ROWS} "
                                     f"runs, >= {MIN_DISTINCT} distinct N and >= {MIN_DISTINCT} distinct D")
    if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0):
        raise InvalidValueError(key, f"{label}: parameters, tokens and loss must all be > 0")
    if compute == "flops":
        if flops is None:
            raise InvalidValueError("--compute", "compute=flops needs a flops column")
        k = float(np.median(np.asarray(flops, float) / (n * d)))
    elif compute == "6ND":
        k = 6.0
    else:
        raise InvalidValueError("--compute", f"{compute!r} is not one of 6ND, flops")
    logs = (np.log(n), np.log(d), np.log(loss))
    grid = initialisation_grid()
    theta, objective = _minimise(_best_grid_points(grid, starts, *logs), *logs)
    fit = LawFit(label=label, rows=len(n), law=law_parameters(theta), objective=objective, k=k, compute=compute)
    fit.law["a"], fit.law["b"] = _allocation_exponents(fit.law)
    budgets = np.geomspace((k * n * d).min(), (k * n * d).max(), 3)  # the span of the runs' compute
    samples = []
    generator = np.random.default_rng(seed)
    for _ in range(resamples):
        pick = generator.integers(0, len(n), len(n))
        sample_logs = tuple(x[pick] for x in logs)
        sample_starts = np.vstack([theta, _best_grid_points(grid, 5, *sample_logs)])
        sample_theta, _ = _minimise(sample_starts, *sample_logs)
        if sample_theta is not None:
            samples.append(law_parameters(sample_theta))
    fit.resamples = len(samples)
    fit.degenerate = sum(not _has_optimum(sample) for sample in samples)

    def interval(values) -> tuple[float, float]:
        """95% percentile interval; an infinite end (degenerate resamples) stays infinite."""
        values = np.asarray(values, float)
        values = values[~np.isnan(values)]
        if not len(values):
            return math.nan, math.nan
        return float(np.percentile(values, 2.5, method="lower")), float(np.percentile(values, 97.5, method="higher"))

    if samples:
        for name in PARAMETERS:
            fit.intervals[name] = interval([s[name] for s in samples])
        allocations = [_allocation_exponents(s) for s in samples]
        fit.intervals["a"] = interval([x[0] for x in allocations])
        fit.intervals["b"] = interval([x[1] for x in allocations])
    for budget in budgets:
        n_opt, d_opt = compute_optimal(fit.law, budget, k)
        entry = {"compute": float(budget), "N": float(n_opt), "D": float(d_opt),
                 "loss": float(predict(fit.law, n_opt, d_opt))}
        if samples:
            optima = [compute_optimal(s, budget, k) for s in samples]
            entry["N_interval"] = interval([o[0] for o in optima])
            entry["D_interval"] = interval([o[1] for o in optima])
        fit.optimal.append(entry)
    return fit


def _allocation_exponents(law: dict[str, float]) -> tuple[float, float]:
    """(a, b) of N* ~ C^a, D* ~ C^b."""
    total = law["alpha"] + law["beta"]
    return (law["beta"] / total, law["alpha"] / total) if total > 0 else (math.nan, math.nan)


def pick_column(rows: list[dict[str, Any]], wanted: str | None, candidates: Sequence[str], what: str, option: str) -> str:
    columns = list(rows[0]) if rows else []
    if wanted:
        if wanted not in columns:
            raise InvalidValueError(option, f"no column {wanted!r} in the table (columns: {', '.join(columns)})")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise InvalidValueError(option, f"no {what} column (looked for {', '.join(candidates)}; columns: "
                                    f"{', '.join(columns)}); name it with {option}")


def fit_table(rows: list[dict[str, Any]], n_column: str | None = None, d_column: str | None = None,
              loss_column: str | None = None, resamples: int = 200, compute: str = "6ND", seed: int = 0,
              key: str = "table") -> dict[str, Any]:
    """Per-variant fits of a results table (rows of a `study collect` table or any CSV with
    parameter, token and loss columns; a `variant` column splits the fits, a `status` column
    keeps only finished runs)."""
    if not rows:
        raise InvalidValueError(key, "the table is empty")
    n_column = pick_column(rows, n_column, N_COLUMNS, "parameter-count", "--n-column")
    d_column = pick_column(rows, d_column, D_COLUMNS, "token-count", "--d-column")
    loss_column = pick_column(rows, loss_column, LOSS_COLUMNS, "loss", "--loss-column")
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row.get("variant") or "all"), []).append(row)
    result = {"method": "Hoffmann et al. 2022 approach 3 (Huber delta 1e-3 on log loss, log-sum-exp, L-BFGS from the "
                        "best grid points), bootstrap percentile intervals",
              "n_column": n_column, "d_column": d_column, "loss_column": loss_column, "variants": {}}
    for label, group in groups.items():
        usable = [r for r in group if r.get("status", "finished") == "finished" and r.get(loss_column) is not None]
        flops = [r["flops"] for r in usable] if compute == "flops" and all("flops" in r for r in usable) else None
        fit = fit_law([r[n_column] for r in usable], [r[d_column] for r in usable], [r[loss_column] for r in usable],
                      label=f"variant {label}", resamples=resamples, flops=flops, compute=compute, seed=seed, key=key)
        result["variants"][label] = {**fit.to_json(), "excluded": len(group) - len(usable)}
    return result


def _number(value) -> str:
    return f"{value:.4g}" if value is not None else "unbounded"


def format_fit(result: dict[str, Any]) -> str:
    """The fit as text: one block per variant."""
    lines = [f"L(N, D) = E + A N^-alpha + B D^-beta; {result['method']}",
             f"N = {result['n_column']}, D = {result['d_column']}, L = {result['loss_column']}"]
    for label, fit in result["variants"].items():
        bootstrap = fit["bootstrap"]
        lines.append(f"\n{label}: {fit['rows']} runs ({fit['excluded']} not finished, left out); "
                     f"95% intervals from {bootstrap['resamples']} bootstrap refits"
                     f" ({bootstrap['degenerate']} degenerate: a parameter infinite or an exponent <= 0)")

        for name in (*PARAMETERS, "a", "b"):
            item = fit[name]
            span = f"  [{_number(item['low'])}, {_number(item['high'])}]" if bootstrap["resamples"] else ""
            lines.append(f"  {name:<6} {_number(item['value'])}{span}")
        lines.append(f"  compute-optimal (C = {fit['k']:.3g} N D, {fit['compute']}): N* ~ C^a, D* ~ C^b")
        for entry in fit["optimal"]:
            n_span = ""
            if "N_interval" in entry:
                n_span = f" [{_number(entry['N_interval'][0])}, {_number(entry['N_interval'][1])}]"
            lines.append(f"    C = {entry['compute']:.3g}: N* = {_number(entry['N'])}{n_span}, D* = {_number(entry['D'])}, "
                         f"L = {_number(entry['loss'])}")
    return "\n".join(lines)
