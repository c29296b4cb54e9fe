"""Compiles `memory_scan.cpp`, `gates.cpp` and `conv_features.cpp` (one extension) on first use with
torch's JIT extension builder.

The build directory is torch's extension cache (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), shared by every process of a user: torch's file lock lets concurrent
ranks wait for one build. Each build has its own directory, named by a digest of the sources, the
flags, torch's version and the Python environment: two checkouts or virtualenvs of other versions
(or two branches side by side) would otherwise rebuild one directory in turn and load each other's
module. `scripts/setup.sh`
builds it once (`python -m titans_train.kernels.memory_scan.cpu --build`) so no run pays the
compile.
"""

from __future__ import annotations

import functools
import hashlib
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


class ExtensionBuildError(RuntimeError):
    """The C++ extension could not be compiled or loaded."""


@functools.lru_cache(maxsize=None)
def extension(verbose: bool = False):
    """The loaded extension module (`forward`, `backward`, `gates_forward`, `gates_backward`,
    `conv_features_forward`, `conv_features_backward`); compiled on the first call per source version."""
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(
            name=build_name(), sources=[str(source) for source in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
            verbose=verbose,
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
