"""Giving the heap pages that a phase freed back to the operating system (glibc's `malloc_trim`).

Generation allocates and frees many tensors of a few MB (a decode step's logits, activations, the cache copies of
shrinking batches). glibc serves tensors below its mmap threshold, which rises up to 32 MB as large blocks are
freed, from its heap arenas, and a freed block stays mapped in the arena until the arena's top is free. After a
SmolLM2 generation ~0.6 GB of the process's resident memory were such free blocks: the update that follows cannot
always reuse them (other sizes, other arenas), so they add to its peak. `malloc_trim(0)` returns the free pages of
every arena (madvise), a few milliseconds for a heap of some GB. Other C libraries (musl, macOS) have no such call,
and nothing is done there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return getattr(libc, "malloc_trim", None)
    except OSError:
        return None


def release_free_memory() -> bool:
    """Return the free pages of every malloc arena to the OS (glibc's malloc_trim(0)); whether it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
