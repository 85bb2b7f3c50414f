"""DLB's schedules: the renamed confidence rule and the per-sample entropy/margin weights, against hand math."""
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.data import SequentialSampler

import selfkd
from selfkd.errors import ConfigError
from selfkd.methods.dlb import schedules as dlb_schedules
from selfkd.methods.losses import IGNORE, kd_kl

from handmath import hand_kl, softmax

Z0 = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])  # step 0: new rows 0, 1 (the next step's teacher)
Z1 = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.3, 0.1], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])  # rep 0,1 | new 2,3
Y0, Y1 = torch.tensor([0, 1]), torch.tensor([0, 1, 2, 0])


def drive(dlb, steps):
    it = iter(dlb.batch_sampler(SequentialSampler(range(4)), batch_size=2))
    outs = []
    for logits, labels in steps:
        next(it)
        outs.append(dlb.loss(logits, labels))
    return outs


def hand_entropy_weight(z):
    p = softmax(z)
    return 1 - (-sum(a * math.log(a) for a in p)) / math.log(len(p))


def hand_margin_weight(z):
    p = sorted(softmax(z), reverse=True)
    return p[0] - p[1]


def test_dynamic_is_renamed_with_a_clear_error():
    with pytest.raises(ConfigError, match=r"schedule.*'dynamic' was renamed 'confidence'"):
        selfkd.DLB(schedule="dynamic")


@pytest.mark.parametrize("kind,hand", [("entropy", hand_entropy_weight), ("margin", hand_margin_weight)])
def test_per_sample_weights_match_hand_computation(kind, hand):
    t, a = 2.0, 0.5
    dlb = selfkd.DLB(schedule=kind, temperature=t, alpha=a)
    out0, out1 = drive(dlb, [(Z0, Y0), (Z1, Y1)])
    w = [hand(r) for r in Z0.tolist()]
    assert 0 < w[1] < w[0] < 1  # row 0's teacher is the more certain one
    kls = [hand_kl(Z0[i].tolist(), Z1[i].tolist(), t) for i in range(2)]
    kd = sum(wi * t * t * k for wi, k in zip(w, kls)) / 2  # mean over the repeated rows, not renormalised
    assert out1.parts["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert out1.parts["weight"].item() == pytest.approx(sum(w) / 2, rel=1e-6)
    assert out1.loss.item() == pytest.approx(out1.parts["ce"].item() + a * kd, rel=1e-6)
    assert "alpha" not in out1.parts  # α and T stay as given


def test_weights_detached_gradient_only_through_the_student():
    t = 2.0
    dlb = selfkd.DLB(schedule="entropy", temperature=t, alpha=1.0, ce_rows="new")
    z1 = Z1.clone().requires_grad_(True)
    _, out = drive(dlb, [(Z0, Y0), (z1, Y1)])
    out.loss.backward()
    w = torch.tensor([hand_entropy_weight(r) for r in Z0.tolist()])
    p_t, p_s = (Z0 / t).softmax(1), (Z1[:2] / t).softmax(1)
    expected = w[:, None] * t * (p_s - p_t) / 2  # d/dz of (1/R) Σ w·T²·KL(p_t ‖ softmax(z/T)) = w·T·(q − p)/R
    assert torch.allclose(z1.grad[:2], expected, atol=1e-6)


def test_confidence_values_match_hand_computation():
    alpha, temp = dlb_schedules.confidence(Z0, Y0, 2.0, 3.0)
    c = (softmax([2, 0, -1])[0] + softmax([0, 1, 0.5])[1]) / 2
    assert isinstance(alpha, torch.Tensor) and isinstance(temp, torch.Tensor)
    assert alpha.item() == pytest.approx(2.0 * c, rel=1e-6)
    assert temp.item() == pytest.approx(3.0 * (2 - c), rel=1e-6)


def test_token_weights_per_token_and_ignored_tokens_do_not_count():
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 4)
    student = torch.randn(2, 3, 4)
    labels = torch.tensor([[1, 2, IGNORE], [0, IGNORE, IGNORE]])
    w = dlb_schedules.row_weight("margin", teacher)
    assert w.shape == (2, 3)
    got = kd_kl(student, teacher, 2.0, mask=labels != IGNORE, weight=w)
    cells = [(0, 0), (0, 1), (1, 0)]
    hand = sum(hand_margin_weight(teacher[i, j].tolist()) * 4 * hand_kl(teacher[i, j].tolist(), student[i, j].tolist(), 2)
               for i, j in cells) / 3
    assert got.item() == pytest.approx(hand, rel=1e-5)


def test_weight_shape_is_checked():
    with pytest.raises(ValueError, match="weight"):
        kd_kl(Z1[:2], Z0, 2.0, weight=torch.ones(3))


class NoSync(TorchFunctionMode):
    """Fails on anything that would copy a device value to the host."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("item", "__float__", "__bool__", "__int__", "tolist", "equal"):
            raise AssertionError(f"host sync: {func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["confidence", "entropy", "margin"])
def test_schedules_never_read_device_values_on_the_host(kind):
    z_s = Z1[:2].clone().requires_grad_(True)
    with NoSync():
        if kind == "confidence":
            alpha, temp = dlb_schedules.confidence(Z0, Y0, 1.0, 3.0)
            kd = alpha * kd_kl(z_s, Z0, temp)
        else:
            kd = kd_kl(z_s, Z0, 3.0, weight=dlb_schedules.row_weight(kind, Z0))
        kd.backward()
    assert z_s.grad is not None
