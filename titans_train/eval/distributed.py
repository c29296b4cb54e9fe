"""How evaluation work is split over ranks, so that every layout gives the same numbers.

Every task is a fixed list of items (windows of a held-out split, generated prompts), a function
of the data and the seed alone. The ranks of one tensor-parallel group (one model replica) work
on the same items; replica r of R takes items r, r + R, r + 2R, ... (`strided_part`), sums what
it measured, and the sums are all-reduced over the replicas (`all_reduce_sums`, in float64).
Only the order of the final additions depends on the layout.

`EvalLayout` builds that layout for the `eval` command: tp from `--tp`, every other rank a
replica (no sequence parallelism: streaming through the state contract already bounds memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def strided_part(count: int, replica: int, replicas: int) -> list[int]:
    """The item indices replica `replica` of `replicas` evaluates."""
    return list(range(replica, count, replicas))


@dataclass
class EvalLayout:
    """This rank's place: its replica (which items) and its tp group (shards of one model)."""

    context: Any  # titans_train.parallel.ParallelContext
    replica: int
    replicas: int
    group: Any  # the group the replicas' sums are reduced over (None: a world of one)

    @classmethod
    def from_context(cls, context) -> "EvalLayout":
        """Replicas are the gradient group (dp x sp): every rank of it holds a whole model copy."""
        replicas = context.layout.dp * context.layout.sp
        replica = context.coordinates.dp_rank * context.layout.sp + context.coordinates.sp_rank
        return cls(context, replica, replicas, context.gradient_group if dist.is_initialized() else None)

    @property
    def is_main(self) -> bool:
        return self.context.rank == 0

    def part(self, count: int) -> list[int]:
        return strided_part(count, self.replica, self.replicas)


def all_reduce_sums(values: torch.Tensor, layout: EvalLayout) -> torch.Tensor:
    """Sum of each replica's `values` (float64, same shape on every rank)."""
    if layout.group is None or layout.replicas == 1:
        return values.to(torch.float64).clone()
    from titans_train.train.distributed import current_device

    values = values.to(device=current_device(), dtype=torch.float64)  # nccl reduces device tensors
    dist.all_reduce(values, group=layout.group)
    return values.cpu()


class FullLogits(nn.Module):
    """A tensor-parallel `TitansLM` whose logits are gathered over tp: (B, T, vocab_size), the
    padding of the vocabulary removed, so decoding code written for one process runs unchanged."""

    def __init__(self, model: nn.Module, context):
        super().__init__()
        self.model = model
        self.context = context

    def forward(self, input_ids: torch.Tensor, state=None):
        out = self.model(input_ids, state=state)
        if self.context.tp_size > 1:
            pieces = [torch.empty_like(out.logits) for _ in range(self.context.tp_size)]
            dist.all_gather(pieces, out.logits.contiguous(), group=self.context.tp_group)
            out.logits = torch.cat(pieces, dim=-1)[..., : self.model.config.vocab_size]
        return out


def padded_rounds(count: int, replica: int, replicas: int, batch: int) -> list[tuple[list[int], list[bool]]]:
    """`strided_part` in equal rounds of `batch` slots, for code whose forward passes must stay in
    lockstep across replicas (ZeRO-3 gathers parameters in every forward): every replica runs
    ceil(count / (replicas x batch)) rounds; slots past the end hold item 0 and are marked False
    (weight 0)."""
    mine = strided_part(count, replica, replicas)
    rounds = -(-count // (replicas * batch))
    out = []
    for first in range(0, rounds * batch, batch):
        slots = mine[first:first + batch]
        out.append((slots + [0] * (batch - len(slots)), [True] * len(slots) + [False] * (batch - len(slots))))
    return out
