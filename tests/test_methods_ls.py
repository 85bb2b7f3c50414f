"""The label-smoothing family: ls, lsrkd, lsrkd-tc, tfkd-reg, zipf-ls.

Losses against hand computations (plain ``math``), gradients, validation, state, and end-to-end runs.
"""
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selfkd
import selfkd.methods.ls  # noqa: F401  (importing registers the methods)
import selfkd.methods.lsrkd  # noqa: F401
import selfkd.methods.lsrkd_tc  # noqa: F401
import selfkd.methods.tfkd_reg  # noqa: F401
import selfkd.methods.zipf_ls as zls
from selfkd.errors import ConfigError, TrainingError
from selfkd.methods import Batch
from selfkd.models import build_model
from handmath import kl, softmax

NAMES = ["ls", "lsrkd", "lsrkd-tc", "tfkd-reg", "zipf-ls"]

Z = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.25], [2.0, 0.0, 1.0, 1.5]]
Y = [1, 2, 0]


def xent(q, z):
    """-sum q log softmax(z)"""
    p = softmax(z)
    return -sum(qi * math.log(pi) for qi, pi in zip(q, p))


def hand_ce(z, y):
    return math.log(sum(math.exp(a) for a in z)) - z[y]


def tensors(requires_grad=False):
    return torch.tensor(Z, requires_grad=requires_grad), torch.tensor(Y)


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


# -- ls ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["uniform", "offtarget"])
def test_ls_matches_hand_computation(form):
    eps, k = 0.2, 4
    m = selfkd.build_method("ls", epsilon=eps, form=form)
    z, y = tensors()
    out = m.loss(z, y)

    def target(yi):
        if form == "uniform":
            return [(1 - eps) * (c == yi) + eps / k for c in range(k)]
        return [1 - eps if c == yi else eps / (k - 1) for c in range(k)]

    expected = mean(xent(target(yi), zi) for zi, yi in zip(Z, Y))
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.parts["ce"].item() == pytest.approx(mean(hand_ce(zi, yi) for zi, yi in zip(Z, Y)), rel=1e-6)
    parts = {k: v.item() for k, v in out.parts.items()}
    assert out.loss.item() == pytest.approx((1 - eps) * parts["ce"] + eps * parts["smooth"], rel=1e-6)
    if form == "uniform":  # PyTorch's label_smoothing is the uniform form
        assert out.loss.item() == pytest.approx(F.cross_entropy(z, y, label_smoothing=eps).item(), rel=1e-6)
    else:  # offtarget(ε) = uniform(ε·K/(K−1))
        ref = selfkd.build_method("ls", epsilon=eps * k / (k - 1)).loss(z, y).loss.item()
        assert out.loss.item() == pytest.approx(ref, rel=1e-6)
    assert selfkd.build_method("ls").hp.epsilon == 0.1 and selfkd.build_method("ls").hp.form == "uniform"


def test_ls_gradient_is_softmax_minus_smoothed_target():
    eps = 0.1
    z, y = tensors(requires_grad=True)
    selfkd.build_method("ls", epsilon=eps, form="offtarget")(z, y).backward()
    for zi, yi, g in zip(Z, Y, z.grad.tolist()):
        q = [1 - eps if c == yi else eps / 3 for c in range(4)]
        assert g == pytest.approx([(p - qc) / 3 for p, qc in zip(softmax(zi), q)], abs=1e-7)


# -- lsrkd ----------------------------------------------------------------------------------
def test_lsrkd_matches_hand_computation():
    alpha, t = 0.3, 2.0
    out = selfkd.build_method("lsrkd", alpha=alpha, temperature=t).loss(*tensors())
    u = [0.25] * 4
    ce = mean(hand_ce(zi, yi) for zi, yi in zip(Z, Y))
    kd = t * t * mean(kl(u, softmax(zi, t)) for zi in Z)
    assert out.parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert out.loss.item() == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-6)


def test_lsrkd_at_temperature_one_is_uniform_label_smoothing_minus_a_constant():
    z, y = tensors()
    lsrkd = selfkd.build_method("lsrkd", alpha=0.1, temperature=1.0).loss(z, y).loss.item()
    ls = selfkd.build_method("ls", epsilon=0.1).loss(z, y).loss.item()
    assert lsrkd + 0.1 * math.log(4) == pytest.approx(ls, rel=1e-6)


def test_lsrkd_gradient():
    alpha, t = 0.4, 3.0
    z, y = tensors(requires_grad=True)
    selfkd.build_method("lsrkd", alpha=alpha, temperature=t)(z, y).backward()
    for zi, yi, g in zip(Z, Y, z.grad.tolist()):
        p, q = softmax(zi), softmax(zi, t)
        want = [((1 - alpha) * (p[c] - (c == yi)) + alpha * t * (q[c] - 0.25)) / 3 for c in range(4)]
        assert g == pytest.approx(want, abs=1e-6)


# -- lsrkd-tc -------------------------------------------------------------------------------
def tc_teacher(yi, a, k, t, soften):
    pc = [a if c == yi else (1 - a) / (k - 1) for c in range(k)]
    if not soften:
        return pc
    w = [p ** (1 / t) for p in pc]  # softmax(log p / T)
    return [x / sum(w) for x in w]


@pytest.mark.parametrize("soften", [True, False])
def test_lsrkd_tc_matches_hand_computation(soften):
    alpha, t, a = 0.3, 2.0, 0.6
    out = selfkd.build_method("lsrkd-tc", alpha=alpha, temperature=t, a=a, soften_teacher=soften).loss(*tensors())
    ce = mean(hand_ce(zi, yi) for zi, yi in zip(Z, Y))
    kd = t * t * mean(kl(tc_teacher(yi, a, 4, t, soften), softmax(zi, t)) for zi, yi in zip(Z, Y))
    assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out.loss.item() == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-5)


def test_lsrkd_tc_default_is_the_journal_form_unsoftened_teacher():
    assert selfkd.build_method("lsrkd-tc").hp.soften_teacher is False
    z, y = tensors()
    default = selfkd.build_method("lsrkd-tc", alpha=0.3, temperature=2.0, a=0.6).loss(z, y).loss.item()
    literal = selfkd.build_method("lsrkd-tc", alpha=0.3, temperature=2.0, a=0.6, soften_teacher=False).loss(z, y)
    assert default == literal.loss.item()


@pytest.mark.parametrize("soften", [True, False])
def test_lsrkd_tc_near_uniform_share_is_lsrkd_and_gradient_goes_to_logits_only(soften):
    z, y = tensors()
    tc = selfkd.build_method("lsrkd-tc", a=0.25 + 1e-7, soften_teacher=soften).loss(z, y).loss.item()
    assert tc == pytest.approx(selfkd.build_method("lsrkd").loss(z, y).loss.item(), rel=1e-5)
    alpha, t, a = 0.5, 2.0, 0.7
    z, y = tensors(requires_grad=True)
    selfkd.build_method("lsrkd-tc", alpha=alpha, temperature=t, a=a, soften_teacher=soften)(z, y).backward()
    for zi, yi, g in zip(Z, Y, z.grad.tolist()):
        p, q, pc = softmax(zi), softmax(zi, t), tc_teacher(yi, a, 4, t, soften)
        want = [((1 - alpha) * (p[c] - (c == yi)) + alpha * t * (q[c] - pc[c])) / 3 for c in range(4)]
        assert g == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("name", ["lsrkd-tc", "tfkd-reg"])
def test_share_must_exceed_one_over_k(name):
    m = selfkd.build_method(name, a=0.1)
    with pytest.raises(ConfigError, match=r"a: must be greater than 1/K = 1/10"):
        m.setup(num_samples=10, num_classes=10, epochs=1)
    m.setup(num_samples=10, num_classes=11, epochs=1)
    with pytest.raises(ConfigError, match=f"method '{name}': a: must be greater than 1/K"):
        m.loss(torch.zeros(2, 10), torch.tensor([0, 1]))


# -- tfkd-reg --------------------------------------------------------------------------------
def test_tfkd_reg_matches_official_formula():
    """Official: (1−α)·CE + α·m·KLDivLoss(mean over N·K)(log_softmax(z), softmax(p^d/T)); m = K."""
    a, t, alpha, k, n = 0.99, 20.0, 0.1, 4, 3
    out = selfkd.build_method("tfkd-reg", a=a, temperature=t, alpha=alpha).loss(*tensors())
    elementwise = 0.0
    for zi, yi in zip(Z, Y):
        teacher = softmax([a if c == yi else (1 - a) / (k - 1) for c in range(k)], t)
        logp = [math.log(p) for p in softmax(zi)]
        elementwise += sum(tc * (math.log(tc) - lp) for tc, lp in zip(teacher, logp))
    official = (1 - alpha) * mean(hand_ce(zi, yi) for zi, yi in zip(Z, Y)) + alpha * k * elementwise / (n * k)
    assert out.loss.item() == pytest.approx(official, rel=1e-6)
    # the official ResNet-18/CIFAR-100 teacher is nearly uniform: ≈0.0105 on the true class
    yk = torch.tensor([3])
    teacher = torch.softmax(selfkd.methods.ls.peaked_target(yk, 100, 0.99) / 20, 1)
    assert teacher[0, 3].item() == pytest.approx(0.010502, abs=1e-6)


def test_tfkd_reg_student_temperature_and_gradient():
    a, t, ts, alpha = 0.9, 5.0, 2.0, 0.5
    z, y = tensors(requires_grad=True)
    out = selfkd.build_method("tfkd-reg", a=a, temperature=t, student_temperature=ts, alpha=alpha).loss(z, y)
    teachers = [softmax([a if c == yi else (1 - a) / 3 for c in range(4)], t) for yi in Y]
    kd = ts * ts * mean(kl(tc, softmax(zi, ts)) for tc, zi in zip(teachers, Z))
    assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-6)
    out.loss.backward()
    for zi, yi, tc, g in zip(Z, Y, teachers, z.grad.tolist()):
        p, q = softmax(zi), softmax(zi, ts)
        want = [((1 - alpha) * (p[c] - (c == yi)) + alpha * ts * (q[c] - tc[c])) / 3 for c in range(4)]
        assert g == pytest.approx(want, abs=1e-6)


# -- zipf-ls -----------------------------------------------------------------------------------
def test_min_rank_and_zipf_target_rank_over_all_classes_then_drop_target():
    ranks = zls.min_rank(torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 5.0]]))
    assert ranks.tolist() == [[1, 4, 2, 2], [2, 2, 2, 1]]  # ties share the smallest rank
    s = torch.tensor([[0.5, 3.0, 1.0, 2.0], [0.5, 3.0, 1.0, 2.0]])
    q = zls.zipf_target(s, torch.tensor([0, 1]), 1.0)
    # y=0 ranks 4th: the others have ranks 1, 3, 2 -> 1, 1/3, 1/2; y=1 ranks 1st: 1/4, 1/3, 1/2
    assert q[0].tolist() == pytest.approx([6 / 11, 2 / 11, 3 / 11], rel=1e-6)
    assert q[1].tolist() == pytest.approx([3 / 13, 4 / 13, 6 / 13], rel=1e-6)
    q2 = zls.zipf_target(s[:1], torch.tensor([0]), 2.0)
    assert q2[0].tolist() == pytest.approx([36 / 49, 4 / 49, 9 / 49], rel=1e-6)


def zipf_rows(z_rows, y_rows, power=1.0, scores=None):
    """Per row: KL(zipf || softmax(non-target logits)) with plain math."""
    out = []
    for i, (zi, yi) in enumerate(zip(z_rows, y_rows)):
        s = (scores or z_rows)[i]
        rank = [1 + sum(1 for o in s if o > v) for v in s]
        w = [rank[c] ** -power for c in range(len(zi)) if c != yi]
        q = [x / sum(w) for x in w]
        out.append(kl(q, softmax([zi[c] for c in range(len(zi)) if c != yi])))
    return out


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_zipf_ls_matches_hand_computation(power):
    lam = 0.5
    out = selfkd.build_method("zipf-ls", loss_lambda=lam, power=power).loss(*tensors())
    ce = mean(hand_ce(zi, yi) for zi, yi in zip(Z, Y))
    zipf = mean(zipf_rows(Z, Y, power))
    assert out.parts["zipf"].item() == pytest.approx(zipf, rel=1e-6, abs=1e-6)
    assert out.loss.item() == pytest.approx(ce + lam * zipf, rel=1e-6)


def test_zipf_ls_mask_averages_over_correct_rows_only():
    # argmax per row: 1 (y=1, correct), 2 (y=2, correct), 0 (y=0, correct) -> make row 3 wrong
    y_rows = [1, 2, 3]
    out = selfkd.build_method("zipf-ls", mask_correct=True).loss(torch.tensor(Z), torch.tensor(y_rows))
    rows = zipf_rows(Z, y_rows)
    assert out.parts["zipf"].item() == pytest.approx((rows[0] + rows[1]) / 2, rel=1e-6)
    none = selfkd.build_method("zipf-ls", mask_correct=True).loss(torch.tensor(Z), torch.tensor([0, 0, 1]))
    assert none.parts["zipf"].item() == 0.0
    assert none.loss.item() == pytest.approx(none.parts["ce"].item(), rel=1e-7)


def test_zipf_ls_gradient_target_column_gets_only_ce():
    lam = 0.7
    z, y = tensors(requires_grad=True)
    selfkd.build_method("zipf-ls", loss_lambda=lam)(z, y).backward()
    for zi, yi, g in zip(Z, Y, z.grad.tolist()):
        p = softmax(zi)
        others = [c for c in range(4) if c != yi]
        p_nt = softmax([zi[c] for c in others])
        rank = [1 + sum(1 for o in zi if o > v) for v in zi]
        w = [1 / rank[c] for c in others]
        q = [x / sum(w) for x in w]
        want = [(p[c] - (c == yi)) / 3 for c in range(4)]
        for j, c in enumerate(others):
            want[c] += lam * (p_nt[j] - q[j]) / 3  # the soft label is a constant: no gradient through ranks
        assert g == pytest.approx(want, abs=1e-6)


class Head(nn.Module):
    """A model whose input is its final feature map: pool + linear head, like the ResNets."""

    def __init__(self, c=3, k=3):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, k)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(k, c))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


def fmap_from_winners(winners, c=3, hw=2):
    """(N, C, hw, hw) map whose location l has its largest channel at winners[n][l]."""
    x = torch.zeros(len(winners), c, hw, hw)
    for n, row in enumerate(winners):
        for loc, w in enumerate(row):
            x[n, w, loc // hw, loc % hw] = 1.0 + 0.1 * loc
    return x


def test_zipf_ls_dense_ranks_by_location_votes():
    winners = [[2, 2, 0, 2], [0, 1, 0, 1]]  # votes [1, 0, 3] and [2, 2, 0]
    x, y = fmap_from_winners(winners), torch.tensor([0, 2])
    model = Head()
    m = selfkd.build_method("zipf-ls", rank="dense", loss_lambda=1.0)
    assert m.prepare_model(model) is model
    out = m.train_step(model.train(), Batch(x, y))
    z = model(x).tolist()
    votes = [[1, 0, 3], [2, 2, 0]]
    # row 0: y=0, ranks by votes [2, 3, 1] -> others 1/3, 1 -> [1/4, 3/4]; row 1: tie -> [1/2, 1/2]
    rows = zipf_rows(z, [0, 2], scores=votes)
    assert out.parts["zipf"].item() == pytest.approx(mean(rows), rel=1e-6, abs=1e-6)
    assert out.parts["zipf"].item() != pytest.approx(mean(zipf_rows(z, [0, 2])), rel=1e-3)  # not logit ranks
    assert zls.dense_votes(x, model.fc, 1).tolist() == votes
    assert zls.dense_votes(x, model.fc, 2).sum(1).tolist() == [16.0, 16.0]  # 4x4 locations after upsampling


def test_zipf_ls_dense_needs_prepared_model_and_training_forward():
    model = Head()
    x, y = fmap_from_winners([[0, 0, 1, 2]]), torch.tensor([1])
    with pytest.raises(TrainingError, match="prepare_model"):
        selfkd.build_method("zipf-ls", rank="dense").train_step(model, Batch(x, y))
    m = selfkd.build_method("zipf-ls", rank="dense")
    m.prepare_model(model)
    z = model.eval()(x)  # eval forwards are not captured
    with pytest.raises(TrainingError, match="no feature map"):
        m.loss(z, y)
    z = model.train()(x)
    m.loss(z, y)
    with pytest.raises(TrainingError, match="no feature map"):  # one capture serves one loss call
        m.loss(z, y)
    model(torch.cat([x, x]))  # the capture of a 2-row forward cannot serve 1-row logits
    with pytest.raises(TrainingError, match=r"shape \(2, 3, 2, 2\) but the loss got 1 rows"):
        m.loss(z, y)
    with pytest.raises(ConfigError, match="rank: 'dense' needs a model with a 'pool' module"):
        m.prepare_model(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))
    plain = Head()
    assert selfkd.build_method("zipf-ls").prepare_model(plain) is plain and not plain.pool._forward_pre_hooks


def test_zipf_ls_dense_on_a_real_resnet_uses_the_pooled_map():
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=5).train()
    m = selfkd.build_method("zipf-ls", rank="dense")
    m.prepare_model(model)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    z = model(x)
    fmap = m.feature_map
    assert fmap.shape == (2, 64, 4, 4)
    # the head applied at every location averages to the logits: the tapped map is the pooled one
    dense = F.linear(fmap.permute(0, 2, 3, 1), model.fc.weight, model.fc.bias).mean((1, 2))
    assert torch.allclose(dense, z.detach(), atol=1e-5)
    assert m.loss(z, y).parts["zipf"].item() > 0


# -- shared contract ------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_logits_only_contract_and_state_round_trip(name):
    m = selfkd.build_method(name)
    assert m.forwards_per_sample == 1
    assert m.state_dict() == {}
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m.load_state_dict(torch.load(buf, weights_only=True))
    with pytest.raises(ConfigError, match="has no state"):
        m.load_state_dict({"x": torch.zeros(1)})
    z, y = tensors(requires_grad=True)
    loss = m(z, y)
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert all(not v.requires_grad and v.dim() == 0 for v in m.last_parts.values())
    assert m.formula and m.__doc__


@pytest.mark.parametrize("name,bad", [
    ("ls", {"epsilon": -0.1}), ("ls", {"epsilon": 1.0}), ("ls", {"form": "gaussian"}),
    ("lsrkd", {"alpha": 1.5}), ("lsrkd", {"alpha": -0.1}), ("lsrkd", {"temperature": 0}),
    ("lsrkd-tc", {"a": 1.0}), ("lsrkd-tc", {"a": 0}), ("lsrkd-tc", {"temperature": -1}),
    ("tfkd-reg", {"a": 1.2}), ("tfkd-reg", {"temperature": 0}), ("tfkd-reg", {"student_temperature": 0}),
    ("tfkd-reg", {"alpha": 2}),
    ("zipf-ls", {"loss_lambda": -1}), ("zipf-ls", {"power": -1}), ("zipf-ls", {"rank": "soft"}),
    ("zipf-ls", {"dense_upsample": 0}),
])
def test_bad_hyper_parameters_are_rejected(name, bad):
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=f"method '{name}': {key}"):
        selfkd.build_method(name, **bad)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_hyper_parameter_is_rejected(name):
    with pytest.raises(ConfigError, match="unknown key 'temprature'.*known hyper-parameters"):
        selfkd.build_method(name, temprature=3)


# -- end to end -----------------------------------------------------------------------------
def _cfg(method: dict, epochs: int):
    from selfkd.engine.config import build_config

    return build_config({"data": {"name": "digits", "subset": 128}, "model": {"name": "cnn_small"}, "method": method,
                         "optim": {"batch_size": 32}, "train": {"epochs": epochs, "device": "cpu"}})


@pytest.mark.parametrize("name", NAMES)
def test_one_epoch_through_the_trainer(tmp_path, name):  # zipf-ls rank='dense' runs in the resume test
    method = {"name": name}
    from selfkd.engine.trainer import Trainer
    from selfkd.engine.setup import build

    summary = Trainer(build(_cfg(method, 1)), tmp_path / "run", progress=False, log=lambda m: None).run()
    assert summary["epochs"] == 1 and summary["forwards_per_sample"] == 1
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    parts = {"ls": "smooth", "zipf-ls": "zipf"}.get(method["name"], "kd")
    assert math.isfinite(row["train_loss"]) and math.isfinite(row[f"train_{parts}"]) and row["train_ce"] > 0


def test_resume_after_epoch_one_is_bit_identical(tmp_path):
    method = {"name": "zipf-ls", "rank": "dense", "mask_correct": True, "dense_upsample": 2}
    from selfkd.engine import checkpoint as ckpt
    from selfkd.engine.trainer import TIMING_KEYS, Trainer
    from selfkd.engine.setup import build

    Trainer(build(_cfg(method, 2)), tmp_path / "full", progress=False, log=lambda m: None).run()

    def stop(msg):
        if msg.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    cfg = _cfg(method, 2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(build(cfg), tmp_path / "cut", progress=False, log=stop).run()
    Trainer(build(cfg), tmp_path / "cut", progress=False, log=lambda m: None).run(resume=True)

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "cut") == rows(tmp_path / "full") and len(rows(tmp_path / "full")) == 2
    a = ckpt.load(tmp_path / "cut" / "checkpoint.pt")["model"]
    b = ckpt.load(tmp_path / "full" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
