"""BYOT: the multi-exit wrapper, the loss against hand computation, gradients, errors, trainer end to end."""
import json
import math

import pytest
import torch
from torch import nn

import selfkd.methods.byot  # noqa: F401  (registers "byot")
from selfkd.engine import checkpoint as ckpt
from selfkd.engine.config import build_config
from selfkd.engine.trainer import TIMING_KEYS, Trainer
from selfkd.engine.setup import build
from selfkd.errors import ConfigError, TrainingError
from selfkd.methods import Batch, build_method
from selfkd.methods.byot import BYOT, MultiExit, byot_loss
from selfkd.models import build_model
from handmath import hand_ce, softmax


def wrap(name, k=10, in_channels=3, **hp):
    torch.manual_seed(0)
    return BYOT(**hp).prepare_model(build_model(name, k, in_channels))


# -- the wrapper -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size,n_exits", [
    ("resnet8", 32, 3), ("resnet20", 32, 3), ("resnet32", 32, 3), ("densenet40", 32, 3), ("vgg16", 32, 5),
])
def test_wrapper_shapes_and_deepest_exit_is_the_model(name, size, n_exits):
    w = wrap(name, k=7)
    assert isinstance(w, MultiExit) and w.num_exits == n_exits
    x = torch.randn(3, 3, size, size)
    w.eval()
    with torch.no_grad():
        zs = w.forward_exits(x)
        assert [tuple(z.shape) for z in zs] == [(3, 7)] * n_exits
        assert torch.equal(w(x), zs[-1])
        assert torch.allclose(w.net(x), zs[-1], rtol=1e-5, atol=1e-6)  # the deepest exit is the model's own head
        # the exits differ from each other (each has its own head)
        assert not torch.allclose(zs[0], zs[-1])


@pytest.mark.parametrize("head,attention", [("sepconv", False), ("conv", False), ("sepconv", True), ("conv", True)])
def test_heads_on_digits_sized_inputs(head, attention):
    w = wrap("resnet8", k=10, in_channels=1, head=head, attention=attention)
    x = torch.randn(4, 1, 8, 8)
    logits, feats = w.forward_exits(x, with_features=True)
    assert [tuple(z.shape) for z in logits] == [(4, 10)] * 3
    assert [tuple(f.shape) for f in feats] == [(4, 64, 2, 2)] * 3  # every exit pools the deepest shape
    assert torch.equal(w(x), w.forward_exits(x)[-1])
    n_blocks = [len(e.blocks) for e in w.exits]
    assert n_blocks == [2, 1]  # one block per downsampling step: 16->32->64 channels, 8->4->2 pixels
    assert all((e.attention is not None) == attention for e in w.exits)


def test_state_dict_holds_base_model_under_net_prefix_and_exits():
    torch.manual_seed(0)
    base = build_model("resnet8", 10, 1)
    plain_keys = set(base.state_dict())
    w = BYOT().prepare_model(base)
    keys = set(w.state_dict())
    assert {k for k in keys if k.startswith("net.")} == {"net." + k for k in plain_keys}
    assert keys - {"net." + k for k in plain_keys} == {k for k in keys if k.startswith("exits.")}
    assert {k.split(".")[1] for k in keys if k.startswith("exits.")} == {"0", "1"}
    restored = build_model("resnet8", 10, 1)
    restored.load_state_dict(MultiExit.base_state_dict(w.state_dict()))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(restored.eval()(x), w.eval()(x))
    # every exit parameter is trainable and reachable by the optimiser
    ids = {id(p) for p in w.parameters()}
    assert all(id(p) in ids and p.requires_grad for p in w.exits.parameters())
    assert BYOT().prepare_model(w) is w  # wrapping twice is a no-op


def test_probe_leaves_batchnorm_statistics_and_rng_alone():
    torch.manual_seed(0)
    base, other = build_model("resnet8", 10, 1), build_model("resnet8", 10, 1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(5)
    a = MultiExit(base)
    after_wrap = torch.rand(1)
    torch.manual_seed(5)
    b = MultiExit(other)  # the exits' init is the only use of the global RNG: same seed, same exits
    assert torch.equal(torch.rand(1), after_wrap)
    assert all(torch.equal(u, v) for u, v in zip(a.exits.state_dict().values(), b.exits.state_dict().values()))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert base.training


def test_model_without_stages_is_a_config_error():
    with pytest.raises(ConfigError, match=r"byot needs a model with stages \(resnet\*.*got cnn_small"):
        BYOT().prepare_model(build_model("cnn_small", 10, 1))
    with pytest.raises(ConfigError, match="byot needs a model with stages"):
        BYOT().prepare_model(nn.Linear(4, 2))
    cfg = build_config({"data": {"name": "digits"}, "model": {"name": "cnn_small"}, "method": {"name": "byot"},
                        "train": {"epochs": 1, "device": "cpu"}})
    with pytest.raises(ConfigError, match="got cnn_small"):
        build(cfg)


# -- the loss against hand computation -------------------------------------------------------------
def hand_soft_ce(teacher, student, t):
    """-Σ_k softmax(teacher/t)_k · log softmax(student/t)_k for one row."""
    p, q = softmax(teacher, t), softmax(student, t)
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q))


def hand_kl(teacher, student, t):
    p, q = softmax(teacher, t), softmax(student, t)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


Z1 = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]  # shallowest
Z2 = [[0.0, 2.0, 1.0], [-1.0, 0.0, 1.0]]
Z3 = [[3.0, 1.0, 0.0], [0.0, 0.5, 1.5]]  # deepest
Y = [0, 2]


def exits(requires_grad=False):
    return [torch.tensor(z, requires_grad=requires_grad) for z in (Z1, Z2, Z3)]


def test_loss_matches_hand_computation_official_defaults():
    c, t = 0.3, 3.0
    loss, parts = byot_loss(exits(), torch.tensor(Y))
    ce = sum(hand_ce(r, y) for r, y in zip(Z3, Y)) / 2
    kd = sum(sum(hand_soft_ce(tr, sr, t) for tr, sr in zip(Z3, zi)) / 2 for zi in (Z1, Z2))
    ce_aux = sum(sum(hand_ce(r, y) for r, y in zip(zi, Y)) / 2 for zi in (Z1, Z2))
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert parts["ce_aux"].item() == pytest.approx(ce_aux, rel=1e-6)
    assert loss.item() == pytest.approx(ce + c * kd + (1 - c) * ce_aux, rel=1e-6)
    assert loss.item() == pytest.approx(2.2346621, rel=1e-6)  # a fixed value guards the formula
    assert set(parts) == {"ce", "kd", "ce_aux"}


def test_loss_with_other_weights_and_t2_scaling():
    c, t = 0.6, 2.0
    loss, parts = byot_loss(exits(), torch.tensor(Y), kd_weight=c, temperature=t, t2_scaling=True)
    ce = sum(hand_ce(r, y) for r, y in zip(Z3, Y)) / 2
    kd = sum(t * t * sum(hand_kl(tr, sr, t) for tr, sr in zip(Z3, zi)) / 2 for zi in (Z1, Z2))
    ce_aux = sum(sum(hand_ce(r, y) for r, y in zip(zi, Y)) / 2 for zi in (Z1, Z2))
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-6)
    assert loss.item() == pytest.approx(ce + c * kd + (1 - c) * ce_aux, rel=1e-6)


def test_t2_scaling_scales_the_soft_gradient_by_t_squared():
    t = 3.0
    grads = []
    for t2 in (False, True):
        zs = exits(requires_grad=True)
        loss, _ = byot_loss(zs, torch.tensor(Y), kd_weight=1.0, temperature=t, t2_scaling=t2)  # soft terms only
        loss.backward()
        grads.append(zs[0].grad.clone())
    assert torch.allclose(grads[1], t * t * grads[0], rtol=1e-5, atol=1e-7)


def test_gradients_deepest_gets_only_its_ce_shallow_get_both():
    zs = exits(requires_grad=True)
    y = torch.tensor(Y)
    loss, _ = byot_loss(zs, y, kd_weight=0.3, temperature=3.0)
    loss.backward()
    deep = zs[-1].detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(deep, y).backward()
    assert torch.allclose(zs[-1].grad, deep.grad, atol=1e-7)  # nothing from the soft terms (detached teacher)
    for z in zs[:-1]:
        ce_only = z.detach().clone().requires_grad_(True)
        (0.7 * torch.nn.functional.cross_entropy(ce_only, y)).backward()
        assert z.grad is not None and not torch.allclose(z.grad, ce_only.grad)  # CE and the soft term
    # with c = 1 the shallow exits learn from the teacher only: zero gradient when they match it
    zs = [torch.tensor(Z3, requires_grad=True), torch.tensor(Z3, requires_grad=True)]
    byot_loss(zs, y, kd_weight=1.0)[0].backward()
    assert torch.allclose(zs[0].grad, torch.zeros(2, 3), atol=1e-7)


def test_feature_hint_matches_hand_computation_and_teacher_gets_no_gradient():
    f1 = torch.tensor([[[[1.0]], [[2.0]]], [[[0.0]], [[-1.0]]]], requires_grad=True)  # 2 rows, 2 channels, 1x1
    f2 = torch.tensor([[[[0.5]], [[0.0]]], [[[1.0]], [[1.0]]]], requires_grad=True)
    fd = torch.tensor([[[[1.0]], [[1.0]]], [[[0.0]], [[0.0]]]], requires_grad=True)
    zs = exits()
    loss, parts = byot_loss(zs, torch.tensor(Y), hint_weight=0.5, features=[f1, f2, fd])
    hint1 = ((1 - 1) ** 2 + (2 - 1) ** 2 + 0 + (-1) ** 2) / 2
    hint2 = ((0.5 - 1) ** 2 + (0 - 1) ** 2 + 1 + 1) / 2
    base, _ = byot_loss(zs, torch.tensor(Y))
    assert parts["hint"].item() == pytest.approx(hint1 + hint2, rel=1e-6)
    assert loss.item() == pytest.approx(base.item() + 0.5 * (hint1 + hint2), rel=1e-6)
    loss.backward()
    assert fd.grad is None and f1.grad is not None and f2.grad is not None
    with pytest.raises(TrainingError, match="one feature map per exit"):
        byot_loss(zs, torch.tensor(Y), hint_weight=0.5)


def test_journal_hint_is_one_unsquared_norm_over_the_batch_and_skips_the_deepest_neighbour():
    # pooled features of 2 rows x 2 channels; exit 2 (the deepest's neighbour) is skipped (None)
    f1 = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    fd = torch.tensor([[1.0, 1.0], [0.0, 0.0]], requires_grad=True)
    zs = exits()
    loss, parts = byot_loss(zs, torch.tensor(Y), hint_weight=0.03, features=[f1, None, fd], hint="journal")
    want = math.sqrt((1 - 1) ** 2 + (2 - 1) ** 2 + 0 ** 2 + (-1) ** 2)  # torch.dist(f1, fd): sqrt(2)
    base, _ = byot_loss(zs, torch.tensor(Y))
    assert parts["hint"].item() == pytest.approx(want, rel=1e-6)
    assert loss.item() == pytest.approx(base.item() + 0.03 * want, rel=1e-6)
    loss.backward()
    assert fd.grad is None
    # d/df1 of 0.03·||f1 − fd|| = 0.03·(f1 − fd)/||f1 − fd||
    assert torch.allclose(f1.grad, 0.03 * torch.tensor([[0.0, 1.0], [0.0, -1.0]]) / want, atol=1e-7)


def test_journal_hint_adaptation_layers_are_part_of_the_model_and_trained():
    hp = {"hint": "journal", "hint_weight": 0.03, "attention": True}
    w = wrap("resnet8", k=10, in_channels=1, **hp)
    assert w.adapt is not None and len(w.adapt) == 1  # resnet8: 2 shallow exits, the deepest's neighbour skipped
    assert isinstance(w.adapt[0], nn.Linear) and w.adapt[0].in_features == w.adapt[0].out_features == 64
    assert any(k.startswith("adapt.0.") for k in w.state_dict())
    assert wrap("resnet8", k=10, in_channels=1).adapt is None  # no hint: no extra parameters
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    out = BYOT(**hp).train_step(w, Batch(x, y))
    zs, maps = w.forward_exits(x, with_features=True)
    feats = w.journal_features(maps)
    assert feats[1] is None and feats[0].shape == (6, 64) and feats[2].shape == (6, 64)
    want = torch.linalg.vector_norm(feats[0] - feats[2]).item()
    assert out.parts["hint"].item() == pytest.approx(want, rel=1e-5)
    out.loss.backward()
    assert w.adapt[0].weight.grad is not None and w.adapt[0].weight.grad.abs().sum() > 0
    with pytest.raises(TrainingError, match="adapt=True"):
        BYOT(**hp).train_step(wrap("resnet8", k=10, in_channels=1), Batch(x, y))


def test_byot_journal_preset_is_the_journal_recipe():
    from selfkd.engine.config import resolve

    cfg = resolve(preset="byot-journal", file=None, flags={"data": {"name": "digits"}, "model": {"name": "resnet8"}},
                  overrides=[])
    assert cfg.method.name == "byot"
    assert cfg.method.params() | {} == build_method("byot", kd_weight=0.3, temperature=3.0, hint="journal",
                                                    hint_weight=0.03, attention=True).hp.model_dump()
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.batch_size) == (0.1, 0.9, False, 128)
    assert cfg.schedule.kind == "multistep" and cfg.schedule.milestones == [83, 166, 240]
    assert cfg.train.epochs == 250 and cfg.augment.policy == "autoaugment" and cfg.augment.cutout == 16


def test_train_step_uses_forward_exits_and_reports_parts():
    w = wrap("resnet8", k=10, in_channels=1)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    m = BYOT()
    out = m.train_step(w, Batch(x, y))
    zs = w.forward_exits(x)
    assert torch.equal(out.logits, zs[-1]) and torch.equal(out.target, y)
    ref, _ = byot_loss(zs, y)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert set(out.parts) == {"ce", "kd", "ce_aux"}
    out.loss.backward()
    assert all(p.grad is not None for p in w.exits.parameters())
    hinted = BYOT(hint_weight=1e-3).train_step(w, Batch(x, y))
    assert set(hinted.parts) == {"ce", "kd", "ce_aux", "hint"} and hinted.parts["hint"] > 0
    with pytest.raises(TrainingError, match="prepare_model"):
        m.train_step(build_model("resnet8", 10, 1), Batch(x, y))


def test_train_step_under_bf16_autocast():
    w = wrap("resnet8", k=10, in_channels=1)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = BYOT(hint_weight=1e-3).train_step(w, Batch(x, y))
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in w.parameters() if p.grad is not None)


def test_plain_loop_call_takes_the_list_of_exits():
    m = BYOT()
    y = torch.tensor(Y)
    assert m(exits(), y).item() == pytest.approx(byot_loss(exits(), y)[0].item())
    assert m(torch.stack(exits()), y).item() == pytest.approx(byot_loss(exits(), y)[0].item())
    assert set(m.last_parts) == {"ce", "kd", "ce_aux"}
    with pytest.raises(TrainingError, match="every exit"):
        m(torch.tensor(Z3), y)


# -- hyper-parameters and state ---------------------------------------------------------------------
@pytest.mark.parametrize("bad", [{"kd_weight": -0.1}, {"kd_weight": 1.5}, {"temperature": 0}, {"temperature": -2},
                                 {"hint_weight": -1}, {"head": "mlp"}, {"t2_scaling": "sometimes"}])
def test_bad_hyper_parameters_are_rejected(bad):
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=key):
        BYOT(**bad)


def test_unknown_hyper_parameter_is_rejected_with_known_names():
    with pytest.raises(ConfigError, match="unknown key 'c'.*known hyper-parameters: kd_weight, temperature"):
        build_method("byot", c=0.3)


def test_defaults_cost_and_empty_state_round_trip(tmp_path):
    m = build_method("byot")
    assert m.hp.model_dump() == {"kd_weight": 0.3, "temperature": 3.0, "t2_scaling": False, "hint_weight": 0.0,
                                 "hint": "paper", "head": "sepconv", "attention": False}
    assert m.forwards_per_sample == 1.0
    assert m.state_dict() == {}
    torch.save(m.state_dict(), tmp_path / "s.pt")
    m.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    with pytest.raises(ConfigError, match="no state"):
        m.load_state_dict({"x": 1})


# -- the trainer end to end -------------------------------------------------------------------------
def cfg_for(epochs, **hp):
    # a 96-image stratified subset keeps the CPU runs short (3 steps of 32 per epoch)
    return build_config({"data": {"name": "digits", "subset": 96}, "model": {"name": "resnet8"}, "method": {"name": "byot", **hp},
                         "optim": {"batch_size": 32}, "train": {"epochs": epochs, "device": "cpu"}})


def rows(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def test_one_epoch_through_the_trainer(tmp_path):
    summary = Trainer(build(cfg_for(1)), tmp_path / "run", progress=False, log=lambda m: None).run()
    (row,) = rows(tmp_path / "run")
    for key in ("train_ce", "train_kd", "train_ce_aux", "test_acc_exit1", "test_acc_exit2", "test_acc_exit3"):
        assert key in row, key
    assert row["test_acc"] == row["test_acc_exit3"]
    assert summary["forwards_per_sample"] == 1.0 and summary["method"].startswith("byot(kd_weight=0.3")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["method"] == {} and "net.fc.weight" in state["model"] and "exits.0.fc.weight" in state["model"]


def test_resume_after_an_interrupt_is_bit_identical(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    Trainer(build(cfg_for(2)), ref, progress=False, log=lambda m: None).run()

    def interrupt(msg):
        if msg.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(build(cfg_for(2)), run, progress=False, log=interrupt).run()
    assert len(rows(run)) == 1
    Trainer(build(cfg_for(2)), run, progress=False, log=lambda m: None).run(resume=True)
    assert rows(run) == rows(ref)
    a, b = ckpt.load(run / "checkpoint.pt")["model"], ckpt.load(ref / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
