"""Latencies of the SLURM path on a local test cluster (tests/slurm_cluster.py; needs root).

    .venv/bin/python benchmarks/slurm.py [--launcher srun|torchrun] [--steps 40]

Starts munge, slurmctld and two slurmd "nodes" on this machine, submits the `debug` recipe as a
2-node job through `titans-train slurm submit`, and prints:
- submit -> first training step: from calling submit to the wall time step 1 is logged in
  metrics.jsonl (scheduling, Python and torch start-up, rendezvous, model build, one step);
- preemption signal -> exit 75 (checkpointed, requeued): `scancel --signal=USR1 --batch`, as
  SLURM does --signal=B:USR1@grace before a time limit, until the job is pending again;
- signal -> first resumed step: the above, SLURM's hold of a requeued job (Reason=BeginTime, the
  credential lifetime AuthInfo cred_expire: 10 s on the test cluster, SLURM's default 120 s),
  then start-up and resume from the checkpoint.
Take numbers on an otherwise idle machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from slurm_cluster import CRED_EXPIRE_SECONDS, start_cluster  # noqa: E402


def _steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r]


def _wait(condition, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError("the job did not get there in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launcher", choices=("srun", "torchrun"), default="srun")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    cluster = start_cluster()
    work = Path(tempfile.mkdtemp(prefix="titans-slurm-bench-"))
    try:
        settings = work / "cluster.yaml"
        settings.write_text("request_gpus: false\ncpus_per_task: 1\n")
        run_dir = work / "run"
        env = {**os.environ, **cluster.env, "OMP_NUM_THREADS": "1"}
        submitted = time.time()
        out = subprocess.run([sys.executable, "-m", "titans_train", "slurm", "submit", "debug", f"train.steps={args.steps}",
                              f"run_dir={run_dir}", "--nodes", "2", "--gpus-per-node", "1", "--launcher", args.launcher,
                              "--cluster", str(settings)], env=env, capture_output=True, text=True, check=True).stdout
        job = out.split("submitted job ")[1].split(":")[0]
        first = _wait(lambda: _steps(run_dir))[0]
        print(f"submit -> first training step: {first['time'] - submitted:.1f} s ({args.launcher}, 2 nodes)")
        signalled = time.time()
        cluster.run("scancel", "--signal=USR1", "--batch", job)
        _wait(lambda: cluster.job_state(job).get("Restarts") == "1" and cluster.job_state(job)["JobState"] == "PENDING")
        stopped_at = _steps(run_dir)[-1]["step"]
        print(f"signal -> checkpointed at step {stopped_at}, exit 75, requeued: {time.time() - signalled:.1f} s")
        resumed = _wait(lambda: [r for r in _steps(run_dir) if r["step"] > stopped_at])[0]
        print(f"signal -> first resumed step (step {resumed['step']}), with a {CRED_EXPIRE_SECONDS} s requeue hold: "
              f"{resumed['time'] - signalled:.1f} s")
        cluster.wait_for_job(job, 600)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
