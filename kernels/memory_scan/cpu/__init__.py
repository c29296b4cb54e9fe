"""memory_scan's chunk loop and gate products (and the memory's conv features, kernels/conv_features.py)
as a compiled ATen extension, parallel over (batch, head) groups (README.md)."""

from .build import ExtensionBuildError, extension, extension_loads
from .scan import CppChunkedScan, CppStackedGates, cpp_scan, cpp_stacked_gates

__all__ = ["CppChunkedScan", "CppStackedGates", "ExtensionBuildError", "cpp_scan", "cpp_stacked_gates", "extension",
           "extension_loads"]
