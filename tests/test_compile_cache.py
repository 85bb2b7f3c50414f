"""train.compile_cache (issue 19): inductor's on-disk caches in a folder the run (or its sweep) names, so a later
run loads the compiled graphs instead of compiling them; the compile time in metrics.jsonl apart from the
training time; a folder that cannot be written is a one-line error before anything is written."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfkd.engine.config import build_config, config_hash
from selfkd.engine.setup import build
from selfkd.engine.trainer import Trainer
from selfkd.errors import ConfigError
from test_safety import one_line_error, run_cli

ROOT = Path(__file__).resolve().parent.parent
# a linear map without bias: its graphs are matmuls (library calls), so inductor has few C++ kernels to compile (the cost of this test)
PLUGIN = '''
from torch import nn
from selfkd import register_model

@register_model("lin_cc")
def lin_cc(num_classes, in_channels=1):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes, bias=False))
'''
ARGS = ["--data", "digits", "--model", "lin_cc", "--method", "dlb", "--epochs", "2", "--batch-size", "16", "--compile",
        "--set", "data.subset=64", "--set", "data.test_subset=20", "--set", "train.log=csv", "--no-progress", "--threads", "1"]


def _cached(folder: Path) -> set[str]:
    """The compiled artefacts (not the lock files) under an inductor cache folder."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "locks" not in p.parts}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None,
                    reason="inductor compiles C++ on the CPU and no C++ compiler is installed")
def test_compile_time_is_reported_apart_and_a_second_run_loads_the_cached_graphs(tmp_path):
    plugin = tmp_path / "lin_cc.py"
    plugin.write_text(PLUGIN)
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    runs = []
    for name in ("first", "second"):  # fresh processes: nothing of the first run's compilation is left in memory
        run = tmp_path / name
        p = subprocess.run([sys.executable, "-m", "selfkd", "train", "--import", str(plugin), *ARGS,
                            "--set", f"train.compile_cache={cache}", "--out", str(run)],
                           env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(run)
        if name == "first":
            compiled = _cached(cache)
            assert any(f.startswith("fxgraph/") for f in compiled), compiled
    first, second = (_rows(r) for r in runs)
    assert _cached(cache) == compiled  # the second run compiled nothing new: every graph came from the folder
    for rows in (first, second):
        assert [set(r) >= {"compile_s", "epoch_seconds", "train_seconds"} for r in rows] == [True, True]
        assert rows[1]["compile_s"] == 0.0  # one graph for every batch size: nothing compiles after epoch 1
        assert rows[0]["train_seconds"] <= rows[0]["epoch_seconds"]
    # 64 images through a linear layer take milliseconds; compiling takes seconds. With the compilation left
    # in it, epoch 1 would take longer than its compile time
    assert first[0]["compile_s"] > 1.0 and first[0]["epoch_seconds"] < first[0]["compile_s"]
    assert second[0]["compile_s"] < first[0]["compile_s"]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["compile_s"] == first[0]["compile_s"]
    assert summary["seconds"] == pytest.approx(sum(r["epoch_seconds"] for r in first))


def test_a_compile_cache_that_cannot_be_written_is_one_line_and_writes_nothing(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", "digits", "--model", "cnn_small", "--epochs", "1", "--compile",
                           "--set", f"train.compile_cache={blocker / 'cache'}", "--no-progress", "--out", out)
    one_line_error(code, err, f"train.compile_cache = '{blocker / 'cache'}': cannot write there", "choose a writable folder")
    assert not out.exists()


def test_compile_cache_without_compile_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train.compile_cache = '.*' has no effect without train.compile \(--compile\)"):
        build_config({"train": {"compile_cache": str(tmp_path)}})


def test_the_cache_folder_is_not_part_of_the_config_hash(tmp_path):
    """Where the graphs are kept is not what is trained: a resume may name another folder."""
    a = build_config({"train": {"compile": True, "compile_cache": str(tmp_path / "a")}})
    b = build_config({"train": {"compile": True, "compile_cache": str(tmp_path / "b")}})
    assert config_hash(a) == config_hash(b) == config_hash(build_config({"train": {"compile": True}}))


def test_a_sweeps_compiled_runs_share_its_compile_cache_folder(tmp_path):
    from selfkd.experiments.sweep import plan

    spec = tmp_path / "s.yaml"
    spec.write_text("out: runs\nbase: {data: {name: digits}, model: {name: cnn_small}, train: {compile: true}}\n"
                    "grid: {train.seed: [0, 1, 2]}\n"
                    "variants: {m: [{name: own, method.name: ce, train.compile_cache: own_cache}, {name: ce, method.name: ce}]}\n")
    runs = plan(spec).runs
    shared = [r.cfg.train.compile_cache for r in runs if r.axes["m"] == "ce"]
    own = [r.cfg.train.compile_cache for r in runs if r.axes["m"] == "own"]
    assert shared == [str(tmp_path / "runs" / "compile_cache")] * 3
    assert own == [str(tmp_path / "own_cache")] * 3  # relative to the sweep file, as every path key


def test_an_uncompiled_run_records_no_compile_time(tmp_path):
    cfg = build_config({"data": {"name": "digits", "subset": 40, "test_subset": 20}, "model": {"name": "cnn_small"},
                        "optim": {"batch_size": 20}, "train": {"epochs": 1, "log": "csv", "device": "cpu"}})
    summary = Trainer(build(cfg), tmp_path / "r", progress=False, log=lambda m: None).run()
    assert "compile_s" not in _rows(tmp_path / "r")[0] and "compile_s" not in summary
