"""Pure, device-agnostic loss functions. The T² factor lives here and nowhere else.

Every function upcasts to float32 (logits may arrive in bfloat16 under autocast) and reduces
with ``batchmean``: a sum over classes, a mean over rows. Teachers are always detached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, mean over rows.

    The T² factor keeps the gradient scale of the soft term independent of T (Hinton et al., 2015).
    Gradients flow into ``student`` only. Zero rows give zero (not NaN).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"kd_kl: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    if student.shape[0] == 0:
        return student.float().sum() * 0.0
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=1)
    log_t = F.log_softmax(teacher.detach().float() / t, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (t * t)


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Hard-label cross-entropy, mean over rows, in float32; ``label_smoothing=ε`` targets
    ``(1−ε)·onehot + ε/K`` (PyTorch's form)."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """``-Σ_k q_k log softmax(z)_k``, mean over rows; ``target_probs`` is detached."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(target_probs.detach().float() * log_p).sum(dim=1).mean()
