"""A run's state from its directory, and the study's table of results.

Status of a run (from `metrics.jsonl`, `config.yaml` and the runner's `study-run.json`):
  finished    a validation loss was logged at the run's last step
  diverged    the trainer stopped on a NaN/inf loss (exit code 3)
  failed      the trainer exited with another error (the log is `<run_dir>/train.log`)
  unfinished  started but not finished (interrupted, or still running): `study run` resumes it
  pending     never started
Nothing is dropped: every planned run is a row, whatever its status.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from titans_train.study.plan import PlannedRun

RUN_RECORD = "study-run.json"  # written by `study run`: the overrides and the last exit code
EXIT_DIVERGED = 3  # titans_train.train.trainer
EXIT_REQUEUE = 75

COLUMNS = ("run", "variant", "size", "budget", "lr", "status", "params", "non_embedding_params", "tokens",
           "flops", "flops_6nd", "compute_budget", "steps", "last_step", "val_loss", "val_step", "train_loss",
           "exit_code", "run_dir")


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def read_run_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RUN_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a torn last line (a killed run) is ignored."""
    path = run_dir / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def last_by_step(records: Iterable[dict[str, Any]], key: str) -> dict[int, float]:
    """step -> value of `key`; a step logged twice (re-run after a resume) keeps its last value."""
    return {int(r["step"]): float(r[key]) for r in records if key in r}


def run_status(run: PlannedRun, records: list[dict[str, Any]] | None = None) -> str:
    run_dir = Path(run.run_dir)
    records = read_metrics(run_dir) if records is None else records
    validation = last_by_step(records, "val/loss")
    if run.steps in validation and math.isfinite(validation[run.steps]):
        return "finished"
    record = read_run_record(run_dir) or {}
    code = record.get("exit_code")
    if code == EXIT_DIVERGED:
        return "diverged"
    if code is not None and code < 0:
        return "unfinished"  # killed by a signal before it could save: it resumes from its last checkpoint
    if code not in (None, 0, EXIT_REQUEUE) or (code == 0 and record.get("state") == "exited"):
        return "failed"  # exit 0 without a final validation loss is a failure too
    if run_dir.is_dir() and (records or record or (run_dir / "config.yaml").is_file()):
        return "unfinished"
    return "pending"


def collect_row(run: PlannedRun) -> dict[str, Any]:
    """One table row: the run's parameters, tokens and FLOPs (from its plan: `study run` refuses a
    run directory holding other settings), its status and its last validation loss."""
    records = read_metrics(Path(run.run_dir))
    validation = last_by_step(records, "val/loss")
    train_loss = last_by_step(records, "train/loss")
    record = read_run_record(Path(run.run_dir)) or {}
    val_step = max(validation) if validation else None
    last_step = max(train_loss) if train_loss else 0
    return {
        "run": run.name, "variant": run.variant, "size": run.size, "budget": run.budget, "lr": run.lr,
        "status": run_status(run, records), "params": run.params, "non_embedding_params": run.non_embedding_params,
        "tokens": run.tokens, "flops": run.flops, "flops_6nd": 6.0 * run.params * run.tokens,
        "compute_budget": run.compute_budget, "steps": run.steps, "last_step": last_step,
        "val_loss": validation[val_step] if val_step is not None else None, "val_step": val_step,
        "train_loss": train_loss[last_step] if train_loss else None, "exit_code": record.get("exit_code"),
        "run_dir": run.run_dir,
    }


def collect(runs: list[PlannedRun]) -> list[dict[str, Any]]:
    return [collect_row(run) for run in runs]


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    """CSV, or JSON lines if `path` ends in .jsonl; written to a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
        return
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in COLUMNS})
    os.replace(temporary, path)


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV or JSONL table; CSV numbers parsed, empty cells None."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def parse(value: str):
        if value == "":
            return None
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number

    with open(path, newline="") as handle:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(handle)]
