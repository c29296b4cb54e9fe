"""The one place that adapts megatron-core to machines without CUDA.

megatron-core allocates communication buffers with `device=torch.cuda.current_device()` in its
sequence-parallel gathers and scatters (tensor_parallel/mappings.py, layers.py, utils.py). On a
CPU-only machine that call raises; returning the CPU device instead is all those paths need
(CPU-NOTES: "megatron-core 0.16.1 on CPU"). The shim is installed only when CUDA is absent, so on
a GPU node megatron runs untouched.
"""

from __future__ import annotations

import torch

_original_current_device = torch.cuda.current_device


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def install_megatron_cpu_shim() -> bool:
    """Make `torch.cuda.current_device()` return the CPU device when CUDA is absent.

    Returns whether the shim is active. Idempotent.
    """
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = _cpu_current_device
    return True


def megatron_cpu_shim_active() -> bool:
    return torch.cuda.current_device is _cpu_current_device
