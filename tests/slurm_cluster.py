"""A real SLURM on this machine for tests: munge, slurmctld and two slurmd "nodes" on localhost.

`slurm_cluster` (pytest fixture, session-wide) starts the cluster once per test run and tears it
down at the end. Everything lives in a private directory (its own munge key and socket, its own
slurm.conf reached through $SLURM_CONF, spool and state directories), so no system SLURM or munge
is touched; the only system change is a line in /etc/hosts naming the two nodes 127.0.0.1
(rendezvous addresses must resolve), removed again at teardown.

Missing packages are installed with apt-get when running as root (Debian's slurmd, slurmctld,
slurm-client, munge). Under CI (CI=true) a SLURM that cannot be started fails the tests; on a
machine without root and without SLURM they are skipped with one line saying how to enable them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ports import free_ports

NODES = ("ttnode1", "ttnode2")
PACKAGES = ("slurmd", "slurmctld", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
HOSTS_MARK = "# titans-train test SLURM"
# SLURM holds a requeued job back for the credential lifetime (AuthInfo cred_expire, default
# 120 s) so the old run's credentials have expired on the nodes; shortened here so the
# preemption drill requeues in seconds. Shorter is riskier on a loaded machine (a step's
# credential must outlive its launch).
CRED_EXPIRE_SECONDS = 10
ENABLE_HINT = ("real-SLURM tests need root (to install slurmd slurmctld slurm-client munge with apt-get and start "
               "them) or those packages installed and CI=true; run pytest as root to enable them")


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]  # SLURM_CONF etc.: pass to every SLURM command and to titans-train
    processes: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(command, env={**os.environ, **self.env}, capture_output=True, text=True,
                              check=check, timeout=timeout)

    def job_state(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_for_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll until the job reaches a final state; returns its scontrol fields."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s: {state}")
            time.sleep(0.5)

    def log_tail(self, characters: int = 3000) -> str:
        """The end of the controller's and the nodes' logs (for failure messages)."""
        parts = []
        for log in sorted(self.root.glob("slurm*.log")):
            parts.append(f"--- {log.name}\n{log.read_text()[-characters:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        self.run("scontrol", "shutdown", check=False, timeout=30)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        _remove_hosts_line()
        shutil.rmtree(self.root, ignore_errors=True)


def _ensure_packages() -> str | None:
    """None when the binaries are there (installing them if root); else why not."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and this is not a root Debian machine"
    result = subprocess.run(["apt-get", "install", "-y", *PACKAGES], capture_output=True, text=True,
                            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if result.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-300:]}"
    return None


def _add_hosts_line() -> None:
    hosts = Path("/etc/hosts")
    text = hosts.read_text()
    if HOSTS_MARK not in text:
        hosts.write_text(text.rstrip("\n") + f"\n127.0.0.1 {' '.join(NODES)} {HOSTS_MARK}\n")


def _remove_hosts_line() -> None:
    hosts = Path("/etc/hosts")
    lines = hosts.read_text().splitlines(keepends=True)
    kept = [line for line in lines if HOSTS_MARK not in line]
    if kept != lines:
        hosts.write_text("".join(kept))


def _slurm_conf(root: Path, ctld_port: int, node_ports: list[int], munge_socket: Path) -> str:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=1 State=UNKNOWN"
        for name, port in zip(NODES, node_ports)
    )
    return f"""ClusterName=titanstest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_SECONDS}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=10
{nodes}
PartitionName=debug Nodes={NODES[0]},{NODES[1]} Default=YES MaxTime=INFINITE State=UP
"""


def _wait(condition, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} did not happen within {timeout:.0f} s\n{tail}")
        time.sleep(0.3)


def start_cluster() -> SlurmCluster:
    root = Path(tempfile.mkdtemp(prefix="titans-slurm-"))
    root.chmod(0o755)
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir()
    munge_dir = root / "munge"
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = munge_dir / "munge.socket"
    ctld_port, *node_ports = free_ports(1 + len(NODES))
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, ctld_port, node_ports, munge_socket))
    cluster = SlurmCluster(root, {"SLURM_CONF": str(conf)})
    _add_hosts_line()
    try:
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={munge_socket}",
                        f"--pid-file={munge_dir}/munged.pid", f"--seed-file={munge_dir}/munged.seed",
                        f"--log-file={munge_dir}/munged.log"], check=True, capture_output=True, text=True)
        cluster.processes.append(_Pidfile(munge_dir / "munged.pid"))
        env = {**os.environ, **cluster.env}
        cluster.processes.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=env,
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0, 30,
              "slurmctld answering", root / "slurmctld.log")
        for name in NODES:
            cluster.processes.append(subprocess.Popen(["slurmd", "-D", "-N", name], env=env,
                                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(lambda: cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout.split() == ["idle"], 60,
              "both nodes idle", root / f"slurmd-{NODES[0]}.log")
    except BaseException:
        cluster.stop()
        raise
    return cluster


class _Pidfile:
    """A daemon that forked into the background, ended through the pid it wrote (munged)."""

    def __init__(self, path: Path) -> None:
        self.pid = int(path.read_text().strip())

    def poll(self):
        try:
            os.kill(self.pid, 0)
            return None
        except ProcessLookupError:
            return 0

    def send_signal(self, sig) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> None:
        _wait(lambda: self.poll() is not None, timeout, f"process {self.pid} ending")

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


_CLUSTER: list[SlurmCluster] = []


def require_slurm() -> None:
    """Return if a test SLURM can be started here; else fail (CI=true) or skip with the hint."""
    problem = _ensure_packages()
    if problem is None and os.geteuid() != 0:
        problem = "starting slurmctld/slurmd for tests needs root"
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but no test SLURM: {problem}")
    pytest.skip(ENABLE_HINT)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The running test cluster (started on first use, stopped when the session ends)."""
    require_slurm()
    started = not _CLUSTER
    if started:
        _CLUSTER.append(start_cluster())
    yield _CLUSTER[0]
    if started:
        _CLUSTER.pop().stop()
