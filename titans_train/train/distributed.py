"""Process-group setup and the parallel context the engine is given.

`init_distributed()` works the same as one plain process (it provides the rendezvous variables
torchrun would) and as N processes under torchrun/SLURM: gloo on CPU, nccl on GPU unless the
config names a backend. DeepSpeed's accelerator is chosen before deepspeed is imported.

`DataParallelContext` is the trivial (tp = sp = 1) layout. A context object is what the engine
consumes: `rank`, `data_rank` / `data_world_size` (which part of the global batch this rank
loads), `tp_size`, `sp_size`, `gradient_group` and `mpu()` (DeepSpeed's model-parallel adapter,
None for pure data parallelism). `titans_train.parallel.ParallelContext` has the same members.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def choose_backend(configured: str = "auto") -> str:
    if configured != "auto":
        return configured
    return "nccl" if torch.cuda.is_available() else "gloo"


def prepare_deepspeed_environment() -> None:
    """Settings that must precede `import deepspeed` / its first accelerator query."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(backend: str = "auto") -> None:
    """Initialise torch.distributed through DeepSpeed, in one process or under a launcher."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    prepare_deepspeed_environment()
    if "RANK" not in os.environ:  # a plain `python`/`titans-train` process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    import deepspeed
    import deepspeed.ops

    # The shared-memory all-reduce op would be JIT-compiled (~40 s) on CPU; gloo does the job.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    chosen = choose_backend(backend)
    if chosen == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=chosen, auto_mpi_discovery=False, verbose=False)


def world_size_from_environment() -> int:
    """The world size a launcher announced, before any process group exists (for validation)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def current_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class DataParallelContext:
    """Every rank is a data-parallel replica (tp = sp = 1): no model-parallel groups needed.

    Its members are the subset of `titans_train.parallel.ParallelContext` the trainer uses.
    """

    rank: int
    world_size: int

    tp_size: int = 1
    sp_size: int = 1

    @classmethod
    def from_process_group(cls) -> DataParallelContext:
        import torch.distributed as dist

        return cls(rank=dist.get_rank(), world_size=dist.get_world_size())

    @property
    def data_rank(self) -> int:
        return self.rank

    @property
    def data_world_size(self) -> int:
        return self.world_size

    @property
    def gradient_group(self):
        return None  # the default (world) group

    def mpu(self, partition_over_sp: bool = True):
        return None


def build_parallel_context(parallel_config):
    """The context for this run's layout; tp/sp > 1 come from `titans_train.parallel`."""
    if parallel_config.tp == 1 and parallel_config.sp == 1:
        return DataParallelContext.from_process_group()
    from titans_train.parallel import ParallelContext

    return ParallelContext.initialize(tp=parallel_config.tp, sp=parallel_config.sp)


def all_reduce_mean(value: float, group=None) -> float:
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=current_device())
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
        tensor /= dist.get_world_size(group)
    return float(tensor.item())


def all_reduce_max_flag(flag: bool) -> bool:
    """True on every rank if it is True on any (collective stop decisions)."""
    import torch.distributed as dist

    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=current_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """End a process cleanly: every rank reaches the barrier, then the group is destroyed."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
