"""DeepSpeed universal checkpoints of a ZeRO 1-3 checkpoint, cut for another tensor-parallel size,
so a run resumes exactly on another tp size (and any dp/sp).

DeepSpeed's `ds_to_universal` cannot do this for our model (it needs merge patterns for the
row-parallel, head-split and padded-vocabulary parameters, and fails on megatron-core's
`_extra_state` entries), and its ZeRO-3 universal loader cuts no tp shards at all (it only
partitions over ZeRO's data-parallel group). So each state (fp32 master weights, Adam's exp_avg
and exp_avg_sq) is read one at a time, tp rank by tp rank (`consolidate.read_tp_rank_state`),
joined over tp by `TP_PLAN`, cut again for each rank of the new tp size (`shard_for_rank`,
vocabulary padded for it), and written as one universal checkpoint per new tp rank. Its shards
have the shapes of that rank's parameters, so DeepSpeed's loaders (ZeRO 1/2 and 3 alike) only
re-partition them over the new ZeRO group:

    rank<r>/zero/<parameter name>/{fp32,exp_avg,exp_avg_sq}.pt   {"param": tp rank r's shard}
    rank<r>/zero/<parameter name>/step.pt                         Adam's step
    rank<r>/zero/optimizer_state.pt        the optimizer's global state and param groups (no tensors)
    rank<r>/<source tp rank 0's model-states file>  scheduler and client state, read by DeepSpeed's loader

Peak memory: one state of one source tp rank as read, plus that state at full size and cut.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from titans_train.convert.consolidate import TRAINER_PREFIX, ZERO_STATES, _torch_load, read_tp_rank_state
from titans_train.convert.errors import ConversionError
from titans_train.convert.tp_layout import merge_tensor_parallel, shard_for_rank

SHARDED_KEYS = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups",
                "fp32_flat_groups", "optimizer_state_dict")


def universal_rank_dir(tp_rank: int) -> str:
    """The directory (a DeepSpeed tag) of new tp rank `tp_rank`'s universal checkpoint."""
    return f"rank{tp_rank}"


def _full_state(checkpoint: Path, config: dict[str, Any], zero_stage: int, state: str):
    tp, vocab_size = int(config["parallel"]["tp"]), int(config["model"]["vocab_size"])
    tied = config["model"].get("tie_embeddings", True)
    shards, first = [], None
    for rank in range(tp):
        shard, optimizer_state = read_tp_rank_state(checkpoint, rank, zero_stage, state)
        first = first or optimizer_state
        shard = {name.removeprefix(TRAINER_PREFIX): value for name, value in shard.items()}
        if tied:  # listed under both names by some ranks' files, stored once
            shard.pop("lm_head.weight", None)
        shards.append(shard)
    return merge_tensor_parallel(shards, vocab_size), first


def _global_state(optimizer_state: dict[str, Any], zero_stage: int) -> dict[str, Any]:
    """What DeepSpeed's universal loaders read from zero/optimizer_state.pt, without the shards."""
    base = optimizer_state["optimizer_state_dict" if zero_stage == 3 else "base_optimizer_state"]
    out = {key: value for key, value in optimizer_state.items() if key not in SHARDED_KEYS}
    out["param_groups"] = base["param_groups"]
    if zero_stage == 3:  # its loader takes the step from here
        out["optimizer_state_dict"] = {"param_groups": base["param_groups"], "state": {0: {"step": base["state"][0]["step"]}}}
    return out


def write_universal(checkpoint: Path, manifest: dict[str, Any], out: Path, target_tp: int) -> None:
    """Write into `out` one universal checkpoint per rank of `target_tp` from `checkpoint`
    (ZeRO 1-3, any tp/dp/sp)."""
    config = manifest["config"]
    zero_stage = int(manifest["zero_stage"])
    if zero_stage not in (1, 2, 3):
        raise ConversionError(checkpoint, f"is a ZeRO {zero_stage} checkpoint, which has no ZeRO shards",
                              "re-cut it with titans_train.convert.reshard.write_zero0_for_tp")
    vocab_size = int(config["model"]["vocab_size"])
    optimizer_state = None
    for state in ZERO_STATES:
        full, first = _full_state(checkpoint, config, zero_stage, state)
        optimizer_state = optimizer_state or first
        for rank in range(target_tp):
            zero_dir = out / universal_rank_dir(rank) / "zero"
            for path, value in shard_for_rank(full, vocab_size, target_tp, rank).items():
                directory = zero_dir / (TRAINER_PREFIX + path)
                directory.mkdir(parents=True, exist_ok=True)
                torch.save({"param": value.contiguous()}, directory / f"{state}.pt")
        del full
    base = optimizer_state["optimizer_state_dict" if zero_stage == 3 else "base_optimizer_state"]
    step = base["state"][0]["step"]
    global_state = _global_state(optimizer_state, zero_stage)
    pattern = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt"
    model_states = _torch_load(checkpoint / pattern)
    model_states["mp_world_size"] = 1  # DeepSpeed checks it against the model-states files in the directory
    for rank in range(target_tp):
        rank_dir = out / universal_rank_dir(rank)
        for directory in (rank_dir / "zero").iterdir():
            torch.save(step, directory / "step.pt")
        torch.save(global_state, rank_dir / "zero" / "optimizer_state.pt")
        torch.save(model_states, rank_dir / pattern)
