"""One running job per run directory: an advisory lock held by rank 0 for the job's lifetime.

Two trainers writing one run dir (checkpoints, `latest`, metrics.jsonl) would corrupt each
other's checkpoints. Rank 0 takes `flock(LOCK_EX | LOCK_NB)` on `<run_dir>/.lock` and keeps the
file open until the job ends; the kernel releases the lock when the process dies, however it
dies, so a lock file left behind by a dead job is stale by construction and simply taken over.
The file records who holds it (host, pid, start time) for the refusal message. On file systems
without working `flock` across nodes (some NFS mounts) the lock only guards one node.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from titans_train.errors import UserError

LOCK_NAME = ".lock"


class RunDirectoryLocked(UserError):
    pass


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._file = None

    def acquire(self) -> None:
        """Take the lock, or raise `RunDirectoryLocked` naming the holder and the fix."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirectoryLocked(
                f"run dir {self.path.parent} is in use by a running job ({holder}); wait for it or stop it, "
                "or give this run its own directory (name=... or run_dir=...)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
