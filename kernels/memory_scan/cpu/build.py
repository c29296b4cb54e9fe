"""Compiles `memory_scan.cpp`, `gates.cpp` and `conv_features.cpp` (one extension) on first use with
torch's JIT extension builder.

The build directory is in torch's extension cache (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), shared by every process of a user. Each build has its own directory,
named by a digest of the sources, the flags, torch's version and the Python environment: two
checkouts or virtualenvs of other versions (or two branches side by side) would otherwise rebuild
one directory in turn and load each other's module. `scripts/setup.sh` builds it once
(`python -m titans_train.kernels.memory_scan.cpu --build`) so no run pays the compile.

Concurrent ranks wait for one build under an flock on `build.flock` in that directory, which the
kernel releases when its holder dies. Torch's own lock (a `lock` file it creates and deletes) is
left behind by a build that is killed (a preempted job, an OOM kill), and then every later load
waits on it forever; holding the flock, a `lock` file can only be such a leftover, so it is
removed, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import pathlib
import sys
import warnings

SOURCES = tuple(pathlib.Path(__file__).with_name(name)
                for name in ("memory_scan.cpp", "gates.cpp", "conv_features.cpp"))
NAME = "titans_memory_scan_cpu"
# -fopenmp: at::parallel_for is a header template, parallel only when compiled with OpenMP; the
# runtime it links (libgomp.so.1) is the one torch has already loaded. No -march=native: the build
# cache may be shared by machines of different CPU generations.
CFLAGS = ["-O3", "-fopenmp"]


def build_name() -> str:
    """NAME and the digest of what the module is built from (its directory in the cache)."""
    import torch

    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    digest.update("\0".join([*CFLAGS, torch.__version__, sys.prefix]).encode())
    return f"{NAME}_{digest.hexdigest()[:12]}"


def build_directory() -> pathlib.Path:
    """The extension's directory: TORCH_EXTENSIONS_DIR (default torch's cache root) / build_name()."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return pathlib.Path(root) / build_name()


@contextlib.contextmanager
def build_lock(directory: pathlib.Path):
    """Holds the directory's flock (waiting for another process's build to end); yields whether it
    could (a filesystem without flock support leaves only torch's lock file)."""
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(directory / "build.flock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            locked = True
        except OSError:
            locked = False
        yield locked
    finally:
        os.close(descriptor)  # releases the flock


def _remove_stale_lock(directory: pathlib.Path) -> None:
    stale = directory / "lock"
    try:
        stale.unlink()
    except FileNotFoundError:
        return
    warnings.warn(f"removed {stale}, left by a build of the memory_scan C++ extension that was killed "
                  "(torch would otherwise wait on it forever)", stacklevel=4)


class ExtensionBuildError(RuntimeError):
    """The C++ extension could not be compiled or loaded."""


@functools.lru_cache(maxsize=None)
def extension(verbose: bool = False):
    """The loaded extension module (`forward`, `backward`, `gates_forward`, `gates_backward`,
    `conv_features_forward`, `conv_features_backward`); compiled on the first call per source version."""
    from torch.utils import cpp_extension

    directory = build_directory()
    try:
        with build_lock(directory) as locked:
            if locked:
                _remove_stale_lock(directory)
            return cpp_extension.load(
                name=build_name(), sources=[str(source) for source in SOURCES], extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=verbose,
            )
    except (RuntimeError, OSError, ImportError) as error:
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ExtensionBuildError(
            f"cannot build the memory_scan C++ extension from {', '.join(str(s) for s in SOURCES)} ({detail}); "
            "it needs g++ and ninja (apt-get install g++; pip install ninja) - run "
            "`python -m titans_train.kernels.memory_scan.cpu --build` to see the compiler output"
        ) from error


@functools.lru_cache(maxsize=None)
def extension_loads() -> bool:
    """Whether the extension builds and loads; asked once per process, a failure warns once. The
    "auto" implementations (memory_scan, conv_features) then run their PyTorch forms."""
    try:
        extension()
    except ExtensionBuildError as error:
        warnings.warn(f"{error}; the 'auto' implementations of memory_scan and conv_features run their "
                      "PyTorch forms instead", stacklevel=3)
        return False
    return True
