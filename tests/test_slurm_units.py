"""SLURM pieces that need no cluster: node lists, the rank mapping, exit codes, submit's errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from titans_train.slurm.environment import (
    SlurmEnvironmentError,
    expand_nodelist,
    job_port,
    rendezvous_endpoint,
    torch_environment,
)
from titans_train.slurm.node_launch import torchrun_arguments, worker_exit_code


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("ttnode[1-2]", ["ttnode1", "ttnode2"]),
    ("gpu[08-10,12],login", ["gpu08", "gpu09", "gpu10", "gpu12", "login"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_expand_nodelist_rejects_a_bad_range():
    with pytest.raises(SlurmEnvironmentError, match="range"):
        expand_nodelist("n[5-2]")


SRUN_TASK = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NODEID": "2",
             "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[03-06]",
             "SLURM_STEP_NODELIST": "gpu[03-06]", "SLURM_TASKS_PER_NODE": "2(x4)"}


def test_srun_task_gets_the_torch_variables():
    assert torch_environment(SRUN_TASK) == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "2",
        "MASTER_ADDR": "gpu03", "MASTER_PORT": str(job_port(123456)),
    }
    assert 20000 <= job_port(123456) < 40000


def test_a_step_smaller_than_the_job_uses_the_step_counts():
    env = {**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}
    assert torch_environment(env)["WORLD_SIZE"] == "4" and torch_environment(env)["LOCAL_WORLD_SIZE"] == "1"


def test_uneven_tasks_per_node():
    env = {**SRUN_TASK, "SLURM_TASKS_PER_NODE": "4,2(x2),1", "SLURM_NODEID": "3"}
    assert torch_environment(env)["LOCAL_WORLD_SIZE"] == "1"


@pytest.mark.parametrize("drop_or_add", [{"RANK": "0"}, {"SLURM_STEP_ID": None}, {"SLURM_PROCID": None}])
def test_no_mapping_under_torchrun_or_in_the_batch_script(drop_or_add):
    env = dict(SRUN_TASK)
    for key, value in drop_or_add.items():
        env.pop(key) if value is None else env.__setitem__(key, value)
    assert torch_environment(env) == {}


def test_torchrun_mode_rendezvous_on_the_first_host():
    env = {**SRUN_TASK, "SLURM_NNODES": "4", "SLURM_NODEID": "0"}
    assert rendezvous_endpoint(env) == f"gpu03:{job_port(123456)}"
    args = torchrun_arguments(8, ["train", "debug"], env)
    assert args[args.index("--rdzv-endpoint") + 1] == f"gpu03:{job_port(123456)}"
    assert args[args.index("--rdzv-conf") + 1] == "is_host=1"
    assert args[args.index("--nnodes") + 1] == "4" and args[-3:] == ["titans_train", "train", "debug"]
    assert torchrun_arguments(8, [], {**env, "SLURM_NODEID": "1"})[args.index("--rdzv-conf") + 1] == "is_host=0"


@pytest.mark.parametrize("codes, expected", [([75, 75], 75), ([75, -15], 75), ([2, 75], 2), ([3, -15], 3),
                                             ([-9, 1], -9), ([0, 0], 0)])
def test_node_exit_code_from_worker_codes(codes, expected):
    assert worker_exit_code(codes) == expected


def _submit(tmp_path, *arguments, path=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "titans_train", "slurm", "submit", *arguments], env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_world_size_the_layout_cannot_split(tmp_path):
    line = _one_line_error(_submit(tmp_path, "debug", "parallel.tp=2", "--nodes", "3", "--gpus-per-node", "1", "--dry-run"))
    assert "parallel.tp" in line and "--nodes 3 x --gpus-per-node 1 = world size 3" in line


def test_sbatch_missing(tmp_path):
    line = _one_line_error(_submit(tmp_path, "debug", "--nodes", "1", "--gpus-per-node", "1", path="/nonexistent"))
    assert "sbatch is not on PATH" in line and "--dry-run" in line


def test_unknown_cluster_setting(tmp_path):
    settings = tmp_path / "cluster.yaml"
    settings.write_text("partition: gpu\npartiton: gpu2\n")
    line = _one_line_error(_submit(tmp_path, "debug", "--nodes", "1", "--gpus-per-node", "1", "--cluster", str(settings),
                                   "--dry-run"))
    assert f"{settings}: partiton: unknown key; did you mean partition?" in line


def test_recipe_that_does_not_validate(tmp_path):
    line = _one_line_error(_submit(tmp_path, "debug", "train.lr_schedule=cosine", "--nodes", "1", "--gpus-per-node", "1",
                                   "--dry-run"))
    assert "train.lr_schedule: unknown key; did you mean train.schedule?" in line


def test_a_sweep_set_that_does_not_validate(tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("train.lr=1e-3\ntrain.steps=-1 train.tokens=0\n")
    line = _one_line_error(_submit(tmp_path, "debug", "--nodes", "1", "--gpus-per-node", "1", "--sweep", str(sweep),
                                   "--dry-run"))
    assert f"--sweep {sweep} set 1" in line


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path):
    result = _submit(tmp_path, "debug", "train.lr=1e-3", "train.global_batch_tokens=1024", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                     "--time", "1:00:00", "--launcher", "torchrun", "--dry-run", path="/nonexistent:" + os.path.dirname(sys.executable))
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
                 "--nproc-per-node 4 -- train"):
        assert line in script
    assert "train.lr=1e-3" in script and not (tmp_path / "runs").exists()


def _corpus(root) -> list[str]:
    """Files of unequal sizes, so the byte-balanced slices and sample boundaries cross files."""
    import random

    generator = random.Random(0)
    root.mkdir()
    for index in range(7):
        words = [generator.choice(["memory", "titan", "surprise", "token", "gate", "chunk"]) for _ in range(150 * (index + 1))]
        (root / f"doc{index}.txt").write_text(" ".join(words))
    return [str(root)]


def _dataset_files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_prepare_stages_over_tasks_equal_one_prepare(tmp_path):
    from titans_train.data.prepare import prepare_dataset, prepare_stage

    inputs = _corpus(tmp_path / "corpus")
    options = dict(seed=3, shard_bytes=8192, num_workers=1, progress=False)
    single = prepare_dataset(inputs, str(tmp_path / "single"), "byte", 32, **options)
    for stage in ("tokenize", "shards"):
        for task in (1, 0, 2):  # any order within a stage
            assert prepare_stage(stage, task, 3, inputs, str(tmp_path / "split"), "byte", 32, **options) is None
    merged = prepare_stage("merge", 0, 3, inputs, str(tmp_path / "split"), "byte", 32, **options)
    assert len(single.shards) > 3 and merged == single
    assert _dataset_files(tmp_path / "split") == _dataset_files(tmp_path / "single")


def test_prepare_merge_before_the_shards_stage_names_the_fix(tmp_path):
    from titans_train.data.errors import DataError
    from titans_train.data.prepare import prepare_stage

    inputs = _corpus(tmp_path / "corpus")
    with pytest.raises(DataError, match="run every task of --stage tokenize first"):
        prepare_stage("shards", 0, 2, inputs, str(tmp_path / "out"), "byte", 32, num_workers=1, progress=False)
    prepare_stage("tokenize", 0, 1, inputs, str(tmp_path / "out"), "byte", 32, num_workers=1, progress=False)
    with pytest.raises(DataError, match="run every task of --stage shards first"):
        prepare_stage("merge", 0, 1, inputs, str(tmp_path / "out"), "byte", 32, num_workers=1, progress=False)


@pytest.mark.parametrize("ci, outcome", [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_no_slurm_skips_with_a_hint_or_fails_under_ci(monkeypatch, ci, outcome):
    import slurm_cluster

    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: None)
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(outcome) as raised:
        slurm_cluster.require_slurm()
    message = str(raised.value)
    assert ("run pytest as root to enable them" in message) if not ci else ("CI=true but no test SLURM" in message)


def test_cluster_settings_that_are_not_yaml(tmp_path):
    settings = tmp_path / "cluster.yaml"
    settings.write_text("partition: a\npartition: b\n")
    line = _one_line_error(_submit(tmp_path, "debug", "--nodes", "1", "--gpus-per-node", "1", "--cluster", str(settings),
                                   "--dry-run"))
    assert f"--cluster: {settings} is not valid YAML" in line


def test_sweep_sets_with_their_own_run_dir_keep_it(tmp_path):
    """A scaling study's sweep file names each run's run_dir (`study run --slurm`); the rendered
    sets keep those, and sets without one get <run_dir>/<task>. `sbatch` here is a stand-in that
    only answers with a job id, as `sbatch --parsable` does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(f"train.lr=1e-3 run_dir={tmp_path / 'study' / 'a'}\ntrain.lr=2e-3\n")
    result = _submit(tmp_path, "debug", f"run_dir={tmp_path / 'sweep'}", "--nodes", "1", "--gpus-per-node", "1",
                     "--sweep", str(sweep), path=f"{bin_dir}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    rendered = (tmp_path / "sweep" / "slurm" / "sweep.txt").read_text().splitlines()
    assert rendered == [f"train.lr=1e-3 run_dir={tmp_path / 'study' / 'a'}",
                        f"train.lr=2e-3 run_dir={tmp_path / 'sweep' / '001'}"]
