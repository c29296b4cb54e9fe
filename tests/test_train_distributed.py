"""The engine across processes: ZeRO 0-3, tp 2 and sp 2 (ZeRO 1 and 3) on 2 ranks follow 1 rank;
bf16 learns; exact resume.

Each launch runs several trainings in turn (launches cost seconds, steps milliseconds). Every
run uses the debug recipe (a 2-layer MAC model of width 32 on the built-in corpus) with 4
sequences per step: 1 rank x 2 micro-batches x accumulation 2, or 2 ranks x 2 x 1.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest

from distributed import run_distributed
from step_actions import AtStep

STEPS = 6
RESUME_STEPS = 8
STOP_AT = 3
RELATIVE_TOLERANCE = 1e-5


def _config(run_dir: Path, *overrides: str):
    from titans_train.config import load_recipe

    return load_recipe(
        "debug",
        [f"run_dir={run_dir}", f"data.cache_dir={run_dir.parent / 'corpus'}", *overrides],
        world_size=None,
    )


def _losses(run_dir: Path, *overrides: str, callbacks=()):
    from titans_train.train.trainer import train

    result = train(_config(run_dir, *overrides), callbacks=callbacks)
    return result.exit_code, [result.losses[step] for step in sorted(result.losses)]


def _stop_with_signal_at(step_to_stop: int, signal_number: int) -> AtStep:
    """Signals this process at a step (rank 0 only: the stop is agreed collectively)."""

    def signal_rank_0(trainer):
        if trainer.context.rank == 0:
            os.kill(os.getpid(), signal_number)

    return AtStep(step_to_stop, signal_rank_0)


def _grad_norms(run_dir: Path) -> list[float]:
    """The logged pre-clipping gradient norm of every step (the debug recipe logs each step)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["train/grad_norm"] for line in lines if "train/grad_norm" in line]


# lmm with a linear memory: what the scan schedule runs.
LINEAR_LMM = ("model.variant=lmm", "model.memory_depth=1")


def _telemetry_keys(run_dir: Path) -> list[str]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return sorted({key for line in lines for key in json.loads(line) if key.startswith("telemetry/")})


def layouts_rank(root: str, stages: list[int]) -> dict:
    """Per-step losses of the fp32 debug run for each ZeRO stage, and of a bf16 run."""
    root = Path(root)
    world = int(os.environ["WORLD_SIZE"])
    out = {}
    for stage in stages:
        _, out[f"zero{stage}"] = _losses(root / f"w{world}-zero{stage}", f"parallel.zero_stage={stage}",
                                         f"train.steps={STEPS}", "logging.telemetry_interval=3")
    # ZeRO-3's module hooks rebuild list arguments: telemetry must survive them
    out["telemetry zero3"] = _telemetry_keys(root / f"w{world}-zero3") if 3 in stages else None
    out["grad norms"] = {f"zero{stage}": _grad_norms(root / f"w{world}-zero{stage}") for stage in stages}
    if world == 1:  # the reference of the scan schedule's model
        _, out["lmm1"] = _losses(root / "lmm1", *LINEAR_LMM, f"train.steps={STEPS}")
    if world > 1:
        _, out["bf16"] = _losses(root / "bf16", "train.precision=bf16", "parallel.zero_stage=2", "train.steps=12")
        # everything at once: sequence parallelism, ZeRO-3, bf16, activation checkpointing and
        # (dp = 1) gradient accumulation
        _, out["sp-zero3-bf16"] = _losses(root / "sp-zero3-bf16", f"parallel.sp={world}", "parallel.zero_stage=3",
                                          "train.precision=bf16", "parallel.activation_checkpointing=true",
                                          "train.steps=12", "logging.telemetry_interval=6")
        out["telemetry sp-zero3-bf16"] = _telemetry_keys(root / "sp-zero3-bf16")
        # tensor / sequence parallelism from titans_train.parallel; sp = 2 leaves dp = 1, so the
        # 2 micro-batches of a step are accumulated (by parallel/zero.py under sp)
        for layout, stage in (("tp", 1), ("sp", 1), ("sp", 3)):
            _, out[f"{layout}-zero{stage}"] = _losses(root / f"{layout}-zero{stage}", f"parallel.{layout}={world}",
                                                      f"parallel.zero_stage={stage}", f"train.steps={STEPS}")
            out["grad norms"][f"{layout}-zero{stage}"] = _grad_norms(root / f"{layout}-zero{stage}")
        # the other routes through parallelize: sequence-sharded norms under tp, the scan schedule
        _, out["tp-sequence-sharded"] = _losses(root / "tp-sharded", f"parallel.tp={world}",
                                                "parallel.tp_sequence_sharding=true", "parallel.zero_stage=2",
                                                f"train.steps={STEPS}")
        out["grad norms"]["tp-sequence-sharded"] = _grad_norms(root / "tp-sharded")
        _, out["sp-scan"] = _losses(root / "sp-scan", *LINEAR_LMM, f"parallel.sp={world}", "parallel.sp_schedule=scan",
                                    "parallel.zero_stage=1", f"train.steps={STEPS}")
    return out


# Resume drills: (ZeRO stage, overrides, also resumed on one rank). sp = 2 x ZeRO-1 shards over
# dp x sp = 2 ranks; one rank (sp = 1) holds a single partition, so that resume re-cuts the shards
# through the universal format, as a dp change does. ZeRO-3 with sp shards over dp only: both span
# owners hold the same shard and one writes it.
RESUME_DRILLS = {"zero1": (1, (), True), "zero2": (2, (), True), "zero3": (3, (), True),
                 "zero1-sp2": (1, ("parallel.sp=2",), True), "zero3-sp2": (3, ("parallel.sp=2",), False)}


def resume_rank(root: str) -> dict:
    """Per drill: an uninterrupted run vs a run stopped by SIGUSR1 at STOP_AT and resumed (same
    world size). All drills share one launch (launches cost seconds)."""
    import torch.distributed as dist

    results = {}
    for name, (stage, overrides, _) in RESUME_DRILLS.items():
        full_dir, stopped_dir = Path(root) / f"{name}-full", Path(root) / f"{name}-stopped"  # one corpus cache in root
        common = (f"parallel.zero_stage={stage}", f"train.steps={RESUME_STEPS}", "checkpoint.interval=0", *overrides)
        _, full = _losses(full_dir, *common)
        stopped_code, first = _losses(stopped_dir, *common,
                                      callbacks=[_stop_with_signal_at(STOP_AT, signal.SIGUSR1)])
        if dist.get_rank() == 0:  # keep the step-STOP_AT checkpoint for the other-world-size resume
            shutil.copytree(stopped_dir, Path(root) / f"{name}-snapshot")
        dist.barrier()
        resumed_code, rest = _losses(stopped_dir, *common)
        results[name] = {"full": full, "first": first, "rest": rest, "codes": (stopped_code, resumed_code)}
    return results


def other_world_rank(root: str) -> dict[str, list[float]]:
    """The drills' step-STOP_AT snapshots resumed on this (other) world size: name -> losses."""
    return {name: _losses(Path(root) / f"{name}-snapshot", f"parallel.zero_stage={stage}",
                          f"train.steps={RESUME_STEPS}", "checkpoint.interval=0")[1]
            for name, (stage, _, on_one) in RESUME_DRILLS.items() if on_one}


def _assert_close(actual: list[float], expected: list[float], label: str) -> None:
    assert len(actual) == len(expected), label
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert abs(a - e) <= RELATIVE_TOLERANCE * abs(e), f"{label}: step {step}: {a!r} vs {e!r}"


@pytest.mark.slow
def test_zero_stages_and_tp_sp_on_two_ranks_follow_one_rank_and_bf16_learns(tmp_path):
    stages = [0, 1, 2, 3]
    (single,) = run_distributed("test_train_distributed:layouts_rank", 1, 240, init_process_group=False,
                                root=str(tmp_path / "one"), stages=[0])
    two = run_distributed("test_train_distributed:layouts_rank", 2, 300, init_process_group=False,
                          root=str(tmp_path / "two"), stages=stages)
    reference = single["zero0"]
    assert len(reference) == STEPS and reference[-1] < reference[0]
    for stage in stages:
        assert two[0][f"zero{stage}"] == two[1][f"zero{stage}"]  # every rank logs the global loss
        _assert_close(two[0][f"zero{stage}"], reference, f"ZeRO {stage}, 2 ranks vs 1")
    for layout in ("tp-zero1", "sp-zero1", "sp-zero3", "tp-sequence-sharded"):
        _assert_close(two[0][layout], reference, f"{layout}, 2 ranks vs 1")
    _assert_close(two[0]["sp-scan"], single["lmm1"], "sp = 2 scan schedule vs 1 rank")
    # The logged pre-clipping gradient norm is the one-process norm under every layout (ZeRO 0
    # on one rank computes it from the whole gradients; DeepSpeed reports it under ZeRO >= 1).
    reference_norms = single["grad norms"]["zero0"]
    assert len(reference_norms) == STEPS
    for layout, norms in two[0]["grad norms"].items():
        _assert_close(norms, reference_norms, f"train/grad_norm, {layout} on 2 ranks vs 1")
    for run in ("telemetry zero3", "telemetry sp-zero3-bf16"):
        assert two[0][run] == [f"telemetry/layer{layer}/{name}" for layer in range(2)
                               for name in ("alpha", "eta", "store_gain", "store_gain_shuffled", "theta",
                                            "update_norm")], run
    for run in ("bf16", "sp-zero3-bf16"):
        bf16 = two[0][run]
        assert all(map(math.isfinite, bf16)), (run, bf16)
        assert sum(bf16[-3:]) / 3 < sum(bf16[:3]) / 3 - 0.1, (run, bf16)


@pytest.mark.slow
def test_resume_after_signal_is_exact_and_continues_on_another_world_size(tmp_path):
    from titans_train.train.trainer import EXIT_OK, EXIT_REQUEUE

    two = run_distributed("test_train_distributed:resume_rank", 2, 900, init_process_group=False, root=str(tmp_path))
    assert two[0] == two[1]  # every rank logs the global loss
    for name, result in two[0].items():
        assert result["codes"] == (EXIT_REQUEUE, EXIT_OK), name
        assert len(result["first"]) == STOP_AT and len(result["rest"]) == RESUME_STEPS - STOP_AT, name
        assert result["first"] + result["rest"] == result["full"], name  # bit-identical, same world size
    (on_one,) = run_distributed("test_train_distributed:other_world_rank", 1, 600, init_process_group=False,
                                root=str(tmp_path))
    assert set(on_one) == {name for name, (_, _, resumed_on_one) in RESUME_DRILLS.items() if resumed_on_one}
    for name, rest in on_one.items():
        _assert_close(rest, two[0][name]["full"][STOP_AT:], f"{name}: resumed on 1 rank after 2")
