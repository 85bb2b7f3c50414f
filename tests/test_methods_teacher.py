"""Methods whose teacher is a copy of the model: mrkd, mrkd-tc (snapshots on the training trajectory)
and tfkd-self (a CE-trained copy). Losses against hand computation, the snapshot schedule, gradients,
errors, state round trips and end-to-end runs through the reference trainer (with resume)."""
import copy
import json
import math

import pytest
import torch
from torch import nn

from selfkd.engine import checkpoint as ckpt
from selfkd.engine.config import build_config
from selfkd.engine.trainer import TIMING_KEYS, Trainer
from selfkd.engine.setup import build
from selfkd.errors import ConfigError, TrainingError
from selfkd.methods import Batch
from selfkd.methods.mrkd import MrKD, knowledge_adjustment
from selfkd.methods.mrkd_tc import MrKDTC
from selfkd.methods.tfkd_self import TfKDSelf
from handmath import kl, softmax


# -- hand computations (plain math) -------------------------------------------------------------
def hand_kd(teacher_rows, student_rows, t):
    """T² · mean over rows of KL(softmax(teacher/T) ‖ softmax(student/T))."""
    return t * t * sum(kl(softmax(a, t), softmax(b, t)) for a, b in zip(teacher_rows, student_rows)) / len(teacher_rows)


def hand_ce(rows, ys):
    return sum(math.log(sum(math.exp(a) for a in r)) - r[y] for r, y in zip(rows, ys)) / len(rows)


Z = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])  # student logits
ZT = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 2.0]])  # teacher logits
Y = torch.tensor([0, 2])  # the teacher is right on both rows


# -- mrkd: the loss ---------------------------------------------------------------------------------
def test_mrkd_loss_matches_hand_computation():
    m = MrKD(temperature=2.0, alpha=0.5)
    out = m.loss(Z, Y, teacher=ZT)
    ce = hand_ce(Z.tolist(), Y.tolist())
    kd = hand_kd(ZT.tolist(), Z.tolist(), 2.0)
    assert out.parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert out.loss.item() == pytest.approx(ce + 0.5 * kd, rel=1e-6)
    no_teacher = m.loss(Z, Y)  # before the first snapshot: CE only
    assert no_teacher.loss.item() == pytest.approx(ce, rel=1e-6) and no_teacher.parts["kd"].item() == 0.0


def test_knowledge_adjustment_swaps_the_top_and_true_logits():
    t = torch.tensor([[1.0, 3.0, 2.0], [5.0, 1.0, 0.0], [0.0, 4.0, 4.0]])
    y = torch.tensor([0, 0, 2])
    # row 0: top is class 1 -> swap with class 0; row 1: already right; row 2: tie, first max (1) <-> 2
    assert knowledge_adjustment(t, y).tolist() == [[3.0, 1.0, 2.0], [5.0, 1.0, 0.0], [0.0, 4.0, 4.0]]
    m = MrKD(temperature=2.0, alpha=1.0, knowledge_adjustment=True)
    y_wrong = torch.tensor([1, 2])  # teacher row 0 is wrong (top 0), row 1 right
    out = m.loss(Z, y_wrong, teacher=ZT)
    adjusted = [[2.0, 3.0, 1.0], [0.0, 0.0, 2.0]]
    assert out.parts["kd"].item() == pytest.approx(hand_kd(adjusted, Z.tolist(), 2.0), rel=1e-6)


@pytest.mark.parametrize("correction", ["mix", "floor"])
def test_mrkd_tc_matches_hand_computation(correction):
    a, t = 0.6, 2.0
    m = MrKDTC(temperature=t, alpha=0.5, a=a, correction=correction)
    y = torch.tensor([1, 2])  # row 0: teacher's p[y] < a; row 1: p[y] > a
    expected = 0.0
    for zt, z, yy in zip(ZT.tolist(), Z.tolist(), y.tolist()):
        p = softmax(zt, t)
        if correction == "mix":
            q = [(1 - a) * pk + (a if k == yy else 0.0) for k, pk in enumerate(p)]
        elif p[yy] < a:
            q = [a if k == yy else (1 - a) * pk / (1 - p[yy]) for k, pk in enumerate(p)]
        else:
            q = p
        assert sum(q) == pytest.approx(1.0)
        expected += t * t * kl(q, softmax(z, t)) / 2
    out = m.loss(Z, y, teacher=ZT)
    assert out.parts["kd"].item() == pytest.approx(expected, rel=1e-5)
    assert out.loss.item() == pytest.approx(hand_ce(Z.tolist(), y.tolist()) + 0.5 * expected, rel=1e-5)
    # a=0 is plain mrkd
    assert MrKDTC(temperature=t, a=0.0, correction=correction).loss(Z, y, teacher=ZT).parts["kd"].item() == \
        pytest.approx(MrKD(temperature=t).loss(Z, y, teacher=ZT).parts["kd"].item(), rel=1e-5)


def test_mrkd_tc_extreme_teacher_stays_finite():
    zt = torch.tensor([[200.0, -200.0, 0.0]])
    for corr in ("mix", "floor"):
        out = MrKDTC(a=0.9, correction=corr).loss(torch.zeros(1, 3), torch.tensor([1]), teacher=zt)
        assert math.isfinite(out.loss.item())


# -- mrkd: snapshots, schedule, gradients ------------------------------------------------------------
def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def data(steps, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(steps)]


def test_snapshot_schedule_fifo_and_eval_mode_teacher():
    model, t = bn_model(), 2.0
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    m = MrKD(interval=3, copies=2, temperature=t, alpha=1.0)
    mine = []  # the test's own snapshots: eval-mode deep copies taken at the same moments
    for step, (x, y) in enumerate(data(11)):
        with torch.no_grad():
            outs = [s(x).tolist() for s in mine[-2:]]
        out = m.train_step(model, Batch(x, y))
        if step > 0 and step % 3 == 0:
            mine.append(copy.deepcopy(model).eval())
        if not outs:
            assert out.parts["kd"].item() == 0.0, step  # steps 0..3: no teacher yet
        else:
            teacher = [[sum(col) / len(col) for col in zip(*rows)] for rows in zip(*outs)]
            student = out.logits.detach().tolist()
            assert out.parts["kd"].item() == pytest.approx(hand_kd(teacher, student, t), rel=1e-4, abs=1e-6), step
            expected = hand_ce(student, y.tolist()) + hand_kd(teacher, student, t)
            assert out.loss.item() == pytest.approx(expected, rel=1e-5)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert m.steps == 11
    assert len(m.snapshots) == 2  # taken at steps 3, 6, 9: the first was overwritten (FIFO)
    for snap, ref in zip(m.snapshots, mine[-2:]):
        assert not snap.training
        for (k, a), b in zip(snap.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), k
    assert not any(torch.equal(p, q) for p, q in zip(m.snapshots[-1].parameters(), model.parameters()))
    assert m.forwards_per_sample == 3.0 and MrKD().forwards_per_sample == 2.0


def test_teacher_mode_train_normalises_with_batch_statistics():
    def kd_after(mode):
        model = bn_model()
        m = MrKD(interval=1, teacher_mode=mode)
        (x0, y0), (x1, y1) = data(2)
        m.train_step(model, Batch(x0, y0))
        m.train_step(model, Batch(x0, y0))  # step 1 takes the first snapshot
        assert m.snapshots[0].training == (mode == "train")
        return m.train_step(model, Batch(x1, y1)).parts["kd"].item()

    assert kd_after("eval") != pytest.approx(kd_after("train"), rel=1e-3)


@pytest.mark.parametrize("ensemble", ["mean", "fcn"])
def test_gradients_reach_only_the_student(ensemble):
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    m = MrKD(interval=1, copies=2, ensemble=ensemble, alpha=0.7, temperature=3.0)
    for x, y in data(4):
        out = m.train_step(model, Batch(x, y))
        fcn_grad = None if m.fcn is None else m.fcn.weight.grad.clone()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.parts["kd"].item() > 0
    for snap in m.snapshots:
        assert all(not p.requires_grad and p.grad is None for p in snap.parameters())
    if ensemble == "fcn":  # the student's loss does not reach the ensembling layer
        assert torch.equal(m.fcn.weight.grad, fcn_grad)
    # the student's gradient is that of CE + α·KD towards a constant teacher
    x, y = data(1, seed=5)[0]
    snaps_before = copy.deepcopy(m.snapshots)
    fcn_before = copy.deepcopy(m.fcn)
    model.zero_grad()
    out = m.train_step(model, Batch(x, y))
    out.loss.backward()
    with torch.no_grad():
        outs = [s(x) for s in snaps_before]
        teacher = torch.stack(outs).mean(0) if ensemble == "mean" else fcn_before(torch.cat(outs, 1))
    ref = copy.deepcopy(model)
    ref.load_state_dict({k: v for k, v in model.state_dict().items()})
    ref.zero_grad()
    z = ref(x)
    loss = nn.functional.cross_entropy(z, y) + 0.7 * 9.0 * nn.functional.kl_div(
        nn.functional.log_softmax(z / 3, 1), nn.functional.softmax(teacher / 3, 1), reduction="batchmean")
    loss.backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)


def test_fcn_starts_as_the_mean_and_learns_by_ce():
    model = bn_model()
    m = MrKD(interval=1, copies=3, ensemble="fcn", temperature=2.0)
    m.setup(num_samples=100, num_classes=3, epochs=1)
    init = m.fcn.weight.detach().clone()
    assert torch.equal(init, torch.eye(3).repeat(1, 3) / 3)
    (x0, y0), (x1, y1), (x2, y2) = data(3)
    assert "fcn_ce" in m.train_step(model, Batch(x0, y0)).parts
    m.train_step(model, Batch(x1, y1))  # step 1 takes the first snapshot
    with torch.no_grad():
        teacher = m.snapshots[0](x2).tolist()  # one snapshot fills all three slots: FCN = identity
    out = m.train_step(model, Batch(x2, y2))
    assert out.parts["fcn_ce"].item() == pytest.approx(hand_ce(teacher, y2.tolist()), rel=1e-5)
    assert out.parts["kd"].item() == pytest.approx(hand_kd(teacher, out.logits.tolist(), 2.0), rel=1e-5)
    assert not torch.equal(m.fcn.weight, init)  # one SGD step on the layer's own CE
    assert m.fcn_optimizer.state[m.fcn.weight]["momentum_buffer"].abs().sum() > 0


def test_plain_call_is_a_clear_error():
    with pytest.raises(TrainingError, match="train_step"):
        MrKD()(Z, Y)
    with pytest.raises(TrainingError, match="train_step"):
        MrKDTC()(Z, Y)
    with pytest.raises(TrainingError, match="teacher"):
        TfKDSelf()(Z, Y)
    with pytest.raises(TrainingError, match="teacher"):
        TfKDSelf().loss(Z, Y)


@pytest.mark.parametrize("cls,bad", [
    (MrKD, {"interval": 0}), (MrKD, {"copies": 0}), (MrKD, {"temperature": 0}), (MrKD, {"alpha": -0.1}),
    (MrKD, {"ensemble": "max"}), (MrKD, {"teacher_mode": "test"}), (MrKD, {"fcn_lr": 0}),
    (MrKD, {"fcn_momentum": 1.0}), (MrKDTC, {"a": 1.0}), (MrKDTC, {"a": -0.1}), (MrKDTC, {"correction": "set"}),
    (TfKDSelf, {"alpha": 1.5}), (TfKDSelf, {"temperature": 0}), (TfKDSelf, {"teacher": 3}),
])
def test_bad_hyper_parameters_are_rejected(cls, bad):
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=key):
        cls(**bad)


def test_unknown_hyper_parameter_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown key 'intervall'.*interval"):
        MrKD(intervall=3)
    with pytest.raises(ConfigError, match="unknown key 'teachr'.*teacher"):
        TfKDSelf(teachr="x")


# -- mrkd: state -----------------------------------------------------------------------------------
def run_plain(m, model, opt, batches):
    losses = []
    for x, y in batches:
        out = m.train_step(model, Batch(x, y))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("cls", [MrKD, MrKDTC])
def test_state_dict_resumes_exactly(tmp_path, cls):
    kw = dict(interval=2, copies=2, ensemble="fcn", knowledge_adjustment=True)
    batches = data(12)

    def fresh():
        model = bn_model()
        return cls(**kw), model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)

    m, model, opt = fresh()
    full = run_plain(m, model, opt, batches)

    m1, model1, opt1 = fresh()
    first = run_plain(m1, model1, opt1, batches[:7])
    torch.save({"method": m1.state_dict(), "model": model1.state_dict(), "opt": opt1.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["method"]["steps"] == 7 and len(state["method"]["snapshots"]) == 2
    assert set(state["method"]) == {"steps", "snapshots", "fcn", "fcn_optimizer"}

    m2, model2, opt2 = fresh()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    m2.load_state_dict(state["method"])
    assert m2.state_dict()["steps"] == 7  # state before the snapshots are rebuilt
    rest = run_plain(m2, model2, opt2, batches[7:])
    assert first + rest == full  # bit-identical
    for a, b in zip(m.snapshots, m2.snapshots):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_state_that_does_not_fit_the_config_is_rejected():
    model = bn_model()
    m = MrKD(interval=1, copies=2, ensemble="fcn")
    run_plain(m, model, torch.optim.SGD(model.parameters(), lr=0.1), data(4))
    state = m.state_dict()
    with pytest.raises(ConfigError, match="copies"):
        MrKD(interval=1, copies=1, ensemble="fcn").load_state_dict(state)
    with pytest.raises(ConfigError, match="ensemble"):
        MrKD(interval=1, copies=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="expected keys"):
        MrKD().load_state_dict({"steps": 1})


# -- tfkd-self -------------------------------------------------------------------------------------
def test_tfkd_self_loss_matches_hand_computation():
    m = TfKDSelf(alpha=0.9, temperature=4.0)
    out = m.loss(Z, Y, teacher=ZT)
    ce, kd = hand_ce(Z.tolist(), Y.tolist()), hand_kd(ZT.tolist(), Z.tolist(), 4.0)
    assert out.parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert out.loss.item() == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-6)
    d = TfKDSelf()
    assert (d.hp.alpha, d.hp.temperature, d.hp.teacher, d.forwards_per_sample) == (0.95, 6.0, None, 2.0)
    assert TfKDSelf.needs_teacher


def test_tfkd_self_loads_a_frozen_teacher_and_only_the_student_learns(tmp_path):
    torch.manual_seed(3)
    trained = bn_model()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    torch.save({"epoch": 1, "model": trained.state_dict()}, tmp_path / "best.pt")
    (tmp_path / "run").mkdir()
    torch.save({"model": trained.state_dict(), "format": 1}, tmp_path / "run" / "checkpoint.pt")
    torch.save(trained.state_dict(), tmp_path / "bare.pt")
    for where in (tmp_path / "best.pt", tmp_path / "run", tmp_path / "bare.pt"):
        student = bn_model()
        m = TfKDSelf(teacher=str(where), alpha=0.5, temperature=2.0)
        assert m.prepare_model(student) is student
        assert m.teacher is not student and not m.teacher.training
        assert all(torch.equal(a, b) for a, b in zip(m.teacher.state_dict().values(), trained.state_dict().values()))
    x, y = data(1)[0]
    student.train()
    out = m.train_step(student, Batch(x, y))
    with torch.no_grad():
        zt = trained.eval()(x).tolist()
    assert out.parts["kd"].item() == pytest.approx(hand_kd(zt, out.logits.tolist(), 2.0), rel=1e-5)
    out.loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in m.teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert not m.teacher.training  # the teacher's BN statistics are not updated


def test_tfkd_self_teacher_errors_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="method.teacher is not set"):
        TfKDSelf().prepare_model(bn_model())
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"{missing}.*not found"):
        TfKDSelf(teacher=str(missing)).prepare_model(bn_model())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pt cannot be loaded"):
        TfKDSelf(teacher=str(tmp_path / "junk.pt")).prepare_model(bn_model())
    torch.save({"epoch": 3, "weights": torch.zeros(2)}, tmp_path / "keys.pt")
    with pytest.raises(ConfigError, match="keys.pt holds no 'model' state_dict"):
        TfKDSelf(teacher=str(tmp_path / "keys.pt")).prepare_model(bn_model())
    torch.save({"model": nn.Linear(4, 3).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="other.pt does not fit the model"):
        TfKDSelf(teacher=str(tmp_path / "other.pt")).prepare_model(bn_model())
    with pytest.raises(TrainingError, match="prepare_model"):
        TfKDSelf(teacher=str(tmp_path / "other.pt")).train_step(bn_model(), Batch(*data(1)[0]))


def test_tfkd_self_state_is_the_teacher_fingerprint(tmp_path):
    torch.save({"model": bn_model().state_dict()}, tmp_path / "a.pt")
    other = bn_model()
    with torch.no_grad():
        other[0].weight.add_(1e-3)
    torch.save({"model": other.state_dict()}, tmp_path / "b.pt")
    m = TfKDSelf(teacher=str(tmp_path / "a.pt"))
    assert m.state_dict() == {}
    m.prepare_model(bn_model())
    torch.save(m.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert set(state) == {"teacher_sha256"}
    again = TfKDSelf(teacher=str(tmp_path / "a.pt"))
    again.prepare_model(bn_model())
    again.load_state_dict(state)
    with pytest.raises(ConfigError, match="other weights"):
        b = TfKDSelf(teacher=str(tmp_path / "b.pt"))
        b.prepare_model(bn_model())
        b.load_state_dict(state)


# -- end to end through the reference trainer --------------------------------------------------------
def cfg(method, epochs, **params):
    return build_config({"data": {"name": "digits"}, "model": {"name": "cnn_small"},
                         "method": {"name": method, **params}, "optim": {"batch_size": 64},
                         "train": {"epochs": epochs, "device": "cpu", "seed": 0}})


def rows(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def train_and_resume(tmp_path, method, **params):
    """2 epochs in one go; 2 epochs interrupted after epoch 1 and resumed: must be bit-identical."""
    ref = tmp_path / "ref"
    Trainer(build(cfg(method, 2, **params)), ref, progress=False, log=lambda m: None).run()

    def stop(msg):
        if msg.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(build(cfg(method, 2, **params)), run, progress=False, log=stop).run()
    assert len(rows(run)) == 1 and not (run / "summary.json").exists()
    Trainer(build(cfg(method, 2, **params)), run, progress=False, log=lambda m: None).run(resume=True)
    assert rows(run) == rows(ref)
    a, b = ckpt.load(run / "checkpoint.pt"), ckpt.load(ref / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    return rows(ref), b


def test_mrkd_trains_and_resumes_bit_identically_across_epochs(tmp_path):
    # 22 steps per epoch: snapshots at steps 5, 10, 15, 20 (epoch 1) and 25, ... (epoch 2)
    hist, state = train_and_resume(tmp_path, "mrkd", interval=5, copies=2, ensemble="fcn", knowledge_adjustment=True)
    assert hist[0]["train_kd"] > 0 and hist[0]["train_fcn_ce"] > 0 and hist[1]["train_kd"] > 0
    method = state["method"]
    assert method["steps"] == 44 and len(method["snapshots"]) == 2
    assert method["snapshots"][0].keys() == state["model"].keys()
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["forwards_per_sample"] == 3.0


def test_mrkd_tc_trains_one_epoch(tmp_path):
    s = Trainer(build(cfg("mrkd-tc", 1, interval=5, a=0.5)), tmp_path / "run", progress=False, log=lambda m: None).run()
    assert s["epochs"] == 1 and s["forwards_per_sample"] == 2.0
    assert rows(tmp_path / "run")[0]["train_kd"] > 0


def test_tfkd_self_trains_from_a_ce_teacher_and_resumes(tmp_path):
    teacher = tmp_path / "teacher"
    Trainer(build(cfg("ce", 1)), teacher, progress=False, log=lambda m: None).run()
    hist, state = train_and_resume(tmp_path, "tfkd-self", teacher=str(teacher))
    assert hist[0]["train_kd"] > 0
    assert set(state["method"]) == {"teacher_sha256"}
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["forwards_per_sample"] == 2.0 and summary["method"].startswith("tfkd-self(")
