"""Pure, device-agnostic loss functions. The T² factor lives here and nowhere else.

Every function upcasts to float32 (logits may arrive in bfloat16 under autocast). The class
dimension is the last one:

* ``[B, K]`` logits (image or sequence classification) reduce with ``batchmean``: a sum over
  classes, a mean over rows;
* ``[B, T, V]`` logits (token classification, language modelling) with ``[B, T]`` labels reduce
  **per token**: a sum over the vocabulary, a mean over the tokens that count, i.e. those whose
  label is not :data:`IGNORE` (-100, the Hugging Face convention) or that ``mask`` selects. A batch
  with no such token gives 0 (not NaN). Within one call every token weighs the same, wherever its row
  is and however long that row is; over the micro-batches of an accumulation window or over ranks such
  means weigh tokens unequally, so ``SelfKDTrainer`` rescales them to Hugging Face's token-level mean
  (one count over the window and the ranks).

Mixed rows (mixup/CutMix, a :class:`~selfkd.data.mixing.Mix` or ``MixBlocks`` from the data layer) get
their targets here too: ``cross_entropy(logits, y, mix=mix)`` is the one call for mixed and unmixed
hard labels, :func:`mix_targets` the soft targets, :func:`mixed_log_probs` a mixture of two teachers.

Teachers are always detached.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.mixing import Mix, MixBlocks, mix_rows

#: the label of a position that gets no loss (padding, prompt tokens): PyTorch's and Hugging Face's -100
IGNORE = -100


def _tokens(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``[..., V]`` -> ``[N, V]`` rows, and the mask flattened alike (None: every row counts)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows, None if mask is None else mask.reshape(-1).to(rows.device)


def _masked_mean(per_row: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return per_row.sum() / max(per_row.shape[0], 1)
    w = mask.to(per_row.dtype)
    return (per_row * w).sum() / w.sum().clamp_min(1.0)


def _check_rows(name: str, student: Tensor, mask: Tensor | None, weight: Tensor | None) -> None:
    """``mask`` and ``weight`` of a KD loss, when given, have one value per row (token) of ``student``."""
    rows = tuple(student.shape[:-1])
    for what, x in (("mask", mask), ("weight", weight)):
        if x is not None and tuple(x.shape) != rows:
            raise ValueError(f"{name}: {what} {tuple(x.shape)} must have the shape {rows}")


def _kl_mean(log_s: Tensor, log_t: Tensor, fused: bool, weight: Tensor | None, mask: Tensor | None,
             t: float | Tensor) -> Tensor:
    """``T² · KL(t ‖ s)`` of ``[N, V]`` log-probabilities, reduced as the KD losses do: one fused batchmean
    (``fused``: image rows, no mask or weight), else a (weighted) mean over the rows ``mask`` keeps."""
    if fused:
        return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (t * t)
    per_token = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=1)
    if weight is not None:
        per_token = per_token * weight.detach().reshape(-1).to(per_token)
    return _masked_mean(per_token, mask) * (t * t)


def kd_kl(student: Tensor, teacher: Tensor, temperature: float | Tensor, mask: Tensor | None = None,
          weight: Tensor | None = None) -> Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over the last dimension, mean over rows
    (``[B, K]``) or over the tokens that ``mask`` (``[B, T]`` bool) selects (``[B, T, V]``; no mask:
    every token). ``weight`` (shape ``student.shape[:-1]``, detached) multiplies each row's (token's)
    term before that same mean: ``(1/N) Σ_i w_i · T²·KL_i`` (not renormalised by ``Σ w``).
    ``temperature`` may be a 0-dim tensor (a schedule's value, kept on the device).

    The T² factor keeps the gradient scale of the soft term independent of T (Hinton et al., 2015).
    Gradients flow into ``student`` only. No rows (or no selected token) give zero (not NaN).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"kd_kl: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    _check_rows("kd_kl", student, mask, weight)
    if student.shape[0] == 0:
        return student.float().sum() * 0.0
    t = temperature
    s, m = _tokens(student, mask)
    log_s = F.log_softmax(s.float() / t, dim=1)
    log_t = F.log_softmax(teacher.detach().reshape(s.shape).float() / t, dim=1)
    # the image path (no mask, no weight): one fused batchmean
    return _kl_mean(log_s, log_t, student.dim() == 2 and mask is None and weight is None, weight, m, t)


def topk_logits(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """A teacher's ``[..., V]`` logits compressed for :func:`kd_kl_topk`: ``(values, index, tail)``, the ``k``
    largest logits per row and their vocabulary indices (``[..., k]``, int64, in vocabulary order: ``k = V``
    keeps the logits exactly as they were) and the tail's log-mass at temperature ``T``,
    ``log Σ_{j ∉ top-k} exp(z_j/T)`` (``[...]`` float32; None when ``k = V``: no tail). Ties at the k-th
    value keep the indices ``torch.topk`` picks."""
    z = logits.detach().float()
    v = z.shape[-1]
    if not 0 < k <= v:
        raise ValueError(f"topk_logits: k={k} must be in 1..{v} (the last dimension)")
    index = torch.topk(z, k, dim=-1, sorted=False).indices.sort(dim=-1).values
    values = z.gather(-1, index)
    if k == v:
        return values, index, None
    rest = (z / temperature).scatter(-1, index, -math.inf)
    return values, index, torch.logsumexp(rest, dim=-1)


def kd_kl_topk(student: Tensor, values: Tensor, index: Tensor, tail: Tensor | None, temperature: float | Tensor,
               mask: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
    """:func:`kd_kl` against a top-K teacher (:func:`topk_logits`): ``T² · KL`` over ``K+1`` buckets, the
    teacher's K kept tokens and one bucket for the rest of the vocabulary,

    ``KL_{K+1} = Σ_{k∈S} p_k log(p_k/q_k) + p_tail log(p_tail/q_tail)``, with ``p_k = exp(z_k/T − n)``,
    ``p_tail = exp(tail − n)``, ``n = logaddexp(logsumexp(z_S/T), tail)`` (the teacher's full
    normaliser: the kept probabilities are not renormalised), and the student's ``q = softmax(s/T)`` over
    the whole vocabulary, ``q_tail = Σ_{j∉S} q_j``. ``tail`` must be the tail's log-mass at this ``T``.

    By the chain rule of KL, ``KL = KL_{K+1} + p_tail · KL(p(·|tail) ‖ q(·|tail))``: the bucket form is the
    exact KL of the two distributions coarsened to {each kept token, the rest}, a lower bound of the full
    KL, equal to it when ``K = V`` (``tail`` None: then this *is* :func:`kd_kl`, value and gradient bit for
    bit). Unlike renormalised top-K caching, which biases the teacher's probabilities upwards (Anshumann
    et al. 2025, "Sparse Logit Sampling", arXiv 2503.16870), the tail keeps its mass and the student is
    pulled to put the teacher's tail mass, not zero, outside the kept tokens; splitting the teacher into
    its top-K and its tail follows Dasgupta et al. 2026 ("Don't Ignore the Tail", arXiv 2602.20816); the
    single tail bucket is our form. ``mask``, ``weight``, the reductions and zero rows are :func:`kd_kl`'s.
    """
    if values.shape != index.shape or tuple(values.shape[:-1]) != tuple(student.shape[:-1]):
        raise ValueError(f"kd_kl_topk: values {tuple(values.shape)} and index {tuple(index.shape)} must be "
                         f"{tuple(student.shape[:-1])} x K")
    if (tail is None) != (values.shape[-1] == student.shape[-1]):
        raise ValueError(f"kd_kl_topk: a tail is needed exactly when K={values.shape[-1]} < V={student.shape[-1]}")
    _check_rows("kd_kl_topk", student, mask, weight)
    if student.shape[0] == 0:
        return student.float().sum() * 0.0
    t = temperature
    s, m = _tokens(student, mask)
    idx = index.reshape(s.shape[0], -1).to(device=s.device, dtype=torch.int64)
    log_q = F.log_softmax(s.float() / t, dim=1)
    a = values.detach().reshape(idx.shape).to(s.device).float() / t
    if tail is None:  # K = V: the K+1-th bucket is empty
        log_p, log_b = F.log_softmax(a, dim=1), log_q.gather(1, idx)
    else:
        rest = tail.detach().reshape(-1, 1).to(s.device).float()
        n = torch.logaddexp(torch.logsumexp(a, dim=1, keepdim=True), rest)
        log_p = torch.cat([a - n, rest - n], dim=1)
        q_rest = torch.logsumexp(log_q.scatter(1, idx, -math.inf), dim=1, keepdim=True)  # never all -inf: K < V
        log_b = torch.cat([log_q.gather(1, idx), q_rest], dim=1)
    return _kl_mean(log_b, log_p, student.dim() == 2 and mask is None and weight is None, weight, m, t)


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0, *,
                  mix: Mix | MixBlocks | None = None) -> Tensor:
    """Hard-label cross-entropy in float32, mean over rows (``[B, K]``) or over the non-ignored tokens
    (``[B, T, V]`` with ``[B, T]`` labels, -100 ignored; none left: 0). ``label_smoothing=ε`` targets
    ``(1−ε)·onehot + ε/K`` (PyTorch's form). ``mix`` (how the rows were mixed; ``[B, K]`` only):
    ``lam * CE(logits, y) + (1 - lam) * CE(logits, y[mix.index])``, each CE a mean over rows; with
    :class:`MixBlocks` (a ``lam`` per block) the same per row, ``mean_i [lam_i CE_i(y_i) + (1 - lam_i)
    CE_i(y[index_i])]``; ``label_smoothing`` on each of the two CE terms. None: no mixing."""
    if mix is not None:
        if logits.dim() != 2:
            raise ValueError(f"cross_entropy: mixed targets need [B, K] logits (got {tuple(logits.shape)})")
        return _mixed(logits.float(), target, mix, label_smoothing)
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    z, y = logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1)
    total = F.cross_entropy(z, y, ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="sum")
    return total / (y != IGNORE).sum().clamp_min(1).to(total.dtype)


def _mixed(logits: Tensor, y: Tensor, mix: Mix | MixBlocks, label_smoothing: float) -> Tensor:
    if isinstance(mix, Mix):
        ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if mix.lam == 1.0:
            return ce
        other = y.index_select(0, mix.index.to(y.device))
        return mix.lam * ce + (1.0 - mix.lam) * F.cross_entropy(logits, other, label_smoothing=label_smoothing)
    index, lam = mix_rows(mix, y.shape[0], y.device)
    own = F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
    other = F.cross_entropy(logits, y.index_select(0, index), reduction="none", label_smoothing=label_smoothing)
    return (lam * own + (1.0 - lam) * other).mean()


def one_hot(y: Tensor, num_classes: int) -> Tensor:
    """float32 ``[B, K]`` one-hot rows, by a scatter: unlike ``F.one_hot`` on the CPU it reads no value back
    to range-check (labels are checked when the data set is loaded), so it is the same op on every device."""
    return torch.zeros((y.shape[0], num_classes), dtype=torch.float32, device=y.device).scatter_(1, y[:, None], 1.0)


def mix_targets(y: Tensor, num_classes: int, mix: Mix | MixBlocks | None = None) -> Tensor:
    """Soft targets ``lam * onehot(y) + (1 - lam) * onehot(y[mix.index])``, float32 ``[B, K]``
    (``mix=None``: ``onehot(y)``)."""
    oh = one_hot(y, num_classes)
    if mix is None:
        return oh
    if isinstance(mix, Mix):
        return oh.mul(mix.lam).add_(oh.index_select(0, mix.index.to(y.device)), alpha=1.0 - mix.lam)
    index, lam = mix_rows(mix, y.shape[0], y.device)
    return oh * lam[:, None] + oh.index_select(0, index) * (1.0 - lam[:, None])


def mixed_log_probs(log_own: Tensor, log_other: Tensor, lam: Tensor | float) -> Tensor:
    """``log(lam * exp(log_own) + (1 - lam) * exp(log_other))`` row-wise (``lam`` a float or a ``[B]``
    tensor), in log space: the log of a mixture of two distributions (``lam`` 0 or 1 are exact)."""
    lam_t = torch.as_tensor(lam, dtype=log_own.dtype, device=log_own.device)
    if lam_t.dim() == 1:
        lam_t = lam_t[:, None]
    a = torch.where(lam_t > 0, log_own + torch.log(lam_t), torch.full_like(log_own, -math.inf))
    b = torch.where(lam_t < 1, log_other + torch.log1p(-lam_t), torch.full_like(log_other, -math.inf))
    return torch.logaddexp(a, b)


def soft_cross_entropy(logits: Tensor, target_probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """``-Σ_k q_k log softmax(z)_k`` over the last dimension, mean over rows (or the tokens ``mask``
    selects); ``target_probs`` is detached."""
    if logits.dim() == 2 and mask is None:
        log_p = F.log_softmax(logits.float(), dim=1)
        return -(target_probs.detach().float() * log_p).sum(dim=1).mean()
    z, m = _tokens(logits, mask)
    log_p = F.log_softmax(z.float(), dim=1)
    per_token = -(target_probs.detach().reshape(z.shape).float() * log_p).sum(dim=1)
    return _masked_mean(per_token, m)


def token_mask(labels: Tensor) -> Tensor:
    """Positions that count: label not -100."""
    return labels != IGNORE


def align_tokens(cached: Tensor, cached_labels: Tensor, labels: Tensor, side: str = "right") -> tuple[Tensor, Tensor]:
    """Cached ``[R, T0, V]`` logits re-laid at the positions of the current ``[R, T]`` labels, for rows that
    a collator padded to another length than when they were cached (dynamic padding).

    ``side="right"`` (padding after the tokens, Hugging Face's default) aligns the first positions;
    ``"left"`` aligns the last. Positions the cache lacks get logits 0 (they are padding: their label
    is -100). Returns ``(teacher [R, T, V], same)``: ``same`` is a 0-dim bool tensor, true when every
    cached token lands on a position with the same label and every current token has a cached one
    (the caller raises if not; no host sync here).
    """
    t0, t = cached.shape[1], labels.shape[1]
    width = max(t0, t)

    def pad(x: Tensor, n: int, value: float) -> Tensor:  # to ``width`` positions along dim 1
        extra = width - n
        if extra == 0:
            return x
        spec = (0, extra) if side == "right" else (extra, 0)
        return F.pad(x, ((0, 0) if x.dim() == 3 else ()) + spec, value=value)

    same = (pad(cached_labels.to(labels.device), t0, IGNORE) == pad(labels, t, IGNORE)).all()
    z = pad(cached, t0, 0.0)
    z = z[:, :t] if side == "right" else z[:, width - t:]
    return z, same
