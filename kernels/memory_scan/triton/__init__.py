"""Triton kernels of memory_scan (GPU; on CPU only under TRITON_INTERPRET=1). Imported lazily by
`memory_scan`, so the interpreter switch, read when the kernels are defined, can be set first."""

from .scan import triton_scan

__all__ = ["triton_scan"]
