"""The built-in corpus: Python standard library sources, present on every machine, no download.

The file list is a fixed set of long-lived stdlib modules and packages (tests excluded), so it is
the same set on Python 3.11 to 3.14; the text inside them differs a little between Python
versions, and the cache key and manifest fingerprint include it. On Python 3.11 it is about 7 MB
of text in about 560 files. Documents are files; a file goes to validation when the sha256 of its
path relative to the stdlib is < 5% of the hash range, a split that does not move when other files
come or go.

Several ranks may call `builtin_corpus` at once: one prepares under a file lock while the others
wait; each split is prepared in a temporary directory and renamed into place, manifest last.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sysconfig

from titans_train.data.errors import EmptyInputError
from titans_train.data.manifest import MANIFEST_NAME
from titans_train.data.prepare import prepare_dataset
from titans_train.data.tokenizer import load_tokenizer

# Modules (name.py) or packages (name/, recursive) in the stdlib of every Python >= 3.11.
STDLIB_MODULES = (
    "abc argparse ast asyncio base64 bdb bisect calendar cmd code codecs collections colorsys "
    "compileall concurrent configparser contextlib copy csv dataclasses datetime difflib dis "
    "doctest email enum filecmp fileinput fnmatch fractions ftplib functools getopt gettext glob "
    "graphlib gzip hashlib heapq hmac html http imaplib importlib inspect ipaddress json keyword "
    "linecache locale logging mailbox mimetypes modulefinder multiprocessing netrc numbers "
    "operator optparse pathlib pdb pickle pickletools pkgutil platform plistlib poplib pprint "
    "profile pstats pydoc queue quopri random re reprlib rlcompleter runpy sched secrets "
    "selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl statistics "
    "string stringprep struct subprocess symtable sysconfig tabnanny tarfile tempfile textwrap "
    "threading timeit tokenize tomllib trace traceback tracemalloc types typing unittest urllib "
    "uuid warnings wave weakref webbrowser wsgiref xml xmlrpc zipapp zipfile zoneinfo _pydecimal _pyio"
).split()
EXCLUDED_DIRS = {"test", "tests", "__pycache__", "idle_test"}
VALIDATION_PERCENT = 5
# Small shards so several prepare workers write in parallel (the corpus is ~30 MB of shards).
SHARD_BYTES = 4 << 20


def stdlib_files(stdlib_dir: str | None = None) -> list[str]:
    """The corpus files, relative to the stdlib directory, sorted."""
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    files = []
    for name in STDLIB_MODULES:
        module_file = os.path.join(stdlib_dir, f"{name}.py")
        package_dir = os.path.join(stdlib_dir, name)
        if os.path.isfile(module_file):
            files.append(f"{name}.py")
        elif os.path.isdir(package_dir):
            for root, dirs, names in os.walk(package_dir):
                dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
                files += [os.path.relpath(os.path.join(root, n), stdlib_dir) for n in names if n.endswith(".py")]
    return sorted(files)


def is_validation(relative_path: str) -> bool:
    digest = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big")
    return digest % 100 < VALIDATION_PERCENT


def default_cache_dir() -> str:
    return os.environ.get("TITANS_TRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "titans-train")


def _content_key(stdlib_dir: str, files: list[str]) -> str:
    digest = hashlib.sha256()
    for relative in files:
        digest.update(relative.encode() + b"\0")
        with open(os.path.join(stdlib_dir, relative), "rb") as handle:
            digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()[:16]


def builtin_corpus(cache_dir: str | None = None, tokenizer: str = "byte", seq_len: int = 512,
                   *, num_workers: int | None = None, progress: bool = True,
                   stdlib_dir: str | None = None) -> tuple[str, str]:
    """(train_dir, validation_dir) of the stdlib corpus, prepared on first use into `cache_dir`.

    cache_dir defaults to $TITANS_TRAIN_CACHE or ~/.cache/titans-train. stdlib_dir (tests) reads
    the same module list from another directory laid out like the stdlib.
    """
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    files = stdlib_files(stdlib_dir)
    if not files:
        raise EmptyInputError(f"{stdlib_dir} holds none of the built-in corpus modules; is it a Python stdlib?")
    tokenizer_object = load_tokenizer(tokenizer)
    # "d2": shards with member digests and the per-shard Feistel shuffle; older caches are left alone.
    key = f"{_content_key(stdlib_dir, files)}-{tokenizer_object.identity.sha256[:12]}-seq{seq_len}-d2"
    root = os.path.join(cache_dir, f"stdlib-{key}")
    splits = {
        "train": [f for f in files if not is_validation(f)],
        "validation": [f for f in files if is_validation(f)],
    }
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, f"stdlib-{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other ranks wait here, then find the manifests
        for split, relative_files in splits.items():
            final = os.path.join(root, split)
            if os.path.exists(os.path.join(final, MANIFEST_NAME)):
                continue
            temporary = f"{final}.tmp-{os.getpid()}"
            shutil.rmtree(temporary, ignore_errors=True)
            prepare_dataset([os.path.join(stdlib_dir, f) for f in relative_files], temporary,
                            tokenizer_object.spec, seq_len, seed=0, shard_bytes=SHARD_BYTES, num_workers=num_workers,
                            progress=progress)
            shutil.rmtree(final, ignore_errors=True)  # an unfinished earlier attempt, no manifest
            os.rename(temporary, final)
    return os.path.join(root, "train"), os.path.join(root, "validation")
