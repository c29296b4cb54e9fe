"""Nothing lost, nothing silent: checkpoints are content-checked, divergence is never saved, a resume
with another config is refused, pruning survives a kill, a SIGTERM at start is a requested stop.

The training drills share one spawned process (a launch costs seconds, a debug step
milliseconds); each returns what its test checks, or its own traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from distributed import run_distributed
from step_actions import AtStep

MODEL_STATES = "mp_rank_00_model_states.pt"


def _config(run_dir: Path, *overrides: str):
    from titans_train.config import load_recipe

    return load_recipe("debug", [f"run_dir={run_dir}", *overrides], world_size=None)


def _flip_byte(file: Path) -> None:
    """Damage without changing the size (bit rot, a bad copy): one byte in the middle inverted."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _poison_weights(trainer) -> None:
    import torch

    with torch.no_grad():
        next(trainer.engine.module.parameters()).fill_(float("nan"))


def _train_capturing_warnings(config, callbacks=()):
    from titans_train.train.trainer import train

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        result = train(config, callbacks=callbacks)
    return result, [line for line in stderr.getvalue().splitlines() if line.startswith("WARNING: ")]  # the logger's


def _latest(run_dir: Path) -> str | None:
    latest = run_dir / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def flipped_bytes_drill(run_dir: Path) -> dict:
    """Two checkpoints (steps 2, 4); a byte of step 4 flipped: conversion names the file, a resume
    warns once and falls back to step 2; with every checkpoint damaged the resume is refused."""
    from titans_train.convert.consolidate import resolve_checkpoint
    from titans_train.convert.errors import ConversionError
    from titans_train.errors import UserError
    from titans_train.train.trainer import train

    overrides = ("checkpoint.interval=2", "checkpoint.keep_last=3")
    train(_config(run_dir, "train.steps=4", *overrides))
    checkpoints = run_dir / "checkpoints"
    damaged_file = checkpoints / "step000000004" / MODEL_STATES
    _flip_byte(damaged_file)
    conversion_error = None
    try:
        resolve_checkpoint(checkpoints / "step000000004")
    except ConversionError as error:
        conversion_error = str(error)
    resumed, warnings = _train_capturing_warnings(_config(run_dir, "train.steps=6", *overrides))
    for checkpoint in checkpoints.glob("step*"):
        _flip_byte(checkpoint / MODEL_STATES)
    refusal = None
    try:
        train(_config(run_dir, "train.steps=8", *overrides))
    except UserError as error:
        refusal = str(error)
    return {"damaged_file": str(damaged_file), "conversion_error": conversion_error, "warnings": warnings,
            "resumed_from": resumed.resumed_from, "resumed_steps": sorted(resumed.losses),
            "resumed_code": resumed.exit_code, "refusal": refusal}


def nan_in_checkpoint_step_drill(run_dir: Path) -> dict:
    """Weights turned NaN in step 4, which saves a checkpoint: step 5's loss is NaN (exit 3); the
    step-4 checkpoint must not become `latest`, and a restart resumes from step 2."""
    config = _config(run_dir, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=3")
    diverged, warnings = _train_capturing_warnings(config, callbacks=[AtStep(4, _poison_weights)])
    entries = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    latest = _latest(run_dir)
    restarted, _ = _train_capturing_warnings(config)
    return {"code": diverged.exit_code, "steps": sorted(diverged.losses), "entries": entries, "latest": latest,
            "warnings": warnings, "restarted_from": restarted.resumed_from, "restarted_code": restarted.exit_code,
            "restarted_steps": sorted(restarted.losses)}


def nan_validation_drill(run_dir: Path) -> dict:
    """Weights turned NaN after the last step (its training loss is finite): the final
    validation loss is NaN, so exit 3 and no final checkpoint."""
    config = _config(run_dir, "train.steps=4", "checkpoint.interval=2")
    result, warnings = _train_capturing_warnings(config, callbacks=[AtStep(4, _poison_weights)])
    return {"code": result.exit_code, "validation": result.validation, "warnings": warnings,
            "latest": _latest(run_dir), "entries": sorted(p.name for p in (run_dir / "checkpoints").iterdir())}


def changed_config_drill(run_dir: Path) -> dict:
    """A 4-step run; then a resume with another lr and theta_max (refused, config.yaml untouched),
    then one with a longer train.steps and other intervals (accepted, on the new lr schedule)."""
    from titans_train.errors import UserError
    from titans_train.train.trainer import train

    zero = "parallel.zero_stage=1"  # the lr is set through DeepSpeed's ZeRO optimizer
    train(_config(run_dir, "train.steps=4", zero))
    config_yaml = (run_dir / "config.yaml").read_text()
    refusal = None
    try:
        train(_config(run_dir, "train.steps=4", zero, "train.lr=1e-2", "model.theta_max=0.01"))
    except UserError as error:
        refusal = str(error)
    config_yaml_after_refusal = (run_dir / "config.yaml").read_text()
    longer = _config(run_dir, "train.steps=8", zero, "checkpoint.keep_last=3", "train.eval_interval=2",
                     "parallel.timeout_s=300")
    resumed = train(longer)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged_lr = {record["step"]: record["train/lr"] for record in records if "train/lr" in record}
    return {"refusal": refusal, "config_yaml_kept": config_yaml_after_refusal == config_yaml,
            "resumed_from": resumed.resumed_from, "resumed_code": resumed.exit_code,
            "logged_lr": logged_lr, "train": dict(longer.train)}


DRILLS = {"flipped_bytes": flipped_bytes_drill, "nan_in_checkpoint_step": nan_in_checkpoint_step_drill,
          "nan_validation": nan_validation_drill, "changed_config": changed_config_drill}


def drills_rank(root: str) -> dict:
    results = {}
    for name, drill in DRILLS.items():
        try:
            results[name] = drill(Path(root) / name)
        except Exception:  # noqa: BLE001 - reported by the drill's own test
            results[name] = {"error": traceback.format_exc()}
    return results


@pytest.fixture(scope="module")
def drills(tmp_path_factory):
    (results,) = run_distributed("test_checkpoint_integrity:drills_rank", 1, 600, init_process_group=False,
                                 root=str(tmp_path_factory.mktemp("drills")))
    return results


def _drill(drills: dict, name: str) -> dict:
    result = drills[name]
    assert "error" not in result, result.get("error")
    return result


@pytest.mark.slow
def test_flipped_bytes_are_found_by_digest_named_and_resume_falls_back(drills):
    result = _drill(drills, "flipped_bytes")
    damaged = result["damaged_file"]
    assert result["conversion_error"] is not None and damaged in result["conversion_error"]
    reports = [line for line in result["warnings"] if "is damaged" in line]
    assert len(reports) == 1 and damaged in reports[0] and "step000000004" in reports[0], result["warnings"]
    assert result["resumed_from"].endswith("step000000002") and result["resumed_steps"] == [3, 4, 5, 6]
    assert result["resumed_code"] == 0
    refusal = result["refusal"]
    assert refusal is not None and "no usable checkpoint" in refusal and "\n" not in refusal
    assert str(Path(damaged).parent.parent) in refusal  # the checkpoints directory, and the fix
    assert "move them out" in refusal


@pytest.mark.slow
def test_nan_in_a_checkpoint_step_never_becomes_latest(drills):
    from titans_train.errors import EXIT_DIVERGED

    result = _drill(drills, "nan_in_checkpoint_step")
    assert result["code"] == EXIT_DIVERGED and result["steps"] == [1, 2, 3, 4, 5]
    assert result["latest"] == "step000000002"
    assert result["entries"] == ["latest", "step000000002"], result["entries"]  # step 4 deleted, no leftover
    assert any("step000000004 deleted" in line for line in result["warnings"]), result["warnings"]
    assert result["restarted_from"].endswith("step000000002")
    assert result["restarted_code"] == 0 and result["restarted_steps"] == [3, 4, 5, 6]


@pytest.mark.slow
def test_nan_validation_loss_exits_3_without_a_final_checkpoint(drills):
    from titans_train.errors import EXIT_DIVERGED

    result = _drill(drills, "nan_validation")
    assert result["code"] == EXIT_DIVERGED
    assert math.isnan(result["validation"][4])
    assert [line for line in result["warnings"] if "validation loss is nan" in line] == result["warnings"]
    assert len(result["warnings"]) == 1, result["warnings"]
    assert result["latest"] == "step000000002" and "step000000004" not in result["entries"]


@pytest.mark.slow
def test_resume_with_a_changed_config_is_refused_and_a_safe_change_accepted(drills):
    from titans_train.train.schedule import lr_at

    result = _drill(drills, "changed_config")
    refusal = result["refusal"]
    assert refusal is not None and "\n" not in refusal
    assert "model.theta_max: 0.002 -> 0.01" in refusal and "train.lr: 0.003 -> 0.01" in refusal, refusal
    assert "train.steps" not in refusal  # unchanged here, and safe anyway
    assert "name=" in refusal and "checkpoint.auto_resume=false" in refusal
    assert result["config_yaml_kept"], "a refused resume rewrote config.yaml"
    assert result["resumed_code"] == 0 and result["resumed_from"].endswith("step000000004")
    train = result["train"]
    for step in range(5, 9):  # the lr of every resumed step is the 8-step schedule's, the first included
        expected = lr_at(step - 1, lr=train["lr"], min_lr=train["min_lr"], warmup_steps=train["warmup_steps"],
                         total_steps=8, schedule=train["schedule"], decay_fraction=train["decay_fraction"])
        assert result["logged_lr"][step] == pytest.approx(expected, rel=1e-12), step


def test_config_differences_name_every_unsafe_key_and_only_those():
    from titans_train.train.resume_config import SAFE_TO_CHANGE, config_differences

    old = {"train": {"lr": 0.001, "steps": 10}, "model": {"dim": 32}, "logging": {"interval": 1}, "parallel": {"tp": 1}}
    new = {"train": {"lr": 0.002, "steps": 20}, "model": {"dim": 64, "extra": 1}, "logging": {"interval": 5},
           "parallel": {"tp": 2}}
    assert config_differences(old, new) == ["model.dim: 32 -> 64", "model.extra: '(absent)' -> 1",
                                            "train.lr: 0.001 -> 0.002"]
    assert "logging.*" in SAFE_TO_CHANGE and "train.steps" in SAFE_TO_CHANGE
    # A key the checkpoint's (older) version did not have counts only when not at its default.
    defaults = {"train": {"optimizer_precision": "fp32"}}
    assert config_differences(old, {**old, "train": {**old["train"], "optimizer_precision": "fp32"}}, defaults) == []
    assert config_differences(old, {**old, "train": {**old["train"], "optimizer_precision": "bf16"}}, defaults) == [
        "train.optimizer_precision: 'fp32' -> 'bf16'"]


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Pruning killed after deleting part of a checkpoint: what remains is a `.deleting-` leftover
    (never read, never reported as damaged), removed by the next start."""
    import shutil

    from titans_train.train import checkpoint
    from titans_train.train.checkpoint import LATEST, MANIFEST, CheckpointManager

    for step in (1, 2, 3):
        path = tmp_path / f"step{step:09d}"
        path.mkdir()
        (path / "model.pt").write_bytes(b"weights")
        (path / MANIFEST).write_text(json.dumps({"step": step, "files": {"model.pt": 7}}))
    (tmp_path / LATEST).write_text("step000000003\n")
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1, log=lambda message: None)

    class Killed(BaseException):
        pass

    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        path = Path(path)
        if path.is_dir() and (path / MANIFEST).exists():
            (path / MANIFEST).unlink()  # part of the files gone, then the process dies
            raise Killed
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        manager._prune()
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert not (tmp_path / "step000000001").exists()  # not a damaged `step` dir left behind
    assert all(isinstance(c, checkpoint.CheckpointInfo) for c in manager.candidates())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".deleting-step000000001"]
    manager.clean_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step000000002", "step000000003"]


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (its SigCgt mask in /proc)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.slow
def test_sigterm_in_the_first_second_is_a_requested_stop(tmp_path):
    """`titans-train train` signalled as soon as it catches SIGTERM (or after 3 s at the latest):
    exit 75, one line, nothing saved."""
    from titans_train.errors import EXIT_REQUEUE

    process = subprocess.Popen([sys.executable, "-m", "titans_train", "train", "debug", f"run_dir={tmp_path}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 3.0
    while not _catches_sigterm(process.pid) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert process.returncode == EXIT_REQUEUE, (process.returncode, lines)
    stops = [line for line in lines if "stop requested" in line]
    assert len(stops) == 1 and "signal 15" in stops[0] and "nothing to save" in stops[0], lines
    assert not (tmp_path / "checkpoints").exists()


def _set_and_sleep(started) -> None:
    started.set()
    time.sleep(60)


def test_stop_signals_are_given_back_after_a_refused_start_and_forked_children_still_die():
    """The recording handler must not outlive `titans-train train` in the calling process (here a
    config error), and a forked worker of the trainer dies of SIGTERM as usual (`Pool.terminate`)."""
    import multiprocessing

    from titans_train.cli import main
    from titans_train.train import stop_signals

    before = signal.getsignal(signal.SIGTERM)
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", "debug", "train.no_such_key=1"]) == 2
    assert signal.getsignal(signal.SIGTERM) is before
    stop_signals.catch()
    try:
        context = multiprocessing.get_context("fork")
        started = context.Event()
        child = context.Process(target=_set_and_sleep, args=(started,))
        child.start()
        assert started.wait(30)  # (a signal in the instant after fork() is dropped by Python itself)
        child.terminate()
        child.join(30)
        assert child.exitcode == -signal.SIGTERM
        assert stop_signals.received() is None
    finally:
        stop_signals.release()
    assert signal.getsignal(signal.SIGTERM) is before
