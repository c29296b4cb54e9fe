"""`python -m titans_train.slurm.node_launch --nproc-per-node G -- train RECIPE ...`: the
torchrun-per-node launch mode, one srun task per node.

It is torchrun (torch's elastic agent, started through `torch.distributed.run`'s own argument
parser) with the c10d rendezvous on the first host of the job's node list, the job id as
rendezvous id, and two things the `torchrun` command does not do:
- SIGUSR1 is handed to the worker processes (torchrun dies of it and orphans them); the trainer
  checkpoints and exits 75;
- its exit code is the workers' (torchrun exits 1 whatever they returned): 2 (config error) or
  3 (diverged) if any worker returned it, else 75 if any worker stopped after a checkpoint, else
  the first failure's code. The batch script decides requeueing on that code.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from titans_train.errors import EXIT_DIVERGED, EXIT_REQUEUE, EXIT_USER_ERROR
from titans_train.slurm.environment import rendezvous_endpoint

# Exit codes that must reach the batch script, most decisive first.
PRIORITY = (EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_REQUEUE)


def _child_pids() -> list[int]:
    """Direct children of this process (the workers run in their own sessions, so no group kill)."""
    me = str(os.getpid())
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
                ppid = handle.read().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue
        if ppid == me:
            children.append(int(entry))
    return children


def _forward_to_workers(signal_number, frame) -> None:
    for pid in _child_pids():
        try:
            os.kill(pid, signal_number)
        except ProcessLookupError:
            pass


def worker_exit_code(codes: list[int]) -> int:
    """One exit code for the node from its workers' codes (see the module docstring)."""
    for code in PRIORITY:
        if code in codes:
            return code
    return next((code for code in codes if code != 0), 0)


def torchrun_arguments(nproc_per_node: int, command: list[str], environ=os.environ) -> list[str]:
    endpoint = rendezvous_endpoint(environ)
    is_host = int(environ.get("SLURM_NODEID", "0") == "0")
    return ["--nnodes", environ["SLURM_NNODES"], "--nproc-per-node", str(nproc_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", environ["SLURM_JOB_ID"],
            "--rdzv-conf", f"is_host={is_host}", "--max-restarts", "0", "-m", "titans_train", *command]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m titans_train.slurm.node_launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the titans-train subcommand and arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    config, entrypoint, entry_args = config_from_args(get_args_parser().parse_args(
        torchrun_arguments(args.nproc_per_node, command)))
    signal.signal(signal.SIGUSR1, _forward_to_workers)
    try:
        elastic_launch(config, entrypoint)(*entry_args)
    except ChildFailedError as error:
        return worker_exit_code([failure.exitcode for failure in error.failures.values()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
