"""Run a study's runs one after another on this machine, or write them as a SLURM sweep file.

Each run is `python -m titans_train train RECIPE OVERRIDES...` in a subprocess (a fresh process
per run: torch.distributed state and memory do not leak from one run into the next), its output
appended to `<run_dir>/train.log`. Finished runs are skipped; unfinished ones are started again
and the trainer resumes them from their `latest` checkpoint; failed/diverged ones are reported
and skipped unless `retry_failed`. SIGTERM or Ctrl-C stops the current run cleanly (the trainer
saves a checkpoint and exits 75) and the study with it; running the study again carries on.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from titans_train.config import InvalidValueError
from titans_train.study.collect import EXIT_REQUEUE, read_metrics, last_by_step, read_run_record, run_status, write_atomic
from titans_train.study.plan import PlannedRun

SKIPPED_STATUSES = ("finished", "failed", "diverged")


def check_run_dir(run: PlannedRun) -> None:
    """A run directory holding a run of other settings is not resumed into (edit the study, change runs_dir)."""
    record = read_run_record(Path(run.run_dir))
    if record is not None and tuple(record.get("overrides", ())) != run.overrides:
        changed = sorted(set(record.get("overrides", ())) ^ set(run.overrides))
        raise InvalidValueError("runs_dir", f"{run.run_dir} holds run {run.name} with other settings "
                                            f"({', '.join(changed[:4])}); remove it or give another runs_dir")


def train_command(run: PlannedRun) -> list[str]:
    return [sys.executable, "-m", "titans_train", "train", run.recipe, *run.overrides]


def _record(run: PlannedRun, **fields) -> None:
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "study-run.json", json.dumps({"run": run.name, "overrides": list(run.overrides), **fields}, indent=1))


class _Forwarder:
    """While installed, SIGTERM/SIGINT to the study reach the current trainer as SIGTERM."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.stopped = False

    def __call__(self, signal_number, frame) -> None:
        self.stopped = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def run_study(runs: list[PlannedRun], retry_failed: bool = False, echo: Callable[[str], None] = print) -> int:
    """Train every run not finished; 0 when all are finished, 75 if stopped by a signal, else 1."""
    for run in runs:
        check_run_dir(run)
    forwarder = _Forwarder()
    previous = {sig: signal.signal(sig, forwarder) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index, run in enumerate(runs, 1):
            prefix = f"[{index}/{len(runs)}] {run.name}"
            status = run_status(run)
            if status in SKIPPED_STATUSES and not (retry_failed and status != "finished"):
                echo(f"{prefix}: {status}, skipped")
                continue
            if forwarder.stopped:
                break
            echo(f"{prefix}: {'resuming' if status == 'unfinished' else 'starting'} ({run.steps} steps, "
                 f"{run.params / 1e6:.3f}M parameters; log {Path(run.run_dir) / 'train.log'})")
            _record(run, state="running", started=time.time())
            start = time.monotonic()
            with open(Path(run.run_dir) / "train.log", "ab") as log:
                # Its own session: a Ctrl-C in the terminal reaches only the study, which forwards it.
                forwarder.child = subprocess.Popen(train_command(run), stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True)
                code = forwarder.child.wait()
                forwarder.child = None
            _record(run, state="exited", exit_code=code, seconds=round(time.monotonic() - start, 1))
            status = run_status(run)
            validation = last_by_step(read_metrics(Path(run.run_dir)), "val/loss")
            loss = f", validation loss {validation[max(validation)]:.4f}" if validation else ""
            echo(f"{prefix}: {status} (exit code {code}, {time.monotonic() - start:.0f} s{loss})")
            if code == EXIT_REQUEUE or forwarder.stopped:
                echo("stopped: run the study again to resume")
                return EXIT_REQUEUE
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if forwarder.stopped:
        return EXIT_REQUEUE
    statuses = [run_status(run) for run in runs]
    return 0 if all(status == "finished" for status in statuses) else 1


def sweep_text(study_name: str, runs: list[PlannedRun]) -> str:
    """The study as `titans-train slurm submit --sweep` reads it: one override set per line (shell
    words), each with its run's own run_dir; array task i trains runs[i] on the base recipe."""
    import shlex

    header = [f"# study {study_name}: {len(runs)} runs; submit with",
              f"#   titans-train slurm submit {runs[0].recipe} --sweep THIS_FILE --nodes N --gpus-per-node G"]
    return "\n".join(header + [f"# {run.name}\n{shlex.join(run.overrides)}" for run in runs]) + "\n"


def write_sweep(study_name: str, runs: list[PlannedRun], path: Path, include_finished: bool = False) -> list[PlannedRun]:
    """Write the unfinished runs (all with `include_finished`) as a sweep file; returns them."""
    for run in runs:
        check_run_dir(run)
    todo = [run for run in runs if include_finished or run_status(run) != "finished"]
    if len({run.recipe for run in todo}) > 1:
        raise RuntimeError("a study's runs share its base recipe")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, sweep_text(study_name, todo) if todo else f"# study {study_name}: every run is finished\n")
    return todo
