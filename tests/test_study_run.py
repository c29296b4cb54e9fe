"""`titans-train study run` for real: a 2-run study completes, an interrupted study resumes
without repeating finished runs, collect finds both, a failed run is reported.

The study that is interrupted runs as a `titans-train` subprocess (it gets the SIGTERM); the
others run in this process. Every run is its own trainer subprocess either way.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STUDY = """
name: two
recipe: debug
overrides:
  train.eval_batches: 1
  checkpoint.interval: 5
  checkpoint.keep_last: 1
  logging.interval: 5
axes:
  sizes: [{name: s, dim: 16, n_layers: 1, n_heads: 1}]
  tokens: [2560, 12800]   # 10 and 50 steps of 256 tokens
derived:
  train.warmup_steps: "1"
"""


def _arguments(tmp_path: Path, text: str, *args: str) -> list[str]:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return ["study", args[0], str(path), "--runs-dir", str(tmp_path / "runs"), *args[1:]]


def _study(tmp_path: Path, capsys, text: str, *args: str) -> tuple[int, str]:
    """`titans-train study ...` in this process: (exit code, stdout + stderr)."""
    from titans_train.cli import main

    capsys.readouterr()
    code = main(_arguments(tmp_path, text, *args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_study_runs_resumes_after_interrupt_and_collects(tmp_path, capsys):
    short, long = tmp_path / "runs" / "s-t2.56k", tmp_path / "runs" / "s-t12.8k"
    study = subprocess.Popen([sys.executable, "-m", "titans_train", *_arguments(tmp_path, STUDY, "run")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not (long / "checkpoints" / "latest").is_file():  # interrupt the second run mid-way
        assert study.poll() is None and time.monotonic() < deadline, study.stdout.read() if study.poll() is not None else "timeout"
        time.sleep(0.05)
    study.send_signal(signal.SIGTERM)
    output, _ = study.communicate(timeout=120)
    assert study.returncode == 75, output
    assert "s-t2.56k: finished" in output and "stopped: run the study again to resume" in output
    before = _records(long)
    interrupted_at = max(r["step"] for r in before if "train/loss" in r)
    assert 5 <= interrupted_at < 50, interrupted_at
    short_metrics = (short / "metrics.jsonl").read_text()

    code, output = _study(tmp_path, capsys, STUDY, "run")
    assert code == 0, output
    assert "[1/2] s-t2.56k: finished, skipped" in output and "[2/2] s-t12.8k: resuming" in output
    assert (short / "metrics.jsonl").read_text() == short_metrics  # not run again
    assert "resuming from" in (long / "train.log").read_text()
    records = _records(long)
    assert [r["step"] for r in records if "val/loss" in r][-1] == 50
    assert min(r["step"] for r in records[len(before):] if "train/loss" in r) > 5  # resumed, not restarted

    code, output = _study(tmp_path, capsys, STUDY, "collect")
    assert code == 0, output
    with open(tmp_path / "runs" / "results.csv") as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"s-t2.56k", "s-t12.8k"}
    assert all(row["status"] == "finished" for row in rows.values())
    assert int(rows["s-t12.8k"]["tokens"]) == 12800 and int(rows["s-t2.56k"]["steps"]) == 10
    assert float(rows["s-t12.8k"]["val_loss"]) < float(rows["s-t2.56k"]["val_loss"])
    config = (long / "config.yaml").read_text()
    assert "wandb_group: two" in config


@pytest.mark.slow
def test_failed_run_is_reported_not_dropped(tmp_path, capsys):
    broken = STUDY.replace("tokens: [2560, 12800]", "tokens: [2560]").replace(
        "  logging.interval: 5\n", "  logging.interval: 5\n  data.source: shards\n  data.train_dir: /nonexistent/shards\n")
    code, output = _study(tmp_path, capsys, broken, "run")
    assert code == 1 and "s-t2.56k: failed" in output, output
    code, output = _study(tmp_path, capsys, broken, "run")
    assert code == 1 and "s-t2.56k: failed, skipped" in output
    code, output = _study(tmp_path, capsys, broken, "collect", "--out", str(tmp_path / "table.jsonl"))
    assert code == 1 and "s-t2.56k: failed" in output
    (row,) = [json.loads(line) for line in (tmp_path / "table.jsonl").read_text().splitlines()]
    assert row["status"] == "failed" and row["exit_code"] not in (0, None) and row["val_loss"] is None


def test_sweep_file_lists_the_unfinished_runs_as_override_sets(tmp_path, capsys):
    from titans_train.slurm.cli import read_sweep

    code, output = _study(tmp_path, capsys, STUDY, "run", "--slurm", str(tmp_path / "sweep.txt"))
    assert code == 0, output
    text = (tmp_path / "sweep.txt").read_text()
    assert "# study two: 2 runs" in text and "debug.yaml --sweep" in text
    assert [line for line in text.splitlines() if line.startswith("# s-")] == ["# s-t2.56k", "# s-t12.8k"]
    sets = read_sweep(str(tmp_path / "sweep.txt"))  # what `slurm submit --sweep` will run
    assert len(sets) == 2
    assert f"run_dir={json.dumps(str(tmp_path / 'runs' / 's-t2.56k'))}" in sets[0]
    assert not (tmp_path / "runs" / "s-t2.56k").exists()  # nothing trained


def test_study_submits_its_sweep_as_one_array_job(tmp_path, capsys, monkeypatch):
    """`study run --slurm FILE --submit ...` hands the sweep to `slurm submit`; `sbatch` here is a
    stand-in answering with a job id (as `sbatch --parsable` does), the real cluster is in test_slurm."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    code, output = _study(tmp_path, capsys, STUDY, "run", "--slurm", str(tmp_path / "sweep.txt"),
                          "--submit", "--nodes", "1", "--gpus-per-node", "1")
    assert code == 0, output
    job = tmp_path / "runs" / "slurm-sweep" / "slurm"
    assert "#SBATCH --array=0-1%2" in (job / "sweep.sbatch").read_text()
    rendered = (job / "sweep.txt").read_text().splitlines()
    assert len(rendered) == 2
    for line, run in zip(rendered, ("s-t2.56k", "s-t12.8k")):
        assert f"run_dir={tmp_path / 'runs' / run}" in line.replace('"', "")
    assert not (tmp_path / "runs" / "s-t2.56k").exists()  # nothing trained here
