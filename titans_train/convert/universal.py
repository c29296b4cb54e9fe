"""A DeepSpeed universal checkpoint of a ZeRO-1/2 checkpoint, made by our own reading, so a run
resumes exactly on another tensor-parallel size (and any dp/sp).

DeepSpeed's `ds_to_universal` cannot do this for our model (it needs merge patterns for the
row-parallel, head-split and padded-vocabulary parameters, and fails on megatron-core's
`_extra_state` entries). Here each state (fp32 master weights, Adam's exp_avg and exp_avg_sq) is
read one at a time, tp rank by tp rank, with zero_to_fp32's merge over the ZeRO partitions, and
joined over tp by `TP_PLAN`. The output is DeepSpeed's universal layout, which its loader slices
for the new layout (`chunk` along `cat_dim`; vocabulary rows padded for the new tp):

    zero/<parameter name>/{fp32,exp_avg,exp_avg_sq}.pt   {"param": full tensor, "cat_dim", "vocab_tensor"}
    zero/<parameter name>/step.pt                         Adam's step
    zero/optimizer_state.pt                               the optimizer's global state and param groups
    mp_rank_XX_model_states.pt                            copied: scheduler and client state

Peak memory: one state of one tp rank as read, plus that state at full size.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Any

import torch

from titans_train.convert.consolidate import TRAINER_PREFIX, _rank_files, _torch_load
from titans_train.convert.errors import ConversionError
from titans_train.convert.tp_layout import VOCAB_PARAMETERS, merge_tensor_parallel, split_dim

STATES = ("fp32", "exp_avg", "exp_avg_sq")
SHARDED_KEYS = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")


def _flat_groups(optimizer_state: dict[str, Any], state: str) -> list[torch.Tensor]:
    groups = optimizer_state["single_partition_of_fp32_groups"]
    if state == "fp32":
        return groups
    moments = optimizer_state["base_optimizer_state"]["state"]
    return [moments[index][state] for index in range(len(groups))]


def _tp_rank_state(checkpoint: Path, mp_rank: int, state: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One state of one tp rank at its shard shapes, by DeepSpeed name; and rank 0's optimizer state."""
    from deepspeed.utils import zero_to_fp32

    model_file = checkpoint / f"mp_rank_{mp_rank:02d}_model_states.pt"
    optim_files = _rank_files(checkpoint, f"*zero_pp_rank_*_mp_rank_{mp_rank:02d}_optim_states.pt")
    if not optim_files:
        raise ConversionError(checkpoint, f"has no ZeRO optimizer shards for tp rank {mp_rank}",
                              "the checkpoint is incomplete: resume from another one")
    _torch_load(model_file, mmap=True)
    flat_groups, first = [], None
    for file in optim_files:  # memory-mapped: only this state's pages are read
        optimizer_state = _torch_load(file, mmap=True)["optimizer_state_dict"]
        first = first or optimizer_state
        flat_groups.append(_flat_groups(optimizer_state, state))
    world = first["partition_count"]
    world = max(world) if isinstance(world, list) else world
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        model_states = zero_to_fp32.parse_model_states([str(model_file)])
        merged = zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(
            world, flat_groups, model_states, False, first.get("param_alignment_paddings"))
    return zero_to_fp32.to_torch_tensor(merged), first


def write_universal(checkpoint: Path, manifest: dict[str, Any], out: Path) -> None:
    """Write the universal checkpoint of `checkpoint` (ZeRO 1 or 2, any tp/dp/sp) into `out`."""
    config = manifest["config"]
    if int(manifest["zero_stage"]) not in (1, 2):
        raise ConversionError(checkpoint, f"is a ZeRO {manifest['zero_stage']} checkpoint; resuming it on another "
                              "tensor-parallel size is built for ZeRO 1 and 2 only",
                              "resume with its tp, or start a new run from its weights with train.init_from")
    tp, vocab_size = int(config["parallel"]["tp"]), int(config["model"]["vocab_size"])
    tied = config["model"].get("tie_embeddings", True)
    zero_dir = out / "zero"
    optimizer_state = None
    for state in STATES:
        shards = []
        for rank in range(tp):
            shard, first = _tp_rank_state(checkpoint, rank, state)
            optimizer_state = optimizer_state or first
            shard = {name.removeprefix(TRAINER_PREFIX): value for name, value in shard.items()}
            if tied:
                shard.pop("lm_head.weight", None)
            shards.append(shard)
        for path, value in merge_tensor_parallel(shards, vocab_size).items():
            directory = zero_dir / (TRAINER_PREFIX + path)
            directory.mkdir(parents=True, exist_ok=True)
            torch.save({"param": value, "cat_dim": split_dim(path) or 0, "vocab_tensor": path in VOCAB_PARAMETERS},
                       directory / f"{state}.pt")
    step = optimizer_state["base_optimizer_state"]["state"][0]["step"]
    for directory in zero_dir.iterdir():
        torch.save(step, directory / "step.pt")
    global_state = {key: value for key, value in optimizer_state.items() if key not in SHARDED_KEYS}
    global_state["param_groups"] = optimizer_state["base_optimizer_state"]["param_groups"]
    torch.save(global_state, zero_dir / "optimizer_state.pt")
    for model_file in checkpoint.glob("mp_rank_*_model_states.pt"):
        shutil.copy2(model_file, out / model_file.name)
