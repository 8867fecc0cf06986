"""pkdpipe.malloc: cache-teacher holds glibc's mmap threshold, so a large block freed does not send
the next, slightly smaller ones to the heap (where the teacher's growing activations fragment it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc only",
)

# In a fresh process: free a 4 MB block (mmapped), then ask for 1 MB; print whether the threshold was
# held and whether each block came from its own mmap (the IS_MMAPPED bit of glibc's chunk header).
PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from pkdpipe.malloc import hold_mmap_threshold
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def mmapped(size):
        block = libc.malloc(size)
        flag = ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value & 2
        libc.free(block)
        return bool(flag)
    held = hold_mmap_threshold() if sys.argv[1] == "hold" else None
    print(held, mmapped(4 << 20), mmapped(1 << 20))
    """
)


def _probe(mode: str, **env) -> str:
    run = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.strip()


def test_without_the_hold_a_freed_large_block_sends_the_next_megabyte_to_the_heap():
    assert _probe("leave") == "None True False"


def test_held_the_next_megabyte_still_gets_its_own_mapping():
    assert _probe("hold") == "True True True"


def test_a_users_own_malloc_setting_wins():
    # set to 64 MB: every block below it comes from the heap, and pkdpipe does not undo that
    assert _probe("hold", MALLOC_MMAP_THRESHOLD_=str(64 << 20)) == "False False False"
