"""The cluster-specific settings every user has to set, in one YAML file.

`titans-train slurm submit --cluster FILE` (default: $TITANS_TRAIN_CLUSTER, else none) reads it;
command-line options (--partition, --account, --time, --qos) win over the file. Every key is
documented on `ClusterSettings`; an unknown key stops with the nearest known one, so a typo never
silently drops a setting. Example: docs/slurm.md, `slurm/cluster.example.yaml`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Dict, List

from omegaconf import OmegaConf

from titans_train.config.errors import InvalidValueError, UnknownKeyError, closest

LAUNCHERS = ("srun", "torchrun")


@dataclass
class ClusterSettings:
    partition: str = ""
    account: str = ""
    qos: str = ""
    # Wall-clock limit, SLURM syntax ("2-00:00:00", "04:00:00").
    time: str = ""
    # "srun": one srun task per GPU (each a trainer rank); "torchrun": one task per node running
    # torchrun's agent, which starts the node's ranks.
    launcher: str = "srun"
    # Ask SLURM for --gpus-per-node (false on CPU-only partitions: the count is then only the
    # number of processes per node).
    request_gpus: bool = True
    cpus_per_task: int = 0  # 0: SLURM's default
    # Seconds before the time limit at which the job is told to checkpoint (--signal=B:USR1@N).
    signal_grace_seconds: int = 300
    # Requeues after a checkpointed stop (exit 75) before the job gives up.
    max_requeues: int = 20
    # Shell lines run before the launch: `module load ...`, `source venv/bin/activate`.
    setup: List[str] = field(default_factory=list)
    # Exported in the job: NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG, ...
    env: Dict[str, str] = field(default_factory=dict)
    # The Python that runs titans-train in the job. Empty: the one that ran `slurm submit`.
    python: str = ""
    # A prefix for every task's command, e.g. a container runtime ("apptainer exec --nv img.sif").
    container: str = ""
    # Further #SBATCH lines, verbatim ("--exclusive", "--constraint=a100").
    sbatch_options: List[str] = field(default_factory=list)


CLUSTER_ENV = "TITANS_TRAIN_CLUSTER"


def load_settings(path: str | None) -> ClusterSettings:
    """The settings in `path` (or $TITANS_TRAIN_CLUSTER); defaults when neither is given."""
    path = path or os.environ.get(CLUSTER_ENV) or None
    schema = OmegaConf.structured(ClusterSettings)
    if path is None:
        return OmegaConf.to_object(schema)
    if not os.path.isfile(path):
        raise InvalidValueError("--cluster", f"{path} does not exist; pass a cluster settings YAML file "
                                             "(see slurm/cluster.example.yaml)")
    try:
        user = OmegaConf.load(path)
    except Exception as error:  # YAML syntax: duplicate keys, bad indentation
        raise InvalidValueError("--cluster", f"{path} is not valid YAML ({' '.join(str(error).split())}); fix the file") from None
    known = [f.name for f in fields(ClusterSettings)]
    for key in user:
        if key not in known:
            raise UnknownKeyError(f"{path}: {key}", closest(str(key), known))
    try:
        merged = OmegaConf.merge(schema, user)
    except Exception as error:  # omegaconf's validation errors: a wrong type for a key
        raise InvalidValueError(f"{path}", f"{error}".splitlines()[0]) from None
    settings = OmegaConf.to_object(merged)
    if settings.launcher not in LAUNCHERS:
        raise InvalidValueError(f"{path}: launcher", f"{settings.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    return settings
