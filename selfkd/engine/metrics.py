"""Evaluation metrics: top-k accuracy, NLL and expected calibration error."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_hits(logits: Tensor, target: Tensor, k: int) -> Tensor:
    """Per row (bool): whether its label is among the k highest logits (k is capped at the class count)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == target[:, None]).any(dim=1)


def topk_correct(logits: Tensor, target: Tensor, k: int) -> int:
    """Number of rows whose label is among the k highest logits (k is capped at the class count)."""
    return int(topk_hits(logits, target, k).sum())


def nll(logits: Tensor, target: Tensor) -> float:
    """Mean negative log-likelihood of the labels (cross-entropy at T=1)."""
    return float(F.cross_entropy(logits.float(), target))


def _bins(logits: Tensor, target: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per confidence bin: count, sum of confidences, sum of correct predictions (float64)."""
    probs = logits.float().softmax(dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == target).double()
    idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(correct))
    sum_conf = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, conf.double())
    sum_acc = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, correct)
    return count, sum_conf, sum_acc


def ece(logits: Tensor, target: Tensor, bins: int = 15) -> float:
    """Expected calibration error (Guo et al., 2017) over equal-width confidence bins.

    ``ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|``; bin b holds confidences in ``(b/bins, (b+1)/bins]``.
    """
    count, sum_conf, sum_acc = _bins(logits, target, bins)
    return float((sum_acc - sum_conf).abs().sum() / len(target))


def reliability(logits: Tensor, target: Tensor, bins: int = 15) -> dict[str, list[float] | int]:
    """The data of a reliability diagram: per bin, the sample count, mean confidence and accuracy
    (0 where a bin is empty). ``Σ count/N · |acc − conf|`` is the ECE."""
    count, sum_conf, sum_acc = _bins(logits, target, bins)
    safe = count.clamp_min(1)
    return {"bins": bins, "count": [int(c) for c in count], "conf": (sum_conf / safe).tolist(),
            "acc": (sum_acc / safe).tolist()}


TOPK = 5


def classification_metrics(logits: Tensor, target: Tensor, bins: int = 15,
                           top1: Tensor | None = None) -> dict[str, float]:
    """``acc`` and ``top5`` in percent, ``nll`` in nats per sample, ``ece`` a fraction in [0, 1]. ``top5`` only
    with more than 5 classes: with 5 or fewer every label is among the top 5 and it would always be 100.
    ``top1``: the rows' ``topk_hits(logits, target, 1)`` when the caller keeps them (``acc`` is their mean)."""
    n = len(target)
    hits = topk_hits(logits, target, 1) if top1 is None else top1
    out = {"acc": 100.0 * int(hits.sum()) / n}
    if logits.shape[1] > TOPK:
        out[f"top{TOPK}"] = 100.0 * topk_correct(logits, target, TOPK) / n
    out["nll"] = nll(logits, target)
    out["ece"] = ece(logits, target, bins)
    return out


def macro_f1(logits: Tensor, target: Tensor, num_classes: int | None = None) -> float:
    """Macro-averaged F1 in percent: ``100 · mean_k 2·TP_k / (2·TP_k + FP_k + FN_k)`` over the classes
    that occur among the labels or the predictions (scikit-learn's ``f1_score(average="macro")``)."""
    k = num_classes or logits.shape[1]
    pred = logits.argmax(dim=1)
    tp = torch.bincount(target[pred == target], minlength=k).double()
    n_pred = torch.bincount(pred, minlength=k).double()
    n_true = torch.bincount(target, minlength=k).double()
    seen = (n_pred + n_true) > 0
    f1 = 2 * tp[seen] / (n_pred[seen] + n_true[seen])
    return 100.0 * float(f1.mean())
