"""Run a function in several real processes on the gloo backend, for multi-process tests.

`run_distributed(target, world_size, timeout_s, **kwargs)` starts `world_size` fresh processes
(spawn), gives each the torch.distributed environment of one rank (gloo, OMP threads 1), calls
`target(**kwargs)` in each and returns the per-rank return values, ordered by rank.

The rendezvous store is hosted by the launching process, as torchrun's agent hosts it: the parent
binds a TCPStore to a port the OS picks and keeps it bound, and the ranks join it as clients
(TORCHELASTIC_USE_AGENT_STORE). A port chosen free and then handed to rank 0 to bind could be taken
in between by another test process (two pytest workers run launches side by side).

Failure handling is the point of this module: the first child that raises makes the parent kill
every other child (which would otherwise wait forever in a collective) and re-raise with the
child's traceback; a launch that exceeds `timeout_s` is killed as a whole and reported as a
deadlock with the ranks that had not finished. Every child runs in its own process group, so
anything it started (DeepSpeed or megatron helper processes) is killed with it.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any


class DistributedTestError(RuntimeError):
    """A rank raised; the message carries that rank's traceback."""


class DistributedTimeout(RuntimeError):
    """The launch did not finish in time (usually a deadlock in a collective)."""


def resolve_target(target: str | Callable[..., Any]) -> Callable[..., Any]:
    """`"package.module:function"` or a module-level callable (it must be importable by path)."""
    if callable(target):
        return target
    module_name, sep, attribute = target.partition(":")
    if not sep:
        raise ValueError(f"target {target!r} must look like 'package.module:function'")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank if the launching process dies (e.g. killed by an outer timeout
    before its cleanup ran), so no orphaned rank keeps waiting in a collective."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _child_main(
    rank: int,
    world_size: int,
    port: int,
    target: str | Callable[..., Any],
    kwargs: dict[str, Any],
    init_process_group: bool,
    results: multiprocessing.Queue,
) -> None:
    os.setsid()  # own process group: the parent kills everything this rank starts
    _die_with_parent()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",  # the parent's store; rank 0 does not start one
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if init_process_group:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = resolve_target(target)(**kwargs)
        if init_process_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - everything must reach the parent, including exits
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None


def _kill_all(processes: list[multiprocessing.Process]) -> None:
    for process in processes:
        if process.pid is None or not process.is_alive():
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    for process in processes:
        process.join(timeout=5)


def run_distributed(
    target: str | Callable[..., Any],
    world_size: int,
    timeout_s: float = 120.0,
    *,
    init_process_group: bool = True,
    **kwargs: Any,
) -> list[Any]:
    """Run `target(**kwargs)` on `world_size` gloo ranks; return the values ordered by rank.

    `init_process_group=False` leaves torch.distributed uninitialised (the environment variables
    MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE are still set) for code that initialises it itself,
    e.g. `deepspeed.init_distributed`.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    port = store.port
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()
    processes = [
        context.Process(
            target=_child_main,
            args=(rank, world_size, port, target, kwargs, init_process_group, results),
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(values))
                raise DistributedTimeout(
                    f"{world_size}-rank launch of {target!r} exceeded {timeout_s:.0f} s; "
                    f"ranks {missing} had not finished (deadlock?)"
                )
            try:
                rank, status, value = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    time.sleep(0.5)  # the queue feeder thread of a dying child may still flush
                    if results.empty():
                        raise DistributedTestError(
                            f"{dead[0].name} exited with code {dead[0].exitcode} "
                            "without reporting (killed or crashed in native code)"
                        ) from None
                continue
            if status == "error":
                raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{value}")
            values[rank] = value
        for process in processes:
            process.join(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        _kill_all(processes)
        del store
    return [values[rank] for rank in range(world_size)]
