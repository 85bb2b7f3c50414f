"""Metrics against hand computation."""
import math

import pytest
import torch

from selfkd.engine.metrics import classification_metrics, ece, reliability, topk_correct


def test_ece_and_reliability_by_hand():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct) with 3 classes
    def logits_for(p_top, k):
        rest = (1 - p_top) / 2
        z = [math.log(rest)] * 3
        z[k] = math.log(p_top)
        return z

    logits = torch.tensor([logits_for(0.9, 0), logits_for(0.9, 1), logits_for(0.6, 2)])
    target = torch.tensor([0, 0, 2])
    # bins of width 1/15: 0.9 -> bin 13 ((13/15, 14/15]), 0.6 -> bin 8 ((8/15, 9/15])
    expected = (2 / 3) * abs(0.5 - 0.9) + (1 / 3) * abs(1.0 - 0.6)
    assert ece(logits, target) == pytest.approx(expected, rel=1e-5)
    r = reliability(logits, target)
    assert r["count"][13] == 2 and r["count"][8] == 1 and sum(r["count"]) == 3
    assert r["acc"][13] == pytest.approx(0.5) and r["conf"][13] == pytest.approx(0.9, rel=1e-5)
    assert r["acc"][8] == pytest.approx(1.0) and r["conf"][8] == pytest.approx(0.6, rel=1e-5)


def test_topk_nll_and_small_class_counts():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    target = torch.tensor([1, 3])
    assert topk_correct(logits, target, 1) == 1
    assert topk_correct(logits, target, 2) == 2
    assert topk_correct(logits[:, :2], torch.tensor([1, 0]), 5) == 2  # k capped at the class count
    m = classification_metrics(logits, target)
    lse = math.log(sum(math.exp(v) for v in (3, 2, 1, 0)))
    assert m["nll"] == pytest.approx(((lse - 2) + (lse - 3)) / 2, rel=1e-6)
    assert m["acc"] == 50.0 and "top5" not in m  # 4 classes: every label is in the top 5, so no top-5


def test_top5_only_with_more_than_5_classes():
    # 6 classes: the label of row 0 is 6th (outside the top 5), of row 1 5th (inside)
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    m = classification_metrics(logits, torch.tensor([5, 4]))
    assert m["top5"] == 50.0 and m["acc"] == 0.0
    assert "top5" not in classification_metrics(logits[:, :5], torch.tensor([4, 3]))


def test_train_on_2_classes_has_no_top5_anywhere(tmp_path, capsys):
    import json

    from PIL import Image

    from selfkd.cli import main
    from selfkd.engine.progress import _fmt

    data = tmp_path / "data"
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (data / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (40 * i, 80 if c == "cat" else 200, 120)).save(data / split / c / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", "--data", "imagefolder", "--data-dir", str(data), "--set", f"data.cache_dir={tmp_path / 'c'}",
                 "--model", "cnn_small", "--epochs", "1", "--batch-size", "4", "--no-progress", "--set", "train.log=csv",
                 "--out", str(run)]) == 0
    err = capsys.readouterr().err  # the epoch lines
    assert "test acc" in err and "top5" not in err
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert "test_acc" in row and "test_top5" not in row
    assert "last_top5" not in json.loads((run / "summary.json").read_text())
    assert "test_top5" not in (run / "metrics.csv").read_text()
    assert main(["report", str(run)]) == 0
    base = {"train_loss": 1.0, "train_acc": 50.0, "test_acc": 60.0, "test_nll": 0.5, "test_ece": 0.1,
            "images_per_s": 10.0, "epoch_seconds": 1.0}
    assert "top5" not in _fmt(base) and "top5 70.00" in _fmt({**base, "test_top5": 70.0})
