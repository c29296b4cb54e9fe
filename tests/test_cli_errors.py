"""Foreseeable user errors reach the user as one line and exit code 2, not a traceback; a frozen
rank fails the job after `parallel.timeout_s`, not after torch's 30 minutes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

from distributed import run_distributed
from titans_train.cli import main

# (command line, what the one line must name)
CASES = [
    (["train", "debug", "train.eps=-1"], "train.eps: must be > 0"),
    (["train", "debug", "train.grad_clip=-1"], "train.grad_clip: must be >= 0"),
    (["train", "debug", "checkpoint.interval=-1"], "checkpoint.interval: must be >= 0"),
    (["train", "debug", "parallel.timeout_s=0"], "parallel.timeout_s: must be > 0"),
    (["train", "debug", "train.optimizer_precision=bf16"], "train.optimizer_precision: bf16 optimizer state needs"),
    (["train", "debug", "train.lr_schedule=wsd"], "did you mean train.schedule"),
    (["train", "debug", "parallel.tp=4"], "parallel.tp"),
    (["train", "no-such-recipe"], "no recipe or file named 'no-such-recipe'"),
    (["config", "show", "debug", "model.n_heads=3"], "model.n_heads"),
    (["model", "info", "debug", "model.dim=-4"], "model.dim"),
    (["data", "prepare", "/nonexistent/corpus", "--output", "/tmp/titans-never-written", "--seq-len", "64"],
     "/nonexistent/corpus"),
    (["generate", "--checkpoint", "/nonexistent/run", "--prompt", "x"], "no complete checkpoint"),
]


@pytest.mark.parametrize("argv, named", CASES, ids=[" ".join(argv[:3]) for argv, _ in CASES])
def test_user_error_is_one_line_and_exit_2(argv, named, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert named in lines[0], lines[0]


def test_generate_refuses_an_empty_prompt_and_no_new_tokens():
    from titans_train.errors import UserError
    from titans_train.generate import generate

    with pytest.raises(UserError, match="--prompt is empty"):
        generate(None, [], 10)
    with pytest.raises(UserError, match="--max-new-tokens must be >= 1, got -5"):
        generate(None, [1, 2], -5)


def test_nccl_on_a_machine_without_gpus_is_a_config_error(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("TITANS_TRAIN_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "titans_train", "train", "debug", "parallel.backend=nccl",
                           f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith(("config error:", "error:"))]
    assert errors == [errors[0]] and "parallel.backend" in errors[0] and "Traceback" not in done.stderr


def frozen_peer_rank(group_timeout_s: float, frozen_s: float) -> tuple[str, float]:
    """Rank 1 stops answering for `frozen_s`; rank 0's collective must give up after about
    `group_timeout_s` (the process group's timeout, `parallel.timeout_s`)."""
    import torch.distributed as dist

    from titans_train.train.distributed import init_distributed

    init_distributed("gloo", group_timeout_s)
    if dist.get_rank() == 1:
        time.sleep(frozen_s)
        return "frozen", frozen_s
    start = time.perf_counter()
    try:
        dist.barrier()
    except Exception:  # gloo reports the timeout as a RuntimeError subclass
        return "timed out", time.perf_counter() - start
    return "completed", time.perf_counter() - start


@pytest.mark.slow
def test_a_frozen_rank_fails_the_job_after_parallel_timeout_s():
    results = run_distributed(frozen_peer_rank, 2, 240, init_process_group=False, group_timeout_s=5.0,
                              frozen_s=20.0)
    outcome, waited = results[0]
    assert outcome == "timed out" and waited < 15.0, results  # not the 20 s the peer was gone


def hold_run_dir_lock(run_dir: str, holding) -> None:
    from titans_train.train.run_lock import RunLock

    lock = RunLock(run_dir)  # held while this object lives
    lock.acquire()
    holding.set()
    time.sleep(120)


def test_a_second_trainer_on_a_locked_run_dir_is_refused_and_a_dead_holder_is_stale(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    holding = context.Event()
    holder = context.Process(target=hold_run_dir_lock, args=(str(tmp_path), holding))
    holder.start()
    try:
        assert holding.wait(60)
        # In its own process: the refusal comes after the process group exists.
        done = subprocess.run([sys.executable, "-m", "titans_train", "train", "debug", f"run_dir={tmp_path}",
                               f"data.cache_dir={tmp_path / 'corpus'}"], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 2, done.stderr
        err = done.stderr
        assert f"run dir {tmp_path} is in use by a running job" in err and f'"pid": {holder.pid}' in err, err
        assert not (tmp_path / "config.yaml").exists()  # the refused trainer wrote nothing
    finally:
        holder.kill()  # dies holding the lock, as a job killed by SLURM or the OOM killer
        holder.join(60)
    # Its lock file stays behind, stale: the next trainer takes it over.
    from titans_train.train.run_lock import RunLock

    assert (tmp_path / ".lock").is_file()
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


@pytest.mark.slow
def test_a_tensor_parallel_cpu_run_prints_no_library_warnings(tmp_path):
    # megatron-core warned ~40 lines per run (Transformer Engine/Apex fallbacks, one queue per
    # device): nothing a user of this framework can act on, so none of it reaches the console.
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "titans_train",
                           "train", "debug", "parallel.tp=2", "train.steps=2", "train.warmup_steps=1",
                           "checkpoint.interval=0", f"run_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stderr
    assert "validation (end, step 2)" in done.stdout + done.stderr


def test_a_zero3_run_prints_no_library_warnings(tmp_path):
    # DeepSpeed's ZeRO-3 hooks warned once per run that the objective's output type (then a
    # dataclass) hid its tensors from them; a NamedTuple they can look into.
    done = subprocess.run([sys.executable, "-m", "titans_train", "train", "debug", "parallel.zero_stage=3",
                           "train.steps=2", "train.warmup_steps=1", "checkpoint.interval=0", f"run_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "warn" not in (done.stdout + done.stderr).lower(), done.stderr
    assert "validation perplexity" in done.stdout + done.stderr


@pytest.fixture
def full_file_system(tmp_path):
    """A 64 KiB tmpfs: every write past that fails with ENOSPC, as on a full scratch disk."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_is_one_line_and_exit_2(tmp_path, full_file_system, capsys):
    # Both workers fail on the full disk, one while the other writes its error back: stopping the
    # pool must not kill a worker holding the result queue's lock (multiprocessing.Pool.terminate()
    # then waited on the lock forever: this test hung until its timeout).
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    generator = random.Random(0)
    for index in range(8):
        (corpus / f"file{index}.txt").write_text("".join(generator.choices("abcdefgh \n", k=40_000)))
    argv = ["data", "prepare", str(corpus), "--output", str(full_file_system / "shards"), "--seq-len", "64"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # beside progress bars
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("error: no space left on device"), errors


def test_ctrl_c_in_data_prepare_is_one_line_and_exit_130_and_the_rerun_goes_on(tmp_path, capsys, monkeypatch):
    from titans_train.data import prepare as prepare_module

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "text.txt").write_text("".join(random.Random(0).choices("abcdefgh \n", k=40_000)))
    argv = ["data", "prepare", str(corpus), "--output", str(tmp_path / "shards"), "--seq-len", "64",
            "--shard-mb", "0.01", "--workers", "1", "--quiet"]
    real_write_shard = prepare_module.write_shard
    written = []

    def interrupted_write_shard(path, *args):
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the third shard is written
        written.append(path)
        return real_write_shard(path, *args)

    monkeypatch.setattr(prepare_module, "write_shard", interrupted_write_shard)
    try:
        code = main(argv)
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt left main() (a traceback for the user, and it would stop pytest)")
    assert code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines() == [
        "interrupted: the token files and shards finished so far are kept; run the same command again to go on "
        "from them"], err
    rewritten = []
    monkeypatch.setattr(prepare_module, "write_shard",
                        lambda path, *args: (rewritten.append(path), real_write_shard(path, *args))[1])
    assert main(argv) == 0
    shards = json.loads((tmp_path / "shards" / "manifest.json").read_text())["shards"]
    assert len(rewritten) == len(shards) - 2 and not set(rewritten) & set(written)  # the two finished are kept


def test_a_checkpoint_on_a_full_disk_is_one_line_and_exit_2(tmp_path, full_file_system):
    # In its own process: the failure comes after the process group exists.
    done = subprocess.run([sys.executable, "-m", "titans_train", "train", "debug", "train.steps=2",
                           "train.warmup_steps=1", f"run_dir={tmp_path / 'run'}",
                           f"checkpoint.dir={full_file_system / 'checkpoints'}"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert "no space left on device for checkpoint step000000002" in errors[0], errors
    assert str(full_file_system / "checkpoints") in errors[0] and "checkpoint.dir" in errors[0], errors
    assert not any(full_file_system.rglob("*.pt"))  # the failed save's files are gone
