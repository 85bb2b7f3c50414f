"""`selfkd finetune` logs as `selfkd train` does: the start-up line, metrics.csv, TensorBoard events (read back with
tensorboard's own EventAccumulator), purged on resume, and a RUN/tb it cannot write refused before training."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from selfkd.cli import main  # noqa: E402
from test_finetune import parts  # noqa: E402,F401  (the tiny BERT folder and corpus)
from test_safety import DROP, NOBODY_SCRIPT, one_line_error, snapshot  # noqa: E402

# 18 training documents, batch 4: 5 steps per epoch; log_every=5 puts one log point at each epoch's end
ARGS = ["--method", "dlb", "--epochs", "2", "--batch-size", "4", "--lr", "2e-3", "--set", "data.max_length=24",
        "--set", "train.log_every=5"]


def cli(parts, out, *extra):  # noqa: F811
    return main(["finetune", "--data", str(parts["data"]), "--model", str(parts["model"]), *ARGS, "--out", str(out),
                 *extra])


def jsonl(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def events(run):
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def run(parts, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("ftlogs") / "run"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli(parts, run, "--set", "train.log=tensorboard") == 0
    return run, err.getvalue()


def test_startup_line_has_train_s_format(run):
    run, err = run
    s = json.loads((run / "summary.json").read_text())
    lines = [ln for ln in err.splitlines() if " | " in ln and ln.endswith(f"| {run}")]
    assert len(lines) == 1, err
    # selfkd train: "<data>: N train / M test, K classes, <shape> | <model>: P parameters | <method> | <device>, T threads | RUN"
    m = re.fullmatch(r"(\S+): (\d+) train / (\d+) test, (\d+) classes, (\d+) tokens max \| (\S+): ([\d,]+) parameters "
                     r"\| (dlb\(.*\)) \| cpu, 1 thread \| (.+)", lines[0])
    assert m, lines[0]
    assert m.group(1) == s["data"] and m.group(6) == s["model"] and m.group(8) == s["method"]
    assert (int(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5))) == (18, 6, 3, 24)
    assert m.group(7) == f"{s['params']:,}" and m.group(9) == str(run)
    before = err.index(lines[0])
    assert before < err.index("step 5:") and before < err.index("epoch 1/2")  # before the first step


def test_metrics_csv_is_the_jsonl_with_ints_as_ints(run):
    run, _ = run
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    js = jsonl(run)
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["step"] for r in rows] == ["5", "10"]
    assert list(rows[0]) == [k for k, v in js[0].items() if not isinstance(v, dict)]  # test_reliability left out
    for r, j in zip(rows, js):
        for k, v in j.items():
            if isinstance(v, dict):
                continue
            assert (r[k] == str(v)) if isinstance(v, int) else (float(r[k]) == v), (k, r[k], v)  # full precision
    assert {"test_acc", "test_ece", "test_nll", "test_macro_f1", "train_loss"} <= set(rows[0])
    assert "test_top5" not in rows[0]  # 3 classes: top-5 is always 100, so it is not written


def test_tensorboard_events_read_back(run):
    run, err = run
    acc = events(run)
    tags = set(acc.Tags()["scalars"])
    assert {"step/loss", "step/ce", "step/kd", "step/lr", "step/grad_norm"} <= tags
    assert {"epoch/train_loss", "epoch/test_acc", "epoch/test_ece", "epoch/test_nll", "epoch/test_macro_f1",
            "epoch/epoch"} <= tags
    js = jsonl(run)
    for key in ("test_acc", "test_ece", "test_nll", "test_macro_f1", "train_loss"):
        got = acc.Scalars(f"epoch/{key}")
        assert [e.step for e in got] == [5, 10]
        assert [e.value for e in got] == pytest.approx([j[key] for j in js], rel=1e-6)
    assert [e.value for e in acc.Scalars("epoch/epoch")] == [1, 2]
    # one log point per epoch (log_every = 5 = steps per epoch): the window's mean loss is the epoch's mean loss
    loss = acc.Scalars("step/loss")
    assert [e.step for e in loss] == [5, 10]
    assert [e.value for e in loss] == pytest.approx([j["train_loss"] for j in js], rel=1e-5)
    printed = [float(x) for x in re.findall(r"step \d+: loss ([\d.]+)", err)]
    assert [e.value for e in loss] == pytest.approx(printed, abs=6e-5)  # what the log lines say (4 decimals)
    assert all(e.value > 0 for e in acc.Scalars("step/lr"))


def test_train_log_csv_writes_no_events_and_bad_value_is_one_line(parts, tmp_path, capsys):  # noqa: F811
    assert cli(parts, tmp_path / "csv", "--epochs", "1", "--set", "train.log=csv") == 0
    assert (tmp_path / "csv" / "metrics.csv").is_file() and not (tmp_path / "csv" / "tb").exists()
    capsys.readouterr()
    assert cli(parts, tmp_path / "bad", "--set", "train.log=wandb") == 2
    one_line_error(2, capsys.readouterr().err, "train.log")
    assert not (tmp_path / "bad").exists()


def _stop_after_log_at(monkeypatch, step):
    """A Ctrl-C right after the Trainer's log point at ``step`` (its events written, the checkpoint older)."""
    from selfkd.integrations import finetune

    on_log = finetune._Epochs.on_log

    def stop(self, args, state, control, logs=None, **kw):
        on_log(self, args, state, control, logs=logs, **kw)
        if logs and "loss" in logs and state.global_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune._Epochs, "on_log", stop)
    return lambda: monkeypatch.setattr(finetune._Epochs, "on_log", on_log)


def interrupted(parts, out, monkeypatch, *extra):  # noqa: F811
    """Stopped at step 8 of 10, after the log point at step 8; hf/checkpoint-5 is the last checkpoint. A log
    point at every step: the Trainer's logged loss is the mean since its last log point, and a resume starts a
    new window at the checkpoint, so with a log point there every window is the same as without the stop."""
    undo = _stop_after_log_at(monkeypatch, 8)
    assert cli(parts, out, "--set", "train.log_every=1", "--set", "train.log=tensorboard", *extra) == 130
    undo()
    assert (out / "hf" / "checkpoint-5").is_dir() and not (out / "summary.json").exists()


def test_resume_purges_the_events_after_the_checkpoint(parts, tmp_path, monkeypatch):  # noqa: F811
    ref = tmp_path / "ref"
    assert cli(parts, ref, "--set", "train.log_every=1", "--set", "train.log=tensorboard") == 0
    run = tmp_path / "run"
    interrupted(parts, run, monkeypatch)
    assert [e.step for e in events(run).Scalars("step/loss")] == list(range(1, 9))  # 6 to 8: after checkpoint-5
    assert main(["finetune", "--resume", str(run)]) == 0
    got, want = events(run), events(ref)
    for tag in ("step/loss", "step/kd", "step/lr", "epoch/test_acc", "epoch/train_loss"):
        steps = [e.step for e in got.Scalars(tag)]
        assert steps == [e.step for e in want.Scalars(tag)] and len(set(steps)) == len(steps), tag  # no step twice
        assert [e.value for e in got.Scalars(tag)] == pytest.approx([e.value for e in want.Scalars(tag)], rel=1e-6), tag
    assert [r["step"] for r in csv.DictReader((run / "metrics.csv").open())] == ["5", "10"]


def test_tensorboard_folder_that_is_a_file_is_one_line_before_training(parts, tmp_path, monkeypatch, capsys):  # noqa: F811
    run = tmp_path / "run"
    interrupted(parts, run, monkeypatch)
    shutil.rmtree(run / "tb")
    (run / "tb").write_text("mine")
    before = snapshot(run)
    capsys.readouterr()
    code = main(["finetune", "--resume", str(run)])
    err = capsys.readouterr().err
    one_line_error(code, err, f"TensorBoard folder {run / 'tb'}: {run / 'tb'} is a file, not a folder",
                   "train.log=tensorboard writes event files there")
    assert snapshot(run) == before


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="drops root's permission override with setpriv (a normal user is denied anyway)")
def test_read_only_tensorboard_folder_is_one_line_before_training(parts, tmp_path, monkeypatch):  # noqa: F811
    run = tmp_path / "run"
    interrupted(parts, run, monkeypatch)
    before = snapshot(run)
    os.chmod(run / "tb", 0o555)
    cases = {"tb": ["finetune", "--resume", str(run)]}
    try:
        res = subprocess.run([*DROP, sys.executable, "-c", NOBODY_SCRIPT, json.dumps(cases)], capture_output=True,
                             text=True, timeout=240)
    finally:
        os.chmod(run / "tb", 0o755)
    assert res.returncode == 0, res.stderr
    code, err = json.loads(res.stdout.strip().splitlines()[-1])["tb"]
    one_line_error(code, err, f"TensorBoard folder {run / 'tb'}: cannot write in", "permission denied",
                   "train.log=tensorboard writes event files there")
    assert snapshot(run) == before  # refused before the resume wrote anything
