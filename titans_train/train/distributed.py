"""Process-group setup and the collective decisions of the training loop.

`init_distributed()` works the same as one plain process (it provides the rendezvous variables
torchrun would) and as N processes under torchrun/SLURM: gloo on CPU, nccl on GPU unless the
config names a backend. DeepSpeed's accelerator is chosen before deepspeed is imported. The
groups of a layout come from `titans_train.parallel.ParallelContext`, for every layout.
"""

from __future__ import annotations

import os

import torch

from titans_train.slurm.environment import apply_to_environment as apply_slurm_environment


def choose_backend(configured: str = "auto") -> str:
    if configured != "auto":
        return configured
    return "nccl" if torch.cuda.is_available() else "gloo"


def prepare_deepspeed_environment() -> None:
    """Settings that must precede `import deepspeed` / its first accelerator query."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(backend: str = "auto", timeout_s: float = 600) -> None:
    """Initialise torch.distributed through DeepSpeed, in one process or under a launcher.
    `timeout_s` bounds every collective's wait (`parallel.timeout_s`)."""
    from datetime import timedelta

    import torch.distributed as dist

    from titans_train.errors import ConfigError

    if dist.is_initialized():
        return
    prepare_deepspeed_environment()
    apply_slurm_environment()  # a task of `srun` (one per GPU): RANK etc. from SLURM's variables
    if "RANK" not in os.environ:  # a plain `python`/`titans-train` process: a world of one
        # Port 0: the store binds a port the OS picks, so no other process can take it first
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    import deepspeed
    import deepspeed.ops

    # The shared-memory all-reduce op would be JIT-compiled (~40 s) on CPU; gloo does the job.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    chosen = choose_backend(backend)
    if chosen == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("parallel.backend", "nccl needs CUDA GPUs and this process sees none; use "
                                                  "parallel.backend=auto (gloo on CPU) or run on GPU nodes")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=chosen, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))


def world_size_from_environment() -> int:
    """The world size a launcher announced, before any process group exists (for validation)."""
    apply_slurm_environment()
    return int(os.environ.get("WORLD_SIZE", "1"))


def current_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def all_gather_objects(value):
    """Every rank's `value` (picklable), ordered by rank; [value] without a process group."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
