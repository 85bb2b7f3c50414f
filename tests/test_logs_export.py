"""metrics.csv, TensorBoard events read back, train.log, and `selfkd export` (safetensors, TorchScript)."""
import csv
import json

import pytest
import torch

from selfkd.cli import main
from selfkd.engine import checkpoint as ckpt

BASE = ["--data", "digits", "--model", "cnn_small", "--seed", "0", "--no-progress", "--set", "data.subset=200",
        "--set", "data.test_subset=100", "--batch-size", "50", "--set", "train.log_every=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("logs") / "run"
    assert main(["train", *BASE, "--method", "dlb", "--epochs", "2", "--out", str(run), "--set", "train.log=tensorboard"]) == 0
    return run


def test_metrics_csv_matches_jsonl(run):
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r, j in zip(rows, jsonl):
        for k in ("epoch", "train_loss", "train_kd", "test_acc", "test_ece", "lr", "images_per_s"):
            assert float(r[k]) == pytest.approx(j[k], rel=1e-12)
        assert "test_reliability" not in r


def test_tensorboard_events_read_back(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"step/loss", "step/ce", "step/kd", "step/lr", "step/images_per_s"} <= tags
    assert {"epoch/train_loss", "epoch/test_acc", "epoch/test_ece", "epoch/lr", "epoch/images_per_s"} <= tags
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc_events = acc.Scalars("epoch/test_acc")
    assert [e.step for e in acc_events] == [4, 8]  # 200 samples / 50 per step = 4 steps per epoch
    assert [e.value for e in acc_events] == pytest.approx([j["test_acc"] for j in jsonl], rel=1e-6)
    # steps 2 and 4 of each epoch (log_every=2); step/loss is the mean over the window's steps
    assert [e.step for e in acc.Scalars("step/loss")] == [2, 4, 6, 8]
    w = acc.Scalars("step/loss")
    assert (w[0].value + w[1].value) / 2 == pytest.approx(jsonl[0]["train_loss"], rel=1e-5)


def test_train_log_csv_writes_no_events_and_bad_value(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", *BASE, "--method", "ce", "--epochs", "1", "--out", str(run), "--set", "train.log=csv"]) == 0
    assert (run / "metrics.csv").is_file() and not (run / "tb").exists()
    assert main(["train", *BASE, "--epochs", "1", "--out", str(tmp_path / "x"), "--set", "train.log=wandb"]) == 2
    assert "train.log" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_export_safetensors_and_torchscript(run, tmp_path, capsys):
    from safetensors import safe_open

    import selfkd

    best = ckpt.load(run / "best.pt")
    out = tmp_path / "m.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(best["model"])
        assert all(torch.equal(f.get_tensor(k), best["model"][k]) for k in f.keys())
    assert meta["model"] == "cnn_small" and json.loads(meta["classes"]) == [str(i) for i in range(10)]
    assert json.loads(meta["image_size"]) == 8 and json.loads(meta["in_channels"]) == 1
    assert len(json.loads(meta["mean"])) == 1 and json.loads(meta["epoch"]) == best["epoch"]

    ts = tmp_path / "m.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(ts), "--weights", "last"]) == 0
    files = {"selfkd.json": ""}
    scripted = torch.jit.load(str(ts), _extra_files=files)
    assert json.loads(files["selfkd.json"])["weights"] == "last"
    model = selfkd.build_model("cnn_small", 10, 1)
    model.load_state_dict(ckpt.load(run / "checkpoint.pt")["model"])
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(scripted(x), model(x), atol=1e-6)
    # bad input: an existing --out is never overwritten, a non-run is named
    capsys.readouterr()
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "safetensors", "--out", str(tmp_path / "n")]) == 2
    assert "not a run directory" in capsys.readouterr().err
