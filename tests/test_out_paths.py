"""--out never loses the user's files (issue 16): sweep roots, exclusive exports, dangling links, demo
into a run, and torchrun's environment half set. Tiny budgets: digits, cnn_small, one epoch."""
import os
from pathlib import Path

import pytest
import yaml

from selfkd import models
from test_safety import one_line_error, run_cli

TINY = ["--data", "digits", "--model", "cnn_small", "--no-progress", "--set", "data.subset=100",
        "--set", "data.test_subset=50", "--batch-size", "32", "--epochs", "1", "--threads", "1"]
BASE = {"data": {"name": "digits", "subset": 100, "test_subset": 50}, "model": {"name": "cnn_small"},
        "optim": {"batch_size": 32}, "train": {"epochs": 1, "device": "cpu"}}


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def sweep_file(folder: Path, **spec) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / "grid.yaml"
    f.write_text(yaml.safe_dump({"out": "runs", "base": BASE, **spec}, sort_keys=False))
    return f


# ------------------------------------------------------------------------------------------------
# sweep --out
def test_sweep_out_into_the_users_own_sweep_yaml_and_runs_json_is_refused(tmp_path, capsys):
    f = sweep_file(tmp_path / "s")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sweep.yaml").write_text("my notes: keep\n")
    (mine / "runs.json").write_text('{"my": "data"}\n')
    before = snapshot(mine)
    for plan in ([], ["--plan"]):
        code, _, err = run_cli(capsys, "sweep", f, "--out", mine, "--no-progress", *plan)
        one_line_error(code, err, f"--out {mine}: folder is not empty (runs.json, sweep.yaml)",
                       "not a sweep written by selfkd")
    assert snapshot(mine) == before


def test_sweep_out_into_a_folder_of_other_files_is_refused_also_from_the_file(tmp_path, capsys):
    f = sweep_file(tmp_path / "s")
    (tmp_path / "s" / "runs").mkdir()
    for i in range(5):
        (tmp_path / "s" / "runs" / f"photo{i}.jpg").write_bytes(b"x")
    before = snapshot(tmp_path / "s" / "runs")
    code, _, err = run_cli(capsys, "sweep", f, "--no-progress")
    one_line_error(code, err, f"sweep {f}: out {tmp_path / 's' / 'runs'}: folder is not empty "
                              "(photo0.jpg, photo1.jpg, photo2.jpg and 2 more)")
    assert snapshot(tmp_path / "s" / "runs") == before


def test_sweep_root_selfkd_wrote_is_accepted_again_and_so_is_the_sweep_files_own_folder(tmp_path, capsys):
    f = sweep_file(tmp_path / "s")
    code, _, err = run_cli(capsys, "sweep", f, "--no-progress")
    assert code == 0, err
    root = tmp_path / "s" / "runs"
    assert (root / ".selfkd-sweep").is_file() and (root / "run" / "summary.json").exists()
    code, _, err = run_cli(capsys, "sweep", f, "--no-progress")  # the second time: skipped, not refused
    assert code == 0 and "1 skipped" in err, err
    # a root written before the marker existed: recognised by selfkd's own runs.json
    (root / ".selfkd-sweep").unlink()
    code, _, err = run_cli(capsys, "sweep", f, "--no-progress")
    assert code == 0 and "1 skipped" in err, err
    # runs next to the sweep file (`out: .`): the folder holding only the file itself is a new root
    own = tmp_path / "own"
    own.mkdir()
    g = own / "sweep.yaml"
    g.write_text(yaml.safe_dump({"out": ".", "base": BASE}))
    code, _, err = run_cli(capsys, "sweep", g, "--no-progress")
    assert code == 0, err
    assert g.read_text() == yaml.safe_dump({"out": ".", "base": BASE})  # the spec went to sweep.resolved.yaml
    assert (own / "sweep.resolved.yaml").exists() and (own / "run" / "summary.json").exists()


# ------------------------------------------------------------------------------------------------
# export
RACE: dict = {}


def racy_cnn(num_classes: int, in_channels: int = 1):
    """cnn_small; while exporting, another "process" writes the export's --out first (between the
    command's exists() check and its own write), deterministically."""
    if "target" in RACE:
        Path(RACE["target"]).write_bytes(b"the other export\n")
    return models.build_model("cnn_small", num_classes=num_classes, in_channels=in_channels)


@pytest.fixture
def racy_model():
    with models.MODELS.scope():
        models.MODELS.add("racy_cnn", racy_cnn)
        yield


def test_export_never_replaces_a_file_written_meanwhile(tmp_path, capsys, monkeypatch, racy_model):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--model", "racy_cnn", "--out", run)
    assert code == 0, err
    out = tmp_path / "model.safetensors"
    monkeypatch.setitem(RACE, "target", str(out))
    code, _, err = run_cli(capsys, "export", run, "--format", "safetensors", "--out", out)
    one_line_error(code, err, f"cannot write {out}: it exists already", "nothing was replaced")
    assert out.read_bytes() == b"the other export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "run"]  # no temp file left


# ------------------------------------------------------------------------------------------------
# dangling symbolic links
@pytest.mark.parametrize("command", ["train", "sweep", "export", "demo", "finetune", "report", "eval"])
def test_out_at_a_dangling_symlink_is_refused_and_the_link_kept(tmp_path, capsys, command):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    argv = {
        "train": ["train", *TINY, "--out", link],
        "sweep": ["sweep", sweep_file(tmp_path / "s"), "--out", link, "--no-progress"],
        "export": ["export", tmp_path / "no-run", "--format", "safetensors", "--out", link],
        "demo": ["demo", "--epochs", "1", "--out", link, "--no-progress"],
        "finetune": ["finetune", "--data", tmp_path / "t.csv", "--model", tmp_path / "m", "--out", link],
        "report": ["report", tmp_path, "--out", link],
        "eval": ["eval", tmp_path / "no-run", "--data", "digits", "--out", link],
    }[command]
    code, _, err = run_cli(capsys, *argv)
    one_line_error(code, err, f"--out {link}: {link} is a dangling symbolic link (to {tmp_path / 'gone'})")
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "gone") and not (tmp_path / "gone").exists()


def test_out_below_a_dangling_symlink_is_refused(tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    code, _, err = run_cli(capsys, "demo", "--epochs", "1", "--out", link / "d", "--no-progress")
    one_line_error(code, err, f"{link} is a dangling symbolic link")
    assert not (tmp_path / "gone").exists()


# ------------------------------------------------------------------------------------------------
# demo
def test_demo_out_a_finished_run_is_refused_and_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--out", run)
    assert code == 0, err
    before = snapshot(run)
    code, _, err = run_cli(capsys, "demo", "--epochs", "1", "--out", run, "--no-progress")
    one_line_error(code, err, f"--out {run}: already holds a run", "new or empty folder")
    assert snapshot(run) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    code, _, err = run_cli(capsys, "demo", "--epochs", "1", "--out", other, "--no-progress")
    one_line_error(code, err, f"--out {other}: is not empty (notes.txt)")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------------------------
# torchrun's variables half set
def test_rank_and_world_size_without_master_addr_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    code, _, err = run_cli(capsys, "train", *TINY, "--out", tmp_path / "r")
    one_line_error(code, err, "RANK=0 and WORLD_SIZE=2 are set but MASTER_ADDR and MASTER_PORT are not",
                   "torchrun", "--nproc")
    assert not (tmp_path / "r").exists()
