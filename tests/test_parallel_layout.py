"""Rank-grid arithmetic for (tp, sp, dp), checked without processes, and against megatron-core."""

import itertools

import pytest

from titans_train.parallel.context import megatron_rank_groups
from titans_train.parallel.layout import ParallelConfigError, ParallelLayout

LAYOUTS_OF_64 = [
    ParallelLayout.from_world(64, tp=tp, sp=sp)
    for tp, sp in itertools.product((1, 2, 4, 8), (1, 2, 4, 8))
]


@pytest.mark.parametrize("layout", LAYOUTS_OF_64, ids=str)
def test_tp_varies_fastest_then_sp_then_dp(layout):
    for rank in range(layout.world_size):
        c = layout.coordinates(rank)
        assert rank == c.tp_rank + layout.tp * (c.sp_rank + layout.sp * c.dp_rank)
        assert layout.rank_of(c.tp_rank, c.sp_rank, c.dp_rank) == rank


@pytest.mark.parametrize("layout", LAYOUTS_OF_64, ids=str)
def test_groups_partition_the_world(layout):
    sizes = {"tp": layout.tp, "sp": layout.sp, "dp": layout.dp, "gradient": layout.dp * layout.sp}
    for kind, size in sizes.items():
        groups = layout.all_groups(kind)
        assert all(len(group) == size for group in groups)
        assert sorted(r for group in groups for r in group) == list(range(64))
    for rank in range(64):
        c = layout.coordinates(rank)
        # a gradient group holds one tp shard: every member has our tp rank
        assert {layout.coordinates(r).tp_rank for r in layout.gradient_group(rank)} == {c.tp_rank}
        # sp neighbours are the adjacent spans of the same replica and tp shard
        previous, following = layout.sp_neighbours(rank)
        if c.sp_rank == 0:
            assert previous is None
        else:
            assert layout.coordinates(previous).sp_rank == c.sp_rank - 1
            assert layout.sp_neighbours(previous)[1] == rank


@pytest.mark.parametrize("layout", LAYOUTS_OF_64, ids=str)
def test_megatron_builds_the_same_groups(layout):
    megatron = megatron_rank_groups(layout)
    for kind in ("tp", "sp", "dp", "gradient"):
        assert sorted(megatron[kind]) == sorted(layout.all_groups(kind)), kind


def test_specific_grid_of_eight():
    layout = ParallelLayout.from_world(8, tp=2, sp=2)
    assert layout.dp == 2
    assert layout.tp_group(5) == [4, 5]
    assert layout.sp_group(5) == [5, 7]
    assert layout.dp_group(5) == [1, 5]
    assert layout.gradient_group(5) == [1, 3, 5, 7]


def test_world_not_divisible_names_keys_factors_and_fix():
    with pytest.raises(ParallelConfigError) as info:
        ParallelLayout.from_world(6, tp=2, sp=4)
    message = str(info.value)
    for fragment in ("parallel.tp", "parallel.sp", "2 x 4 = 8", "world size 6", "[1, 2, 3, 6]"):
        assert fragment in message
    assert info.value.key == "parallel.sp"  # tp=2 divides 6, sp is the factor to change


@pytest.mark.parametrize("tp, sp, key", [(0, 1, "parallel.tp"), (1, -2, "parallel.sp"), (1.5, 1, "parallel.tp")])
def test_non_positive_degrees_are_rejected(tp, sp, key):
    with pytest.raises(ParallelConfigError, match=key):
        ParallelLayout.from_world(4, tp=tp, sp=sp)
