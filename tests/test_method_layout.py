"""Issue 17, methods and models: one registry mechanism, DLB's sampler-to-loss hand-over as a public object,
one epoch planner, one integer check, one state-key guard, and tests that use public names only."""
import ast
import re
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from torch import nn

import selfkd
from selfkd import models
from selfkd.errors import ConfigError, TrainingError, integer
from selfkd.methods import CSKD, DLB, Method, registry
from selfkd.methods.base import EpochPlan
from selfkd.methods.dlb import SCHEDULES, DLBParams, Layouts
from selfkd.plugins import Registry

TESTS = Path(__file__).parent


def test_models_and_methods_share_one_registry_class_and_decorator_style():
    assert isinstance(models.MODELS, Registry) and isinstance(registry.METHODS, Registry)
    with models.MODELS.scope(), registry.METHODS.scope():
        @selfkd.register_model  # bare: the function's name
        def tiny_net(num_classes, in_channels):
            return nn.Linear(in_channels, num_classes)

        @selfkd.register_method  # bare: the class's name
        class Tiny(Method):
            name = "tiny-method"

        assert selfkd.build_model("tiny_net", 3, 2).out_features == 3
        assert registry.method_class("tiny-method") is Tiny
        with pytest.raises(ConfigError, match=r"^register_method: .* is named 'tiny-method', not 'other'$"):
            selfkd.register_method("other")(Tiny)
        with pytest.raises(ConfigError, match=r"^register_model: 'tiny_net' is already registered \(.*tiny_net\)"):
            selfkd.register_model(lambda k, c: nn.Identity(), name="tiny_net")
    assert "tiny_net" not in selfkd.available_models() and "tiny-method" not in selfkd.available_methods()
    with pytest.raises(ConfigError, match=r"^unknown model 'tiny_net'; known: .*, or timm:ARCH$"):
        selfkd.build_model("tiny_net", 3)


def test_dlb_hands_layouts_to_its_loss_through_one_public_object():
    dlb = DLB()
    assert isinstance(dlb.layouts, Layouts) and len(dlb.layouts) == 0
    with pytest.raises(TrainingError, match="no batch layout is pending"):
        dlb.layouts.next()
    sampler = iter(dlb.batch_sampler(list(range(6)), 2))
    first, second = next(sampler), next(sampler)  # a prefetching loader runs ahead of the loss
    assert len(dlb.layouts) == 2 and dlb.layouts.next().indices() == first == [0, 1]
    dlb.loss(torch.zeros(2, 3), torch.tensor(first) % 3, index=torch.tensor(first))
    assert len(dlb.layouts) == 1 and dlb.layouts.next().indices() == second == [0, 1, 2, 3]
    assert dlb.cached_logits.shape == (2, 3) and dlb.last_mix is None


def test_dlb_and_cskd_plan_their_epochs_with_one_planner():
    dlb, cskd = DLB(), CSKD()
    assert isinstance(dlb.plan, EpochPlan) and isinstance(cskd.plan, EpochPlan)
    plan = EpochPlan()
    order, start = plan.begin([3, 1, 2, 0], 2, False)
    assert order.tolist() == [3, 1, 2, 0] and start == 0 and plan.epoch == 0
    plan.position = 1
    again = EpochPlan()
    again.load_state_dict(plan.state_dict())
    assert again.resumes_at() == 1 and again.resuming(2, False)
    order2, start2 = again.begin([0, 1, 2, 3], 2, False)  # continues the saved order
    assert order2.tolist() == [3, 1, 2, 0] and start2 == 1 and again.resumes_at() is None
    assert again.begin([0, 1, 2, 3], 2, False)[0].tolist() == [0, 1, 2, 3]  # the next epoch draws anew


def test_dlb_schedules_have_one_source():
    assert SCHEDULES == ("constant", "linear", "confidence", "entropy", "margin")
    assert get_args(DLBParams.model_fields["schedule"].annotation) == SCHEDULES
    src = (Path(selfkd.__file__).parent / "methods" / "dlb" / "params.py").read_text()
    assert src.count('"margin"') == 2  # the Literal and PER_SAMPLE, nowhere else


@pytest.mark.parametrize("value, minimum, want", [(3, 1, 3), (np.int64(4), 2, 4), (torch.tensor(5), None, 5),
                                                  (-7, None, -7)])
def test_integer_accepts_integers(value, minimum, want):
    got = integer(value, "x", minimum)
    assert got == want and type(got) is int


@pytest.mark.parametrize("value, minimum, msg", [
    (True, 1, "num_classes: expected an integer >= 1, got True"),
    (2.0, 1, "num_classes: expected an integer >= 1, got 2.0"),
    (0, 1, "num_classes: expected an integer >= 1, got 0"),
    ("3", None, "num_classes: expected an integer, got '3'"),
])
def test_integer_refuses_with_one_line(value, minimum, msg):
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        integer(value, "num_classes", minimum)


def test_models_pskd_and_noise_use_the_same_integer_check():
    from selfkd.data.noise import apply_label_noise
    from selfkd.methods import PSKD

    with pytest.raises(ConfigError, match=r"^num_classes: expected an integer >= 2, got 1$"):
        selfkd.build_model("resnet8", 1)
    with pytest.raises(ConfigError, match=r"^PS-KD setup: epochs: expected an integer >= 1, got True$"):
        PSKD().setup(num_samples=4, num_classes=3, epochs=True)
    with pytest.raises(ConfigError, match=r"^num_classes: expected an integer >= 1, got 0$"):
        apply_label_noise(torch.tensor([0, 1]), 0, "symmetric", 0.1, 0)


def test_every_method_guards_its_state_keys_the_same_way():
    for name in ("dlb", "cskd", "pskd", "mrkd"):
        m = selfkd.build_method(name)
        with pytest.raises(ConfigError, match=rf"^method '{name}' state: unknown keys \['bogus'\]; expected keys "):
            m.load_state_dict({**m.state_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match=r"^method 'mrkd' state: missing keys \['snapshots'\]; expected keys "):
        selfkd.build_method("mrkd").load_state_dict({"steps": 0})
    with pytest.raises(ConfigError, match=r"^method 'dlb' state: unknown keys \['pending'\]"):
        DLB().load_state_dict({**DLB().state_dict(), "pending": []})


def test_multi_exit_need_is_declared_on_every_method():
    assert Method.needs_stages is False
    assert [n for n in selfkd.available_methods() if registry.method_class(n).needs_stages] == ["byot"]


#: private attributes of selfkd objects that tests used to read
PRIVATE = {"_track", "_cache_logits", "_last_mix", "_memory", "_snapshots", "_fcn", "_fcn_opt", "_fmap",
           "_METHODS", "_MODELS", "_BUILTIN", "_order", "_partners", "_position", "_gen"}


def test_tests_use_public_names_of_methods_and_models():
    found = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE and not (
                    isinstance(node.value, ast.Name) and node.value.id == "self"):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found
