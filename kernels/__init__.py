"""Ops with a plain reference beside every fast path. Depends on torch (and triton) only."""

from .conv_features import conv_features
from .memory_scan import memory_mlp, memory_scan, memory_scan_sequential

__all__ = ["conv_features", "memory_mlp", "memory_scan", "memory_scan_sequential"]
