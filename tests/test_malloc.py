"""pkdpipe.malloc: after a shard, cache-teacher hands the heap's free pages back to the system, even
those in holes below memory still in use (which is where the teacher's growing activations leave them)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# In a fresh process: raise glibc's mmap threshold (free an 8 MB block), fill 200 heap blocks of 1 MB,
# free all but the top one (so the heap cannot shrink from its top), then release; print RSS in MB.
PROBE = textwrap.dedent(
    """
    import ctypes, os
    from pkdpipe.malloc import release_free_memory
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss_mb():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
    libc.free(libc.malloc(8 << 20))
    blocks = [libc.malloc(1 << 20) for _ in range(200)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    for block in blocks[:-1]:
        libc.free(block)
    before = rss_mb()
    release_free_memory()
    print(before, rss_mb())
    """
)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)
def test_the_free_pages_of_the_heap_go_back_to_the_system():
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    before, after = map(int, run.stdout.split())
    assert before - after > 150  # of the 199 MB freed in holes below the last block


def test_elsewhere_it_does_nothing_and_does_not_fail(monkeypatch):
    from pkdpipe import malloc

    malloc._malloc_trim.cache_clear()
    monkeypatch.setattr(malloc.sys, "platform", "darwin")
    try:
        malloc.release_free_memory()
        assert malloc._malloc_trim() is None
    finally:
        malloc._malloc_trim.cache_clear()
