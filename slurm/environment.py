"""From SLURM's variables to torch.distributed's, for the two launch modes in common use.

- One task per GPU (`srun` starts every rank): RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID,
  WORLD_SIZE = the step's task count (SLURM_STEP_NUM_TASKS, else SLURM_NTASKS), LOCAL_WORLD_SIZE =
  tasks on this node, MASTER_ADDR = the first host of
  SLURM_JOB_NODELIST, MASTER_PORT derived from the job id (every task computes the same one, and
  jobs sharing a node rarely collide). `torch_environment` computes them; `init_distributed`
  applies them when a process runs under srun without a launcher's RANK.
- One task per node running torchrun's agent (`node_launch`): the c10d rendezvous endpoint is
  the first host of the node list at the same derived port; torchrun then sets the rank variables.

Node lists use SLURM's compressed syntax (`gpu[01-04,07],login1`); `expand_nodelist` expands it
without calling `scontrol show hostnames`, so it works inside containers without SLURM's tools.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from titans_train.errors import UserError

PORT_BASE = 20000
PORT_RANGE = 12000  # ports 20000..31999: above the well-known range, below Linux's ephemeral range (32768..)


class SlurmEnvironmentError(UserError):
    """SLURM variables that do not describe a usable job step."""


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: "a[1-2],b" -> ["a[1-2]", "b"]."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return [part for part in parts if part]


def _expand_ranges(ranges: str) -> list[str]:
    """"01-03,7" -> ["01", "02", "03", "7"] (zero padding kept)."""
    values = []
    for item in ranges.split(","):
        low, _, high = item.partition("-")
        if not high:
            values.append(low)
            continue
        if not (low.isdigit() and high.isdigit()) or int(high) < int(low):
            raise SlurmEnvironmentError(f"SLURM_JOB_NODELIST: cannot read the range {item!r}")
        width = len(low)
        values += [f"{value:0{width}d}" for value in range(int(low), int(high) + 1)]
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names in order: "n[1-3],x" -> ["n1", "n2", "n3", "x"]."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        # Each bracket group multiplies: "r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2.
        names = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            names = [name + literal for name in names]
            if ranges:
                names = [name + value for name in names for value in _expand_ranges(ranges)]
        hosts += names
    if not hosts:
        raise SlurmEnvironmentError(f"SLURM_JOB_NODELIST {nodelist!r} names no host")
    return hosts


def job_port(job_id: str | int) -> int:
    """The rendezvous port of a job: the same on every node, spread over PORT_RANGE by job id."""
    return PORT_BASE + int(job_id) % PORT_RANGE


def _tasks_on_this_node(environ: Mapping[str, str]) -> int:
    """SLURM_STEP_TASKS_PER_NODE (else the job's SLURM_TASKS_PER_NODE), "2(x3),1", at SLURM_NODEID."""
    counts: list[int] = []
    for item in (environ.get("SLURM_STEP_TASKS_PER_NODE") or environ["SLURM_TASKS_PER_NODE"]).split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if not match:
            raise SlurmEnvironmentError(f"SLURM_TASKS_PER_NODE: cannot read {item!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[int(environ.get("SLURM_NODEID", "0"))]


def rendezvous_endpoint(environ: Mapping[str, str] = os.environ) -> str:
    """host:port of the job's rendezvous: the first node of the job (or step) at the job's port."""
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    job_id = environ.get("SLURM_JOB_ID")
    if not nodelist or not job_id:
        raise SlurmEnvironmentError("SLURM_JOB_NODELIST / SLURM_JOB_ID are not set: not inside a SLURM job")
    port = environ.get("MASTER_PORT") or job_port(job_id)
    return f"{expand_nodelist(nodelist)[0]}:{port}"


def torch_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The torch.distributed variables of this srun task (one task per GPU); {} outside srun.

    A task started by torchrun (RANK already set) or a batch script outside any step
    (no SLURM_PROCID / SLURM_STEP_ID) gets {}: the launcher, not SLURM, defines its rank.
    """
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_ID" not in environ:
        return {}
    host, port = rendezvous_endpoint(environ).rsplit(":", 1)
    return {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": environ.get("SLURM_STEP_NUM_TASKS") or environ["SLURM_NTASKS"],
        "LOCAL_WORLD_SIZE": str(_tasks_on_this_node(environ)),
        "GROUP_RANK": environ.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR", host),
        "MASTER_PORT": port,
    }


def apply_to_environment() -> dict[str, str]:
    """Set the variables of `torch_environment()` in os.environ (idempotent); returns them."""
    variables = torch_environment(os.environ)
    os.environ.update(variables)
    return variables
