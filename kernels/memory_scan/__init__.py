"""memory_scan: the Titans neural-memory update and retrieval (DESIGN section 3)."""

from .mlp import memory_mlp
from .naive import memory_scan_sequential

# Placeholder until the chunked implementation lands (kernels/memory_scan/chunked.py): the oracle
# has the same signature and semantics, only slower.
memory_scan = memory_scan_sequential

__all__ = ["memory_mlp", "memory_scan", "memory_scan_sequential"]
