"""The process groups of a run, built once by megatron-core, asked for by role everywhere else.

`ParallelContext.initialize(tp, sp)` validates the layout (before any process-group work), builds
megatron-core's groups with its context-parallel groups serving as our sequence-parallel groups,
checks that megatron placed every rank where `ParallelLayout` says it is, and then answers:

- `tp_group`: the ranks that split one layer's heads;
- `sp_group`: the owners of consecutive spans of one sequence;
- `gradient_group`: dp x sp, every rank holding the same parameter shard (gradients are averaged
  here, and ZeRO shards here);
- `data_rank` / `data_world_size`: which slice of the global batch this rank loads (dp only:
  tp and sp ranks of one replica load the same samples).

A single process without torch.distributed gets a context of world 1 with no groups, so the same
calling code runs unparallelised. With tp = sp = 1 every rank is a data-parallel replica: the
world group is the dp and gradient group and megatron-core is not involved (no groups to build,
and DeepSpeed's own default groups are this layout, so `mpu()` is None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from titans_train.parallel.layout import ParallelConfigError, ParallelLayout, RankCoordinates
from titans_train.parallel.megatron_cpu import install_megatron_cpu_shim

# megatron-core's rank order: tp fastest, then cp (our sp), then ep (1) and dp, pp (1) last.
MEGATRON_ORDER = "tp-cp-ep-dp-pp"


def megatron_rank_groups(layout: ParallelLayout) -> dict[str, list[list[int]]]:
    """The groups megatron-core builds for `layout`, from its own rank generator (no processes)."""
    from megatron.core.parallel_state import RankGenerator

    generator = RankGenerator(
        tp=layout.tp, ep=1, dp=layout.dp, pp=1, cp=layout.sp, order=MEGATRON_ORDER
    )
    return {
        "tp": generator.get_ranks("tp"),
        "sp": generator.get_ranks("cp"),
        "dp": generator.get_ranks("dp"),
        "gradient": generator.get_ranks("dp-cp"),
    }


@dataclass
class ParallelContext:
    layout: ParallelLayout
    rank: int
    tp_group: Any = None  # torch ProcessGroup, None in a world of 1
    sp_group: Any = None
    dp_group: Any = None
    gradient_group: Any = None

    @classmethod
    def initialize(cls, tp: int = 1, sp: int = 1) -> ParallelContext:
        """Build the groups of the (tp, sp) layout with megatron-core.

        The layout was validated with the config (`validate_parallel_layout`); only the world
        arithmetic is re-checked here, as it is needed to build the layout. Call after
        `torch.distributed.init_process_group` (or `deepspeed.init_distributed`); in a single
        process without it, only tp = sp = 1 is valid and no groups are built.
        """
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        layout = ParallelLayout.from_world(world_size, tp=tp, sp=sp)
        if not dist.is_initialized():
            return cls(layout=layout, rank=0)
        if layout.tp == layout.sp == 1:
            world = dist.group.WORLD
            return cls(layout=layout, rank=dist.get_rank(), dp_group=world, gradient_group=world)

        from megatron.core import parallel_state

        install_megatron_cpu_shim()
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            context_parallel_size=layout.sp,
            order=MEGATRON_ORDER,
            # The default backend is already gloo on CPU; duplicate gloo groups cost a collective
            # each. On GPU runs megatron's gloo side groups are not used by our code either.
            create_gloo_process_groups=False,
        )
        rank = dist.get_rank()
        context = cls(
            layout=layout,
            rank=rank,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            sp_group=parallel_state.get_context_parallel_group(),
            dp_group=parallel_state.get_data_parallel_group(with_context_parallel=False),
            gradient_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
        )
        context.check_against_megatron()
        return context

    def check_against_megatron(self) -> None:
        """Every group megatron built holds exactly the ranks our layout arithmetic names."""
        for role, expected in (
            ("tp", self.layout.tp_group(self.rank)),
            ("sp", self.layout.sp_group(self.rank)),
            ("dp", self.layout.dp_group(self.rank)),
            ("gradient", self.layout.gradient_group(self.rank)),
        ):
            group = getattr(self, f"{role}_group")
            actual = dist.get_process_group_ranks(group)
            if actual != expected:
                raise RuntimeError(
                    f"megatron-core built the {role} group of rank {self.rank} as {actual}, "
                    f"the layout {self.layout} expects {expected}"
                )

    @property
    def coordinates(self) -> RankCoordinates:
        return self.layout.coordinates(self.rank)

    @property
    def tp_rank(self) -> int:
        return self.coordinates.tp_rank

    @property
    def sp_rank(self) -> int:
        return self.coordinates.sp_rank

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def sp_size(self) -> int:
        return self.layout.sp

    @property
    def data_rank(self) -> int:
        """Index of this rank's replica: which slice of the global batch it loads."""
        return self.coordinates.dp_rank

    @property
    def data_world_size(self) -> int:
        return self.layout.dp

    @property
    def sp_previous_rank(self) -> int | None:
        """Global rank that owns the span before ours (None for the first span)."""
        return self.layout.sp_neighbours(self.rank)[0]

    @property
    def sp_next_rank(self) -> int | None:
        return self.layout.sp_neighbours(self.rank)[1]

    def mpu(self, partition_over_sp: bool = True) -> DeepSpeedMPU | None:
        """DeepSpeed's model-parallel unit: data-parallel = dp x sp (dp alone without
        `partition_over_sp`, see `parallel/zero.py`), model-parallel = tp. None for pure data
        parallelism, where DeepSpeed's default groups are the layout."""
        if self.layout.tp == self.layout.sp == 1:
            return None
        return DeepSpeedMPU(self, partition_over_sp)

    @staticmethod
    def destroy() -> None:
        """Forget megatron's groups (the process group itself stays; the caller owns it)."""
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()


class DeepSpeedMPU:
    """The adapter `deepspeed.initialize(mpu=...)` calls.

    Its data-parallel group is dp x sp, so ZeRO averages gradients and shards optimizer state
    over every replica of a tp shard, including the span owners of one sequence (each holds the
    whole parameter shard). ZeRO-3 with sp > 1 gets dp alone (`partition_over_sp=False`): its
    parameter gathers must stay among ranks at the same span position (`parallel/zero.py`).
    Its model-parallel group is tp, so gradient-norm clipping counts each tp shard once. It
    deliberately has no `get_sequence_parallel_*` methods: those switch on DeepSpeed's Ulysses
    sequence parallelism, a different scheme that divides the batch size.
    """

    def __init__(self, context: ParallelContext, partition_over_sp: bool = True):
        self._context = context
        self._partition_over_sp = partition_over_sp

    def get_data_parallel_group(self):
        return self._context.gradient_group if self._partition_over_sp else self._context.dp_group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(group=self.get_data_parallel_group())

    def get_data_parallel_world_size(self) -> int:
        return len(self.get_data_parallel_group_ranks())

    def get_data_parallel_group_ranks(self) -> list[int]:
        layout, rank = self._context.layout, self._context.rank
        return layout.gradient_group(rank) if self._partition_over_sp else layout.dp_group(rank)

    def get_model_parallel_group(self):
        return self._context.tp_group

    def get_model_parallel_rank(self) -> int:
        return self._context.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._context.layout.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._context.layout.tp_group(self._context.rank)[0]


__all__ = [
    "DeepSpeedMPU",
    "MEGATRON_ORDER",
    "ParallelConfigError",
    "ParallelContext",
    "megatron_rank_groups",
]
