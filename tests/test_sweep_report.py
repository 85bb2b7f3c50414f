"""`selfkd sweep` (grids of runs: plan, skip, resume, failures, validation) and `selfkd report` (tables, plots)."""
import contextlib
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from selfkd.experiments.sweep import runner as sweep_mod
from selfkd.experiments.report import build_report
from selfkd.experiments.sweep import label, plan, run_jobs, run_sweep
from selfkd.errors import ConfigError
from selfkd.methods import CE, register_method, registry

BASE = {"data": {"name": "digits", "subset": 200}, "model": {"name": "cnn_small"}, "optim": {"batch_size": 32},
        "train": {"epochs": 1, "device": "cpu"}}
PNG = b"\x89PNG\r\n\x1a\n"


def write_sweep(folder: Path, **spec) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"out": "runs", "base": BASE, **spec}, sort_keys=False))
    return str(path)


def summaries(root: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.rglob("summary.json"))}


@contextlib.contextmanager
def registered(cls):
    """Register a test-only method for the duration of a test (the registry is global)."""
    with registry.METHODS.scope():
        yield register_method(cls)


class NaNLoss(CE):
    name = "test-sweep-nan"

    def loss(self, logits, target, index=None):
        out = super().loss(logits, target, index)
        out.loss = out.loss * float("nan")
        return out


class InterruptOnce(CE):
    name = "test-sweep-interrupt"
    armed = True

    def train_step(self, model, batch):
        if InterruptOnce.armed:
            InterruptOnce.armed = False
            raise KeyboardInterrupt
        return super().train_step(model, batch)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A 2x2 sweep (method x seed), run once for the tests that read it; tests that change it copy it."""
    folder = tmp_path_factory.mktemp("grid")
    path = write_sweep(folder, grid={"method.name": ["ce", "dlb"], "train.seed": [0, 1]})
    lines: list[str] = []
    result = run_sweep(path, progress=False, log=lines.append)
    return folder, result, lines


def copy_grid(grid, tmp_path) -> tuple[Path, str]:
    folder = tmp_path / "copy"
    shutil.copytree(grid[0], folder)
    return folder, str(folder / "sweep.yaml")


# ---------------------------------------------------------------------------------------------
# sweep
def test_grid_runs_each_config_in_its_own_directory(grid):
    folder, result, lines = grid
    runs = folder / "runs"
    names = ["method.name=ce/train.seed=0", "method.name=dlb/train.seed=0",  # the seed axis is outermost
             "method.name=ce/train.seed=1", "method.name=dlb/train.seed=1"]
    assert (result["total"], result["finished"], result["skipped"], result["resumed"], result["failed"]) == (4, 4, 0, 0, 0)
    assert list(result["runs"]) == names
    assert set(summaries(runs)) == set(names)
    for name in names:
        cfg = yaml.safe_load((runs / name / "config.yaml").read_text())
        method, seed = name.split("/")
        assert cfg["method"]["name"] == method.split("=")[1] and cfg["train"]["seed"] == int(seed.split("=")[1])
        assert cfg["data"]["subset"] == 200 and cfg["train"]["epochs"] == 1
        assert result["runs"][name]["status"] == "finished"
    table = json.loads((runs / "runs.json").read_text())
    assert table["runs"]["method.name=dlb/train.seed=1"]["axes"] == {"method.name": "dlb", "train.seed": 1}
    assert all(r["status"] == "finished" for r in table["runs"].values())
    spec = yaml.safe_load((runs / "sweep.yaml").read_text())
    assert [a["key"] for a in spec["axes"]] == ["method.name", "train.seed"] and spec["runs"] == 4
    done = [line for line in lines if "last acc" in line]
    assert len(done) == 4 and all(any(n in line for line in done) for n in names)
    s = summaries(runs)["method.name=dlb/train.seed=1"]
    assert f"last acc {s['last_acc']:.2f}" in next(line for line in done if "dlb/train.seed=1" in line)
    assert lines[-1].endswith("4 finished, 0 resumed, 0 skipped, 0 failed")


def test_rerun_skips_finished_and_resumes_unfinished(grid, tmp_path):
    folder, path = copy_grid(grid, tmp_path)
    runs = folder / "runs"
    before = summaries(runs)
    result = run_sweep(path, progress=False, log=lambda m: None)
    assert (result["skipped"], result["finished"], result["resumed"], result["failed"]) == (4, 0, 0, 0)
    assert summaries(runs) == before  # nothing was retrained or rewritten

    victim = runs / "method.name=dlb/train.seed=0"
    (victim / "summary.json").unlink()
    assert (victim / "checkpoint.pt").exists()
    assert run_sweep(path, only_plan=True, log=lambda m: None)["runs"]["method.name=dlb/train.seed=0"]["status"] == "unfinished"
    result = run_sweep(path, progress=False, log=lambda m: None)
    assert (result["skipped"], result["resumed"], result["finished"]) == (3, 1, 0)
    again = summaries(runs)
    key = "method.name=dlb/train.seed=0"
    assert again[key]["last_acc"] == before[key]["last_acc"] and again[key]["epochs"] == 1


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    variants = {"method": [{"method.name": "test-sweep-nan"}, {"method.name": "ce"},
                           {"name": "nodata", "data.name": "imagefolder", "data.dir": str(tmp_path / "absent")}]}
    path = write_sweep(tmp_path / "s", variants=variants)
    lines: list[str] = []
    with registered(NaNLoss):
        result = run_sweep(path, progress=True, log=lines.append)  # the bar path; lines go to `log`
        assert (result["finished"], result["failed"]) == (1, 2)
        runs = tmp_path / "s" / "runs"
        nan = json.loads((runs / "method=test-sweep-nan" / "failed.json").read_text())
        assert nan["error"].startswith("TrainingError: non-finite loss at epoch 1")
        nodata = json.loads((runs / "method=nodata" / "failed.json").read_text())
        assert nodata["error"].startswith("DataError: imagefolder root") and "absent" in nodata["error"]
        assert (runs / "method=ce" / "summary.json").exists()
        table = json.loads((runs / "runs.json").read_text())["runs"]
        assert table["method=test-sweep-nan"]["status"] == "failed" and table["method=ce"]["status"] == "finished"
        assert table["method=nodata"]["error"] == nodata["error"]
        assert any("FAILED: TrainingError: non-finite loss" in line for line in lines)
        # again: the finished run is skipped, the failed ones are retried (and fail again)
        result = run_sweep(path, progress=False, log=lambda m: None)
        assert (result["skipped"], result["failed"], result["finished"]) == (1, 2, 0)

        md = build_report([str(runs)], out=str(tmp_path / "rep"), plots=False)
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| method=")}
    assert "1 failed: TrainingError: non-finite loss at epoch 1 step 1" in rows["method=test-sweep-nan, data=digits, data dir=none"]
    assert "| 0/1 |" in rows["method=test-sweep-nan, data=digits, data dir=none"]
    assert "| 1/1 |" in rows["method=ce, data=digits, data dir=none"]
    nodata_row = next(v for k, v in rows.items() if k.startswith("method=ce, data=imagefolder, data dir=/"))
    assert "| 0/1 |" in nodata_row and "1 failed: DataError: imagefolder root" in nodata_row


def test_interrupt_stops_the_sweep_and_the_run_starts_again_next_time(tmp_path):
    path = write_sweep(tmp_path / "s", variants={"method": [{"method.name": "ce"}, {"method.name": "test-sweep-interrupt"}]})
    InterruptOnce.armed = True
    with registered(InterruptOnce):
        with pytest.raises(KeyboardInterrupt):
            run_sweep(path, progress=False, log=lambda m: None)
        table = json.loads((tmp_path / "s" / "runs" / "runs.json").read_text())["runs"]
        assert table["method=ce"]["status"] == "finished"
        assert table["method=test-sweep-interrupt"]["status"] == "interrupted"
        result = run_sweep(path, progress=False, log=lambda m: None)
    assert (result["skipped"], result["finished"], result["failed"]) == (1, 1, 0)


def _hold_lock(run):
    """A second process that takes the run's flock and keeps it until killed."""
    import subprocess
    import sys

    run.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_run_claimed_by_another_process_is_passed_over_and_shown_running(tmp_path):
    path = write_sweep(tmp_path / "s", grid={"method.name": ["ce", "ls"]})
    runs = tmp_path / "s" / "runs"
    held = _hold_lock(runs / "method.name=ce")  # another process holds the run's flock
    try:
        lines: list[str] = []
        result = run_sweep(path, progress=False, log=lines.append)
        assert (result["finished"], result["elsewhere"], result["skipped"]) == (1, 1, 0)
        assert result["runs"]["method.name=ce"]["status"] == "running"
        assert not (runs / "method.name=ce" / "summary.json").exists()
        assert (runs / "method.name=ls" / "summary.json").exists()
        assert any("method.name=ce: running in another process" in m for m in lines)
        assert json.loads((runs / "runs.json").read_text())["runs"]["method.name=ce"]["status"] == "running"
        assert not sweep_mod._claim(runs / "method.name=ce")
    finally:
        held.kill()
        held.wait()
    result = run_sweep(path, progress=False, log=lambda m: None)  # the lock is gone: the run is trained now
    assert (result["finished"], result["elsewhere"], result["skipped"]) == (1, 0, 1)
    assert json.loads((runs / "runs.json").read_text())["runs"]["method.name=ce"]["status"] == "finished"


def test_jobs_share_a_sweep_and_train_every_run_once(tmp_path):
    path = write_sweep(tmp_path / "s", grid={"method.name": ["ce", "ls"], "train.seed": [0, 1]})
    lines: list[str] = []
    result = run_jobs(path, 2, threads=1, log=lines.append)
    runs = tmp_path / "s" / "runs"
    assert (result["total"], result["finished"], result["failed"]) == (4, 4, 0)
    assert all(r["status"] == "finished" for r in result["runs"].values())
    for name in result["runs"]:  # trained once: one epoch line per run, one summary
        metrics = (runs / name / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 1 and json.loads(metrics[0])["epoch"] == 1
        assert json.loads((runs / name / "summary.json").read_text())["threads"] == 1
    assert any(m.startswith("[job 1] ") for m in lines) and any(m.startswith("[job 2] ") for m in lines)
    assert lines[-1].endswith("4 of 4 runs finished; this time 4 trained, 0 resumed, 0 failed")
    again = run_jobs(path, 2, threads=1, log=lambda m: None)
    assert (again["finished"], again["skipped"]) == (0, 4)
    with pytest.raises(ConfigError, match="optim.lrr"):  # checked before any process starts
        run_jobs(write_sweep(tmp_path / "bad", grid={"optim.lrr": [0.1]}), 2)
    with pytest.raises(ConfigError, match="--jobs 0"):
        run_jobs(path, 0)


def test_forward_passes_count_an_auto_trained_teacher(tmp_path):
    from selfkd.experiments.report.collect import _cost

    run = tmp_path / "run"
    (run / "teacher").mkdir(parents=True)
    student = {"epochs": 8, "seconds": 100.0, "forwards_per_sample": 2.0}
    assert _cost(run, student) == {"seconds_per_epoch": 12.5, "passes": 16.0}
    (run / "teacher" / "summary.json").write_text(json.dumps({"epochs": 8, "forwards_per_sample": 1.0}))
    assert _cost(run, student) == {"seconds_per_epoch": 12.5, "passes": 24.0}
    assert _cost(run, {"epochs": 0, "seconds": 1.0}) == {}


def test_a_job_may_start_processes_of_its_own(tmp_path):
    # past PARALLEL_THRESHOLD files the image decoder starts a process pool; a job must be allowed to
    import numpy as np
    from PIL import Image

    from selfkd.data.imagefolder import PARALLEL_THRESHOLD

    rng = np.random.default_rng(0)
    for split, n in (("train", PARALLEL_THRESHOLD // 2 + 1), ("test", 4)):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / split / c / f"{k}.png")
    path = tmp_path / "s" / "sweep.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"out": "runs", "base": {
        "data": {"name": "imagefolder", "dir": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"), "subset": 64},
        "model": {"name": "cnn_small"}, "optim": {"batch_size": 32}, "train": {"epochs": 1, "device": "cpu"}}}))
    lines: list[str] = []
    result = run_jobs(str(path), 1, threads=1, log=lines.append)
    assert (result["finished"], result["failed"]) == (1, 0), lines
    assert not any("died" in m for m in lines)


@pytest.mark.parametrize("change, message", [
    ({"grid": {"method.name": ["ce"], "optim.lrr": [0.1]}}, "unknown config key 'optim.lrr'"),
    ({"grid": {"method.name": ["ce", "dlb"], "optim.lr": [0.1, -1]}}, "optim.lr"),
    ({"grid": {"data.noise.rate": [0.2, 1.5]}}, "data.noise.rate"),
    ({"grid": {"method.name": ["ce", "dlbb"]}}, "unknown method 'dlbb'"),
    ({"variants": {"m": [{"method.name": "dlb", "method.temprature": 4}]}}, "temprature"),
    ({"grids": {"method.name": ["ce"]}}, "unknown key 'grids'"),
    ({"grid": {"method.name": "ce"}}, "expected a non-empty list"),
    ({"base": {"optim": {"lrr": 1}}}, "unknown config key 'optim.lrr'"),
    ({"grid": {"method.name": ["ce"]}, "variants": {"m": [{"method.name": "dlb"}]}}, "both set 'method.name'"),
])
def test_a_bad_sweep_fails_before_anything_runs_and_writes_nothing(tmp_path, change, message):
    path = write_sweep(tmp_path / "s", **change)
    for only_plan in (True, False):
        with pytest.raises(ConfigError, match="sweep .*sweep.yaml") as err:
            run_sweep(path, only_plan=only_plan, progress=False, log=lambda m: None)
        assert message in str(err.value)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["sweep.yaml"]


def test_only_plan_lists_the_runs_and_writes_nothing(tmp_path):
    path = write_sweep(tmp_path / "s", preset="cpu-short",
                       base={**BASE, "train": {"epochs": 2, "device": "cpu"}, "optim.lr": 0.02,  # dotted keys too
                             "data.noise.kind": "symmetric"},  # a rate without a kind is an error (issue 8)
                       grid={"data.noise.rate": [0.0, 0.4], "train.seed": [3]},
                       variants={"method": [{"method.name": "ce"}, {"method.name": "dlb", "method.temperature": 4}]})
    lines: list[str] = []
    result = run_sweep(path, only_plan=True, log=lines.append)
    assert list(result["runs"]) == [
        "method=ce/data.noise.rate=0.0/train.seed=3", "method=ce/data.noise.rate=0.4/train.seed=3",
        "method=dlb,temperature=4/data.noise.rate=0.0/train.seed=3",
        "method=dlb,temperature=4/data.noise.rate=0.4/train.seed=3"]
    assert result["pending"] == 4 and result["finished"] == 0
    assert all(r["status"] == "pending" for r in result["runs"].values())
    assert result["runs"]["method=dlb,temperature=4/data.noise.rate=0.4/train.seed=3"]["axes"] == {
        "method": "dlb,temperature=4", "data.noise.rate": 0.4, "train.seed": 3}
    assert sum(name in "\n".join(lines) for name in result["runs"]) == 4
    assert not (tmp_path / "s" / "runs").exists()
    sweep = plan(path)
    cfg = next(r.cfg for r in sweep.runs if r.name.startswith("method=dlb"))
    assert cfg.method.params()["temperature"] == 4 and cfg.schedule.warmup_epochs == 1  # the preset applies
    assert cfg.optim.lr == 0.02 and cfg.optim.batch_size == 32
    assert sweep.out == tmp_path / "s" / "runs"  # relative to the sweep file's folder


def test_an_existing_run_with_another_config_is_refused(grid, tmp_path):
    folder, path = copy_grid(grid, tmp_path)
    spec = yaml.safe_load(Path(path).read_text())
    spec["base"]["optim"]["lr"] = 0.1
    Path(path).write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"already exists with another config \(optim.lr: 0.05 there, 0.1 now"):
        run_sweep(path, progress=False, log=lambda m: None)


def test_finished_runs_moved_to_another_cache_folder_are_still_the_sweeps(grid, tmp_path):
    """Runs copied from another checkout (another data.cache_dir: where decoded images are kept, not what is
    trained) count as finished; another lr in the same copy is still refused."""
    folder, path = copy_grid(grid, tmp_path)
    configs = sorted(Path(folder).glob("**/config.yaml"))
    assert configs
    for c in configs:  # as if trained in another checkout with its own cache folder
        d = yaml.safe_load(c.read_text())
        d["data"]["cache_dir"] = str(tmp_path / "elsewhere")
        c.write_text(yaml.safe_dump(d))
    result = run_sweep(path, progress=False, log=lambda m: None)
    assert result["finished"] == 0 and result["skipped"] == result["total"] > 0
    from selfkd.engine.config import WHERE_KEYS, config_diff

    assert "data.cache_dir" in WHERE_KEYS
    assert config_diff({"data": {"cache_dir": "a", "name": "x"}}, {"data": {"cache_dir": "b", "name": "x"}}) == []
    assert config_diff({"data": {"cache_dir": "a", "name": "x"}}, {"data": {"cache_dir": "b", "name": "y"}}) == [
        ("data.name", "x", "y")]
    spec = yaml.safe_load(Path(path).read_text())
    spec["base"]["optim"]["lr"] = 0.1
    Path(path).write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"already exists with another config \(optim.lr: 0.05 there, 0.1 now"):
        run_sweep(path, progress=False, log=lambda m: None)


def test_directory_labels_are_safe_and_unique():
    assert [label(v) for v in (0.4, 0.0, 1e-05, 3, True, None, "dlb", [30, 60])] == [
        "0.4", "0.0", "1e-05", "3", "true", "null", "dlb", "30+60"]
    a, b = label("/data/a b"), label("/data/a_b")
    assert a != b and "/" not in a and " " not in a and a.startswith("_data_a_b_")


# ---------------------------------------------------------------------------------------------
# report
def png_ok(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG)


def test_report_tables_match_the_summaries_and_plots_are_pngs(grid, tmp_path):
    runs = grid[0] / "runs"
    out = tmp_path / "rep"
    md = build_report([str(runs)], out=str(out))
    assert (out / "report.md").read_text() == md
    data = json.loads((out / "report.json").read_text())
    assert [g["label"] for g in data["groups"]] == ["method=ce", "method=dlb"]
    s = summaries(runs)
    for g in data["groups"]:
        method = g["label"].split("=")[1]
        mine = [v for k, v in s.items() if k.startswith(f"method.name={method}/")]
        assert g["finished"] == g["total"] == 2
        for r in mine:  # derived cost columns
            r["seconds_per_epoch"] = r["seconds"] / r["epochs"]
            r["passes"] = r["forwards_per_sample"] * r["epochs"]
        assert g["stats"]["passes"]["mean"] == {"ce": 1.0, "dlb": 2.0}[method]
        for key in ("last_acc", "best_acc", "ece", "nll", "seconds", "seconds_per_epoch", "peak_mem_mb", "passes"):
            vals = [r[key] for r in mine]
            assert g["stats"][key]["mean"] == pytest.approx(statistics.mean(vals), rel=1e-12)
            assert g["stats"][key]["std"] == pytest.approx(statistics.stdev(vals), rel=1e-12)
        la, ece = [r["last_acc"] for r in mine], [r["ece"] for r in mine]
        row = next(line for line in md.splitlines() if line.startswith(f"| method={method} |"))
        assert f"| 2/2 | {statistics.mean(la):.2f} ± {statistics.stdev(la):.2f} |" in row
        assert f"{statistics.mean(ece):.4f} ± {statistics.stdev(ece):.4f}" in row
    assert "noisy-label fit" not in md  # no label noise in these runs: no noise columns
    assert "Common to all groups: data=digits, model=cnn_small, epochs=1, batch_size=32" in md
    assert png_ok(out / "acc_curves.png") and png_ok(out / "reliability.png")
    assert "](acc_curves.png)" in md and "](reliability.png)" in md
    assert not (out / "acc_vs_noise.png").exists() and "acc_vs_noise" not in md  # the runs do not vary the noise
    # --no-plots: the same report less its figures (each an image line, its caption and their blank lines)
    from selfkd.cli import main

    bare = tmp_path / "bare"
    assert main(["report", str(runs), "--out", str(bare), "--no-plots"]) == 0
    figures = [k for k, line in enumerate(md.splitlines()) if line.startswith("![")]
    assert len(figures) == len(data["plots"]) == 3  # curves, compute (1 vs 2 passes), reliability
    kept = [line for k, line in enumerate(md.splitlines()) if not any(f <= k < f + 4 for f in figures)]
    assert (bare / "report.md").read_text().splitlines() == kept
    assert sorted(p.name for p in bare.iterdir()) == ["report.json", "report.md"]
    assert json.loads((bare / "report.json").read_text()) == {**data, "dirs": [str(runs)], "plots": []}


def test_report_pairs_each_group_with_the_baseline_by_seed(grid, tmp_path):
    runs = grid[0] / "runs"
    md = build_report([str(runs)], out=str(tmp_path / "rep"), baseline="method=ce", plots=False)
    s = summaries(runs)
    diffs = {key: [s[f"method.name=dlb/train.seed={k}"][key] - s[f"method.name=ce/train.seed={k}"][key] for k in (0, 1)]
             for key in ("last_acc", "ece")}
    row = next(line for line in md.splitlines() if line.startswith("| method=dlb | 2 |"))
    d = diffs["last_acc"]
    better = sum(x > 0 for x in d)
    assert f"{statistics.mean(d):+.2f} ± {statistics.stdev(d):.2f} ({better}/2 better)" in row
    e = diffs["ece"]
    assert f"{statistics.mean(e):+.4f} ± {statistics.stdev(e):.4f} ({sum(x < 0 for x in e)}/2 better)" in row
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["baseline"] == "method=ce" and [p["label"] for p in data["paired"]] == ["method=dlb"]
    assert data["paired"][0]["last_acc"]["mean"] == pytest.approx(statistics.mean(d), rel=1e-12)
    with pytest.raises(ConfigError, match="--baseline 'method=cee' is not a group; groups: 'method=ce', 'method=dlb'"):
        build_report([str(runs)], out=str(tmp_path / "rep2"), baseline="method=cee", plots=False)
    assert not (tmp_path / "rep2").exists()


def test_report_with_noise_shows_failed_unfinished_and_missing_runs(tmp_path):
    path = write_sweep(tmp_path / "s", base={**BASE, "data": {**BASE["data"], "noise": {"kind": "symmetric"}}},
                       grid={"data.noise.rate": [0.0, 0.4], "train.seed": [0, 1]},
                       variants={"method": [{"method.name": "ce"}]})
    run_sweep(path, progress=False, log=lambda m: None)
    runs = tmp_path / "s" / "runs"
    clean1 = runs / "method=ce/data.noise.rate=0.0/train.seed=1"
    (clean1 / "summary.json").unlink()
    (clean1 / "failed.json").write_text(json.dumps({"error": "TrainingError: non-finite loss at epoch 1 step 3"}))
    noisy1 = runs / "method=ce/data.noise.rate=0.4/train.seed=1"
    (noisy1 / "summary.json").unlink()  # interrupted after its last epoch: unfinished
    other = runs / "extra"  # a group of its own with no finished run: still listed
    other.mkdir()
    cfg = yaml.safe_load((clean1 / "config.yaml").read_text())
    cfg["optim"]["lr"] = 0.2
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    table = json.loads((runs / "runs.json").read_text())
    table["runs"]["method=ce/data.noise.rate=0.8/train.seed=0"] = {"axes": {}, "status": "pending"}
    (runs / "runs.json").write_text(json.dumps(table))

    md = build_report([str(runs)])  # default: <dir>/report
    out = runs / "report"
    assert (out / "report.md").read_text() == md
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| noise=") or
            line.startswith("| method=ce/")}
    noisy0 = json.loads((runs / "method=ce/data.noise.rate=0.4/train.seed=0/summary.json").read_text())
    assert rows["noise=symmetric 0.4, lr=0.05"].startswith(
        f"| noise=symmetric 0.4, lr=0.05 | 1/2 | {noisy0['last_acc']:.2f} | {noisy0['best_acc']:.2f} |")
    assert f"| {noisy0['corrupted_acc']:.1f} | {noisy0['memorized']:.1f} |" in rows["noise=symmetric 0.4, lr=0.05"]
    assert "1 unfinished" in rows["noise=symmetric 0.4, lr=0.05"]
    assert "| 1/2 |" in rows["noise=clean, lr=0.05"] and "1 failed: TrainingError: non-finite loss" in rows["noise=clean, lr=0.05"]
    assert "| – | – |" in rows["noise=clean, lr=0.05"]  # clean runs have no corrupted labels
    assert rows["noise=clean, lr=0.2"].startswith("| noise=clean, lr=0.2 | 0/1 | – |") and "1 not started" in rows["noise=clean, lr=0.2"]
    assert "unfinished: epoch 1/1" in md and "failed: TrainingError: non-finite loss at epoch 1 step 3" in md
    assert "method=ce/data.noise.rate=0.8/train.seed=0" in md and "not started (no directory yet)" in md
    for name in ("acc_curves.png", "acc_vs_noise.png", "reliability.png"):
        assert png_ok(out / name) and f"]({name})" in md
    data = json.loads((out / "report.json").read_text())
    assert {g["label"]: (g["finished"], g["total"]) for g in data["groups"]}["noise=symmetric 0.4, lr=0.05"] == (1, 2)


def test_report_plots_accuracy_against_compute_when_budgets_differ(grid, tmp_path):
    """ce (1 pass per sample) and dlb (2) differ in budget: the compute plot is drawn and linked."""
    out = tmp_path / "rep"
    md = build_report([str(grid[0] / "runs")], out=str(out))
    assert png_ok(out / "acc_vs_compute.png") and "](acc_vs_compute.png)" in md
    only_ce = tmp_path / "ce"
    md = build_report([str(p) for p in (grid[0] / "runs").glob("method.name=ce/*")], out=str(only_ce))
    assert not (only_ce / "acc_vs_compute.png").exists() and "acc_vs_compute" not in md  # one budget: no plot


def test_report_says_a_truncated_summary_is_unreadable(grid, tmp_path, capsys):
    """A summary.json cut short (a copy, a full disk) is not an unfinished run: the report and stderr say so."""
    folder, _ = copy_grid(grid, tmp_path)
    runs = folder / "runs"
    cut = runs / "method.name=dlb/train.seed=1" / "summary.json"
    cut.write_text(cut.read_text()[:40])
    listed = runs / "method.name=ce/train.seed=0" / "summary.json"
    listed.write_text("[1, 2]\n")
    from selfkd.cli import main

    assert main(["report", str(runs), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(e.startswith("selfkd: warning: ") for e in err), err
    assert re.search(f"{re.escape(str(cut.parent))}: summary.json is not valid JSON at line [0-9]+ column [0-9]+ "
                     r"\(truncated or damaged\); the run is listed as unreadable", err[1]), err
    assert f"{listed.parent}: summary.json holds a JSON list, not an object" in err[0]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "unreadable: summary.json is not valid JSON at line" in md and "unfinished" not in md
    row = next(line for line in md.splitlines() if line.startswith("| method=dlb |"))
    assert "| 1/2 |" in row and "1 unreadable: summary.json is not valid JSON" in row
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert sorted(r["status"] for g in data["groups"] for r in g["runs"]) == ["finished", "finished", "unreadable",
                                                                               "unreadable"]


def test_report_out_that_is_a_file_says_so(grid, tmp_path, capsys):
    from selfkd.cli import main

    (tmp_path / "rep").write_text("mine")
    assert main(["report", str(grid[0] / "runs"), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err == f"selfkd: error: --out {tmp_path / 'rep'}: {tmp_path / 'rep'} is a file, not a folder\n"
    assert (tmp_path / "rep").read_text() == "mine"
    assert main(["report", str(grid[0] / "runs"), "--out", str(tmp_path / "rep" / "sub")]) == 2
    assert f"{tmp_path / 'rep'} is a file, not a folder" in capsys.readouterr().err
