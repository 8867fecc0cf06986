"""Handing the C heap's free pages back to the system between shards (glibc's `malloc_trim`).

`cache-teacher` runs the teacher over rows sorted by length, so its activations grow over the whole
run. glibc serves most of them from its heap, where the holes left by earlier, smaller ones are too
small to reuse, and keeps those freed pages resident: at MNLI's size (392,702 rows, MiniLM, two
threads) the command's peak RSS was 1.5 to 1.7 GB, whatever the shard writer did. `malloc_trim`
returns the free pages inside the heap, not only at its top; cache-teacher calls it after each
shard, a few milliseconds each (benchmarks/README.md, "Peak RSS"). Holding glibc's mmap threshold
instead (`MALLOC_MMAP_THRESHOLD_=131072`) saved as much memory but cost 45% of the run's time.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None on another platform or C library (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return the C heap's free pages to the system; nothing where the C library is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
