"""Peak memory (issue 19): the heap training frees is handed back to the OS before evaluation maps its own
(larger) batches, so a run's peak resident set is the larger of the two phases, not their sum."""
import ctypes

import pytest
import torch

from selfkd.engine import system


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="release_memory is glibc's malloc_trim")
def test_release_memory_returns_freed_heap_pages_to_the_os():
    # 400 blocks of 64 KiB (below glibc's mmap threshold: heap memory), each followed by a small block that stays
    # allocated, so the freed blocks are holes in the heap that free() itself cannot give back
    big, pins = [], []
    for _ in range(400):
        big.append(torch.ones(16384))  # 64 KiB, every page touched
        pins.append(torch.ones(16))
    del big
    before = _rss_mib()
    system.release_memory()
    assert before - _rss_mib() > 12  # of the 25 MiB freed
    assert all(float(p.sum()) == 16 for p in pins)  # what is still allocated is untouched
