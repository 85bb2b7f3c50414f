"""Targets of mixed (mixup/CutMix) samples, for every method: remix, each method's rule against a hand
computation, DLB's re-applied mixing of the repeated rows (and its resume), CS-KD's partner mixing,
and every mixing-capable method trained end to end through the reference trainer."""
import json
import math

import pytest
import torch
from torch import nn

import selfkd.methods  # noqa: F401  (registers every method)
from selfkd.data.mixing import Mix, MixBlocks, build_mixer, cutmix, mix_from_state, mix_rows, mix_state, mixup, remix
from selfkd.engine import checkpoint as ckpt
from selfkd.engine.config import build_config
from selfkd.engine.trainer import TIMING_KEYS
from selfkd.engine.stages import train_run
from selfkd.errors import ConfigError, DataError, TrainingError
from selfkd.methods import Batch, Method, available_methods, build_method, method_class
from selfkd.methods.byot import byot_loss
from selfkd.methods.losses import cross_entropy

# ==================================================================================================
# plain-math helpers (independent of the implementation)
# ==================================================================================================


def lse(row):
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def log_softmax(row, t=1.0):
    r = [v / t for v in row]
    s = lse(r)
    return [v - s for v in r]


def softmax(row, t=1.0):
    return [math.exp(v) for v in log_softmax(row, t)]


def ce(row, k):
    return -log_softmax(row)[k]


def kl(p, student_row, t=1.0):
    """KL(p ‖ softmax(student_row / t))."""
    ls = log_softmax(student_row, t)
    return sum(pi * (math.log(pi) - li) for pi, li in zip(p, ls) if pi > 0)


def soft_ce(q, row):
    return -sum(qi * li for qi, li in zip(q, log_softmax(row)))


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def onehot(y, k):
    return [1.0 if c == y else 0.0 for c in range(k)]


def blend(lam, a, b):
    return [lam * u + (1 - lam) * v for u, v in zip(a, b)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


Z = [[2.0, 0.5, -1.0, 0.3], [0.0, 1.0, 3.0, -0.5], [1.5, -0.2, 0.4, 2.2], [-1.0, 0.8, 0.1, 0.6]]
Y = [0, 2, 3, 1]
IDX = [2, 0, 3, 1]  # every row mixed with another row of another label
LAM = 0.3
K = 4


def fixed(z=Z):
    logits = torch.tensor(z, requires_grad=True)
    return logits, torch.tensor(Y), Mix(index=torch.tensor(IDX), lam=LAM)


def mixed_ce(z=Z, y=Y, idx=IDX, lam=LAM):
    return mean(lam * ce(z[i], y[i]) + (1 - lam) * ce(z[i], y[idx[i]]) for i in range(len(z)))


# ==================================================================================================
# mixing.py: Mix, remix, MixBlocks
# ==================================================================================================


@pytest.mark.parametrize("fn", [mixup, cutmix])
def test_remix_reproduces_the_mixer_and_applies_to_another_batch(fn):
    for seed in range(12):
        x = torch.randn(6, 3, 9, 11, generator=gen(100 + seed))
        mixed, mix = fn(x, gen(seed))
        assert torch.equal(remix(x, mix), mixed)
        x2 = torch.randn(6, 3, 9, 11, generator=gen(200 + seed))
        out = remix(x2, mix)
        if fn is mixup:
            assert mix.kind == "mixup" and mix.box is None
            assert torch.allclose(out, mix.lam * x2 + (1 - mix.lam) * x2[mix.index], atol=1e-6)
        else:
            y0, y1, x0, x1 = mix.box
            assert mix.kind == "cutmix"
            assert 1 - (y1 - y0) * (x1 - x0) / (9 * 11) == pytest.approx(mix.lam, abs=1e-12)
            inside = torch.zeros(9, 11, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert torch.equal(out[:, :, inside], x2[mix.index][:, :, inside])
            assert torch.equal(out[:, :, ~inside], x2[:, :, ~inside])


def test_remix_none_kind_and_errors():
    x = torch.randn(4, 1, 5, 5, generator=gen(1))
    out, mix = cutmix(x, gen(0), prob=0.0)
    assert mix.kind == "none" and remix(x, mix) is x
    out, mix = build_mixer("none")(x, gen(0))
    assert mix.kind == "none" and remix(x, mix) is x
    with pytest.raises(DataError):
        remix(x[:3], mix)
    with pytest.raises(ConfigError):
        Mix(torch.arange(4), 0.5, kind="cutout")
    with pytest.raises(ConfigError):
        Mix(torch.arange(4), 0.5, kind="cutmix")  # no box
    with pytest.raises(ConfigError):
        Mix(torch.arange(4), 0.5, kind="mixup", box=(0, 1, 0, 1))
    assert Mix(torch.arange(2), 0.4).kind == "mixup"  # a hand-built Mix(index, lam) is a mixup


def test_mix_state_round_trip(tmp_path):
    _, mix = cutmix(torch.randn(5, 3, 8, 8, generator=gen(2)), gen(3))
    torch.save(mix_state(mix), tmp_path / "m.pt")
    back = mix_from_state(torch.load(tmp_path / "m.pt", weights_only=True))
    assert (back.kind, back.lam, back.box) == (mix.kind, mix.lam, mix.box) and torch.equal(back.index, mix.index)


def test_mix_blocks_rows_and_cross_entropy_by_hand():
    a, b = Mix(torch.tensor([1, 0]), 0.6), Mix(torch.tensor([1, 0]), 0.3)
    blocks = MixBlocks([(0, a), (2, b)], 4)
    index, lam = mix_rows(blocks, 4)
    assert index.tolist() == [1, 0, 3, 2] and lam.tolist() == pytest.approx([0.6, 0.6, 0.3, 0.3])
    logits, y, _ = fixed()
    expected = mean([0.6 * ce(Z[0], 0) + 0.4 * ce(Z[0], 2), 0.6 * ce(Z[1], 2) + 0.4 * ce(Z[1], 0),
                     0.3 * ce(Z[2], 3) + 0.7 * ce(Z[2], 1), 0.3 * ce(Z[3], 1) + 0.7 * ce(Z[3], 3)])
    assert cross_entropy(logits, y, mix=blocks).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(DataError):
        mix_rows(blocks, 5)


def test_base_method_without_mix_support_refuses():
    class Plain(Method):
        name = "test-plain-mix"

        def loss(self, logits, target, index=None):
            raise AssertionError

    batch = Batch(torch.randn(4, 1, 4, 4), torch.tensor(Y))
    with pytest.raises(TrainingError, match="mixed samples"):
        Plain().mix(batch, build_mixer("mixup"), gen())


# ==================================================================================================
# each method's rule against a hand computation
# ==================================================================================================


def test_ce_mixed():
    logits, y, mix = fixed()
    out = build_method("ce").loss(logits, y, mix=mix)
    assert out.loss.item() == pytest.approx(mixed_ce(), rel=1e-6)
    out.loss.backward()
    assert logits.grad is not None


@pytest.mark.parametrize("form", ["uniform", "offtarget"])
def test_ls_mixed(form):
    eps = 0.2
    logits, y, mix = fixed()

    def target(label):
        if form == "uniform":
            return [(1 - eps) * o + eps / K for o in onehot(label, K)]
        return [1 - eps if c == label else eps / (K - 1) for c in range(K)]

    expected = mean(soft_ce(blend(LAM, target(Y[i]), target(Y[IDX[i]])), Z[i]) for i in range(4))
    out = build_method("ls", epsilon=eps, form=form).loss(logits, y, mix=mix)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.parts["ce"].item() == pytest.approx(mixed_ce(), rel=1e-6)


def test_lsrkd_mixed_uniform_teacher_unchanged():
    a, t = 0.3, 4.0
    logits, y, mix = fixed()
    u = [1 / K] * K
    expected = (1 - a) * mixed_ce() + a * t * t * mean(kl(u, Z[i], t) for i in range(4))
    out = build_method("lsrkd", alpha=a, temperature=t).loss(logits, y, mix=mix)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("soften", [True, False])
def test_lsrkd_tc_mixed_teacher(soften):
    a, alpha, t = 0.9, 0.3, 4.0
    logits, y, mix = fixed()

    def teacher(label):
        pc = [a if c == label else (1 - a) / (K - 1) for c in range(K)]
        if not soften:
            return pc
        w = [p ** (1 / t) for p in pc]
        return [v / sum(w) for v in w]

    q = [blend(LAM, teacher(Y[i]), teacher(Y[IDX[i]])) for i in range(4)]
    expected = (1 - alpha) * mixed_ce() + alpha * t * t * mean(kl(q[i], Z[i], t) for i in range(4))
    m = build_method("lsrkd-tc", a=a, alpha=alpha, temperature=t, soften_teacher=soften)
    out = m.loss(logits, y, mix=mix)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_tfkd_reg_mixed_virtual_teacher():
    a, t, ts, alpha = 0.99, 20.0, 2.0, 0.2
    logits, y, mix = fixed()

    def teacher(label):
        pd = [a if c == label else (1 - a) / (K - 1) for c in range(K)]
        return softmax(pd, t)

    q = [blend(LAM, teacher(Y[i]), teacher(Y[IDX[i]])) for i in range(4)]
    expected = (1 - alpha) * mixed_ce() + alpha * ts * ts * mean(kl(q[i], Z[i], ts) for i in range(4))
    m = build_method("tfkd-reg", a=a, temperature=t, student_temperature=ts, alpha=alpha)
    assert m.loss(logits, y, mix=mix).loss.item() == pytest.approx(expected, rel=1e-5)


Z5 = [[2.0, 0.5, -1.0, 0.3, 1.1], [0.0, 1.0, 3.0, -0.5, 0.2], [1.5, -0.2, 0.4, 2.2, -0.7], [-1.0, 0.8, 0.1, 0.6, 1.9]]
Y5 = [0, 2, 3, 1]  # partners' labels (IDX): 3, 0, 1, 2


def zipf_weights(row):
    """rank^-1 over all classes (descending, no ties here)."""
    order = sorted(range(len(row)), key=lambda c: -row[c])
    rank = {c: r + 1 for r, c in enumerate(order)}
    return [1.0 / rank[c] for c in range(len(row))]


def zipf_kl(row, excluded):
    kept = [c for c in range(len(row)) if c not in excluded]
    w = zipf_weights(row)
    q = [w[c] / sum(w[k] for k in kept) for c in kept]
    ls = log_softmax([row[c] for c in kept])
    return sum(qi * (math.log(qi) - li) for qi, li in zip(q, ls))


@pytest.mark.parametrize("rule", ["exclude", "weighted"])
@pytest.mark.parametrize("mask", [False, True])
def test_zipf_ls_mixed(rule, mask):
    lam_z = 0.1
    logits = torch.tensor(Z5, requires_grad=True)
    mix = Mix(torch.tensor(IDX), LAM)
    per_row = []
    for i in range(4):
        a, b = Y5[i], Y5[IDX[i]]
        if rule == "exclude":
            per_row.append(zipf_kl(Z5[i], {a, b}))
        else:
            per_row.append(LAM * zipf_kl(Z5[i], {a}) + (1 - LAM) * zipf_kl(Z5[i], {b}))
    if mask:
        correct = [max(range(5), key=lambda c: Z5[i][c]) in (Y5[i], Y5[IDX[i]]) for i in range(4)]
        assert correct == [True, True, True, False]
        zipf = sum(p for p, c in zip(per_row, correct) if c) / sum(correct)
    else:
        zipf = mean(per_row)
    expected = mixed_ce(Z5, Y5) + lam_z * zipf
    out = build_method("zipf-ls", loss_lambda=lam_z, mix_rule=rule, mask_correct=mask).loss(
        logits, torch.tensor(Y5), mix=mix)
    assert out.parts["zipf"].item() == pytest.approx(zipf, rel=1e-5)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_zipf_ls_unmixed_rows_match_the_plain_loss():
    logits = torch.tensor(Z5)
    m = build_method("zipf-ls")
    plain = m.loss(logits, torch.tensor(Y5)).loss.item()
    same = m.loss(logits, torch.tensor(Y5), mix=Mix(torch.arange(4), 1.0, kind="none")).loss.item()
    assert same == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("memory", ["store", "keep"])
def test_pskd_mixed_targets_and_memory(memory):
    m = build_method("pskd", memory_dtype="float32", mix_memory=memory)
    m.setup(num_samples=6, num_classes=K, epochs=4)
    m.on_epoch_start(1, 4)  # alpha_t = 0.8 * 2/4 = 0.4
    prev = {5: [0.1, 0.2, 0.3, 0.4], 1: [0.5, 0.25, 0.25, 0.0], 3: [0.7, 0.1, 0.1, 0.1]}  # 0: never visited
    for i, p in prev.items():
        m.memory[i] = torch.tensor(p)
    before = m.memory.clone()
    index = torch.tensor([5, 1, 3, 0])
    idx = [0, 2, 1, 3] if memory == "keep" else IDX  # keep: rows 0 and 3 mix with themselves
    logits, y, _ = fixed()
    mix = Mix(torch.tensor(idx), LAM)
    a = 0.4
    own = [blend(1 - a, onehot(Y[i], K), prev.get(int(index[i]), onehot(Y[i], K))) for i in range(4)]
    expected = mean(soft_ce(blend(LAM, own[i], own[idx[i]]), Z[i]) for i in range(4))
    out = m.loss(logits, y, index=index, mix=mix)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.parts["ce"].item() == pytest.approx(mixed_ce(idx=idx), rel=1e-6)
    assert out.loss.item() == pytest.approx((1 - a) * out.parts["ce"].item() + a * out.parts["kd"].item(), rel=1e-6)
    for row, i in enumerate(index.tolist()):
        written = memory == "store" or idx[row] == row
        want = torch.tensor(softmax(Z[row])) if written else before[i]
        assert torch.allclose(m.memory[i], want.float(), atol=1e-6), (row, i)


def test_ddgsd_mixed_loss_and_second_view_remixed():
    t, lam_kd = 3.0, 1.0
    logits = torch.tensor(Z, requires_grad=True)  # [view 1 of 2 images | view 2]
    y = torch.tensor([0, 2])
    mix = Mix(torch.tensor([1, 0]), LAM)
    z1, z2 = Z[:2], Z[2:]
    ce_v = [mixed_ce(z, [0, 2], [1, 0]) for z in (z1, z2)]
    kd = (mean(kl(softmax(z2[i], t), z1[i], t) for i in range(2))
          + mean(kl(softmax(z1[i], t), z2[i], t) for i in range(2)))
    out = build_method("ddgsd", temperature=t, lam=lam_kd).loss(logits, y, mix=mix)
    assert out.loss.item() == pytest.approx(sum(ce_v) + t * t * kd, rel=1e-5)

    # train_step: the second view gets the first view's mixing
    seen = []

    class Rec(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.fc(x.flatten(1))

    raw = torch.randint(0, 255, (4, 1, 4, 4), dtype=torch.uint8, generator=gen(0))
    views = iter([torch.randn(4, 1, 4, 4, generator=gen(s)) for s in (1, 2)])
    v1 = next(views)
    x, mix = cutmix(v1, gen(7))
    batch = Batch(x, torch.tensor([0, 1, 2, 1]), raw=raw, augment=lambda r: next(views), mix=mix)
    build_method("ddgsd").train_step(Rec(), batch)
    v2 = torch.randn(4, 1, 4, 4, generator=gen(2))
    assert torch.equal(seen[0][4:], remix(v2, mix)) and torch.equal(seen[0][:4], x)


def test_mrkd_mixed_ce_and_knowledge_adjustment_skips_two_label_rows():
    t, alpha = 3.0, 1.0
    logits, y, _ = fixed()
    idx = [0, 2, 1, 3]  # rows 0 and 3: one image (single label); rows 1 and 2: labels 2 and 3 mixed
    mix = Mix(torch.tensor(idx), LAM)
    teacher_rows = [[0.0, 2.0, 1.0, 0.5], [3.0, 0.0, 1.0, 0.2], [0.1, 2.5, 0.3, 1.0], [1.0, 0.0, 2.0, 0.4]]
    teacher = torch.tensor(teacher_rows, requires_grad=True)

    def ka(row, label):
        top = max(range(K), key=lambda c: row[c])
        r = list(row)
        r[top], r[label] = row[label], row[top]
        return r

    for rule in ("skip", "dominant"):
        if rule == "skip":
            adjusted = [ka(teacher_rows[0], Y[0]), teacher_rows[1], teacher_rows[2], ka(teacher_rows[3], Y[3])]
        else:  # lam = 0.3 < 0.5: the partner's label
            adjusted = [ka(teacher_rows[i], Y[idx[i]]) for i in range(4)]
        expected = mixed_ce(idx=idx) + alpha * t * t * mean(kl(softmax(adjusted[i], t), Z[i], t) for i in range(4))
        m = build_method("mrkd", temperature=t, alpha=alpha, knowledge_adjustment=True, ka_mixed=rule)
        out = m.loss(logits, y, teacher=teacher, mix=mix)
        assert out.loss.item() == pytest.approx(expected, rel=1e-5), rule
        out.loss.backward()
        assert teacher.grad is None and logits.grad is not None


@pytest.mark.parametrize("correction", ["mix", "floor"])
def test_mrkd_tc_corrects_towards_the_mixed_one_hot(correction):
    t, a = 2.0, 0.5
    logits, y, mix = fixed()
    teacher_rows = [[0.0, 2.0, 1.0, 0.5], [3.0, 0.0, 1.0, 0.2], [0.1, 2.5, 0.3, 1.0], [1.0, 0.0, 2.0, 0.4]]

    def corrected(row, label):
        s = softmax(row, t)
        if correction == "mix":
            return blend(a, onehot(label, K), s)
        if s[label] >= a:
            return s
        return [a if c == label else s[c] * (1 - a) / (1 - s[label]) for c in range(K)]

    p = [blend(LAM, corrected(teacher_rows[i], Y[i]), corrected(teacher_rows[i], Y[IDX[i]])) for i in range(4)]
    if correction == "mix":  # = a·(mixed one-hot) + (1−a)·softmax(z_b/T)
        mixed_oh = blend(LAM, onehot(Y[0], K), onehot(Y[IDX[0]], K))
        assert p[0] == pytest.approx(blend(a, mixed_oh, softmax(teacher_rows[0], t)))
    expected = mixed_ce() + t * t * mean(kl(p[i], Z[i], t) for i in range(4))
    m = build_method("mrkd-tc", temperature=t, a=a, correction=correction)
    out = m.loss(logits, y, teacher=torch.tensor(teacher_rows), mix=mix)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_mrkd_fcn_trains_on_mixed_ce():
    m = build_method("mrkd", ensemble="fcn", copies=2)
    m.setup(num_samples=8, num_classes=K, epochs=1)
    o1, o2 = torch.tensor(Z), torch.tensor(Z[::-1])
    _, y, mix = fixed()
    teacher, fcn_ce = m.ensemble([o1, o2], y, mix=mix)
    avg = [[(u + v) / 2 for u, v in zip(r1, r2)] for r1, r2 in zip(Z, Z[::-1])]  # the layer starts as the mean
    assert torch.allclose(teacher, torch.tensor(avg), atol=1e-6)
    assert fcn_ce.item() == pytest.approx(mixed_ce(avg), rel=1e-6)


def test_tfkd_self_mixed():
    alpha, t = 0.9, 4.0
    logits, y, mix = fixed()
    zt = torch.tensor(Z[::-1])
    expected = (1 - alpha) * mixed_ce() + alpha * t * t * mean(kl(softmax(Z[::-1][i], t), Z[i], t) for i in range(4))
    m = build_method("tfkd-self", teacher="unused", alpha=alpha, temperature=t)
    assert m.loss(logits, y, teacher=zt, mix=mix).loss.item() == pytest.approx(expected, rel=1e-5)


def test_byot_every_exit_ce_mixed_soft_terms_unchanged():
    c, t = 0.3, 3.0
    shallow = torch.tensor(Z[::-1], requires_grad=True)
    deep = torch.tensor(Z, requires_grad=True)
    _, y, mix = fixed()
    kd = mean(soft_ce(softmax(Z[i], t), [v / t for v in Z[::-1][i]]) for i in range(4))
    expected = mixed_ce() + c * kd + (1 - c) * mixed_ce(Z[::-1])
    loss, parts = byot_loss([shallow, deep], y, kd_weight=c, temperature=t, mix=mix)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert parts["ce_aux"].item() == pytest.approx(mixed_ce(Z[::-1]), rel=1e-6)
    out = build_method("byot").loss([shallow, deep], y, mix=mix)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_cskd_mixed_ce_on_anchors_kl_unchanged():
    t, lam_kd = 4.0, 1.0
    logits = torch.tensor(Z, requires_grad=True)  # [2 anchors | 2 partners]
    y = torch.tensor([0, 2, 0, 2])
    m = Mix(torch.tensor([1, 0]), LAM)
    mix = MixBlocks([(0, m), (2, m)], 4)
    kd = t * t * mean(kl(softmax(Z[2 + i], t), Z[i], t) for i in range(2))
    expected = mixed_ce(Z[:2], [0, 2], [1, 0]) + lam_kd * kd
    out = build_method("cskd", temperature=t, lam=lam_kd).loss(logits, y, mix=mix)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    assert logits.grad[2:].abs().sum() == 0 and logits.grad[:2].abs().sum() > 0


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_cskd_partners_mixed_with_the_anchors_permutation(kind):
    b = 5
    x = torch.randn(2 * b, 3, 8, 8, generator=gen(4))
    y = torch.tensor([0, 1, 2, 1, 0] * 2)
    mixer = build_mixer(kind)
    g = gen(9)
    expected, m = mixer(x[:b], gen(9))
    out = build_method("cskd").mix(Batch(x, y), mixer, g)
    assert torch.equal(out.x[:b], expected)
    assert isinstance(out.mix, MixBlocks) and out.mix.block(0) is out.mix.block(b)
    got = out.mix.block(0)
    assert torch.equal(got.index, m.index) and got.lam == m.lam and got.box == m.box
    if kind == "mixup":
        assert torch.allclose(out.x[b:], m.lam * x[b:] + (1 - m.lam) * x[b:][m.index], atol=1e-6)
    else:
        assert torch.equal(out.x[b:], remix(x[b:], m))
    # partner i mixes the classes (y_i, y_index[i]) in anchor i's proportion
    assert torch.equal(y[b:][m.index], y[:b][m.index])


# ==================================================================================================
# DLB
# ==================================================================================================


def test_dlb_mixed_loss_by_hand():
    t = 3.0
    dlb = build_method("dlb", temperature=t, alpha=1.0)
    labels = {0: 0, 1: 2, 2: 3, 3: 1}
    it = iter(dlb.batch_sampler(list(range(4)), 2))
    first = next(it)
    z1 = [[1.0, 0.0, -0.5, 0.2], [0.3, 0.1, 1.2, -0.4]]
    m1 = Mix(torch.tensor([1, 0]), 0.6)
    y1 = [labels[i] for i in first]
    out1 = dlb.loss(torch.tensor(z1), torch.tensor(y1), index=torch.tensor(first), mix=m1)
    assert out1.loss.item() == pytest.approx(mixed_ce(z1, y1, [1, 0], 0.6), rel=1e-6)
    second = next(it)
    assert second == [0, 1, 2, 3]
    m2 = Mix(torch.tensor([1, 0]), 0.3)
    y2 = [labels[i] for i in second]
    logits = torch.tensor(Z, requires_grad=True)
    ce_rows = [0.6 * ce(Z[0], y2[0]) + 0.4 * ce(Z[0], y2[1]), 0.6 * ce(Z[1], y2[1]) + 0.4 * ce(Z[1], y2[0]),
               0.3 * ce(Z[2], y2[2]) + 0.7 * ce(Z[2], y2[3]), 0.3 * ce(Z[3], y2[3]) + 0.7 * ce(Z[3], y2[2])]
    kd = t * t * mean(kl(softmax(z1[i], t), Z[i], t) for i in range(2))
    bad = MixBlocks([(0, Mix(torch.tensor([1, 0]), 0.5)), (2, m2)], 4)
    with pytest.raises(TrainingError, match="previous step"):
        dlb.loss(logits, torch.tensor(y2), index=torch.tensor(second), mix=bad)
    out = dlb.loss(logits, torch.tensor(y2), index=torch.tensor(second), mix=MixBlocks([(0, m1), (2, m2)], 4))
    assert out.parts["ce"].item() == pytest.approx(mean(ce_rows), rel=1e-6)
    assert out.loss.item() == pytest.approx(mean(ce_rows) + kd, rel=1e-5)
    assert dlb.last_mix is m2


def test_dlb_ce_rows_new_mixed():
    dlb = build_method("dlb", ce_rows="new")
    it = iter(dlb.batch_sampler(list(range(4)), 2))
    next(it)
    m1 = Mix(torch.tensor([1, 0]), 0.6)
    dlb.loss(torch.tensor(Z[:2]), torch.tensor(Y[:2]), mix=m1)
    next(it)
    m2 = Mix(torch.tensor([1, 0]), 0.3)
    out = dlb.loss(torch.tensor(Z), torch.tensor(Y[:2] + Y[2:]), mix=MixBlocks([(0, m1), (2, m2)], 4))
    assert out.parts["ce"].item() == pytest.approx(mixed_ce(Z[2:], Y[2:], [1, 0], 0.3), rel=1e-6)


def test_dlb_label_smoothing_and_confidence_schedule_mixed():
    eps, t = 0.1, 3.0
    dlb = build_method("dlb", label_smoothing=eps, schedule="confidence", temperature=t, alpha=1.0)
    it = iter(dlb.batch_sampler(list(range(4)), 2))
    next(it)
    z1 = [[1.0, 0.0, -0.5, 0.2], [0.3, 0.1, 1.2, -0.4]]
    m1 = Mix(torch.tensor([1, 0]), 0.6)
    dlb.loss(torch.tensor(z1), torch.tensor(Y[:2]), mix=m1)
    next(it)
    m2 = Mix(torch.tensor([1, 0]), 0.3)
    out = dlb.loss(torch.tensor(Z), torch.tensor(Y), mix=MixBlocks([(0, m1), (2, m2)], 4))

    def ce_ls(row, k):
        return (1 - eps) * ce(row, k) + eps * mean(-v for v in log_softmax(row))

    pairs = [(0, 1, 0.6), (1, 0, 0.6), (2, 3, 0.3), (3, 2, 0.3)]
    expected_ce = mean(lam * ce_ls(Z[i], Y[i]) + (1 - lam) * ce_ls(Z[i], Y[j]) for i, j, lam in pairs)
    assert out.parts["ce"].item() == pytest.approx(expected_ce, rel=1e-6)
    # the teacher's confidence: its mean probability of the mixed one-hot target of the repeated rows
    conf = mean(0.6 * softmax(z1[i])[Y[i]] + 0.4 * softmax(z1[i])[Y[1 - i]] for i in range(2))
    assert out.parts["alpha"].item() == pytest.approx(conf, rel=1e-5)
    assert out.parts["temperature"].item() == pytest.approx(t * (2 - conf), rel=1e-5)


def test_dlb_refuses_mixing_with_partial_repeats():
    dlb = build_method("dlb", repeat_fraction=0.5)
    with pytest.raises(ConfigError, match="repeat_fraction"):
        dlb.check_mix(build_mixer("mixup"))
    dlb.check_mix(build_mixer("none"))
    build_method("dlb").check_mix(build_mixer("cutmix"))
    it = iter(dlb.batch_sampler(list(range(8)), 4))
    next(it)
    with pytest.raises(ConfigError, match="repeat_fraction"):
        dlb.mix(Batch(torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)), build_mixer("cutmix"), gen())


def _dlb_steps(dlb, batches, mixer, g, steps, labels, record):
    """Run ``steps`` steps: fresh views and logits are a function of the batch's position."""
    for _ in range(steps):
        idx = next(batches)
        layout = dlb.layouts.next()
        r = layout.repeat
        fresh = torch.randn(len(idx), 3, 8, 8, generator=gen(1000 + layout.position))
        y = labels[idx]
        expected_new, expected_mix = mixer(fresh[r:], torch.Generator().set_state(g.get_state()))
        prev = dlb.last_mix
        out = dlb.mix(Batch(fresh, y, torch.tensor(idx)), mixer, g)
        assert torch.equal(out.x[r:], expected_new)  # the new rows: a fresh mixing of the new rows only
        new_mix = out.mix.block(r) if isinstance(out.mix, MixBlocks) else out.mix
        assert torch.equal(new_mix.index, expected_mix.index) and new_mix.lam == expected_mix.lam
        assert new_mix.box == expected_mix.box
        if r:
            assert torch.equal(out.x[:r], remix(fresh[:r], prev))  # exactly the previous step's mixing
            assert out.mix.block(0) is prev
        logits = torch.randn(len(idx), 10, generator=gen(2000 + layout.position))
        dlb.loss(logits, y, index=torch.tensor(idx), mix=out.mix)
        record.append(out.x)
    return record


@pytest.mark.parametrize("kind", ["cutmix", "mixup"])
def test_dlb_repeated_rows_reapply_the_previous_mixing_and_resume(tmp_path, kind):
    labels = torch.arange(16) % 10
    mixer = build_mixer(kind)
    a = build_method("dlb")
    g = gen(5)
    batches = iter(a.batch_sampler(list(range(16)), 4))
    seen = _dlb_steps(a, batches, mixer, g, 2, labels, [])
    assert seen[1].shape[0] == 8
    assert not torch.equal(seen[1][:4], torch.randn(4, 3, 8, 8, generator=gen(1001)))  # really mixed
    # checkpoint mid-run (through a weights_only round trip), continue both
    torch.save(a.state_dict(), tmp_path / "dlb.pt")
    g_state = g.get_state()
    rest_a = _dlb_steps(a, batches, mixer, g, 2, labels, [])
    b = build_method("dlb")
    b.load_state_dict(torch.load(tmp_path / "dlb.pt", weights_only=True))
    rest_b = _dlb_steps(b, iter(b.batch_sampler(list(range(16)), 4)), mixer, torch.Generator().set_state(g_state),
                        2, labels, [])
    assert all(torch.equal(u, v) for u, v in zip(rest_a, rest_b)) and len(rest_b) == 2
    assert a.last_mix.lam == b.last_mix.lam and torch.equal(a.last_mix.index, b.last_mix.index)


# ==================================================================================================
# end to end through the reference trainer
# ==================================================================================================

MIXING = [m for m in available_methods() if not m.startswith("test-") and method_class(m).supports_mix]


def cfg_for(method, mix, epochs=1):
    params = {"interval": 5} if method.startswith("mrkd") else {}
    staged = method_class(method).needs_stages
    return build_config({
        "data": {"name": "digits", "subset": 200}, "model": {"name": "resnet8" if staged else "cnn_small"},
        "augment": {"mix": mix}, "method": {"name": method, **params}, "optim": {"batch_size": 32},
        "train": {"epochs": epochs, "device": "cpu", "seed": 0},
    })


def test_every_method_supports_mixing():
    assert set(MIXING) >= {"ce", "ls", "lsrkd", "lsrkd-tc", "tfkd-reg", "zipf-ls", "dlb", "cskd", "pskd", "ddgsd",
                           "mrkd", "mrkd-tc", "tfkd-self", "byot"}


@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
@pytest.mark.parametrize("method", MIXING)
def test_trains_one_epoch_with_mixing(tmp_path, method, mix):
    summary = train_run(cfg_for(method, mix), tmp_path / "run", progress=False, log=lambda m: None)
    assert summary["epochs"] == 1 and 0 <= summary["last_acc"] <= 100
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(line["train_loss"])


class Stop(KeyboardInterrupt):
    pass


def rows(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["dlb", "cskd"])
def test_resume_is_bit_identical_under_cutmix(tmp_path, method):
    ref = tmp_path / "ref"
    train_run(cfg_for(method, "cutmix", 2), ref, progress=False, log=lambda m: None)

    def stop(msg):
        if msg.startswith("epoch 1/2"):
            raise Stop

    run = tmp_path / "run"
    with pytest.raises(Stop):
        train_run(cfg_for(method, "cutmix", 2), run, progress=False, log=stop)
    train_run(cfg_for(method, "cutmix", 2), run, resume=True, progress=False, log=lambda m: None)
    assert rows(run) == rows(ref)
    a, b = ckpt.load(run / "checkpoint.pt"), ckpt.load(ref / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    if method == "dlb":
        assert a["method"]["last_mix"]["kind"] == "cutmix"
        assert torch.equal(a["method"]["last_mix"]["index"], b["method"]["last_mix"]["index"])
