"""The training loop in one process: the tiny default run learns; checkpoints are atomic.

Trainings run in a spawned process (torch.distributed state must not leak into pytest).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from distributed import run_distributed
from step_actions import AtStep


def _config(recipe: str, run_dir: Path, *overrides: str):
    from titans_train.config import load_recipe

    return load_recipe(recipe, [f"run_dir={run_dir}", *overrides], world_size=None)


def tiny_run_rank(run_dir: str) -> dict:
    from titans_train.train.trainer import train

    config = _config(
        "tiny-mac-cpu", Path(run_dir), "train.steps=16", "train.warmup_steps=2", "train.global_batch_tokens=2048",
        "train.micro_batch_size=4", "train.eval_batches=2", "train.eval_interval=8", "checkpoint.interval=0",
        "logging.interval=4", "logging.telemetry_interval=8", "logging.wandb_mode=offline",
        "checkpoint.interval=8",
    )
    result = train(config)
    return {"validation": result.validation, "losses": result.losses, "checkpoint": result.checkpoint,
            "code": result.exit_code, "expected": _expected_callback_values(config)}


def _expected_callback_values(config) -> dict:
    """What the logging callbacks must have logged, computed directly: FLOPs per token (for MFU)
    and the telemetry of the step-8 weights (read from the step-8 checkpoint) on the first
    validation micro-batch."""
    import torch

    from titans_train.config import batch_plan, model_config
    from titans_train.model import TitansLM
    from titans_train.model.flops import flops_per_token
    from titans_train.parallel import ParallelContext
    from titans_train.train.run_data import build_run_data

    titans_config = model_config(config)
    states = torch.load(Path(config.checkpoint.dir) / "step000000008" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    model = TitansLM(titans_config)
    model.load_state_dict({name.removeprefix("model."): value for name, value in states.items()})
    data = build_run_data(config, ParallelContext.initialize(), batch_plan(config, 1), log=lambda message: None)
    tokens = next(data.validation_batches())
    with torch.no_grad():
        telemetry = model(tokens[:, :-1], return_telemetry=True).telemetry
    return {"flops_per_token": float(flops_per_token(titans_config, config.train.seq_len)),
            "telemetry step 8": {f"telemetry/layer{key.split('.')[1]}/{key.split('.')[-1]}": float(value)
                                 for key, value in telemetry.items()}}


@pytest.mark.slow
def test_tiny_default_run_loss_falls_and_logs_everything(tmp_path):
    (result,) = run_distributed("test_train_loop:tiny_run_rank", 1, 300, init_process_group=False,
                                run_dir=str(tmp_path))
    validation = result["validation"]
    assert sorted(validation) == [0, 8, 16] and result["code"] == 0
    assert validation[16] < validation[0] - 1.0, validation  # ppl well below the start
    losses = [result["losses"][s] for s in sorted(result["losses"])]
    assert sum(losses[-4:]) / 4 < losses[0] - 1.0, losses
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*records)
    for key in ("train/loss", "train/lr", "train/grad_norm", "throughput/tokens_per_second", "throughput/mfu",
                "throughput/eta_seconds", "val/loss", "val/ppl"):
        assert key in keys, key
    for layer in range(4):
        for name in ("theta", "eta", "alpha", "update_norm"):
            assert f"telemetry/layer{layer}/{name}" in keys
    val_ppl = [r["val/ppl"] for r in records if "val/ppl" in r]
    assert val_ppl[0] == pytest.approx(math.exp(validation[0]))
    # The callbacks' values, not only their keys: MFU from the logged throughput, the model's
    # FLOPs per token and the recipe's peak; telemetry equal to a direct forward at those weights.
    peak = 100.0e9  # tiny-mac-cpu's logging.peak_flops_per_device, one process
    for record in (r for r in records if "throughput/mfu" in r):
        expected_mfu = record["throughput/tokens_per_second"] * result["expected"]["flops_per_token"] / peak
        assert record["throughput/mfu"] == pytest.approx(expected_mfu, rel=1e-12), record
    logged = next(r for r in records if r.get("step") == 8 and "telemetry/layer0/theta" in r)
    for key, value in result["expected"]["telemetry step 8"].items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert (tmp_path / "config.yaml").is_file()
    assert Path(result["checkpoint"]).name == "step000000016"
    assert any((tmp_path / "wandb").glob("offline-run-*")), "wandb offline run directory"


def shards_run_rank(root: str) -> dict:
    """A run on prepared shards (`data.source=shards`): the trainer streams those shards."""
    import json as json_module

    from titans_train.data import TokenLoader, load_tokenizer
    from titans_train.data.prepare import prepare_dataset
    from titans_train.train.trainer import train

    root = Path(root)
    corpus = Path(json_module.__file__).parent  # the standard library's json package: ~60 kB of text
    for split, inputs in (("train", corpus), ("validation", corpus / "decoder.py")):
        prepare_dataset(str(inputs), str(root / split), seq_len=64, num_workers=1, progress=False)
    config = _config("debug", root / "run", "data.source=shards", f"data.train_dir={root / 'train'}",
                     f"data.validation_dir={root / 'validation'}", "train.steps=4")
    seen = {}

    def record_stream(trainer) -> None:
        seen["fingerprint"] = trainer.data.train_loader.stream.fingerprint

    result = train(config, callbacks=[AtStep(4, record_stream)])
    own = TokenLoader(str(root / "train"), seq_len=64, global_batch_size=4, micro_batch_size=2, dp_rank=0,
                      dp_world_size=1, seed=config.train.seed, tokenizer=load_tokenizer("byte"))
    return {"code": result.exit_code, "steps": sorted(result.losses), "validation": result.validation,
            "seen": seen, "fingerprint": own.stream.fingerprint}


@pytest.mark.slow
def test_training_on_prepared_shards(tmp_path):
    (result,) = run_distributed("test_train_loop:shards_run_rank", 1, 300, init_process_group=False,
                                root=str(tmp_path))
    assert result["code"] == 0 and result["steps"] == [1, 2, 3, 4]
    assert result["seen"]["fingerprint"] == result["fingerprint"]  # the trainer read these shards
    assert all(math.isfinite(loss) for loss in result["validation"].values()) and sorted(result["validation"]) == [0, 4]


class SimulatedCrash(RuntimeError):
    pass


def crash_rank(run_dir: str) -> dict:
    """Checkpoints every 2 steps; the save at step 4 dies after DeepSpeed wrote its files.

    Then: resume, resume past a damaged checkpoint, and a run whose weights turn NaN.
    """
    from titans_train.train.trainer import Trainer, train

    config = _config("debug", Path(run_dir), "train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=2")

    def crash_during_next_save(trainer: Trainer) -> None:
        original = trainer.engine.save_checkpoint

        def save_then_die(*args, **kwargs):
            original(*args, **kwargs)  # shards on disk, manifest and rename not yet done
            raise SimulatedCrash("killed mid-save")

        trainer.engine.save_checkpoint = save_then_die

    crashed = False
    try:
        train(config, callbacks=[AtStep(4, crash_during_next_save)])
    except SimulatedCrash:
        crashed = True
    checkpoints = Path(run_dir) / "checkpoints"
    after_crash = {"crashed": crashed, "latest": (checkpoints / "latest").read_text().strip(),
                   "entries": sorted(p.name for p in checkpoints.iterdir())}
    resumed = train(config)
    # Damage the newest complete checkpoint: a truncated shard, as after a disk-full.
    newest = checkpoints / (checkpoints / "latest").read_text().strip()
    shard = newest / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    fallback = train(_config("debug", Path(run_dir), "train.steps=8", "checkpoint.interval=2",
                             "checkpoint.keep_last=2"))

    def poison_weights(trainer: Trainer) -> None:
        with torch.no_grad():
            next(trainer.engine.module.parameters()).fill_(float("nan"))

    import torch

    diverging_dir = Path(run_dir) / "diverging"
    diverged = train(_config("debug", diverging_dir, "train.steps=6", "checkpoint.interval=2"),
                     callbacks=[AtStep(2, poison_weights)])
    return {"after_crash": after_crash, "resumed_from": resumed.resumed_from, "resumed_losses": resumed.losses,
            "damaged": newest.name, "fallback_from": fallback.resumed_from, "fallback_losses": fallback.losses,
            "diverged_code": diverged.exit_code, "diverged_steps": sorted(diverged.losses),
            "diverged_checkpoints": sorted(p.name for p in (diverging_dir / "checkpoints").iterdir())}


@pytest.mark.slow
def test_checkpoint_cut_short_is_never_latest_damaged_falls_back_nan_stops(tmp_path):
    (result,) = run_distributed("test_train_loop:crash_rank", 1, 300, init_process_group=False,
                                run_dir=str(tmp_path))
    after_crash = result["after_crash"]
    assert after_crash["crashed"]
    assert after_crash["latest"] == "step000000002"
    assert ".partial-step000000004" in after_crash["entries"] and "step000000004" not in after_crash["entries"]
    assert result["resumed_from"].endswith("step000000002")
    assert sorted(result["resumed_losses"]) == [3, 4, 5, 6]
    assert result["damaged"] == "step000000006"
    assert result["fallback_from"].endswith("step000000004")  # the previous complete one
    assert sorted(result["fallback_losses"]) == [5, 6, 7, 8]
    # A run whose weights turn NaN in step 2 stops at step 3 (NaN loss); the step-2 checkpoint,
    # saved with those weights, is deleted rather than promoted: nothing is left to resume.
    from titans_train.train.trainer import EXIT_DIVERGED

    assert result["diverged_code"] == EXIT_DIVERGED and result["diverged_steps"] == [1, 2, 3]
    assert result["diverged_checkpoints"] == []


def test_checkpoint_manager_verifies_manifests(tmp_path):
    from titans_train.train.checkpoint import LATEST, MANIFEST, CheckpointInfo, CheckpointManager

    def fake_checkpoint(tag: str, step: int, payload: bytes = b"weights") -> Path:
        path = tmp_path / tag
        path.mkdir()
        (path / "model.pt").write_bytes(payload)
        (path / MANIFEST).write_text(json.dumps({"step": step, "files": {"model.pt": len(payload)}}))
        return path

    fake_checkpoint("step000000001", 1)
    fake_checkpoint("step000000002", 2)
    (tmp_path / ".partial-step000000003").mkdir()
    (tmp_path / "step000000004").mkdir()  # renamed but manifest missing: damaged
    (tmp_path / LATEST).write_text("step000000002\n")
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1, log=lambda message: None)
    candidates = manager.candidates()
    assert isinstance(candidates[0], CheckpointInfo) and candidates[0].tag == "step000000002"
    assert ("step000000004", f"no {MANIFEST} (the save did not finish)") in candidates
    assert [info.step for info in manager.complete_checkpoints()] == [1, 2]
    (tmp_path / "step000000002" / "model.pt").write_bytes(b"wei")
    manifest, reason = manager.verify(tmp_path / "step000000002")
    assert manifest is None and "3 bytes, the manifest says 7" in reason
    assert [c.tag for c in manager.candidates() if isinstance(c, CheckpointInfo)] == ["step000000001"]


def test_wandb_run_carries_the_study_group(tmp_path):
    """`logging.wandb_group` (set by `titans-train study`) groups the runs in wandb (offline run here)."""
    from titans_train.train.logging import RunLogger

    config = _config("debug", tmp_path, "logging.wandb_mode=offline", "logging.wandb_group=tiny-study")
    logger = RunLogger(config, enabled=True, resolved_config={})
    try:
        assert logger._wandb_run.group == "tiny-study"
    finally:
        logger.close()
