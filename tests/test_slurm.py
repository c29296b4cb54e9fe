"""SLURM jobs against a real SLURM (tests/slurm_cluster.py: munge, slurmctld, two slurmd nodes).

Every job goes through `titans-train slurm submit` and the installed templates, as a user's would.
The nodes have one CPU each, so a 2-node job has one trainer per node (world size 2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401 (the fixture)

STEPS = 16
RELATIVE_TOLERANCE = 1e-5
JOB_TIMEOUT = 300


def _environment(cluster) -> dict[str, str]:
    return {**os.environ, **cluster.env, "OMP_NUM_THREADS": "1"}


def _cluster_file(tmp_path: Path, **extra) -> Path:
    """The CPU nodes' settings: no GPUs to request, one CPU per task, a short signal grace."""
    settings = {"request_gpus": False, "cpus_per_task": 1, "max_requeues": 3, "signal_grace_seconds": 30, **extra}
    lines = [f"{key}: {json.dumps(value)}" for key, value in settings.items()]
    path = tmp_path / "cluster.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def submit(cluster, tmp_path: Path, *arguments: str, check: bool = True, env_extra=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "titans_train", "slurm", "submit", *arguments]
    result = subprocess.run(command, env={**_environment(cluster), **(env_extra or {})}, capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def job_id_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout.split("submitted job ")[1].split(":")[0]


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def logs(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(run_dir.glob("slurm-*.out")))


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> list[float]:
    """The per-step losses of one process on the same global batch (no SLURM involved)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run([sys.executable, "-m", "titans_train", "train", "debug", f"train.steps={STEPS}", f"run_dir={run_dir}"],
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, timeout=300)
    return [loss for _, loss in step_losses(run_dir)]


def assert_losses_equal(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want), (got, want)
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= RELATIVE_TOLERANCE * abs(b), f"step {step}: {a} != {b}"


def test_nodelist_expansion_matches_scontrol(slurm_cluster):
    from titans_train.slurm.environment import expand_nodelist

    nodelist = "a[1-3,10],b-x[007-009],c"
    assert expand_nodelist(nodelist) == slurm_cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_two_node_job_matches_one_process(slurm_cluster, tmp_path, reference_losses, launcher):
    run_dir = tmp_path / "run"
    result = submit(slurm_cluster, tmp_path, "debug", f"train.steps={STEPS}", f"run_dir={run_dir}",
                    "--nodes", "2", "--gpus-per-node", "1", "--launcher", launcher,
                    "--cluster", str(_cluster_file(tmp_path)))
    state = slurm_cluster.wait_for_job(job_id_of(result), JOB_TIMEOUT)
    assert state["JobState"] == "COMPLETED", logs(run_dir)
    assert (run_dir / "slurm" / "train.sbatch").is_file()
    losses = step_losses(run_dir)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    assert_losses_equal([loss for _, loss in losses], reference_losses)


def _wait_for_step(run_dir: Path, step: int, job_id: str, cluster, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(s >= step for s, _ in step_losses(run_dir)):
            return
        assert cluster.job_state(job_id)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), logs(run_dir)
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not reach step {step}")


def test_preemption_checkpoints_requeues_and_finishes(slurm_cluster, tmp_path, reference_losses):
    run_dir = tmp_path / "run"
    result = submit(slurm_cluster, tmp_path, "debug", f"train.steps={STEPS}", f"run_dir={run_dir}",
                    "--nodes", "2", "--gpus-per-node", "1", "--cluster", str(_cluster_file(tmp_path)))
    job_id = job_id_of(result)
    _wait_for_step(run_dir, 1, job_id, slurm_cluster)
    # What SLURM does --signal=B:USR1@grace before the time limit: USR1 to the batch shell only.
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    state = slurm_cluster.wait_for_job(job_id, JOB_TIMEOUT)
    text = logs(run_dir)
    assert state["JobState"] == "COMPLETED", f"{state}\n{text}\n{slurm_cluster.log_tail()}"
    assert state["Restarts"] == "1", text
    assert "checkpointed and stopped (exit 75): requeue 1 of 3" in text
    assert "resuming from" in text
    losses = step_losses(run_dir)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1)), "every step exactly once"
    assert_losses_equal([loss for _, loss in losses], reference_losses)


def _final_state_without_requeue(cluster, job_id: str) -> dict[str, str]:
    state = cluster.wait_for_job(job_id, JOB_TIMEOUT)
    time.sleep(2)  # a requeue would have put it back to PENDING by now
    return cluster.job_state(job_id)


def test_config_error_at_start_is_not_requeued(slurm_cluster, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base: [debug]\ntrain:\n  steps: 4\n")
    run_dir = tmp_path / "run"
    cluster_file = _cluster_file(tmp_path, sbatch_options=["--hold"])
    job_id = job_id_of(submit(slurm_cluster, tmp_path, str(recipe), f"run_dir={run_dir}",
                              "--nodes", "1", "--gpus-per-node", "1", "--cluster", str(cluster_file)))
    # The recipe is edited between submit and start: the job's own validation stops it (exit 2).
    recipe.write_text("base: [debug]\ntrain:\n  stepz: 4\n")
    slurm_cluster.run("scontrol", "release", job_id)
    state = _final_state_without_requeue(slurm_cluster, job_id)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", logs(run_dir)
    assert state["Restarts"] == "0"
    assert "configuration error (exit 2): not requeued" in logs(run_dir)


def test_diverged_run_is_not_requeued(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job_id = job_id_of(submit(slurm_cluster, tmp_path, "debug", "train.lr=1e30", "train.warmup_steps=0",
                              f"run_dir={run_dir}", "--nodes", "1", "--gpus-per-node", "1",
                              "--cluster", str(_cluster_file(tmp_path))))
    state = _final_state_without_requeue(slurm_cluster, job_id)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "3:0", logs(run_dir)
    assert state["Restarts"] == "0"
    assert "diverged (exit 3): not requeued" in logs(run_dir)


def test_sweep_array_runs_each_set_in_its_own_directory(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# lr sweep\ntrain.lr=1e-3\n\ntrain.lr=3e-3 train.seed=1\n")
    base = tmp_path / "sweep-run"
    job_id = job_id_of(submit(slurm_cluster, tmp_path, "debug", "train.steps=3", f"run_dir={base}",
                              "--nodes", "1", "--gpus-per-node", "1", "--sweep", str(sweep), "--max-parallel", "2",
                              "--cluster", str(_cluster_file(tmp_path))))
    for task in (0, 1):
        state = slurm_cluster.wait_for_job(f"{job_id}_{task}", JOB_TIMEOUT)
        assert state["JobState"] == "COMPLETED", logs(base)
    configs = []
    for task in (0, 1):
        run_dir = base / f"{task:03d}"
        assert [s for s, _ in step_losses(run_dir)] == [1, 2, 3]
        configs.append((run_dir / "config.yaml").read_text())
    assert "lr: 0.001" in configs[0] and "lr: 0.003" in configs[1] and "seed: 1" in configs[1]


def test_prepare_as_two_task_arrays_equals_one_prepare(slurm_cluster, tmp_path):
    from test_slurm_units import _corpus, _dataset_files
    from titans_train.data.prepare import prepare_dataset

    inputs = _corpus(tmp_path / "corpus")
    single = prepare_dataset(inputs, str(tmp_path / "single"), "byte", 32, seed=5, shard_bytes=8192, num_workers=1,
                             progress=False)
    command = [sys.executable, "-m", "titans_train", "slurm", "prepare", *inputs, "-o", str(tmp_path / "split"),
               "--seq-len", "32", "--seed", "5", "--shard-mb", str(8192 / 2**20), "--workers", "1", "--tasks", "2",
               "--cluster", str(_cluster_file(tmp_path))]
    result = subprocess.run(command, env=_environment(slurm_cluster), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    merge = result.stdout.split("merge ")[1].split()[0]
    state = slurm_cluster.wait_for_job(merge, JOB_TIMEOUT)
    logs_text = "\n".join(p.read_text() for p in (tmp_path / "split.slurm").glob("*.out"))
    assert state["JobState"] == "COMPLETED", logs_text
    assert "task 1 of 2 done" in logs_text and "task 0 of 2 done" in logs_text
    assert _dataset_files(tmp_path / "split") == _dataset_files(tmp_path / "single")
    assert json.loads((tmp_path / "split" / "manifest.json").read_text())["fingerprint"] == single.fingerprint


def test_requeues_are_bounded(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job_id = job_id_of(submit(slurm_cluster, tmp_path, "debug", f"train.steps={STEPS}", f"run_dir={run_dir}",
                              "--nodes", "1", "--gpus-per-node", "1",
                              "--cluster", str(_cluster_file(tmp_path, max_requeues=0))))
    _wait_for_step(run_dir, 1, job_id, slurm_cluster)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    state = _final_state_without_requeue(slurm_cluster, job_id)
    assert state["ExitCode"] == "75:0" and state["Restarts"] == "0", logs(run_dir)
    assert "0 requeues are used up: not requeued" in logs(run_dir)
    assert (run_dir / "checkpoints" / "latest").exists()


def test_status_and_cancel_find_the_jobs_of_a_run_directory(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job_id = job_id_of(submit(slurm_cluster, tmp_path, "debug", f"run_dir={run_dir}", "--nodes", "1",
                              "--gpus-per-node", "1", "--cluster", str(_cluster_file(tmp_path, sbatch_options=["--hold"]))))
    command = [sys.executable, "-m", "titans_train", "slurm"]
    status = subprocess.run([*command, "status", str(run_dir)], env=_environment(slurm_cluster), capture_output=True,
                            text=True, timeout=60)
    assert job_id in status.stdout and "PENDING" in status.stdout, status.stderr
    cancel = subprocess.run([*command, "cancel", str(run_dir)], env=_environment(slurm_cluster), capture_output=True,
                            text=True, timeout=60)
    assert cancel.returncode == 0, cancel.stderr
    assert slurm_cluster.wait_for_job(job_id, 60)["JobState"] == "CANCELLED"
