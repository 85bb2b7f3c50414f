"""CS-KD, PS-KD and DDGSD: batch composition, losses against hand computation, gradients, state, errors,
and one resumed run of each through the reference trainer."""
import io
import json
import math
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils.data import RandomSampler, SequentialSampler

from selfkd.engine import checkpoint as ckpt
from selfkd.engine.config import build_config
from selfkd.engine.trainer import TIMING_KEYS, Trainer
from selfkd.engine.setup import build
from selfkd.errors import ConfigError, TrainingError
from selfkd.methods import Batch, build_method
from selfkd.methods.cskd import CSKD
from selfkd.methods.ddgsd import DDGSD
from selfkd.methods.pskd import PSKD
from handmath import hand_ce, hand_kl, softmax


# -- plain-math references ---------------------------------------------------------------------
def hand_soft_ce(logits, target):
    p = softmax(logits)
    return -sum(q * math.log(pi) for q, pi in zip(target, p))


def round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class Recorder(nn.Module):
    """A linear model that records, per call, the batch size and whether grad mode was on."""

    def __init__(self, d=4, k=3):
        super().__init__()
        self.lin = nn.Linear(d, k)
        self.calls = []

    def forward(self, x):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return self.lin(x)


# ===================================== CS-KD =====================================================
LABELS = torch.tensor([0, 1, 0, 1, 2, 0, 1, 2, 2, 0])  # class 0: {0,2,5,9}, 1: {1,3,6}, 2: {4,7,8}


def cskd_epoch(m, sampler):
    """One pass of the sampler, feeding zero logits to the loss; returns the batches."""
    out = []
    for idx in sampler:
        y = LABELS[idx]
        m.loss(torch.zeros(len(idx), 3), y, index=torch.tensor(idx))
        out.append(idx)
    return out


def test_cskd_batches_are_anchors_then_same_class_partners():
    m = CSKD(seed=3)
    sampler = m.batch_sampler(SequentialSampler(range(10)), 4, labels=LABELS)
    assert len(sampler) == 3 and len(m.batch_sampler(range(10), 4, drop_last=True, labels=LABELS)) == 2
    batches = cskd_epoch(m, sampler)
    assert [b[: len(b) // 2] for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # short last batch
    assert [len(b) for b in batches] == [8, 8, 4]
    for b in batches:
        half = len(b) // 2
        for a, p in zip(b[:half], b[half:]):
            assert LABELS[a] == LABELS[p] and a != p
    # the same seed draws the same partners; another seed other ones
    m2 = CSKD(seed=3)
    s2 = m2.batch_sampler(SequentialSampler(range(10)), 4, labels=LABELS)
    assert cskd_epoch(m2, s2) == batches
    others = [cskd_epoch(m3, m3.batch_sampler(SequentialSampler(range(10)), 4, labels=LABELS))
              for m3 in (CSKD(seed=s) for s in range(4, 8))]
    assert any(o != batches for o in others)


@pytest.mark.parametrize("mode", ["other", "any"])
def test_cskd_partner_is_uniform_over_the_class(mode):
    m = CSKD(partner=mode)
    sampler = m.batch_sampler(SequentialSampler(range(10)), 10, labels=LABELS)
    counts = Counter()
    for _ in range(600):
        idx = next(iter(sampler))
        counts[idx[10]] += 1  # anchor 0 (class 0: {0, 2, 5, 9})
    members = [0, 2, 5, 9] if mode == "any" else [2, 5, 9]
    assert set(counts) == set(members)
    for i in members:
        assert abs(counts[i] / 600 - 1 / len(members)) < 0.08


def test_cskd_singleton_class_pairs_with_itself_and_labels_are_required():
    labels = torch.tensor([0, 0, 1, 0])  # class 1 has one sample
    m = CSKD()
    idx = next(iter(m.batch_sampler(SequentialSampler(range(4)), 4, labels=labels)))
    assert idx[4 + 2] == 2
    with pytest.raises(TrainingError, match="labels"):
        CSKD().batch_sampler(SequentialSampler(range(4)), 4)
    with pytest.raises(TrainingError, match="only 4 labels"):
        next(iter(CSKD().batch_sampler(SequentialSampler(range(6)), 4, labels=labels)))
    with pytest.raises(ConfigError, match="batch_size"):
        CSKD().batch_sampler(range(4), 0, labels=labels)


def test_cskd_loss_matches_hand_computation():
    m = CSKD(temperature=2.0, lam=0.5)
    za = [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]]
    zp = [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
    y = [1, 2]
    out = m.loss(torch.tensor(za + zp), torch.tensor(y + y))
    ce = (hand_ce(za[0], 1) + hand_ce(za[1], 2)) / 2
    kd = 4.0 * (hand_kl(zp[0], za[0], 2.0) + hand_kl(zp[1], za[1], 2.0)) / 2
    assert out.parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert out.loss.item() == pytest.approx(ce + 0.5 * kd, rel=1e-6)
    assert out.logits.shape == (2, 3) and out.target.tolist() == y  # accuracy is scored on the anchors


def test_cskd_gradients_reach_anchors_only_and_partners_run_without_grad():
    torch.manual_seed(0)
    z = torch.randn(4, 3, requires_grad=True)
    CSKD().loss(z, torch.tensor([0, 2, 0, 2])).loss.backward()
    assert torch.all(z.grad[2:] == 0) and torch.any(z.grad[:2] != 0)

    model = Recorder()
    x = torch.randn(6, 4)
    out = CSKD().train_step(model, Batch(x, torch.tensor([0, 1, 2, 0, 1, 2])))
    assert model.calls == [(3, True), (3, False)]  # anchors with grad, then partners under no_grad
    out.loss.backward()
    assert model.lin.weight.grad is not None
    # the partner forward gives the same teacher as a detached joint forward
    ref = CSKD().loss(model.lin(x), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)


def test_cskd_layout_errors():
    m = CSKD()
    with pytest.raises(TrainingError, match="even"):
        m.loss(torch.zeros(3, 3), torch.tensor([0, 1, 0]))
    with pytest.raises(TrainingError, match="partner rows' labels"):
        m.loss(torch.zeros(4, 3), torch.tensor([0, 1, 1, 0]))
    # with the sampler's labels known, the check uses the dataset indices (no device sync)
    m.batch_sampler(SequentialSampler(range(10)), 2, labels=LABELS)
    with pytest.raises(TrainingError, match="partner rows' labels"):
        m.loss(torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]), index=torch.tensor([0, 1, 2, 4]))
    with pytest.raises(TrainingError, match="even"):
        m.train_step(Recorder(), Batch(torch.zeros(5, 4), torch.zeros(5, dtype=torch.int64)))


@pytest.mark.parametrize("bad", [{"temperature": 0}, {"lam": -1}, {"partner": "same"}, {"seed": -1}])
def test_cskd_bad_hyper_parameters(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        CSKD(**bad)


def run_cskd(m, sampler, model, data, steps):
    losses, batches = [], []
    for i, idx in enumerate(sampler):
        if i == steps:
            break
        x, y = data[0][idx], data[1][idx]
        losses.append(m.train_step(model, Batch(x, y, torch.tensor(idx))).loss.item())
        batches.append(idx)
    return losses, batches


def test_cskd_state_resumes_mid_epoch_and_across_epochs_exactly():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (23,))
    data = (torch.randn(23, 4), labels)
    model = Recorder()

    def fresh():
        m = CSKD(seed=5)
        g = torch.Generator().manual_seed(7)
        return m, m.batch_sampler(RandomSampler(range(23), generator=g), 4, labels=labels), g

    m, sampler, _ = fresh()
    full = [run_cskd(m, sampler, model, data, 99) for _ in range(3)]
    full_l = sum((f[0] for f in full), [])
    full_b = sum((f[1] for f in full), [])

    m_a, s_a, g_a = fresh()
    l1, b1 = run_cskd(m_a, s_a, model, data, 99)
    l2, b2 = run_cskd(m_a, s_a, model, data, 3)  # stop mid-epoch 2
    state, gstate = round_trip(m_a.state_dict()), g_a.get_state()
    assert state["position"] == 3 and state["order"].shape == (23,) and state["partners"].shape == (23,)
    assert state["generator"].dtype == torch.uint8

    m_b, s_b, g_b = fresh()
    m_b.load_state_dict(state)
    g_b.set_state(gstate)
    l3, b3 = run_cskd(m_b, s_b, model, data, 99)
    l4, b4 = run_cskd(m_b, s_b, model, data, 99)
    assert b1 + b2 + b3 + b4 == full_b
    assert l1 + l2 + l3 + l4 == full_l
    with pytest.raises(ConfigError, match="unknown keys"):
        CSKD().load_state_dict({**state, "extra": 1})


# ===================================== PS-KD =====================================================
def test_pskd_targets_and_memory_match_hand_computation():
    m = PSKD(alpha_T=0.8, memory_dtype="float32")
    m.setup(num_samples=4, num_classes=3, epochs=4)
    z0 = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]]
    m.on_epoch_start(0, 4)
    assert m.alpha_t == pytest.approx(0.2)
    out0 = m.loss(torch.tensor(z0), torch.tensor([0, 1]), index=torch.tensor([3, 1]))
    # epoch 0: never visited, the target is the one-hot label
    assert out0.loss.item() == pytest.approx((hand_ce(z0[0], 0) + hand_ce(z0[1], 1)) / 2, rel=1e-6)
    mem = m.state_dict()["memory"]
    assert torch.allclose(mem[3], torch.tensor(softmax(z0[0])), atol=1e-7)
    assert torch.allclose(mem[1], torch.tensor(softmax(z0[1])), atol=1e-7)
    assert torch.all(mem[[0, 2]] == 0)

    m.on_epoch_start(1, 4)
    assert m.alpha_t == pytest.approx(0.4)
    z1 = [[0.5, 0.5, 0.0], [1.0, -1.0, 2.0], [0.0, 3.0, 0.0]]
    out1 = m.loss(torch.tensor(z1), torch.tensor([1, 0, 2]), index=torch.tensor([1, 3, 0]))
    a = 0.4
    t_1 = [(1 - a) * (k == 1) + a * p for k, p in enumerate(softmax(z0[1]))]  # sample 1: previous prediction
    t_3 = [(1 - a) * (k == 0) + a * p for k, p in enumerate(softmax(z0[0]))]  # sample 3
    t_0 = [1.0 * (k == 2) for k in range(3)]  # sample 0: first visit
    expected = (hand_soft_ce(z1[0], t_1) + hand_soft_ce(z1[1], t_3) + hand_soft_ce(z1[2], t_0)) / 3
    assert out1.loss.item() == pytest.approx(expected, rel=1e-6)
    # the parts decompose the loss: (1 - a)·ce + a·kd
    assert out1.loss.item() == pytest.approx((1 - a) * out1.parts["ce"].item() + a * out1.parts["kd"].item(), rel=1e-6)
    ce = (hand_ce(z1[0], 1) + hand_ce(z1[1], 0) + hand_ce(z1[2], 2)) / 3
    assert out1.parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert torch.allclose(m.state_dict()["memory"][0], torch.tensor(softmax(z1[2])), atol=1e-7)


def test_pskd_alpha_schedule_and_plain_loop_errors():
    m = PSKD()
    with pytest.raises(TrainingError, match="setup"):
        m.loss(torch.zeros(2, 3), torch.tensor([0, 1]), index=torch.tensor([0, 1]))
    m.setup(num_samples=5, num_classes=3, epochs=4)
    got = []
    for e in range(5):
        m.on_epoch_start(e, 4)
        got.append(m.alpha_t)
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])  # capped at alpha_T past E
    with pytest.raises(TrainingError, match="index"):
        m(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(TrainingError, match="out of range"):
        m.loss(torch.zeros(2, 3), torch.tensor([0, 1]), index=torch.tensor([0, 5]))
    with pytest.raises(TrainingError, match=r"logits \[B, 3\]"):
        m.loss(torch.zeros(2, 4), torch.tensor([0, 1]), index=torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="num_classes"):
        m.setup(num_samples=5, num_classes=0, epochs=4)


def test_pskd_gradients_reach_the_logits_only():
    m = PSKD()
    m.setup(num_samples=4, num_classes=3, epochs=2)
    m.on_epoch_start(1, 2)
    z = torch.randn(4, 3, requires_grad=True)
    m.loss(z.detach() * 2, torch.tensor([0, 1, 2, 0]), index=torch.arange(4))  # fill the memory
    out = m.loss(z, torch.tensor([0, 1, 2, 0]), index=torch.arange(4))
    mem = m.state_dict()["memory"]
    assert not m.memory.requires_grad and m.memory.grad_fn is None
    out.loss.backward()
    # d/dz of soft CE = (softmax(z) - target) / B, with the memory as a constant
    prev = torch.softmax(z.detach() * 2, 1)
    target = 0.2 * torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3) + 0.8 * prev
    assert torch.allclose(z.grad, (torch.softmax(z.detach(), 1) - target) / 4, atol=1e-3)  # float16 memory
    assert mem.dtype == torch.float16


def test_pskd_float16_memory_error_is_bounded_and_rows_renormalised():
    torch.manual_seed(0)
    z = torch.randn(64, 10) * 4
    y = torch.randint(0, 10, (64,))
    losses = {}
    for dt in ("float16", "bfloat16", "float32"):
        m = PSKD(memory_dtype=dt)
        m.setup(num_samples=64, num_classes=10, epochs=2)
        m.loss(z, y, index=torch.arange(64))
        mem = m.state_dict()["memory"]
        assert mem.dtype == getattr(torch, dt)
        err = (mem.float() - torch.softmax(z, 1)).abs().max().item()
        assert err <= {"float16": 2.5e-4, "bfloat16": 2e-3, "float32": 1e-7}[dt]
        m.on_epoch_start(1, 2)
        losses[dt] = m.loss(z, y, index=torch.arange(64)).loss.item()
    assert losses["float16"] == pytest.approx(losses["float32"], rel=1e-4)


def test_pskd_first_visit_after_epoch_zero_uses_the_label():
    m = PSKD()
    m.setup(num_samples=3, num_classes=2, epochs=2)
    m.on_epoch_start(1, 2)
    z = torch.tensor([[1.0, -1.0]])
    out = m.loss(z, torch.tensor([1]), index=torch.tensor([2]))
    assert out.loss.item() == pytest.approx(hand_ce([1.0, -1.0], 1), rel=1e-6)


@pytest.mark.parametrize("bad", [{"alpha_T": 1.5}, {"alpha_T": -0.1}, {"memory_dtype": "int8"},
                                 {"memory_device": "gpu"}])
def test_pskd_bad_hyper_parameters(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        PSKD(**bad)


def test_pskd_state_round_trip_resumes_exactly():
    torch.manual_seed(0)
    zs = [torch.randn(6, 4) for _ in range(4)]
    y = torch.randint(0, 4, (6,))
    idx = torch.tensor([5, 0, 3, 2, 1, 4])

    def run(m, epochs):
        out = []
        for e in epochs:
            m.on_epoch_start(e, 4)
            out.append(m.loss(zs[e], y, index=idx).loss.item())
        return out

    a = PSKD()
    a.setup(num_samples=6, num_classes=4, epochs=4)
    full = run(a, range(4))
    b = PSKD()
    b.setup(num_samples=6, num_classes=4, epochs=4)
    first = run(b, range(2))
    state = round_trip(b.state_dict())
    assert state["memory"].shape == (6, 4) and state["memory"].dtype == torch.float16
    c = PSKD()
    c.setup(num_samples=6, num_classes=4, epochs=4)
    c.load_state_dict(state)
    assert first + run(c, range(2, 4)) == full
    d = PSKD()
    d.setup(num_samples=7, num_classes=4, epochs=4)
    with pytest.raises(ConfigError, match="memory"):
        d.load_state_dict(state)


# ===================================== DDGSD =====================================================
@pytest.mark.parametrize("ce_views", ["sum", "mean"])
def test_ddgsd_loss_matches_hand_computation(ce_views):
    m = DDGSD(temperature=2.0, lam=0.5, ce_views=ce_views)
    z1 = [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]]
    z2 = [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
    y = [1, 2]
    out = m.loss(torch.tensor(z1 + z2), torch.tensor(y))
    ce = sum(hand_ce(a, c) + hand_ce(b, c) for a, b, c in zip(z1, z2, y)) / 2
    if ce_views == "mean":
        ce /= 2
    kd = 4.0 * sum(hand_kl(b, a, 2.0) + hand_kl(a, b, 2.0) for a, b in zip(z1, z2)) / 2
    assert out.parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert out.loss.item() == pytest.approx(ce + 0.5 * kd, rel=1e-6)
    # 2B labels with equal halves are accepted
    assert m.loss(torch.tensor(z1 + z2), torch.tensor(y + y)).loss.item() == pytest.approx(out.loss.item(), rel=1e-7)


def test_ddgsd_each_view_is_the_detached_teacher_of_the_other():
    z1 = [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]]
    z2 = [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
    y = [1, 2]
    t, lam, b = 2.0, 0.5, 2
    z = torch.tensor(z1 + z2, requires_grad=True)
    DDGSD(temperature=t, lam=lam).loss(z, torch.tensor(y)).loss.backward()
    # hand gradient with the teacher constant: CE gives (p - onehot)/B, T²·KL gives T·(p_T - q_T)/B
    for i, (me, other) in enumerate([(z1[0], z2[0]), (z1[1], z2[1]), (z2[0], z1[0]), (z2[1], z1[1])]):
        p, pt, qt = softmax(me), softmax(me, t), softmax(other, t)
        expected = [(p[k] - (k == y[i % 2])) / b + lam * t * (pt[k] - qt[k]) / b for k in range(3)]
        assert z.grad[i].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("forward", ["joint", "split"])
def test_ddgsd_train_step_draws_a_second_view(forward):
    torch.manual_seed(0)
    raw = torch.randn(3, 4)
    gen = torch.Generator().manual_seed(1)

    def augment(r):
        return r + torch.randn(r.shape, generator=gen)

    x = augment(raw)
    model = Recorder()
    out = DDGSD(forward=forward).train_step(model, Batch(x, torch.tensor([0, 1, 2]), raw=raw, augment=augment))
    assert model.calls == ([(6, True)] if forward == "joint" else [(3, True), (3, True)])
    g2 = torch.Generator().manual_seed(1)
    x_ref = raw + torch.randn(raw.shape, generator=g2)
    v2 = raw + torch.randn(raw.shape, generator=g2)
    ref = DDGSD().loss(model.lin(torch.cat([x_ref, v2])), torch.tensor([0, 1, 2]))
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    assert out.logits.shape == (6, 3) and out.target.tolist() == [0, 1, 2, 0, 1, 2]
    assert DDGSD().forwards_per_sample == 2.0


def test_ddgsd_errors_and_state():
    m = DDGSD()
    with pytest.raises(TrainingError, match="raw images"):
        m.train_step(Recorder(), Batch(torch.zeros(2, 4), torch.tensor([0, 1])))
    with pytest.raises(TrainingError, match="two views"):
        m.loss(torch.zeros(3, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(TrainingError, match="same labels"):
        m.loss(torch.zeros(4, 3), torch.tensor([0, 1, 1, 0]))
    with pytest.raises(TrainingError, match="need 2 or 4 labels"):
        m.loss(torch.zeros(4, 3), torch.tensor([0, 1, 2]))
    assert round_trip(m.state_dict()) == {}
    m.load_state_dict({})
    with pytest.raises(ConfigError, match="no state"):
        m.load_state_dict({"x": torch.zeros(1)})


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"lam": -0.5}, {"ce_views": "max"}, {"forward": "both"},
                                 {"mmd": 1.0}])
def test_ddgsd_bad_hyper_parameters(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        DDGSD(**bad)


# ===================================== the trainer ===============================================
@pytest.fixture
def one_thread():
    """Two shared cores: intra-op threads only contend, so the trainer runs are far faster on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.parametrize("name", ["cskd", "pskd", "ddgsd"])
def test_trainer_runs_and_resumes_bit_identically(tmp_path, name, one_thread):
    cfg = build_config({"data": {"name": "digits", "subset": 320}, "model": {"name": "cnn_small"},
                        "method": {"name": name}, "optim": {"batch_size": 64},
                        "train": {"epochs": 2, "device": "cpu"}})
    full = tmp_path / "full"
    summary = Trainer(build(cfg), full, progress=False, log=lambda m: None).run()
    assert summary["epochs"] == 2 and summary["forwards_per_sample"] == (1.0 if name == "pskd" else 2.0)
    rows = metrics(full)
    assert all(math.isfinite(r["train_loss"]) and r["train_kd"] >= 0 for r in rows)

    def stop_after_epoch_1(msg):
        if msg.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        Trainer(build(cfg), cut, progress=False, log=stop_after_epoch_1).run()
    assert len(metrics(cut)) == 1
    Trainer(build(cfg), cut, progress=False, log=lambda m: None).run(resume=True)
    assert metrics(cut) == rows
    a, b = ckpt.load(full / "checkpoint.pt"), ckpt.load(cut / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    state = torch.load(full / "checkpoint.pt", weights_only=True)["method"]
    if name == "pskd":
        assert state["memory"].shape == (320, 10) and bool((state["memory"].float().sum(1) > 0.99).all())
    if name == "cskd":
        assert state["position"] == 5 and state["order"].shape == (320,)


def test_build_method_by_name():
    assert isinstance(build_method("cskd", lam=3), CSKD)
    assert isinstance(build_method("pskd"), PSKD)
    assert isinstance(build_method("ddgsd", temperature=1), DDGSD)
