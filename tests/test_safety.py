"""Lose nothing, crash never (issue 8): run-directory safety, every bad input one line + exit 2 + nothing
written, no option silently ignored, a start-up line, fast listings. Tiny budgets: digits, cnn_small."""
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from selfkd.cli import main
from selfkd.engine import checkpoint as ckpt
from selfkd.engine import rundir
from selfkd.engine.config import build_config
from selfkd.engine.stages import train_run

TINY = ["--data", "digits", "--model", "cnn_small", "--no-progress", "--set", "data.subset=100",
        "--set", "data.test_subset=50", "--batch-size", "32"]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line_error(code, err, *needles):
    assert code == 2, err
    assert err.startswith("selfkd: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def last_line_error(code, err, *needles):
    """An error after training began: the log lines, then one error line."""
    assert code == 2 and "Traceback" not in err, err
    one_line_error(code, err.splitlines()[-1] + "\n", *needles)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def tiny_cfg(**over):
    layers = {"data": {"name": "digits", "subset": 100, "test_subset": 50}, "model": {"name": "cnn_small"},
              "optim": {"batch_size": 32}, "train": {"epochs": 2, "device": "cpu"}}
    for k, v in over.items():
        layers.setdefault(k, {}).update(v)
    return build_config(layers)


def interrupted(run: Path, cfg=None, threads=None):
    """A run stopped right after epoch 1 of 2 was checkpointed (as a kill there would leave it)."""
    def stop(msg):
        if msg.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg or tiny_cfg(), run, progress=False, log=stop, threads=threads)
    assert (run / "checkpoint.pt").exists() and not (run / "summary.json").exists()


@contextlib.contextmanager
def other_process_lock(run: Path):
    """Another process holding the run's flock (a second selfkd writing it)."""
    run.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------------
# data never lost or mixed
def test_out_into_a_non_empty_folder_is_refused_and_untouched(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "best.pt").write_bytes(b"my own weights")
    (mine / "summary.json").write_text("{}")
    before = snapshot(mine)
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", mine)
    one_line_error(code, err, "not empty", "best.pt")
    assert snapshot(mine) == before


def test_an_empty_folder_may_become_a_run(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", empty)
    assert code == 0, err and (empty / "summary.json").exists()


def test_a_second_writer_gets_one_line_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    with other_process_lock(run):
        code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", run)
        one_line_error(code, err, "another selfkd process", str(run))
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    interrupted(tmp_path / "half")
    before = snapshot(tmp_path / "half")
    with other_process_lock(tmp_path / "half"):
        code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "half", "--no-progress")
        one_line_error(code, err, "another selfkd process")
    assert snapshot(tmp_path / "half") == before


def test_lock_is_reentrant_in_one_process_and_exclusive_across(tmp_path):
    run = tmp_path / "r"
    assert rundir.try_lock(run) and rundir.try_lock(run) and rundir.depth(run) == 2
    rundir.unlock(run)
    assert rundir.held(run)
    rundir.unlock(run)
    assert not rundir.held(run) and not rundir.busy(run)
    with other_process_lock(run):
        assert rundir.busy(run) and not rundir.try_lock(run)


def test_resume_removes_its_own_temp_leftovers_only(tmp_path, capsys):
    run = tmp_path / "run"
    interrupted(run)
    own = [".checkpoint.pt.k2j_x9a1.tmp", ".best.pt.abcdefgh.tmp", ".metrics.jsonl.12345678.tmp"]
    others = [".mydata.abcdefgh.tmp", "notes.txt", ".checkpoint.pt.tmp", ".checkpoint.pt.toolong99.tmp.bak"]
    for name in own + others:
        (run / name).write_bytes(b"x" * 100)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--no-progress")
    assert code == 0, err
    assert "removed 3 temp files of an interrupted write" in err
    left = {p.name for p in run.iterdir()}
    assert not left & set(own) and set(others) <= left


def test_best_pt_is_the_first_best_epoch_like_summary(tmp_path):
    # a learning rate so small that test accuracy ties in every epoch
    cfg = tiny_cfg(optim={"lr": 1e-12}, train={"epochs": 3})
    s = train_run(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len({r["test_acc"] for r in rows}) == 1  # the tie this test is about
    assert s["best_epoch"] == 1 and ckpt.load(tmp_path / "run" / "best.pt")["epoch"] == 1


def test_thread_count_is_recorded_and_reused_on_resume(tmp_path):
    run = tmp_path / "run"
    interrupted(run, threads=1)
    assert ckpt.load(run / "checkpoint.pt")["threads"] == 1
    lines = []
    torch.set_num_threads(2)
    try:
        train_run(tiny_cfg(), run, resume=True, progress=False, log=lines.append)
        assert torch.get_num_threads() == 2  # the caller's count is restored after the run
    finally:
        torch.set_num_threads(1)
    assert any("resuming with 1 thread as recorded" in m for m in lines), lines
    assert json.loads((run / "summary.json").read_text())["threads"] == 1
    # told otherwise: that count is used, with a warning that bit-identity is lost
    run2 = tmp_path / "run2"
    interrupted(run2, threads=1)
    lines = []
    train_run(tiny_cfg(), run2, resume=True, progress=False, log=lines.append, threads=2)
    assert any("will not be bit-identical" in m for m in lines)
    assert json.loads((run2 / "summary.json").read_text())["threads"] == 2


# ------------------------------------------------------------------------------------------------
# nothing silently accepted
@pytest.mark.parametrize("args, needles", [
    (["--data-dir", "some/cifar.tar.gz"], ["data.dir (--data-dir)", "no effect", "digits"]),
    (["--download"], ["data.download (--download)", "no effect"]),
    (["--set", "data.noise.rate=0.4"], ["data.noise.rate", "noise kind"]),
    (["--set", "data.cache_dir=/tmp/c"], ["data.cache_dir", "no effect"]),
    (["--set", "augment.mix_alpha=0.2"], ["augment.mix_alpha", "no effect"]),
    (["--set", "augment.randaugment_magnitude=5"], ["augment.randaugment_magnitude", "no effect"]),
    (["--set", "schedule.milestones=[1]", "--epochs", "3"], ["schedule.milestones", "no effect"]),
])
def test_options_without_effect_are_errors(tmp_path, capsys, args, needles):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", run, *args)
    one_line_error(code, err, *needles)
    assert not run.exists()


def test_duplicate_yaml_keys_are_errors(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    code, _, err = run_cli(capsys, "train", *TINY, "--config", f, "--out", tmp_path / "run")
    one_line_error(code, err, str(f), "line 3", "'lr' appears twice")
    code, _, err = run_cli(capsys, "train", *TINY, "--set", "method={name: ce, name: dlb}", "--out", tmp_path / "run")
    one_line_error(code, err, "appears twice")
    sweep = tmp_path / "s.yaml"
    sweep.write_text("out: o\nbase: {train: {epochs: 1}}\ngrid: {train.seed: [0]}\ngrid: {train.seed: [1]}\n")
    code, _, err = run_cli(capsys, "sweep", sweep, "--plan")
    one_line_error(code, err, "sweep file", "'grid' appears twice")
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


def test_config_edited_before_resume_is_refused_naming_the_keys(tmp_path, capsys):
    run = tmp_path / "run"
    interrupted(run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["optim"]["lr"] = 0.2
    cfg["train"]["eval_batch_size"] = 7
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = snapshot(run)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--no-progress")
    one_line_error(code, err, "config.yaml differs", "optim.lr: 0.05 in the checkpoint, 0.2 now", "train.eval_batch_size")
    assert snapshot(run) == before


def test_startup_line_comes_before_the_first_step(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--method", "dlb", "--epochs", "1", "--out", run, "--threads", "1")
    assert code == 0
    lines = err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("digits:"))
    assert first < next(i for i, line in enumerate(lines) if line.startswith("epoch 1/1"))
    from selfkd.models import build_model

    params = sum(p.numel() for p in build_model("cnn_small", 10, 1).parameters())
    assert re.fullmatch(rf"digits: 100 train / 50 test, 10 classes, 1x8x8 \| cnn_small: {params:,} parameters \| "
                        rf"dlb\(temperature=3\.0, alpha=1\.0.*\) \| cpu, 1 thread \| {re.escape(str(run))}", lines[first]), lines[first]


# ------------------------------------------------------------------------------------------------
# every bad input: one line, exit 2, nothing written
def test_empty_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    interrupted(run)
    (run / "checkpoint.pt").write_bytes(b"")
    code, _, err = run_cli(capsys, "train", "--resume", run, "--no-progress")
    one_line_error(code, err, "checkpoint.pt: empty file")


def test_checkpoint_of_another_method_or_model_is_one_line(tmp_path, capsys):
    a, b = tmp_path / "ce", tmp_path / "dlb"
    interrupted(a)
    interrupted(b, cfg=tiny_cfg(method={"name": "dlb"}))
    shutil.copy(b / "checkpoint.pt", a / "checkpoint.pt")
    code, _, err = run_cli(capsys, "train", "--resume", a, "--no-progress")
    one_line_error(code, err, "method.name: 'dlb' in the checkpoint, 'ce' now")
    # a checkpoint without a recorded config (older format) that does not fit the model
    state = ckpt.load(b / "checkpoint.pt")
    state = {k: v for k, v in state.items() if k not in ("config", "config_sha256")}
    state["model"] = {k: v[:1] if v.ndim else v for k, v in state["model"].items()}
    ckpt.save(a / "checkpoint.pt", state)
    code, _, err = run_cli(capsys, "train", "--resume", a, "--no-progress")
    one_line_error(code, err, "does not fit this run's model 'cnn_small'")


def test_refused_global_in_a_checkpoint_is_one_short_line(tmp_path, capsys):
    run = tmp_path / "run"
    interrupted(run)
    torch.save({"format": 1, "x": Path("evil")}, run / "checkpoint.pt")
    code, _, err = run_cli(capsys, "train", "--resume", run, "--no-progress")
    one_line_error(code, err, "refused to load global 'pathlib.")
    assert len(err) < 250, err


def test_model_that_cannot_take_the_data_fails_before_writing(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--model", "vgg16", "--out", run)
    one_line_error(code, err, "model.name=vgg16 cannot take digits images of 1x8x8", "--image-size")
    assert not run.exists()


@pytest.mark.parametrize("args, key", [
    (["--seed", str(2**64)], "train.seed"),
    (["--seed", "-1"], "train.seed"),
    (["--set", f"data.noise.seed={2**70}", "--set", "data.noise.kind=symmetric"], "data.noise.seed"),
])
def test_seeds_beyond_64_bits_are_one_line(tmp_path, capsys, args, key):
    code, _, err = run_cli(capsys, "train", *TINY, "--out", tmp_path / "run", *args)
    one_line_error(code, err, key)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def no_data(monkeypatch):
    """Loading data at all is a failure here: the check must come first."""
    import selfkd.engine.setup as T

    def refuse(*a, **k):
        raise AssertionError("data was loaded before the --out check")

    monkeypatch.setattr(T, "load_dataset", refuse)


def test_out_below_a_regular_file_fails_before_loading_data(tmp_path, capsys, no_data):
    f = tmp_path / "file.txt"
    f.write_text("mine")
    code, _, err = run_cli(capsys, "train", *TINY, "--out", f / "run")
    one_line_error(code, err, f"{f} is a file, not a folder")
    code, _, err = run_cli(capsys, "train", *TINY, "--out", f)
    one_line_error(code, err, "is a file, not a folder")
    assert f.read_text() == "mine"


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/selfkd-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "none", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    return ok


CAN_MOUNT = _can_mount()


@contextlib.contextmanager
def tmpfs(path: Path, size: str, ro: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "none", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount_ro(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


@pytest.mark.skipif(not CAN_MOUNT, reason="needs root with mount (tmpfs) to make a read-only file system")
def test_read_only_file_system_out_and_resume(tmp_path, capsys, monkeypatch):
    with tmpfs(tmp_path / "fs", "4m") as fs:
        interrupted(fs / "run")
        remount_ro(fs)
        code, _, err = run_cli(capsys, "train", "--resume", fs / "run", "--no-progress")
        one_line_error(code, err, "--resume", "read-only file system")
        import selfkd.engine.setup as T

        monkeypatch.setattr(T, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
        code, _, err = run_cli(capsys, "train", *TINY, "--out", fs / "new")
        one_line_error(code, err, "--out", "read-only file system")


@pytest.mark.skipif(not CAN_MOUNT, reason="needs root with mount (tmpfs) to fill a small file system")
def test_full_disk_names_the_path_and_free_space_and_keeps_the_last_checkpoint(tmp_path, capsys):
    with tmpfs(tmp_path / "fs", "500k") as fs:
        run = fs / "run"
        code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "4", "--out", run)
        last_line_error(code, err, f"cannot write {run}/", "no space left on device", "MiB free there")
        assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no half-written temp file left
        state = ckpt.load(run / "checkpoint.pt")  # the last one written is whole
        assert state["epoch"] >= 1


def test_full_disk_without_mount_is_one_line(tmp_path, capsys, monkeypatch):
    """Portable twin of the tmpfs test: the file system reports ENOSPC on the checkpoint's fsync."""
    import errno

    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".checkpoint.pt."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", run)
    last_line_error(code, err, f"cannot write {run / 'checkpoint.pt'}: no space left on device", "MiB free there")
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


NOBODY_SCRIPT = r"""
import io, json, os, sys, contextlib
import torch
torch.set_num_threads(1)
from selfkd.cli import main
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    out[name] = [code, err.getvalue()]
print(json.dumps(out))
"""


DROP = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="drops root's permission override with setpriv (a normal user is denied anyway)")
def test_permission_errors_are_one_line(tmp_path):
    """File permissions do not stop root: these cases run in one subprocess without CAP_DAC_OVERRIDE."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)  # not writable
    secret = tmp_path / "secret.yaml"
    secret.write_text("train: {epochs: 1}\n")
    os.chmod(secret, 0o000)
    data = tmp_path / "data"
    (data / "cifar-10-batches-py").mkdir(parents=True)
    os.chmod(data, 0o000)
    ro_run = tmp_path / "ro_run"
    interrupted(ro_run)
    before = snapshot(ro_run)
    for p in [*ro_run.iterdir(), ro_run]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    tb_run = tmp_path / "tb_run"  # only its TensorBoard folder is read-only
    interrupted(tb_run, cfg=tiny_cfg(train={"log": "tensorboard"}))
    tb_before = snapshot(tb_run)
    os.chmod(tb_run / "tb", 0o555)
    cases = {
        "out": ["train", *TINY, "--out", str(locked / "run")],
        "config": ["train", *TINY, "--config", str(secret), "--out", str(tmp_path / "w1")],
        "data": ["train", "--data", "cifar10", "--data-dir", str(data), "--model", "resnet8", "--out", str(tmp_path / "w2")],
        "resume": ["train", "--resume", str(ro_run), "--no-progress"],
        "tb": ["train", "--resume", str(tb_run), "--no-progress"],
    }
    try:
        res = subprocess.run([*DROP, sys.executable, "-c", NOBODY_SCRIPT, json.dumps(cases)], capture_output=True,
                             text=True, timeout=240)
    finally:
        os.chmod(data, 0o755)
        os.chmod(tb_run / "tb", 0o755)
        for p in [ro_run, *ro_run.iterdir()]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    needles = {"out": [str(locked), "cannot write", "permission denied"], "config": [str(secret), "permission denied"],
               "data": [str(data), "permission denied"], "resume": ["--resume", "permission denied"],
               "tb": [f"TensorBoard folder {tb_run / 'tb'}: cannot write in", "permission denied",
                      "train.log=tensorboard writes event files there"]}
    for name, (code, err) in got.items():
        one_line_error(code, err, *needles[name])
    assert snapshot(ro_run) == before and not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()
    assert snapshot(tb_run) == tb_before  # refused before the resume wrote anything


def test_tensorboard_folder_that_is_a_file_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    interrupted(run, cfg=tiny_cfg(train={"log": "tensorboard"}))
    shutil.rmtree(run / "tb")
    (run / "tb").write_text("mine")
    before = snapshot(run)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--no-progress")
    one_line_error(code, err, f"TensorBoard folder {run / 'tb'}: {run / 'tb'} is a file, not a folder",
                   "train.log=tensorboard writes event files there")
    assert snapshot(run) == before


def test_error_texts_only_name_existing_flags():
    """Every ``--flag`` a message in the engine, the data layer or the CLI mentions exists (in selfkd or torchrun)."""
    from selfkd.cli import parser

    top = parser()
    known = {s for a in top._actions for s in a.option_strings}
    for action in top._subparsers._group_actions[0].choices.values():
        for a in action._actions:
            known.update(a.option_strings)
    from torch.distributed.run import get_args_parser  # resume lines under torchrun quote torchrun's own flags

    known.update(s for a in get_args_parser()._actions for s in a.option_strings)
    root = Path(__file__).resolve().parent.parent / "selfkd"
    used = {}
    for sub in ("cli", "engine", "data"):
        for f in (root / sub).glob("*.py"):
            if f.name == "_catalog.py":  # method docstrings quote the official codes' flags
                continue
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]+", f.read_text()):
                used.setdefault(flag, f.name)
    assert {f: where for f, where in used.items() if f not in known} == {}


def test_resume_with_other_options_names_the_flags(tmp_path, capsys):
    run = tmp_path / "run"
    interrupted(run)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--epochs", "30", "--set", "optim.lr=1")
    one_line_error(code, err, "drop the other options (--epochs, --set)")


def test_nan_before_any_checkpoint_cites_none(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--lr", "1e30", "--out", run)
    last_line_error(code, err, "non-finite loss at epoch 1", "no checkpoint was written yet")
    assert not (run / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------------------------
# sweeps
def _sweep(tmp_path: Path, body: str) -> Path:
    f = tmp_path / "sweeps" / "s.yaml"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(body)
    return f


def test_sweep_records_a_run_error_in_failed_json_and_goes_on(tmp_path, capsys):
    f = _sweep(tmp_path, "out: runs\nbase:\n  data: {name: digits, subset: 100, test_subset: 50}\n"
                         "  train: {epochs: 1, device: cpu}\n  optim: {batch_size: 32}\n"
                         "grid:\n  model.name: [vgg16, cnn_small]\n")
    code, _, err = run_cli(capsys, "sweep", f, "--no-progress")
    assert code == 1 and "Traceback" not in err
    runs = tmp_path / "sweeps" / "runs"
    failed = json.loads((runs / "model.name=vgg16" / "failed.json").read_text())
    assert "cannot take digits images of 1x8x8" in failed["error"]
    assert (runs / "model.name=cnn_small" / "summary.json").exists()


def test_sweep_path_error_shared_by_every_run_is_reported_once_up_front(tmp_path, capsys):
    f = _sweep(tmp_path, "out: runs\nbase:\n  data: {name: cifar10, dir: nowhere}\n  model: {name: resnet8}\n"
                         "  train: {epochs: 1}\ngrid:\n  train.seed: [0, 1, 2]\n")
    code, _, err = run_cli(capsys, "sweep", f, "--no-progress")
    one_line_error(code, err, "all 3 runs", str(tmp_path / "sweeps" / "nowhere"), "does not exist")
    assert not (tmp_path / "sweeps" / "runs").exists()


def test_sweep_relative_paths_resolve_against_the_sweep_file(tmp_path, monkeypatch):
    from selfkd.experiments.sweep import plan

    f = _sweep(tmp_path, "out: runs\nbase:\n  data: {name: imagefolder, dir: imgs.tar.gz, cache_dir: ../cache}\n"
                         "  train: {epochs: 1}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = plan(os.path.relpath(f)).runs[0]
    assert run.cfg.data.dir == str(tmp_path / "sweeps" / "imgs.tar.gz")
    assert run.cfg.data.cache_dir == str(tmp_path / "cache")
    assert run.dir.resolve() == (tmp_path / "sweeps" / "runs" / "run").resolve()


# ------------------------------------------------------------------------------------------------
# start-up and the demo
FAST = r"""
import sys, time, io, contextlib
t = time.process_time()  # CPU time: a wall-clock bound measured the other jobs on a loaded machine (or pytest -n 2)
from selfkd.cli import main
for argv in (["methods"], ["models"], ["presets"], ["methods", "dlb"]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(argv) == 0
    assert out.getvalue().strip(), argv
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(["--help"])
    except SystemExit:
        pass
print("torch" in sys.modules, time.process_time() - t)
import selfkd
assert selfkd.DLB.__name__ == "DLB" and "torch" in sys.modules and selfkd.build_method("ce").name == "ce"
"""


def test_listings_and_help_do_not_import_torch():
    res = subprocess.run([sys.executable, "-c", FAST], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    torch_loaded, seconds = res.stdout.split()
    assert torch_loaded == "False"
    assert float(seconds) < 2.0  # CPU seconds; about 0.1 s on an idle machine, the bound leaves room for a slow CI box


def test_generated_catalog_matches_the_registries(capsys):
    from selfkd.cli import _catalog, catalog

    assert _catalog.SOURCES == catalog.sources_hash(), "regenerate: python -m selfkd.cli.catalog"
    assert _catalog.CATALOG == catalog.live()
    assert main(["methods", "nope"]) == 2 and "unknown method 'nope'" in capsys.readouterr().err


def test_demo_threads_progress_and_what_the_numbers_are(tmp_path, capsys):
    torch.set_num_threads(1)
    code = main(["demo", "--epochs", "1", "--threads", "1", "--out", str(tmp_path / "d"), "--no-progress"])
    cap = capsys.readouterr()
    assert code == 0
    assert cap.err.count("epoch 1/1, test acc") == 4  # progress inside each of the four runs
    table_end = cap.out.rindex("| dlb | 40% symmetric")
    after = cap.out[table_end:].splitlines()
    assert any("One seed on a small data set" in line and "benchmarks/" in line for line in after[1:4]), cap.out
    assert json.loads((tmp_path / "d" / "ce-noise0" / "summary.json").read_text())["threads"] == 1
    code, _, err = run_cli(capsys, "demo", "--epochs", "1", "--out", tmp_path / "d", "--no-progress")
    one_line_error(code, err, "already holds a run")  # a second demo never overwrites the first


@pytest.mark.parametrize("argv, needle", [
    (["train", "--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
    (["train", "--set", "-x"], "argument --set: expected one argument"),
    (["trian"], "invalid choice: 'trian'"),
])
def test_usage_errors_are_one_line_too(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    one_line_error(e.value.code, err, needle, "--help")
