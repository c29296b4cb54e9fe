#!/usr/bin/env bash
# Creates .venv (if absent) and installs titans-train with its pinned torch.
# torch is named in the same pip command as the project: installing megatron-core into an
# environment without torch would pull a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TITANS_TORCH_SPEC:-torch==2.13.0}"
# The versions CI passed with (constraints.txt says how to move them); TITANS_CONSTRAINTS= (empty)
# installs the newest releases pyproject.toml allows instead.
CONSTRAINTS="${TITANS_CONSTRAINTS-constraints.txt}"
if [ -n "$CONSTRAINTS" ] && [ ! -f "$CONSTRAINTS" ]; then
    echo "[setup] error: TITANS_CONSTRAINTS=$CONSTRAINTS is not a file (a path from the repository root, or empty for none)" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.titans-installed
want="$(cat pyproject.toml setup.py scripts/setup.sh ${CONSTRAINTS:+"$CONSTRAINTS"} | sha256sum | cut -c1-16)-${1:-}"
# --test installs a superset, so a test install also satisfies a plain one.
if [ -z "${1:-}" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${want}--test" ]; then exit 0; fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[setup] installing titans-train into .venv (first run takes ~2 minutes)" >&2
.venv/bin/python -m pip install --quiet --upgrade ${CONSTRAINTS:+-c "$CONSTRAINTS"} pip
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
.venv/bin/python -m pip install --quiet ${CONSTRAINTS:+-c "$CONSTRAINTS" --build-constraint "$CONSTRAINTS"} \
    "$TORCH_SPEC" -e ".${extras}"
# The C++ memory_scan kernel (kernels/memory_scan/cpu) compiles on first use; building it here
# means neither the tests nor a first training step pays the ~1-2 minute compile. Without it CPU
# runs fall back to the PyTorch kernel (slower, same numbers, one warning), so only CI (where the
# tests check that the compiled kernel runs) stops here.
cpp_kernel_missing() {
    if [ "${CI:-}" = "true" ]; then
        echo "[setup] error: $1; CI needs the C++ memory_scan kernel" >&2
        exit 1
    fi
    echo "[setup] warning: $1; CPU runs will use the slower PyTorch memory_scan kernel" >&2
}
if ! command -v g++ >/dev/null 2>&1; then
    echo "[setup] g++ not found: installing it with apt-get (the C++ memory_scan kernel needs it)" >&2
    { apt-get update -qq && apt-get install -y -qq g++; } >&2 ||
        echo "[setup] could not install g++ with apt-get (install a C++ compiler and re-run scripts/setup.sh)" >&2
fi
if command -v g++ >/dev/null 2>&1; then
    echo "[setup] building the C++ memory_scan kernel into torch's extension cache" >&2
    .venv/bin/python -m titans_train.kernels.memory_scan.cpu --build >&2 ||
        cpp_kernel_missing "the C++ memory_scan kernel did not build (its error is above)"
else
    cpp_kernel_missing "no C++ compiler"
fi
echo "$want" > "$stamp"
