"""Parallel layout (validated dataclass), process groups, and the CPU shims for Megatron-Core."""

from megasyne.parallel.dims import ParallelConfigError, ParallelDims

__all__ = ["ParallelConfigError", "ParallelDims"]
