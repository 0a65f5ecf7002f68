"""Byte units, allocator rounding and display helpers."""

from __future__ import annotations

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# PyTorch's CUDA caching allocator rounds every request up to a multiple of 512 bytes
# (c10/cuda/CUDACachingAllocator.cpp, `kMinBlockSize = 512`, `round_size()`), and
# `torch.cuda.memory_allocated()` counts the rounded block sizes.
ALLOC_ALIGN_BYTES = 512


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(n: int, multiple: int) -> int:
    return ceil_div(n, multiple) * multiple


def alloc_bytes(nbytes: int) -> int:
    """Bytes the caching allocator accounts for one tensor of `nbytes` (0 stays 0)."""
    if nbytes <= 0:
        return 0
    return round_up(nbytes, ALLOC_ALIGN_BYTES)



def fmt_gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"
