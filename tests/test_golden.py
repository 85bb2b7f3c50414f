"""Golden weights (issue 17): short real trainings of CE, DLB (joint, split, mixup, 2 ranks), CS-KD, PS-KD,
MrKD and BYOT end in exactly the weights recorded in tests/golden.json before the re-layout. A refactor that
changes any of them changed behaviour. The hashes depend on the torch build and the CPU's float kernels:
on a platform not in golden.json the test says so and skips (add it with `python tests/scripts/golden.py DIR --write`
on the old code first)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import golden  # noqa: E402


def test_refactor_keeps_every_golden_run_bit_identical(tmp_path):
    known = json.loads(golden.GOLDEN.read_text())["platforms"]
    if golden.platform_key() not in known:
        pytest.skip(f"golden hashes were taken on {sorted(known)}, this is {golden.platform_key()!r}")
    got = golden.run_all(tmp_path)
    assert got == known[golden.platform_key()]
