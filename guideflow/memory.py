"""Giving freed heap memory back to the operating system.

CPython returns freed objects to the C allocator, and glibc's malloc keeps what it gets
back in per-thread arenas for reuse instead of returning it to the OS. A long pipeline
run frees a shard's worth of requests, outcomes and parquet buffers every second or so,
from several threads; without a trim its resident size crept up shard after shard.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on other C libraries and platforms."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc only); True if it could be asked.

    Costs a millisecond or two: call it after freeing a lot, not per object.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def use_system_arrow_pool() -> bool:
    """Make pyarrow allocate with the C library's malloc instead of its bundled allocator.

    Unless the user chose a pool with ``ARROW_DEFAULT_MEMORY_POOL``. The pipeline reads a
    manifest slice and writes a ledger file per shard, from several worker threads;
    pyarrow's default mimalloc keeps per-thread heaps and holds on to them. Measured with
    ``bench/pipeline.py`` (a real 500k-row run, Prefect API in another process): RSS went
    283 → 303 MB with mimalloc, 257 → 267 MB with malloc, whose free pages
    :func:`release_free_heap` gives back after every shard. Process-wide; buffers already
    allocated stay with their pool. True when it switched.
    """
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return False
    import pyarrow as pa

    if pa.default_memory_pool().backend_name == "system":
        return False
    pa.set_memory_pool(pa.system_memory_pool())
    return True
