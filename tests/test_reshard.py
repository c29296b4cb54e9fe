"""Resume on another layout for every ZeRO stage: dp, tp and sp sizes changed between the save
and the resume, each compared with the uninterrupted one-process run's per-step losses (every
layout follows that run: tests/test_train_distributed.py).

Every run is the debug recipe (a 2-layer MAC model) with 4 heads, so tp = 4 divides them, on 2
sequences of 32 tokens per step. A source saves at step SAVE_AT (multi-process sources stop
there; one-process sources are the uninterrupted runs and go on); a "resumed" run starts in a
copy of the source's run directory cut back to that checkpoint, on another layout, and trains to
the end. The ZeRO-3 dp drills (issue 10: 2 -> 1 and 1 -> 2 drifted by 3.6e-4 in 12 steps) run
LONG steps, so 20 steps follow the resume, within 1e-6 (as the ZeRO-0 dp drills); the tp/sp
reshards run SHORT steps within 1e-5 (tp changes the order of fp32 reductions). Several runs
share one launch (launches cost seconds).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from distributed import run_distributed
from step_actions import AtStep

SAVE_AT = 3
LONG, SHORT = 23, 7
BASE = ("model.n_heads=4", "train.seq_len=32", "train.global_batch_tokens=64", "train.micro_batch_size=1",
        "checkpoint.interval=0")


def _stopped_copy(source: Path, copy: Path) -> None:
    """`copy`: `source`'s run directory as if the run had stopped after its step-SAVE_AT save."""
    from titans_train.train.checkpoint import LATEST, tag_for_step

    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source, copy)
    checkpoints = copy / "checkpoints"
    for path in checkpoints.iterdir():
        if path.is_dir() and path.name != tag_for_step(SAVE_AT):
            shutil.rmtree(path)
    (checkpoints / LATEST).write_text(tag_for_step(SAVE_AT) + "\n")


def _save_or_stop(trainer) -> None:
    """A one-process source saves and goes on (it is the uninterrupted run); others stop here."""
    from titans_train.train.callbacks import StopRequest
    from titans_train.train.trainer import EXIT_REQUEUE

    if trainer.context.layout.world_size == 1:
        trainer.save()
    else:
        trainer.request_stop(StopRequest(EXIT_REQUEUE, save=True, reason=f"source saved at step {SAVE_AT}"))


def train_runs(root: str, runs: dict[str, tuple[str | None, int, list[str]]]) -> dict[str, list[float]]:
    """Train each run in turn: name -> (the source run it resumes, or None; steps; overrides).
    Returns name -> the per-step losses this launch trained (a resumed run: steps SAVE_AT+1...)."""
    from titans_train.config import load_recipe
    from titans_train.train.distributed import barrier
    from titans_train.train.trainer import train

    root = Path(root)
    out = {}
    for name, (source, steps, overrides) in runs.items():
        run_dir = root / name
        if source is not None:
            if int(os.environ["RANK"]) == 0:
                _stopped_copy(root / source, run_dir)
            barrier()
        config = load_recipe("debug", [f"run_dir={run_dir}", f"data.cache_dir={root / 'corpus'}", *BASE,
                                       f"train.steps={steps}", *overrides], world_size=None)
        result = train(config, callbacks=[AtStep(SAVE_AT, _save_or_stop)] if source is None else [])
        out[name] = [result.losses[step] for step in sorted(result.losses)]
    return out


Z0, Z1, Z3 = "parallel.zero_stage=0", "parallel.zero_stage=1", "parallel.zero_stage=3"
TP2, TP4, SP2 = "parallel.tp=2", "parallel.tp=4", "parallel.sp=2"
ON_ONE = {"z3": (None, LONG, [Z3]), "z0": (None, SHORT, [Z0]), "z1": (None, SHORT, [Z1]),
          "z3-short": (None, SHORT, [Z3])}
ON_TWO = {
    "z3-dp1-to-dp2": ("z3", LONG, [Z3]), "z0-dp1-to-dp2": ("z0", SHORT, [Z0]),
    "z0-tp1-to-tp2": ("z0", SHORT, [Z0, TP2]), "z1-tp1-to-tp2": ("z1", SHORT, [Z1, TP2]),
    "z3-tp1-to-tp2": ("z3-short", SHORT, [Z3, TP2]),
    # sources: they stop at SAVE_AT
    "z3-dp2": (None, LONG, [Z3]), "z0-dp2": (None, SHORT, [Z0]),
    "z0-tp2": (None, SHORT, [Z0, TP2]), "z1-tp2": (None, SHORT, [Z1, TP2]), "z3-tp2": (None, SHORT, [Z3, TP2]),
    "z0-tp2-to-sp2": ("z0-tp2", SHORT, [Z0, SP2]), "z1-tp2-to-sp2": ("z1-tp2", SHORT, [Z1, SP2]),
    "z3-tp2-to-sp2": ("z3-tp2", SHORT, [Z3, SP2]),
}
BACK_ON_ONE = {"z3-dp2-to-dp1": ("z3-dp2", LONG, [Z3]), "z0-dp2-to-dp1": ("z0-dp2", SHORT, [Z0]),
               "z0-tp2-to-tp1": ("z0-tp2", SHORT, [Z0]), "z1-tp2-to-tp1": ("z1-tp2", SHORT, [Z1]),
               "z3-tp2-to-tp1": ("z3-tp2", SHORT, [Z3])}
ON_FOUR = {"z0-tp1-to-tp4": ("z0", SHORT, [Z0, TP4]), "z1-tp2-to-tp4": ("z1-tp2", SHORT, [Z1, TP4]),
           "z3-tp2-to-tp4": ("z3-tp2", SHORT, [Z3, TP4])}
DP_DRILLS = ("z3-dp1-to-dp2", "z3-dp2-to-dp1", "z0-dp1-to-dp2", "z0-dp2-to-dp1")
RESUMED = [name for runs in (ON_TWO, BACK_ON_ONE, ON_FOUR) for name, (source, _, _) in runs.items() if source]


def _uninterrupted(resumed: str) -> str:
    """The one-process run of the same length and ZeRO stage."""
    if resumed.startswith("z3"):
        return "z3" if resumed in DP_DRILLS else "z3-short"
    return resumed[:2]


def test_resume_on_another_layout_continues_the_uninterrupted_losses_for_zero_0_1_3(tmp_path):
    launch = {"init_process_group": False, "root": str(tmp_path)}
    (uninterrupted,) = run_distributed("test_reshard:train_runs", 1, 300, runs=ON_ONE, **launch)
    two = run_distributed("test_reshard:train_runs", 2, 480, runs=ON_TWO, **launch)
    assert two[0] == two[1]  # every rank logs the global loss
    (back,) = run_distributed("test_reshard:train_runs", 1, 300, runs=BACK_ON_ONE, **launch)
    four = run_distributed("test_reshard:train_runs", 4, 600, runs=ON_FOUR, **launch)
    losses = two[0] | back | four[0]
    assert len(RESUMED) == 16
    for name in RESUMED:
        expected, actual = uninterrupted[_uninterrupted(name)][SAVE_AT:], losses[name]
        tolerance = 1e-6 if name in DP_DRILLS else 1e-5
        assert len(actual) == len(expected) >= SHORT - SAVE_AT, name
        for step, (a, e) in enumerate(zip(actual, expected), start=SAVE_AT + 1):
            assert abs(a - e) <= tolerance * abs(e), f"{name}: step {step}: {a!r} vs {e!r} (uninterrupted)"
    assert len(losses["z3-dp1-to-dp2"]) == len(losses["z3-dp2-to-dp1"]) == 20


def _manifest(zero_stage: int, tp: int, zero_partitions: int) -> dict:
    return {"zero_stage": zero_stage, "zero_partitions": zero_partitions, "config": {"parallel": {"tp": tp}}}


def test_resume_route_for_each_layout_change_and_one_line_refusals(tmp_path):
    from titans_train.config import InvalidValueError
    from titans_train.convert.reshard import resume_route

    cases = {  # (source stage, tp, ZeRO partitions), (this run's tp, partitions) -> route
        ((0, 1, 1), (1, 2)): "same", ((0, 2, 1), (1, 1)): "zero0", ((0, 1, 1), (4, 1)): "zero0",
        ((1, 1, 2), (1, 2)): "same", ((1, 1, 2), (1, 1)): "deepspeed", ((3, 1, 1), (1, 2)): "deepspeed",
        ((2, 2, 1), (2, 1)): "same", ((2, 2, 1), (2, 2)): "tensor_parallel", ((3, 1, 1), (2, 1)): "tensor_parallel",
        ((3, 2, 1), (1, 1)): "tensor_parallel",
    }
    for ((stage, tp, partitions), (new_tp, new_partitions)), route in cases.items():
        assert resume_route(_manifest(stage, tp, partitions), stage, new_tp, new_partitions, "fp32", tmp_path) == route
    with pytest.raises(InvalidValueError) as stage_change:
        resume_route(_manifest(1, 1, 1), 3, 1, 1, "fp32", tmp_path)
    with pytest.raises(InvalidValueError) as bf16_zero0:
        resume_route(_manifest(0, 2, 1) | {"config": {"parallel": {"tp": 2}, "train": {"precision": "bf16"}}},
                     0, 1, 1, "bf16", tmp_path)
    for error, key in ((stage_change, "parallel.zero_stage"), (bf16_zero0, "parallel.tp")):
        message = str(error.value)
        assert message.startswith(key) and "\n" not in message and str(tmp_path) in message, message
    assert "relaunch with parallel.zero_stage=1" in str(stage_change.value)
    assert resume_route(_manifest(0, 2, 2), 0, 2, 1, "bf16", tmp_path) == "same"  # bf16 ZeRO-0, dp only
