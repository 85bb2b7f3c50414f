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
    # 800 blocks of 64 KiB (below glibc's mmap threshold: heap memory), every other one freed: the freed ones are
    # holes between blocks still in use, which free() itself cannot give back (only the heap's top)
    blocks = [torch.ones(16384) for _ in range(800)]  # every page touched
    kept = blocks[1::2]
    del blocks
    before = _rss_mib()
    system.release_memory()
    assert before - _rss_mib() > 16  # of the 25 MiB in holes
    assert all(float(b.sum()) == 16384 for b in kept)  # what is still allocated is untouched
