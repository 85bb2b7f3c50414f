"""Typed config: layering, overrides, and loud errors that name the key."""
import pytest

from selfkd.engine import config as C
from selfkd.engine.schedule import lr_lambda
from selfkd.errors import ConfigError


def test_layers_merge_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lr: 0.2}\ntrain: {epochs: 7}\nmethod: {name: dlb, temperature: 4}\n")
    cfg = C.resolve(preset="dlb-cifar", file=str(f), flags={"train": {"seed": 3}},
                    overrides=["method.alpha=0.5", "schedule.milestones=[2,4]"])
    assert cfg.optim.lr == 0.2 and cfg.train.epochs == 7 and cfg.train.seed == 3
    assert cfg.schedule.kind == "multistep" and cfg.schedule.milestones == [2, 4]  # preset, then override
    assert cfg.method.name == "dlb" and cfg.method.params()["temperature"] == 4 and cfg.method.params()["alpha"] == 0.5


def test_preset_matches_dlb_repo_recipe():
    cfg = C.resolve(preset="dlb-cifar")
    assert (cfg.train.epochs, cfg.optim.lr, cfg.optim.batch_size, cfg.optim.weight_decay) == (240, 0.05, 64, 5e-4)
    assert cfg.optim.nesterov and cfg.schedule.milestones == [150, 180, 210] and cfg.schedule.gamma == 0.1


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=0.1", "unknown key 'optim.lrr'"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.batch_size=1", "optim.batch_size"),
    ("train.epochs=0", "train.epochs"),
    ("train.device=tpu", "train.device"),
    ("data.noise.rate=1.0", "data.noise.rate"),
    ("method.temperature=3", "unknown key 'temperature'"),  # ce has no temperature
    ("nonsense.key=1", "unknown key 'nonsense'"),
    ("optim.lr", "expected key.path=value"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        C.resolve(overrides=[override])


def test_method_params_validated_against_the_method():
    with pytest.raises(ConfigError, match="temperature"):
        C.resolve(overrides=["method.name=dlb", "method.temperature=0"])
    with pytest.raises(ConfigError, match="alpha"):
        C.resolve(overrides=["method.name=dlb", "method.alpha=-1"])
    with pytest.raises(ConfigError, match="unknown method 'dbl'"):
        C.resolve(overrides=["method.name=dbl"])


def test_switching_method_drops_the_old_methods_params(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: {name: dlb, temperature: 4}\n")
    cfg = C.resolve(file=str(f), flags={"method": {"name": "ce"}})
    assert cfg.method.name == "ce" and cfg.method.params() == {}


def test_milestones_must_fit_the_run():
    with pytest.raises(ConfigError, match="milestones"):
        C.resolve(overrides=["schedule.kind=multistep", "schedule.milestones=[5,30]", "train.epochs=20"])
    with pytest.raises(ConfigError, match="milestones"):
        C.resolve(overrides=["schedule.milestones=[5,3]"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        C.resolve(file=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        C.resolve(file=str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        C.resolve(file=str(lst))
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        C.resolve(preset="fast")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = C.resolve(overrides=["method.name=dlb", "method.temperature=4.5", "data.noise.kind=symmetric",
                               "data.noise.rate=0.4"])
    p = tmp_path / "config.yaml"
    p.write_text(C.save_yaml(cfg))
    again = C.build_config(C.load_yaml(p))
    assert again == cfg
    assert "temperature: 4.5" in p.read_text()


def test_schedules():
    cfg = C.resolve(overrides=["schedule.kind=multistep", "schedule.milestones=[2,3]", "train.epochs=4"]).schedule
    f = lr_lambda(cfg, epochs=4, steps_per_epoch=10, base_lr=0.1)
    assert [f(s) for s in (0, 19, 20, 29, 30, 39)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = C.resolve(overrides=["schedule.kind=cosine", "schedule.warmup_epochs=1", "train.epochs=3"]).schedule
    g = lr_lambda(cos, epochs=3, steps_per_epoch=10, base_lr=0.1)
    assert g(0) == pytest.approx(0.1) and g(9) == pytest.approx(1.0)  # linear warmup over 10 steps
    assert g(10) == pytest.approx(1.0) and g(20) == pytest.approx(0.5) and g(30) == pytest.approx(0.0)


def test_dlb_repeat_preset_is_dlb_batches_with_ce_on_every_row_and_no_distillation():
    import torch

    from selfkd.methods import build_method

    cfg = C.resolve(preset="dlb-repeat", flags={"data": {"name": "digits"}})
    assert cfg.method.name == "dlb" and cfg.method.params()["alpha"] == 0.0
    dlb = build_method(cfg.method.name, **cfg.method.params())
    sampler = dlb.batch_sampler(range(6), batch_size=3)
    g = torch.Generator().manual_seed(0)
    for step, idx in enumerate(sampler):  # step 0: 3 new rows; step 1: 3 repeated + 3 new
        z = torch.randn(len(idx), 4, generator=g, requires_grad=True)
        y = torch.tensor([i % 4 for i in idx])
        out = dlb.loss(z, y, index=torch.tensor(idx))
        loss = out.loss
        # by hand: the mean over all rows of -log softmax(z)[y], nothing else
        hand = -(z.log_softmax(1)[torch.arange(len(idx)), y]).mean()
        assert len(idx) == (3 if step == 0 else 6)
        assert abs(loss.item() - hand.item()) <= 1e-6 * hand.item()  # float32 rounding only
        (gz,) = torch.autograd.grad(loss, z)
        (gh,) = torch.autograd.grad(hand, z)
        assert torch.allclose(gz, gh, atol=1e-7)


def test_validation_checks_the_params_without_building_the_method(monkeypatch):
    """A config is validated against the method's Params; the method is built once, by the trainer's build."""
    from selfkd.methods import DLB

    built = []
    real = DLB.__init__
    monkeypatch.setattr(DLB, "__init__", lambda self, **kw: (built.append(kw), real(self, **kw))[1])
    cfg = C.build_config({"method": {"name": "dlb", "temperature": 4}})
    assert built == [] and cfg.method.params()["temperature"] == 4.0 and cfg.method.params()["alpha"] == 1.0
    C.MethodCfg(name="dlb", **cfg.method.params())
    assert built == []
    from selfkd.engine.setup import build

    build(C.build_config({"data": {"subset": 40}, "method": {"name": "dlb"}, "train": {"device": "cpu", "epochs": 1}}))
    assert len(built) == 1
