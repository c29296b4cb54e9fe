"""`python -m titans_train.kernels.memory_scan.cpu --build`: compile the extension now (scripts/setup.sh runs it)."""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--build", action="store_true", help="compile (or find in torch's cache) the C++ extension")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    args = parser.parse_args()
    if not args.build:
        parser.error("nothing to do: pass --build")
    from .build import SOURCES, ExtensionBuildError, extension

    names = ", ".join(source.name for source in SOURCES)
    print(f"[memory_scan cpu] building {names} into torch's extension cache (about a minute the first time)",
          flush=True)
    started = time.perf_counter()
    try:
        module = extension(verbose=args.verbose)
    except ExtensionBuildError as error:
        print(f"[memory_scan cpu] error: {error}", file=sys.stderr)
        return 1
    print(f"[memory_scan cpu] ready: {module.__file__} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
