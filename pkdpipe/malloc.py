"""glibc's malloc and the teacher's growing activations: hold the mmap threshold where it starts.

`cache-teacher` runs the teacher over rows sorted by length, so its activations grow from batch to
batch over the whole run. glibc serves a block of 128 KiB or more with its own mmap, handed back to
the system when freed, until the first such free: from then on it raises that threshold to the
freed block's size (up to 32 MB), and the next, slightly larger activations come from the heap,
whose freed holes are then too small to reuse. At MNLI's size (392,702 rows, MiniLM, two threads)
this left the command's peak RSS anywhere from 1.4 to 1.7 GB from one version of the writer to the
next; with the threshold held at 128 KiB it peaked at about 1.0 GB (benchmarks/README.md,
"Peak RSS"). The `cache-teacher` command holds it, for its own process only; a user's
`MALLOC_MMAP_THRESHOLD_` is left to rule, and other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's <malloc.h>
THRESHOLD = 128 * 1024  # glibc's starting value, held so that it no longer moves
ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc's own setting of it, which wins


def hold_mmap_threshold() -> bool:
    """Hold glibc's mmap threshold at 128 KiB for this process; True where that took effect (False
    on another C library, or where the user set `MALLOC_MMAP_THRESHOLD_` themselves)."""
    if not sys.platform.startswith("linux") or ENV in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no libc.so.6, or no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1
