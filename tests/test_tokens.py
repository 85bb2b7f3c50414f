"""Token logits [B, T, V] with labels [B, T] (-100 ignored): the KD losses and DLB against hand computation,
masking, dynamic padding; [B, K] unchanged."""
import math

import pytest
import torch

import selfkd
from selfkd.errors import TrainingError
from selfkd.methods.losses import IGNORE, align_tokens, cross_entropy, kd_kl, soft_cross_entropy

from handmath import hand_ce, hand_kl, softmax


def rows(x):
    return [[float(v) for v in r] for r in x]


def test_kd_kl_per_token_mean_over_unmasked_tokens():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    want = sum(hand_kl(t[b, i].tolist(), s[b, i].tolist(), 2.0) for b, i in [(0, 0), (0, 1), (1, 0)]) / 3 * 4.0
    assert kd_kl(s, t, 2.0, mask=mask).item() == pytest.approx(want, rel=1e-5)
    # no mask: every token; [B, K] keeps batchmean
    every = sum(hand_kl(t[b, i].tolist(), s[b, i].tolist(), 2.0) for b in range(2) for i in range(3)) / 6 * 4.0
    assert kd_kl(s, t, 2.0).item() == pytest.approx(every, rel=1e-5)
    flat = kd_kl(s[0], t[0], 2.0).item()
    assert flat == pytest.approx(sum(hand_kl(t[0, i].tolist(), s[0, i].tolist(), 2.0) for i in range(3)) / 3 * 4, rel=1e-5)
    # nothing selected: zero with a gradient path, not NaN
    s.requires_grad_(True)
    zero = kd_kl(s, t, 2.0, mask=torch.zeros(2, 3, dtype=torch.bool))
    zero.backward()
    assert zero.item() == 0.0 and torch.all(s.grad == 0)


def test_cross_entropy_ignores_minus_100_and_counts_tokens():
    z = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]], [[2.0, -1.0, 0.0], [0.3, 0.2, 0.1]]])
    y = torch.tensor([[1, IGNORE], [0, 2]])
    want = (hand_ce([1.0, 2.0, 0.5], 1) + hand_ce([2.0, -1.0, 0.0], 0) + hand_ce([0.3, 0.2, 0.1], 2)) / 3
    assert cross_entropy(z, y).item() == pytest.approx(want, rel=1e-6)
    assert cross_entropy(z, torch.full_like(y, IGNORE)).item() == 0.0
    # soft CE with a mask: the same per-token mean
    q = torch.softmax(torch.arange(12.0).view(2, 2, 3), -1)
    keep = y != IGNORE
    hand = sum(-sum(qk * math.log(pk) for qk, pk in zip(q[b, i].tolist(), softmax(z[b, i].tolist())))
               for b, i in [(0, 0), (1, 0), (1, 1)]) / 3
    assert soft_cross_entropy(z, q, mask=keep).item() == pytest.approx(hand, rel=1e-6)


def test_align_tokens_by_position_both_sides():
    z = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    y = torch.tensor([[5, 6, IGNORE], [7, IGNORE, IGNORE]])
    # longer now (right padding): cached positions first, zeros after
    t, same = align_tokens(z, y, torch.tensor([[5, 6, IGNORE, IGNORE], [7, IGNORE, IGNORE, IGNORE]]))
    assert bool(same) and t.shape == (2, 4, 2) and torch.equal(t[:, :3], z) and torch.all(t[:, 3] == 0)
    # shorter now: the dropped position held padding only
    t, same = align_tokens(z, y, torch.tensor([[5, 6], [7, IGNORE]]))
    assert bool(same) and torch.equal(t, z[:, :2])
    # a token that would be dropped or moved: not the same
    assert not bool(align_tokens(z, y, torch.tensor([[5], [7]]))[1])
    assert not bool(align_tokens(z, y, torch.tensor([[IGNORE, 5, 6], [7, IGNORE, IGNORE]]))[1])
    # left padding aligns the ends
    yl = torch.tensor([[IGNORE, 5, 6], [IGNORE, IGNORE, 7]])
    t, same = align_tokens(z, yl, torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, IGNORE, IGNORE, 7]]), side="left")
    assert bool(same) and torch.equal(t[:, 1:], z) and torch.all(t[:, 0] == 0)


def _step(dlb, sampler_iter, logits_fn, labels_fn):
    idx = next(sampler_iter)
    z = logits_fn(idx).requires_grad_(True)
    out = dlb.loss(z, labels_fn(idx), index=torch.tensor(idx))
    return idx, z, out


def test_dlb_on_tokens_matches_hand_computation_with_padding_change():
    """Step 1 caches the new rows padded to 3 tokens; step 2 repeats them padded to 4 (dynamic padding)."""
    V, T = 3.0, 2.0
    lengths = {0: 2, 1: 3, 2: 1, 3: 2}  # real tokens per sample
    g = torch.Generator().manual_seed(1)
    table = {i: torch.randn(4, 3, generator=g) for i in range(4)}  # the logits a 'model' gives sample i

    def labels(idx, width):
        y = torch.full((len(idx), width), IGNORE)
        for r, i in enumerate(idx):
            y[r, :lengths[i]] = torch.tensor([(i + p) % 3 for p in range(lengths[i])])
        return y

    dlb = selfkd.DLB(temperature=T, alpha=0.5)
    it = iter(dlb.batch_sampler(range(4), 2))
    idx1, z1, out1 = _step(dlb, it, lambda idx: torch.stack([table[i][:3] for i in idx]), lambda idx: labels(idx, 3))
    assert out1.parts["kd"].item() == 0.0
    # step 1's CE: mean over its 2 + 3 real tokens
    ce1 = sum(hand_ce(table[i][p].tolist(), (i + p) % 3) for i in idx1 for p in range(lengths[i])) / 5
    assert out1.parts["ce"].item() == pytest.approx(ce1, rel=1e-6)
    cached = {i: table[i][:3].clone() for i in idx1}
    for i in table:
        table[i] = table[i] + 0.3 * (i + 1)  # the 'model' changed after the update

    idx2, z2, out2 = _step(dlb, it, lambda idx: torch.stack([table[i] for i in idx]), lambda idx: labels(idx, 4))
    assert idx2[:2] == idx1
    toks = [(r, i, p) for r, i in enumerate(idx2[:2]) for p in range(lengths[i])]
    kd = sum(hand_kl(cached[i][p].tolist(), table[i][p].tolist(), T) for _, i, p in toks) / len(toks) * T * T
    ce = sum(hand_ce(table[i][p].tolist(), (i + p) % 3) for i in idx2 for p in range(lengths[i])) / sum(lengths[i] for i in idx2)
    assert out2.parts["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out2.parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out2.loss.item() == pytest.approx(ce + 0.5 * kd, rel=1e-5)
    out2.loss.backward()
    # padded positions of every row get no gradient
    pad = labels(idx2, 4) == IGNORE
    assert torch.all(z2.grad[pad] == 0) and torch.all(z2.grad[~pad].abs().sum(-1) > 0)
    del V


def test_dlb_tokens_relabelled_or_moved_row_is_an_error():
    dlb = selfkd.DLB()
    it = iter(dlb.batch_sampler(range(4), 2))
    idx = next(it)
    y = torch.tensor([[0, 1, IGNORE], [2, IGNORE, IGNORE]])
    dlb.loss(torch.zeros(2, 3, 3), y)
    next(it)
    moved = torch.tensor([[IGNORE, 0, 1], [2, IGNORE, IGNORE], [0, 0, 0], [1, 1, 1]])  # left-padded now
    with pytest.raises(TrainingError, match="padding_side='right'"):
        dlb.loss(torch.zeros(4, 3, 3), moved)
    del idx


def test_dlb_tokens_confidence_schedule_over_real_tokens():
    dlb = selfkd.DLB(schedule="confidence", alpha=1.0, temperature=2.0)
    it = iter(dlb.batch_sampler(range(4), 2))
    next(it)
    z = torch.tensor([[[2.0, 0.0], [0.0, 5.0]], [[0.0, 1.0], [9.0, 9.0]]])
    y = torch.tensor([[0, IGNORE], [1, IGNORE]])
    dlb.loss(z, y)
    next(it)
    out = dlb.loss(torch.zeros(4, 2, 2), torch.cat([y, y]))
    c = (softmax([2.0, 0.0])[0] + softmax([0.0, 1.0])[1]) / 2
    assert out.parts["alpha"].item() == pytest.approx(c, rel=1e-6)
    assert out.parts["temperature"].item() == pytest.approx(2.0 * (2 - c), rel=1e-6)


def test_dlb_rejects_mixing_and_bad_shapes_on_tokens():
    from selfkd.data.mixing import Mix

    dlb = selfkd.DLB()
    next(iter(dlb.batch_sampler(range(4), 2)))
    with pytest.raises(TrainingError, match="not defined for token logits"):
        dlb.loss(torch.zeros(2, 3, 3), torch.zeros(2, 3, dtype=torch.long), mix=Mix(torch.arange(2), 0.5))
    with pytest.raises(TrainingError, match=r"labels \[B, T\]"):
        dlb.loss(torch.zeros(2, 3, 3), torch.zeros(2, dtype=torch.long))
