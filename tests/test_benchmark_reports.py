"""The committed benchmark reports recompute, byte for byte, from the records committed beside them: a change to
the code under a report (intervals, pairing, parsing) that moves a number shows up here, not in a README."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"


def _script(name: str, *args: str) -> str:
    res = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_intervals_legacy_recomputes_its_committed_table():
    assert _script("intervals_legacy.py") == (RESULTS / "intervals_legacy.md").read_text()


@pytest.mark.parametrize("name,folder,args", [
    ("repeat_control.py", "repeat_control",
     lambda runs: ["--runs", *(str(runs / d) for d in sorted(p.name for p in runs.iterdir()))]),
    ("evidence.py", "evidence_cifar10", lambda runs: ["--core", str(runs / "core"), "--rf", str(runs / "rf")]),
], ids=["repeat_control", "evidence"])
def test_report_recomputes_from_its_committed_records(tmp_path, name, folder, args):
    committed = RESULTS / folder
    runs = tmp_path / "runs"
    shutil.copytree(committed / "runs", runs)
    _script(name, *args(runs), "--out", str(tmp_path / "out"))
    for f in ("report.md", "report.json"):
        got = (tmp_path / "out" / f).read_text().replace(str(runs), str(committed / "runs"))
        assert got == (committed / f).read_text(), f
