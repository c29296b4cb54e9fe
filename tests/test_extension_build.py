"""The C++ extension's build lock: a lock left by a killed build is removed, a live build is waited on."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from titans_train.kernels.memory_scan.cpu import build

LOAD = ("import warnings; warnings.simplefilter('always'); "
        "from titans_train.kernels.memory_scan.cpu.build import extension; extension(); print('loaded')")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """A copy of the built extension (times kept, so nothing is rebuilt) in a cache of this test's
    own: other test processes loading the extension meanwhile neither see its locks nor wait on them."""
    built = build.build_directory()
    root = tmp_path / "torch_extensions"
    shutil.copytree(built, root / built.name, ignore=shutil.ignore_patterns("lock", "build.flock"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))


def load_in_a_new_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOAD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_lock_left_by_a_killed_build_is_removed_with_a_warning_not_waited_on():
    stale = build.build_directory() / "lock"
    stale.touch()  # what torch's FileBaton leaves when the process building is killed
    process = load_in_a_new_process()
    out, err = process.communicate(timeout=120)  # torch alone waits on the lock forever
    assert process.returncode == 0, err
    assert out.strip().endswith("loaded")
    assert "left by a build of the memory_scan C++ extension that was killed" in err
    assert not stale.exists()


def test_a_load_waits_for_the_process_holding_the_build_lock():
    directory = build.build_directory()
    with build.build_lock(directory) as locked:
        assert locked
        process = load_in_a_new_process()
        time.sleep(5)  # ample for a load of the built module (under a second)
        assert process.poll() is None, "the load went on while another process held the build lock"
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert out.strip().endswith("loaded")
    assert "killed" not in err  # torch's own lock was released by a build that ended


def test_without_flock_support_the_load_goes_on_under_torchs_lock_alone():
    # As on a file system mounted without flock (Lustre without -o flock): flock raises.
    no_flock = ("import errno, fcntl\n"
                "def flock(descriptor, operation): raise OSError(errno.ENOLCK, 'no locks available')\n"
                "fcntl.flock = flock\n")
    done = subprocess.run([sys.executable, "-c", no_flock + LOAD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("loaded")
