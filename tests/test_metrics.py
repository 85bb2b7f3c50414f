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
    assert m["acc"] == 50.0 and m["top5"] == 100.0
