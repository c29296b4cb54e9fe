"""memory_scan: the Titans neural-memory update and retrieval (DESIGN section 3; math in README.md)."""

from .scan import memory_scan
from .mlp import memory_mlp
from .naive import memory_scan_sequential

__all__ = ["memory_mlp", "memory_scan", "memory_scan_sequential"]
