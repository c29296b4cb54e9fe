#!/usr/bin/env bash
# The GPU path in one table (benchmarks/gpu_check.py): Triton memory_scan vs the PyTorch reference
# (numerics in fp32 and bf16, speed), memory_scan tokens/s and TFLOP/s against the device peak, and
# the model step's MFU for the 760M recipes' layer shape against the transformer.
#
#   bash benchmarks/gpu_check.sh                     # one CUDA GPU; < 5 minutes on an H100
#   bash benchmarks/gpu_check.sh --peak-bf16 756     # a GPU the script does not know (TFLOP/s)
#   bash benchmarks/gpu_check.sh --cpu-smoke         # every piece on CPU at tiny size (no speeds)
#
# Exit status 1 when a numerics row is above its bound; 124 when the 5-minute budget runs out.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
exec timeout "${GPU_CHECK_TIMEOUT:-300}" "$PYTHON" benchmarks/gpu_check.py "$@"
