"""How each parameter of a `TitansLM` is laid out over tensor-parallel ranks, read from `TP_PLAN`.

`merge_tensor_parallel(shards, vocab_size)` joins the per-tp-rank state dicts of a checkpoint
into full tensors; `shard_for_rank(full, vocab_size, tp, rank)` cuts the full tensors into the
ones `apply_tensor_parallel` gives rank `rank` of `tp`. Both follow the plan's styles:

  column              weight and bias split along dim 0 (output features, grouped by head)
  row, row_to_local_channels   weight split along dim 1; the bias (added after the reduction) whole
  heads               split along dim 0
  vocab_embedding, vocab_head  rows split along dim 0 after padding the vocabulary to a multiple of tp
  replicated          every rank holds all of it

Keys are parameter paths of a `TitansLM` (no trainer prefix). megatron-core's `_extra_state`
entries carry no weights and are dropped.
"""

from __future__ import annotations

from typing import Optional

import torch

from titans_train.parallel.tensor_parallel import TP_PLAN, padded_vocab_size, plan_style

VOCAB_PARAMETERS = ("embedding.weight", "lm_head.weight")


def split_dim(path: str) -> Optional[int]:
    """The dim `path` (a parameter path) is split along over tp ranks; None if replicated."""
    style = plan_style(path, TP_PLAN)
    if style is None:
        module_path, _, name = path.rpartition(".")
        style = plan_style(module_path, TP_PLAN)
        if style is None:
            raise KeyError(f"TP_PLAN does not say how {path} is split; add it to the plan")
        if style in ("row", "row_to_local_channels"):
            return 1 if name == "weight" else None
        return 0  # column (weight and bias), vocab_embedding, vocab_head
    return 0 if style == "heads" else None


def is_weight_entry(path: str) -> bool:
    return not path.endswith("_extra_state")


def merge_tensor_parallel(shards: list[dict[str, torch.Tensor]], vocab_size: int) -> dict[str, torch.Tensor]:
    """Per-rank state dicts (index = tp rank) -> full tensors, vocabulary padding removed."""
    if len(shards) == 1:
        return {path: value for path, value in shards[0].items() if is_weight_entry(path)}
    full = {}
    for path, value in shards[0].items():
        if not is_weight_entry(path):
            continue
        dim = split_dim(path)
        if dim is None:
            full[path] = value
            continue
        merged = torch.cat([shard[path] for shard in shards], dim=dim)
        full[path] = merged[:vocab_size] if path in VOCAB_PARAMETERS else merged
    return full


def shard_for_rank(full: dict[str, torch.Tensor], vocab_size: int, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """Full tensors -> rank `rank`'s shards of a tp = `tp` model (vocabulary padded with zeros)."""
    if tp == 1:
        return dict(full)
    out = {}
    for path, value in full.items():
        dim = split_dim(path)
        if dim is None:
            out[path] = value
            continue
        if path in VOCAB_PARAMETERS:
            padded = value.new_zeros(padded_vocab_size(vocab_size, tp), *value.shape[1:])
            padded[:vocab_size] = value
            value = padded
        if value.shape[dim] % tp:
            raise ValueError(f"{path}: dim {dim} of shape {tuple(value.shape)} does not divide by tp = {tp}")
        out[path] = value.chunk(tp, dim=dim)[rank].clone()
    return out
