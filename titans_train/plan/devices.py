"""The accelerators the planner knows: one table, sources in docs/scaling.md ("Device specs").

Peak FLOP/s is dense bf16 (no structured sparsity). NVLink is the per-GPU bandwidth in one
direction (half the datasheet's bidirectional figure); InfiniBand is one 400 Gb/s (NDR) or
200 Gb/s (HDR) adapter per GPU, the usual HGX/DGX configuration, in bytes/s.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    peak_bf16_flops: float  # dense, per GPU
    memory_bytes: float  # HBM per GPU
    nvlink_bytes_per_s: float  # per GPU, one direction
    infiniband_bytes_per_s: float  # per GPU, one direction


DEVICES: dict[str, Device] = {
    "a100-80gb": Device("a100-80gb", 312e12, 80 * GB, 300 * GB, 200e9 / 8),
    "h100-80gb": Device("h100-80gb", 989e12, 80 * GB, 450 * GB, 400e9 / 8),
    "h200": Device("h200", 989e12, 141 * GB, 450 * GB, 400e9 / 8),
    "b200": Device("b200", 2250e12, 180 * GB, 900 * GB, 400e9 / 8),
}

# Held back from every GPU's memory before anything is placed: the CUDA context, NCCL's
# communicator buffers and the caching allocator's fragmentation. A convention (2 GiB + 5%), not
# a measurement; `--reserve-gib` changes the fixed part.
RESERVE_FIXED_BYTES = 2 * GIB
RESERVE_FRACTION = 0.05


def usable_bytes(device: Device, reserve_fixed: float = RESERVE_FIXED_BYTES) -> float:
    return device.memory_bytes * (1 - RESERVE_FRACTION) - reserve_fixed
