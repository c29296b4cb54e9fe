"""Tensor, sequence and data parallelism for Titans models (installed as titans_train.parallel).

Heavy imports (megatron-core, DeepSpeed) happen inside the functions that need them, so importing
this package for its layout arithmetic or validation stays cheap.
"""

from titans_train.parallel.context import DeepSpeedMPU, ParallelContext
from titans_train.parallel.layout import ParallelConfigError, ParallelLayout

__all__ = ["DeepSpeedMPU", "ParallelConfigError", "ParallelContext", "ParallelLayout"]
