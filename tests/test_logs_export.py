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


def test_metrics_csv_keeps_integers_as_integers(run):
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == ["1", "2"]  # not 1.0, 2.0
    for r, j in zip(rows, jsonl):
        for k, v in j.items():
            if isinstance(v, int) and not isinstance(v, bool):
                assert r[k] == str(v), k
            elif isinstance(v, float):
                assert "." in r[k] or "e" in r[k] or r[k] == "nan", (k, r[k])


def _readme_snippet(name: str) -> str:
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split(f"<!-- load:{name} -->\n```python\n", 1)[1]
    return block.split("```", 1)[0]


def test_export_formats_load_without_selfkd(run, tmp_path):
    """--format export (.pt2, dynamic batch), no torch.jit warnings from selfkd's own calls, and the README's
    loading lines run in a Python where selfkd cannot be imported."""
    import os
    import subprocess
    import sys
    import warnings

    import selfkd

    for fmt, name in (("export", "r8.pt2"), ("safetensors", "r8.safetensors"), ("torchscript", "r8.pt")):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / name)]) == 0
        assert not [w for w in said if "jit" in str(w.message)], [str(w.message) for w in said]
    model = selfkd.build_model("cnn_small", 10, 1)
    model.load_state_dict(ckpt.load(run / "best.pt")["model"])
    model.eval()
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    torch.save(x, tmp_path / "x.pt")
    site = os.path.dirname(os.path.dirname(torch.__file__))
    script = "\n".join([
        "import importlib.util, sys",
        f"sys.path.append({site!r})",
        "assert importlib.util.find_spec('selfkd') is None, 'selfkd is importable'",
        "import torch",
        "x = torch.load('x.pt')",
        _readme_snippet("export"), "torch.save(logits, 'export.out')",
        _readme_snippet("safetensors"), "torch.save((state, classes, mean, std), 'safetensors.out')",
        _readme_snippet("torchscript"), "torch.save(logits, 'torchscript.out')",
    ])
    res = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((run / "data.json").read_text())
    mean, std = (torch.tensor(info[k])[:, None, None] for k in ("mean", "std"))
    with torch.no_grad():
        want = model((x / 255 - mean) / std)
    assert torch.allclose(torch.load(tmp_path / "export.out"), want, atol=1e-5)
    assert torch.allclose(torch.load(tmp_path / "torchscript.out"), want, atol=1e-5)
    state, classes, m, s = torch.load(tmp_path / "safetensors.out")
    assert set(state) == set(model.state_dict()) and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert classes == info["classes"] and m == info["mean"] and s == info["std"]
    # the .pt2 takes any batch size (dynamic batch dimension)
    program = torch.export.load(str(tmp_path / "r8.pt2")).module()
    for n in (1, 7):
        z = torch.randn(n, 1, 8, 8)
        with torch.no_grad():
            assert torch.allclose(program(z), model(z), atol=1e-5)
