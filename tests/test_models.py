"""Tests for selfkd.models: registry, shapes, backward, channels_last, counts, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from selfkd.errors import ConfigError
from selfkd.models import available_models, build_model

RESNETS = ["resnet8", "resnet20", "resnet32", "resnet56", "resnet110", "resnet110b", "wrn20_8"]
EXPECTED_NAMES = sorted(RESNETS + ["vgg16", "vgg19", "densenet40", "cnn_small"])

# Exact parameter counts of this implementation, for (10, 100) classes. A change here is an
# architecture change: update the docstrings of selfkd/models/*.py with it.
PARAM_COUNTS = {
    "resnet8": (78_042, 83_892),
    "resnet20": (272_474, 278_324),
    "resnet32": (466_906, 472_756),
    "resnet56": (855_770, 861_620),
    "resnet110": (1_730_714, 1_736_564),
    "resnet110b": (1_147_738, 1_170_868),
    "wrn20_8": (6_848_090, 6_871_220),
    "vgg16": (15_249_354, 15_295_524),
    "vgg19": (20_560_330, 20_606_500),
    "densenet40": (176_122, 188_092),
    "cnn_small": (28_842, 34_692),  # with in_channels=1
}

# Published ballparks (10 classes): He et al. 2016, Table 6 (CIFAR ResNets, option A).
BALLPARK = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet56": 0.85e6, "resnet110": 1.7e6}

# Option-A (zero-padding shortcut) counts as commonly reproduced for 10 classes; option B
# adds two 1x1 conv + BN projections (16->32 and 32->64): 512 + 64 + 2048 + 128 params.
OPTION_A_COUNTS = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
}
OPTION_B_EXTRA = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


def _in_channels(name: str) -> int:
    return 1 if name == "cnn_small" else 3


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_available_models_lists_all_sorted():
    assert available_models() == EXPECTED_NAMES
    assert set(PARAM_COUNTS) == set(EXPECTED_NAMES)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_forward_backward_and_channels_last(name):
    """One contiguous and one channels_last forward (batch 2, 32x32), both equal; backward works."""
    torch.manual_seed(0)
    c, k = _in_channels(name), 7
    model = build_model(name, k, c).train()
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(2, c, 32, 32)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert x_cl.is_contiguous(memory_format=torch.channels_last)

    with torch.no_grad():
        out = model(x)  # train-mode BN uses batch statistics, so depth does not blow up logits
    out_cl = model_cl(x_cl)
    assert out.shape == (2, k)
    assert out_cl.shape == (2, k)
    assert torch.isfinite(out_cl).all()
    # The 110-layer nets differ by up to ~1.5e-4 between memory formats: the same size as
    # their float32-vs-float64 error, i.e. rounding order, not a layout bug.
    tol = 1e-3 if name in ("resnet110", "resnet110b") else 1e-5
    torch.testing.assert_close(out_cl.detach(), out, rtol=10 * tol, atol=tol)

    out_cl.logsumexp(dim=1).sum().backward()
    for pname, p in model_cl.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model_cl.parameters())


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_param_counts_exact(name):
    c = _in_channels(name)
    counts = tuple(_num_params(build_model(name, k, c)) for k in (10, 100))
    assert counts == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(BALLPARK))
def test_param_counts_match_published_ballpark(name):
    assert PARAM_COUNTS[name][0] == pytest.approx(BALLPARK[name], rel=0.04)


@pytest.mark.parametrize("name", sorted(OPTION_A_COUNTS))
def test_resnet_option_b_is_option_a_plus_two_projections(name):
    assert OPTION_B_EXTRA == 2752
    assert PARAM_COUNTS[name][0] == OPTION_A_COUNTS[name] + OPTION_B_EXTRA


def test_vgg16_is_the_common_cifar_vgg16_with_a_3_layer_head():
    """The common CIFAR VGG-16-BN with conv biases and one Linear(512, 10) has 14,728,266 params
    (14.7M); ours drops the 13 redundant conv biases (4,224) and has the 512-512-K head."""
    conv_biases = 2 * 64 + 2 * 128 + 3 * 256 + 6 * 512
    head = 2 * (512 * 512 + 512) + (512 * 10 + 10)
    assert conv_biases == 4224
    assert PARAM_COUNTS["vgg16"][0] == 14_728_266 - conv_biases - (512 * 10 + 10) + head


def test_head_size_accounts_for_class_difference():
    """100 - 10 classes adds 90 * (features + 1) params: features 64 / 256 / 512 / 132 / 64."""
    feats = {
        "resnet20": 64,
        "resnet110b": 256,
        "wrn20_8": 256,
        "vgg16": 512,
        "densenet40": 132,
        "cnn_small": 64,
    }
    for name, f in feats.items():
        p10, p100 = PARAM_COUNTS[name]
        assert p100 - p10 == 90 * (f + 1), name


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_features_and_structure(name):
    torch.manual_seed(0)
    model = build_model(name, 10)
    assert isinstance(model.stages, nn.ModuleList) and len(model.stages) == 3
    for attr in ("stem", "pool", "fc"):
        assert isinstance(getattr(model, attr), nn.Module), attr
    expansion = 1 if name in ("resnet8", "resnet20", "resnet32", "resnet56", "resnet110") else 4
    assert model.stage_channels == [16 * expansion, 32 * expansion, 64 * expansion]
    assert model.fc.in_features == model.stage_channels[-1]

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # train-mode BN: batch statistics keep deep nets well scaled
        feats = model.features(x)
        logits = model.fc(torch.flatten(model.pool(feats[-1]), 1))
    assert len(feats) == 3
    assert [f.shape[1] for f in feats] == model.stage_channels
    assert [tuple(f.shape[2:]) for f in feats] == [(32, 32), (16, 16), (8, 8)]
    assert logits.shape == (2, 10)


def test_wrn20_8_bottleneck_is_8x_wide():
    model = build_model("wrn20_8", 10)
    inner = [stage[0].conv2.out_channels for stage in model.stages]
    assert inner == [128, 256, 512]
    assert [len(stage) for stage in model.stages] == [2, 2, 2]


def test_resnet110b_and_densenet40_depth():
    def convs_and_fcs(model):
        return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())

    # Weighted layers on the main path (projection shortcuts not counted).
    r = build_model("resnet110b", 10)
    shortcuts = sum(1 for m in r.modules() if getattr(m, "shortcut", None) is not None)
    assert convs_and_fcs(r) - shortcuts == 110
    assert convs_and_fcs(build_model("densenet40", 10)) == 40


@pytest.mark.parametrize("name", ["vgg16", "densenet40"])
def test_other_nets_expose_stage_features(name):
    model = build_model(name, 10)
    with torch.no_grad():
        feats = model.features(torch.randn(2, 3, 32, 32))
    assert [f.shape[1] for f in feats] == model.stage_channels
    expected = [64, 128, 256, 512, 512] if name == "vgg16" else [96, 120, 132]
    assert model.stage_channels == expected


def test_vgg_accepts_64x64_and_has_no_dropout_by_default():
    torch.manual_seed(0)
    model = build_model("vgg16", 10).train()
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_cnn_small_on_digits_shapes_and_other_inputs():
    torch.manual_seed(0)
    model = build_model("cnn_small", 10, in_channels=1).train()
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    x = torch.randn(4, 1, 8, 8)
    out = model(x)
    out_cl = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    assert build_model("cnn_small", 3, in_channels=3)(torch.randn(2, 3, 11, 13)).shape == (2, 3)
    assert 10_000 <= _num_params(model) <= 100_000


def test_in_channels_is_honoured():
    torch.manual_seed(0)
    for name in ("resnet8", "densenet40"):
        model = build_model(name, 5, in_channels=1)
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    model = build_model("resnet8", 5, in_channels=4)
    assert model.stem[0].in_channels == 4


def test_unknown_name_raises_config_error_naming_it():
    with pytest.raises(ConfigError) as info:
        build_model("resnet9", 10)
    msg = str(info.value)
    assert "'resnet9'" in msg
    assert "\n" not in msg
    for known in EXPECTED_NAMES:
        assert known in msg


@pytest.mark.parametrize("bad", [None, 32, "ResNet32", " resnet32"])
def test_non_registered_names_raise(bad):
    with pytest.raises(ConfigError, match="unknown model"):
        build_model(bad, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True, "10", None])
def test_bad_num_classes_raise_config_error_naming_value(bad):
    with pytest.raises(ConfigError) as info:
        build_model("resnet8", bad)  # type: ignore[arg-type]
    assert "num_classes" in str(info.value)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [0, -1, 1.0, False])
def test_bad_in_channels_raise_config_error_naming_value(bad):
    with pytest.raises(ConfigError) as info:
        build_model("resnet8", 10, in_channels=bad)  # type: ignore[arg-type]
    assert "in_channels" in str(info.value)
    assert repr(bad) in str(info.value)


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    model = build_model("resnet8", np.int64(10), in_channels=np.int32(3))
    assert model.fc.out_features == 10


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_same_seed_same_weights(name):
    torch.manual_seed(123)
    a = build_model(name, 10).state_dict()
    torch.manual_seed(123)
    b = build_model(name, 10).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_different_seed_different_weights():
    torch.manual_seed(1)
    a = build_model("resnet8", 10).stem[0].weight
    torch.manual_seed(2)
    b = build_model("resnet8", 10).stem[0].weight
    assert not torch.equal(a, b)


def test_init_is_standard():
    torch.manual_seed(0)
    model = build_model("resnet56", 10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, nn.Conv2d):
            assert m.bias is None
    # Kaiming normal, fan_out, relu: std = sqrt(2 / (out_channels * k * k)).
    conv = model.stages[2][-1].conv2
    expected = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("name", ["resnet8", "resnet110b", "vgg16", "densenet40"])
def test_stage_outputs_are_not_modified_in_place_by_later_stages(name):
    """Auxiliary exits (BYOT) read features(x)[i]: later stages must not overwrite it."""
    torch.manual_seed(0)
    model = build_model(name, 10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        first = model.stages[0](model.stem(x) if hasattr(model, "stem") else x)
    torch.testing.assert_close(feats[0], first)

