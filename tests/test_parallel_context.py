"""Process groups built through megatron-core on 4 real gloo ranks, and the DeepSpeed adapter."""

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from titans_train.model import TitansConfig
from titans_train.parallel.context import ParallelContext
from titans_train.parallel.layout import ParallelConfigError
from titans_train.parallel.validation import validate_parallel_layout

# Each layout is one megatron initialisation (a collective per group); the grids of every
# (tp, sp) of a 64-rank world are compared with megatron's rank generator in test_parallel_layout.
LAYOUTS = [(2, 2), (1, 4), (4, 1), (2, 1)]


def build_every_layout():
    from megatron.core import parallel_state

    rank = dist.get_rank()
    with pytest.raises(ParallelConfigError, match="parallel.sp"):
        ParallelContext.initialize(tp=1, sp=3)
    heads = TitansConfig(variant="lmm", vocab_size=64, dim=24, n_layers=1, n_heads=6, chunk_size=4)
    with pytest.raises(ParallelConfigError, match="model.n_heads = 6 is not divisible by parallel.tp = 4"):
        validate_parallel_layout(heads, tp=4, sp=1, world_size=4, seq_len=12)
    with pytest.raises(ParallelConfigError, match="model.chunk_size = 4"):
        validate_parallel_layout(heads, tp=2, sp=2, world_size=4, seq_len=12)
    assert not parallel_state.model_parallel_is_initialized()  # rejected before group work
    seen = []
    for tp, sp in LAYOUTS:
        context = ParallelContext.initialize(tp=tp, sp=sp)  # checks megatron's groups itself
        layout = context.layout
        assert parallel_state.get_tensor_model_parallel_rank() == context.tp_rank
        assert parallel_state.get_context_parallel_rank() == context.sp_rank
        assert parallel_state.get_data_parallel_rank() == context.data_rank
        mpu = context.mpu()
        assert mpu.get_data_parallel_world_size() == dist.get_world_size(mpu.get_data_parallel_group())
        assert mpu.get_data_parallel_world_size() == layout.dp * layout.sp
        assert mpu.get_data_parallel_group_ranks() == dist.get_process_group_ranks(
            mpu.get_data_parallel_group()
        )
        assert mpu.get_model_parallel_world_size() == layout.tp
        assert mpu.get_model_parallel_rank() == dist.get_rank(mpu.get_model_parallel_group())
        assert not hasattr(mpu, "get_sequence_parallel_world_size")
        # a reduction in the gradient group sums exactly the replicas of our tp shard
        value = torch.tensor([float(context.tp_rank)])
        dist.all_reduce(value, group=context.gradient_group)
        assert value.item() == context.tp_rank * layout.dp * layout.sp
        seen.append((tp, sp, layout.dp, context.tp_rank, context.sp_rank, context.data_rank,
                     context.sp_previous_rank, context.sp_next_rank))
    ParallelContext.destroy()
    return rank, seen


def test_context_groups_match_layout_on_four_ranks():
    results = run_distributed(build_every_layout, world_size=4, timeout_s=120)
    by_rank = dict(results)
    # tp=2 x sp=2 on 4 ranks: rank 3 is tp 1, sp 1; its previous span owner is rank 1
    assert by_rank[3][0] == (2, 2, 1, 1, 1, 0, 1, None)
    # sp=4: rank 2 sits between 1 and 3
    assert by_rank[2][1] == (1, 4, 1, 0, 2, 0, 1, 3)
    # tp=2 x dp=2: rank 2 is tp 0 of the second replica, no sp neighbours
    assert by_rank[2][3] == (2, 1, 2, 0, 0, 1, None, None)


def test_single_process_without_distributed_is_world_one():
    context = ParallelContext.initialize()
    assert (context.layout.tp, context.layout.sp, context.layout.dp) == (1, 1, 1)
    assert context.sp_previous_rank is None and context.sp_next_rank is None
    with pytest.raises(ParallelConfigError, match="parallel.tp"):
        ParallelContext.initialize(tp=2)
