"""memory_scan's chunk loop as a compiled ATen extension, parallel over (batch, head) groups (README.md)."""

from .build import ExtensionBuildError, extension
from .scan import CppChunkedScan, cpp_scan

__all__ = ["CppChunkedScan", "ExtensionBuildError", "cpp_scan", "extension"]
