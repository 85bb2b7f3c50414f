"""The GPU campaign's parts that the CPU can check cheaply (the whole campaign's CPU run is
`make gpu-smoke`, which .ci/run runs after the tests): its time bounds, the accuracy stage's choice of
epochs, the table it writes, and the smoke run's refusals."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_accuracy  # noqa: E402
import gpu_report  # noqa: E402

GPU_SH = ROOT / "benchmarks" / "gpu.sh"


def test_gpu_stage_bounds_fit_eight_minutes():
    text = GPU_SH.read_text()
    gpu_branch = text.split("\nelse\n")[-1]  # the stages after `stage setup` that run on a GPU
    bounds = [int(b) for b in re.findall(r"^\s*stage \w+ (\d+) ", gpu_branch, re.M)]
    bounds.insert(0, int(re.search(r"^stage setup (\d+) ", text, re.M).group(1)))
    assert len(bounds) == 4  # setup, tests, steps, accuracy
    kill = int(re.search(r'timeout -k (\d+) "\$bound"', text).group(1))
    report_kill, report = map(int, re.search(r'timeout -k (\d+) (\d+) "\$\{REPORT', text).groups())
    worst = sum(b + kill for b in bounds) + len(bounds) * (report + report_kill)
    assert worst == 478 and worst <= 480
    # each Python stage stops itself before its bound
    assert "--budget 135" in gpu_branch and "stage steps 145" in gpu_branch
    assert "--budget 220" in gpu_branch and "stage accuracy 235" in gpu_branch


def test_epochs_from_step_timings():
    rows = [
        {"status": "ok", "model": "resnet32", "compile": False, "method": "ce", "runs": 1, "ms_per_step": 5.0},
        {"status": "ok", "model": "resnet32", "compile": False, "method": "dlb", "runs": 1, "ms_per_step": 7.0},
        {"status": "ok", "model": "resnet32", "compile": True, "method": "dlb", "runs": 4, "ms_per_step": 1.0},
        {"status": "ok", "model": "wrn20_8", "compile": False, "method": "dlb", "runs": 4, "ms_per_step": 99.0},
    ]
    # no shared timing of both methods: two runs at once cost at most twice the slower one alone
    assert gpu_accuracy.step_ms(rows, "resnet32") == (14.0, "2 x dlb alone")
    rows += [{"status": "ok", "model": "resnet32", "compile": False, "method": m, "runs": 4, "ms_per_step": ms}
             for m, ms in (("ce", 10.0), ("dlb", 12.0))]
    assert gpu_accuracy.step_ms(rows, "resnet32") == (12.0, "dlb with 4 runs sharing the device")
    assert gpu_accuracy.step_ms(rows[:1], "resnet32") is None
    assert gpu_accuracy.step_ms([{**rows[0], "status": "cut off (time bound)"}], "resnet32") is None
    # 782 steps of 12 ms, x1.25 = 11.73 s per epoch; (220 - 25) / 11.73 = 16.6 -> 16 epochs
    epochs, per_epoch = gpu_accuracy.choose_epochs(12.0, 50_000, 64, 220.0)
    assert per_epoch == pytest.approx(782 * 0.012 * 1.25)
    assert epochs == 16
    # never fewer than 2: the cpu-short recipe warms up for one epoch (1 is a config error)
    assert gpu_accuracy.choose_epochs(1000.0, 50_000, 64, 220.0)[0] == 2


def test_report_tables(tmp_path):
    runs = tmp_path / "runs"
    for m, secs in (("ce", (5.0, 3.0, 4.0)), ("dlb", (9.0, 6.0))):
        (runs / m).mkdir(parents=True)
        rows = [{"epoch": e + 1, "test_acc": 50.0 + e, "test_ece": 0.05, "test_nll": 1.5, "epoch_seconds": s,
                 "test_reliability": {"bins": 15}} for e, s in enumerate(secs)]
        (runs / m / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = {"model": "resnet32", "methods": ["ce", "dlb"], "batch_size": 64, "recipe": "cpu-short",
            "n_train": 50000, "n_test": 10000, "decode_s": 3.0, "budget_s": 220, "device": "cuda",
            "runs_dir": str(runs), "epochs": 3, "epochs_how": "given", "status": {"ce": "finished", "dlb": "cut off (time bound)"}}
    (tmp_path / "gpu_accuracy.json").write_text(json.dumps(plan))
    steps = [{"model": "resnet32", "method": m, "compile": False, "runs": 1, "batch": 64, "status": "ok",
              "images_per_s": ips, "ms_per_step": ms, "warmup_s": 2.0, "peak_mib": 300.0, "syncs_per_step": 0.0,
              "sync_where": ""} for m, ms, ips in (("ce", 10.0, 6400.0), ("dlb", 20.0, 6400.0))]
    steps.append({"model": "wrn20_8", "method": "ce", "compile": True, "runs": 4, "batch": 64,
                  "status": "not run (time bound)"})
    (tmp_path / "gpu_steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    (tmp_path / "gpu_env.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0"}))
    (tmp_path / "gpu_stages.jsonl").write_text(json.dumps({"stage": "setup", "bound_s": 10, "took_s": 2.4,
                                                           "status": "ok"}) + "\n")
    assert gpu_report.main([str(tmp_path)]) == 0
    md = (tmp_path / "gpu.md").read_text()
    lines = md.splitlines()
    assert "Device: NVIDIA H200; torch 2.11.0 (CUDA -, cuDNN -)" in md
    assert "| setup | 10 | 2 | ok |" in lines
    assert "| resnet32 | dlb | off | 1 | 6,400 | 20.00 | 2.0 | 300 | 0 | ok |" in lines
    assert "| wrn20_8 | ce | on | 4 | | | | | | not run (time bound) |" in lines
    assert "| 1 | 50.00 | 0.0500 | 1.5000 | 5.0 | 50.00 | 0.0500 | 1.5000 | 9.0 |" in lines
    assert "| 3 | 52.00 | 0.0500 | 1.5000 | 4.0 | – | – | – | – |" in lines
    # median of the epochs after the first: ce (3, 4) -> 3.5 s x 240 = 14 min; dlb 6 s x 240 = 24 min
    assert "* ce: 3.5 s/epoch -> 14.0 min" in lines and "* dlb: 6.0 s/epoch -> 24.0 min" in lines
    # 240 x 782 steps: CE 10 ms -> 1876.8 s, DLB 20 ms -> 3753.6 s; 42 runs at their mean, one at a time
    assert "| resnet32 | 1 | 31.3 min | 1.04 h | 32.84 h |" in lines
    assert "Not run yet." in md  # the CUDA tests' file is not there
    epochs = [json.loads(x) for x in (tmp_path / "gpu_epochs.jsonl").read_text().splitlines()]
    assert [(e["method"], e["epoch"]) for e in epochs] == [("ce", 1), ("ce", 2), ("ce", 3), ("dlb", 1), ("dlb", 2)]
    assert "test_reliability" not in epochs[0]


def _smoke(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_SH), "--smoke", *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **(env or {})}, timeout=60)


def test_smoke_never_writes_the_committed_results():
    before = sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir())
    r = _smoke(str(ROOT / "benchmarks" / "results"))
    assert r.returncode == 2
    assert r.stderr.strip() == "gpu.sh: --smoke never writes benchmarks/results (give another OUT_DIR)"
    assert sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir()) == before


def test_smoke_without_data_says_so(tmp_path):
    r = _smoke(str(tmp_path / "out"), env={"GPU_DATA": str(tmp_path / "none.tar.gz")})
    assert r.returncode == 2
    assert "no CIFAR-10 JPEG archive" in r.stderr
    assert list((tmp_path / "out").iterdir()) == []
