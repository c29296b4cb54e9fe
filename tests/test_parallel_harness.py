"""The multi-process harness itself: values come back by rank, failures and deadlocks fail fast."""

import time

import pytest
import torch
import torch.distributed as dist

from distributed import DistributedTestError, DistributedTimeout, run_distributed


def sum_of_ranks(offset):
    value = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(value)
    return dist.get_rank(), value.item()


def rank_one_raises():
    if dist.get_rank() == 1:
        raise ValueError("rank one is broken on purpose")
    dist.barrier()  # rank 0 would wait here forever if the harness did not kill it


def rank_one_never_joins():
    if dist.get_rank() == 0:
        dist.barrier()
    else:
        time.sleep(600)


def test_values_come_back_ordered_by_rank():
    values = run_distributed(sum_of_ranks, world_size=2, timeout_s=60, offset=10)
    assert values == [(0, 21.0), (1, 21.0)]


def test_child_traceback_is_propagated_and_peers_are_killed():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="rank one is broken on purpose"):
        run_distributed(rank_one_raises, world_size=2, timeout_s=60)
    assert time.monotonic() - start < 50  # failed on the error, not on the timeout


def test_deadlock_fails_at_the_timeout():
    with pytest.raises(DistributedTimeout, match=r"ranks \[0, 1\] had not finished"):
        run_distributed("test_parallel_harness:rank_one_never_joins", world_size=2, timeout_s=8)
