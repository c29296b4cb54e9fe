"""memory_scan's chunk loop and gate products as a compiled ATen extension, parallel over (batch, head)
groups (README.md)."""

from .build import ExtensionBuildError, extension
from .scan import CppChunkedScan, CppStackedGates, cpp_scan, cpp_stacked_gates

__all__ = ["CppChunkedScan", "CppStackedGates", "ExtensionBuildError", "cpp_scan", "cpp_stacked_gates", "extension"]
