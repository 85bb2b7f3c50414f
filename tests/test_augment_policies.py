"""Tests of selfkd.data.policies (Cutout, AutoAugment, RandAugment, TrivialAugment and their ops) and
selfkd.data.mixing (mixup, CutMix, the Beta sampler, mixed losses).

Each op is checked against a slow per-image reference written here with plain Python / numpy; each
policy's dispatch against a per-sample replay of its documented draws.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfkd.data.mixing import MIXERS, Mix, build_mixer, cutmix, mixup, sample_beta
from selfkd.data.policies import (AUTOAUGMENT_POLICIES, OP_NAMES, OPS, POLICIES, AutoAugment, Cutout, RandAugment,
                                  TrivialAugment, build_policy)
from selfkd.errors import ConfigError, DataError
from selfkd.methods.losses import cross_entropy, mix_targets

CUDA = torch.cuda.is_available()


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def batch(b: int = 8, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, h, w), generator=gen(seed), dtype=torch.uint8)


def op(name: str, x: torch.Tensor, m, fill: float = 0.0) -> torch.Tensor:
    ms = torch.as_tensor(m, dtype=torch.float32).reshape(-1).expand(x.shape[0])
    f = torch.full((1, x.shape[1], 1, 1), float(fill))
    return OPS[name](x, ms.contiguous(), f)


# ==================================================================================================
# policies: shapes, dtypes, determinism, errors
# ==================================================================================================

@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("c", [1, 3])
def test_policy_shape_dtype_determinism(name, c):
    x = batch(16, c, 12, 12)
    pol = build_policy(name)
    a, b = pol(x, gen(3)), pol(x, gen(3))
    assert a.dtype == torch.uint8 and a.shape == x.shape and a.device == x.device
    assert torch.equal(a, b)
    assert not torch.equal(a, x)                       # something happened
    assert not torch.equal(a, pol(x, gen(4)))          # the seed matters
    assert torch.equal(x, batch(16, c, 12, 12))        # the input is untouched
    cl = pol(x.contiguous(memory_format=torch.channels_last), gen(3))
    assert torch.equal(cl, a) and cl.is_contiguous(memory_format=torch.channels_last)


def test_policy_draws_consume_generator_fixed_amount():
    # the draws depend on the batch shape only, not on the pixel values
    for name in POLICIES:
        g1, g2 = gen(5), gen(5)
        pol = build_policy(name)
        pol(batch(8, seed=1), g1)
        pol(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), g2)
        assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2)), name


def test_policy_bad_inputs():
    pol = RandAugment()
    with pytest.raises(DataError, match="uint8"):
        pol(torch.zeros(2, 3, 8, 8), gen())
    with pytest.raises(DataError, match="channels"):
        pol(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), gen())
    with pytest.raises(ConfigError, match="Generator"):
        pol(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 0)
    with pytest.raises(DataError, match="fill"):
        RandAugment(fill=[1, 2, 3])(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), gen())


def test_build_policy_errors():
    with pytest.raises(ConfigError) as e:
        build_policy("mixup")
    assert "'mixup'" in one_line(e) and "trivialaugment" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_policy("cutout", length=8)
    assert "'length'" in one_line(e) and "size" in str(e.value)
    for name, kw, key in [("cutout", {"size": 0}, "size"), ("cutout", {"fill": 256}, "fill"),
                          ("randaugment", {"magnitude": 31}, "magnitude"), ("randaugment", {"num_ops": -1}, "num_ops"),
                          ("randaugment", {"num_magnitude_bins": 1}, "num_magnitude_bins"),
                          ("trivialaugment", {"fill": [1, 2.5]}, "fill"),
                          ("autoaugment", {"policy": "imagenet"}, "policy"),
                          ("autoaugment", {"policy": [(("Blur", 1.0, None),)]}, "policy")]:
        with pytest.raises(ConfigError) as e:
            build_policy(name, **kw)
        assert one_line(e).startswith(key), (name, kw, str(e.value))
    assert isinstance(build_policy("cutout", size=8, fill=[1, 2, 3]), Cutout)


# ==================================================================================================
# ops against slow references
# ==================================================================================================

def test_rotate_matches_rot90():
    x = batch(3, 3, 9, 9)
    for k, deg in [(1, 90.0), (2, 180.0), (3, 270.0), (-1, -90.0)]:
        assert torch.equal(op("Rotate", x, deg), torch.rot90(x, k, dims=(-2, -1))), deg
    assert torch.equal(op("Rotate", x, 0.0), x)
    # a non-square image rotated 180 degrees is flipped both ways
    y = batch(2, 1, 6, 10)
    assert torch.equal(op("Rotate", y, 180.0), y.flip(-1).flip(-2))


@pytest.mark.parametrize("k", [3, -2, 3.7, -2.9])
def test_translate_shifts_and_fills(k):
    x = batch(2, 3, 8, 8)
    s = int(k)  # truncated toward zero
    out_x, out_y = op("TranslateX", x, k, fill=7), op("TranslateY", x, k, fill=7)
    ref_x = torch.full_like(x, 7)
    ref_y = torch.full_like(x, 7)
    if s > 0:
        ref_x[..., :, s:] = x[..., :, :-s]
        ref_y[..., s:, :] = x[..., :-s, :]
    else:
        ref_x[..., :, :s] = x[..., :, -s:]
        ref_y[..., :s, :] = x[..., -s:, :]
    assert torch.equal(out_x, ref_x) and torch.equal(out_y, ref_y)


@pytest.mark.parametrize("m", [0.3, -0.3, 0.99])
def test_shear_against_reference(m):
    x = batch(2, 3, 8, 10)
    h, w = x.shape[-2:]
    ref_x = np.full(x.shape, 9, dtype=np.uint8)
    ref_y = np.full(x.shape, 9, dtype=np.uint8)
    xn = x.numpy()
    for i in range(h):
        for j in range(w):
            sj = j + m * (i + 0.5)            # source column of output pixel (i, j), pixel units
            jj = round(sj)
            if 0 <= jj < w:
                ref_x[:, :, i, j] = xn[:, :, i, jj]
            si = i + m * (j + 0.5)
            ii = round(si)
            if 0 <= ii < h:
                ref_y[:, :, i, j] = xn[:, :, ii, j]
    assert np.array_equal(op("ShearX", x, m, fill=9).numpy(), ref_x)
    assert np.array_equal(op("ShearY", x, m, fill=9).numpy(), ref_y)


def test_invert_solarize_posterize():
    x = batch(3, 3, 6, 6)
    assert torch.equal(op("Invert", x, 0.0), 255 - x)
    assert torch.equal(op("Identity", x, 0.0), x)
    xs = x.tolist()
    for thr in [0.0, 100.0, 178.5, 255.0, 256.0]:
        ref = [[[[255 - v if v >= thr else v for v in r] for r in ch] for ch in im] for im in xs]
        assert op("Solarize", x, thr).tolist() == ref, thr
    for bits in [8, 7, 5, 2, 0]:
        sh = 8 - bits
        ref = [[[[(v >> sh) << sh for v in r] for r in ch] for ch in im] for im in xs]
        assert op("Posterize", x, float(bits)).tolist() == ref, bits


def _equalize_ref(ch: list[int]) -> list[int]:
    """PIL's ImageOps.equalize on one channel."""
    h = [0] * 256
    for v in ch:
        h[v] += 1
    histo = [c for c in h if c]
    step = (sum(histo) - histo[-1]) // 255
    if not step:
        return list(ch)
    lut, n = [], step // 2
    for i in range(256):
        lut.append(min(n // step, 255))
        n += h[i]
    return [lut[v] for v in ch]


def test_equalize_against_reference():
    x = torch.cat([batch(2, 3, 32, 32, seed=1),
                   torch.randint(100, 112, (2, 3, 32, 32), generator=gen(2), dtype=torch.uint8),  # low contrast
                   torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)])                             # constant
    x[4, 1, :16] = 200                                                                             # two values
    x[3, 2] = (torch.arange(32 * 32) % 7 * 30).view(32, 32).to(torch.uint8)
    out = op("Equalize", x, 0.0)
    for b in range(x.shape[0]):
        for c in range(3):
            ch = x[b, c].reshape(-1).tolist()
            assert out[b, c].reshape(-1).tolist() == _equalize_ref(ch), (b, c)


def test_autocontrast_against_reference():
    x = torch.randint(40, 180, (3, 3, 8, 8), generator=gen(3), dtype=torch.uint8)
    x[2, 1] = 93  # constant channel: unchanged
    out = op("AutoContrast", x, 0.0)
    for b in range(3):
        for c in range(3):
            ch = x[b, c].reshape(-1).tolist()
            lo, hi = min(ch), max(ch)
            ref = ch if hi == lo else [(v - lo) * 255 // (hi - lo) for v in ch]
            assert out[b, c].reshape(-1).tolist() == ref
    assert out[0].amin().item() == 0 and out[0].amax().item() == 255


def _gray_ref(xn: np.ndarray) -> np.ndarray:
    return np.floor(0.2989 * xn[:, 0:1] + 0.587 * xn[:, 1:2] + 0.114 * xn[:, 2:3])


def _blend_ref(xn, other, f):
    # f * x + (1 - f) * other, written so that other == x gives x exactly
    return np.floor(np.clip(xn + (f - 1.0) * (xn - other), 0, 255))


def _close(out: torch.Tensor, ref: np.ndarray) -> None:
    d = np.abs(out.numpy().astype(np.int64) - ref.astype(np.int64))
    assert d.max() <= 1 and (d == 0).mean() > 0.97, (d.max(), (d == 0).mean())


@pytest.mark.parametrize("m", [0.5, -0.5, 0.9, -0.99])
def test_color_ops_against_reference(m):
    x = batch(3, 3, 8, 8, seed=4)
    xn = x.numpy().astype(np.float64)
    f = 1.0 + m
    _close(op("Brightness", x, m), _blend_ref(xn, 0.0, f))
    g = _gray_ref(xn)
    _close(op("Color", x, m), _blend_ref(xn, g, f))
    _close(op("Contrast", x, m), _blend_ref(xn, g.mean(axis=(1, 2, 3), keepdims=True), f))
    deg = xn.copy()
    inner = np.zeros_like(xn[:, :, 1:-1, 1:-1])
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            wgt = 5.0 if di == dj == 0 else 1.0
            inner += wgt * xn[:, :, 1 + di:xn.shape[2] - 1 + di, 1 + dj:xn.shape[3] - 1 + dj]
    deg[:, :, 1:-1, 1:-1] = np.round(inner / 13.0)
    _close(op("Sharpness", x, m), _blend_ref(xn, deg, f))
    # one channel: Color is the identity, Contrast blends with the image mean
    y = batch(2, 1, 8, 8)
    yn = y.numpy().astype(np.float64)
    assert torch.equal(op("Color", y, m), y)
    _close(op("Contrast", y, m), _blend_ref(yn, yn.mean(axis=(1, 2, 3), keepdims=True), f))


def test_ops_per_sample_magnitudes_equal_single_calls():
    x = batch(4, 3, 10, 10)
    mags = {"Rotate": [30.0, -12.0, 0.0, 135.0], "ShearX": [0.3, -0.1, 0.99, 0.0], "TranslateY": [4.9, -3.0, 0.0, 9.0],
            "Brightness": [0.5, -0.3, 0.9, 0.0], "Sharpness": [0.9, -0.9, 0.2, 0.0], "Posterize": [8, 4, 2, 1],
            "Solarize": [0.0, 128.0, 255.0, 51.0], "Contrast": [0.9, -0.9, 0.1, 0.0]}
    for name, ms in mags.items():
        together = op(name, x, ms, fill=3)
        for i, m in enumerate(ms):
            assert torch.equal(together[i:i + 1], op(name, x[i:i + 1], m, fill=3)), (name, i)


# ==================================================================================================
# Cutout
# ==================================================================================================

@pytest.mark.parametrize("size,h,w", [(16, 32, 32), (5, 9, 12), (40, 32, 32)])
def test_cutout_fills_exactly_the_clipped_square(size, h, w):
    x = torch.randint(1, 256, (64, 3, h, w), generator=gen(1), dtype=torch.uint8)
    out = Cutout(size=size)(x, gen(7))
    g = gen(7)
    cy = torch.randint(0, h, (64,), generator=g)
    cx = torch.randint(0, w, (64,), generator=g)
    clipped = 0
    for b in range(64):
        y0, x0 = int(cy[b]) - size // 2, int(cx[b]) - size // 2
        ref = x[b].clone()
        ref[:, max(y0, 0):max(y0 + size, 0), max(x0, 0):max(x0 + size, 0)] = 0
        assert torch.equal(out[b], ref), b
        n = int((out[b, 0] == 0).sum())
        clipped += n < size * size
        assert n == (min(y0 + size, h) - max(y0, 0)) * (min(x0 + size, w) - max(x0, 0))
    assert clipped > 0  # some squares hit a border


def test_cutout_per_channel_fill():
    x = torch.full((4, 3, 8, 8), 255, dtype=torch.uint8)
    out = Cutout(size=4, fill=[10, 20, 30])(x, gen(0))
    for c, v in enumerate([10, 20, 30]):
        hit = out[:, c] != 255
        assert (out[:, c][hit] == v).all() and hit.any()
    assert torch.equal(out[:, 0] != 255, out[:, 2] != 255)


# ==================================================================================================
# magnitude tables and dispatch (per-sample replay of the documented draws)
# ==================================================================================================

def _tv_space(n: int, h: int, w: int, wide: bool) -> dict[str, tuple[torch.Tensor, bool]]:
    """torchvision's augmentation spaces (RandAugment / AutoAugment and TrivialAugmentWide)."""
    e = 0.99 if wide else 0.9
    return {
        "Identity": (torch.zeros(n), False),
        "ShearX": (torch.linspace(0.0, 0.99 if wide else 0.3, n), True),
        "ShearY": (torch.linspace(0.0, 0.99 if wide else 0.3, n), True),
        "TranslateX": (torch.linspace(0.0, 32.0 if wide else 150.0 / 331.0 * w, n), True),
        "TranslateY": (torch.linspace(0.0, 32.0 if wide else 150.0 / 331.0 * h, n), True),
        "Rotate": (torch.linspace(0.0, 135.0 if wide else 30.0, n), True),
        "Brightness": (torch.linspace(0.0, e, n), True),
        "Color": (torch.linspace(0.0, e, n), True),
        "Contrast": (torch.linspace(0.0, e, n), True),
        "Sharpness": (torch.linspace(0.0, e, n), True),
        "Posterize": (8 - (torch.arange(n) / ((n - 1) / (6 if wide else 4))).round().int(), False),
        "Solarize": (torch.linspace(255.0, 0.0, n), False),
        "AutoContrast": (torch.zeros(n), False),
        "Equalize": (torch.zeros(n), False),
        "Invert": (torch.zeros(n), False),
    }


@pytest.mark.parametrize("pol", [RandAugment(), TrivialAugment(), AutoAugment()])
def test_level_tables_match_torchvision(pol):
    levels, signed = pol._table(32, 28, torch.device("cpu"))
    space = _tv_space(pol.num_magnitude_bins, 32, 28, pol.wide)
    for i, name in enumerate(OP_NAMES):
        mags, sgn = space[name]
        assert torch.allclose(levels[i], mags.float(), atol=1e-5), name
        assert bool(signed[i]) == sgn, name
    if isinstance(pol, RandAugment):  # magnitude 9 of 31: the values in the docstring
        lv = {n: float(levels[i, 9]) for i, n in enumerate(OP_NAMES)}
        assert lv["Rotate"] == pytest.approx(9.0) and lv["Posterize"] == 7 and lv["Solarize"] == 178.5
        assert int(lv["TranslateX"]) == 3 and lv["Brightness"] == pytest.approx(0.27)  # 150/331*28*0.3 = 3.8


def _replay(x, slots, fill=0):
    """Apply, sample by sample, slot by slot, op ``names[i]`` at magnitude ``mags[i]``."""
    out = x.clone()
    for names, mags in slots:
        for i in range(x.shape[0]):
            out[i:i + 1] = op(names[i], out[i:i + 1], mags[i], fill=fill)
    return out


def _space(pol, h: int, w: int) -> dict[str, tuple[torch.Tensor, bool]]:
    """The policy's own level values (checked against torchvision's above to 1e-5; float32 linspace
    values differ in the last bit, which moves a truncation now and then) with torchvision's signs."""
    levels = pol._table(h, w, torch.device("cpu"))[0]
    tv = _tv_space(pol.num_magnitude_bins, h, w, pol.wide)
    return {name: (levels[i], tv[name][1]) for i, name in enumerate(OP_NAMES)}


def _mag(space, name, level, negative):
    mags, signed = space[name]
    m = float(mags[level])
    return -m if (signed and negative) else m


def test_randaugment_dispatch_matches_replay():
    x = batch(24, 3, 16, 16, seed=2)
    pol = RandAugment(num_ops=3, magnitude=17, fill=5)
    out = pol(x, gen(11))
    g = gen(11)
    ops = torch.randint(0, 14, (24, 3), generator=g)
    neg = torch.randint(0, 2, (24, 3), generator=g)
    space = _space(pol, 16, 16)
    slots = [([OP_NAMES[o] for o in ops[:, j].tolist()],
              [_mag(space, OP_NAMES[o], 17, n) for o, n in zip(ops[:, j].tolist(), neg[:, j].tolist())])
             for j in range(3)]
    assert "Invert" not in {n for s in slots for n in s[0]}
    assert torch.equal(out, _replay(x, slots, fill=5))


def test_trivialaugment_dispatch_matches_replay():
    x = batch(40, 3, 16, 16, seed=3)
    pol = TrivialAugment()
    out = pol(x, gen(12))
    g = gen(12)
    ops = torch.randint(0, 14, (40,), generator=g).tolist()
    lvl = torch.randint(0, 31, (40,), generator=g).tolist()
    neg = torch.randint(0, 2, (40,), generator=g).tolist()
    space = _space(pol, 16, 16)
    names = [OP_NAMES[o] for o in ops]
    assert torch.equal(out, _replay(x, [(names, [_mag(space, n, lv, s) for n, lv, s in zip(names, lvl, neg)])]))


def test_autoaugment_cifar10_table_and_dispatch():
    table = AUTOAUGMENT_POLICIES["cifar10"]
    assert len(table) == 25 and all(len(sp) == 2 for sp in table)
    assert table[0] == (("Invert", 0.1, None), ("Contrast", 0.2, 6))
    assert table[-1] == (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None))
    assert sum(p for sp in table for _, p, _ in sp) == pytest.approx(26.5)
    assert table[14] == (("Solarize", 0.5, 2), ("Invert", 0.0, None))
    x = batch(48, 3, 16, 16, seed=4)
    pol = AutoAugment()
    out = pol(x, gen(13))
    g = gen(13)
    sub = torch.randint(0, 25, (48,), generator=g).tolist()
    u = torch.rand((48, 2), generator=g).tolist()
    neg = torch.randint(0, 2, (48, 2), generator=g).tolist()
    space = _space(pol, 16, 16)
    slots = []
    for j in range(2):
        names, mags = [], []
        for i in range(48):
            name, p, lv = table[sub[i]][j]
            name = name if u[i][j] < p else "Identity"
            names.append(name)
            mags.append(_mag(space, name, lv or 0, neg[i][j]))
        slots.append((names, mags))
    assert torch.equal(out, _replay(x, slots))


def test_autoaugment_forced_probabilities_compose_the_two_ops():
    x = batch(6, 3, 12, 12)
    pol = AutoAugment(policy=[(("Invert", 1.0, None), ("Posterize", 1.0, 7))])
    # level 7 of 10: 8 - round(7 / 2.25) = 5 bits
    assert torch.equal(pol(x, gen(0)), (255 - x) & 0b11111000)
    pol = AutoAugment(policy=[(("Rotate", 1.0, 9), ("Equalize", 1.0, None))])
    out = pol(x, gen(1))
    g = gen(1)
    torch.randint(0, 1, (6,), generator=g)
    torch.rand((6, 2), generator=g)
    neg = torch.randint(0, 2, (6, 2), generator=g)[:, 0].tolist()
    for i in range(6):
        rot = op("Rotate", x[i:i + 1], -30.0 if neg[i] else 30.0)
        assert torch.equal(out[i:i + 1], op("Equalize", rot, 0.0))
    never = AutoAugment(policy=[(("Invert", 0.0, None), ("Solarize", 0.0, 3))])
    assert torch.equal(never(x, gen(0)), x)


# ==================================================================================================
# mixing
# ==================================================================================================

@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_beta_sampler_moments(alpha):
    d = sample_beta(alpha, alpha, gen(0), 20000)
    assert d.dtype == torch.float64 and d.shape == (20000,)
    assert ((d >= 0) & (d <= 1)).all()
    assert abs(d.mean().item() - 0.5) < 0.01
    assert abs(d.var().item() - 1.0 / (4 * (2 * alpha + 1))) < 0.006
    assert torch.equal(d, sample_beta(alpha, alpha, gen(0), 20000))


def test_beta_sampler_asymmetric_and_uniform_cdf():
    d = sample_beta(2.0, 5.0, gen(1), 20000)
    assert abs(d.mean().item() - 2 / 7) < 0.005
    assert abs(d.var().item() - 2 * 5 / (7 * 7 * 8)) < 0.002
    u = sample_beta(1.0, 1.0, gen(2), 20000).sort().values  # Beta(1, 1) = U(0, 1): Kolmogorov-Smirnov
    ks = (u - torch.arange(1, 20001, dtype=torch.float64) / 20000).abs().max().item()
    assert ks < 1.36 / math.sqrt(20000)
    tiny = sample_beta(0.01, 0.01, gen(3), 2000)
    assert torch.isfinite(tiny).all() and ((tiny < 0.01) | (tiny > 0.99)).float().mean() > 0.9


def test_mixup_is_a_convex_combination():
    x = torch.randn(10, 3, 4, 4, generator=gen(0))
    mixed, mix = mixup(x, gen(1), alpha=1.0)
    assert isinstance(mix, Mix) and 0.0 <= mix.lam <= 1.0
    assert sorted(mix.index.tolist()) == list(range(10)) and mix.index.dtype == torch.int64
    assert torch.allclose(mixed, mix.lam * x + (1 - mix.lam) * x[mix.index], atol=1e-6)
    g = gen(1)
    lam = sample_beta(1.0, 1.0, g, 1).item()
    assert mix.lam == lam and torch.equal(mix.index, torch.randperm(10, generator=g))
    again, mix2 = mixup(x, gen(1), alpha=1.0)
    assert torch.equal(again, mixed) and mix2.lam == mix.lam


def test_cutmix_lam_is_the_kept_area():
    b, h, w = 6, 10, 14
    x = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).contiguous()
    clipped = 0
    for seed in range(30):
        mixed, mix = cutmix(x, gen(seed), alpha=1.0)
        own = mixed == x
        assert (own | (mixed == x[mix.index])).all()
        box = ~own[mix.index != torch.arange(b)]
        assert (box == box[0:1]).all()  # the same box in every row, every channel
        kept = own[:, 0].float().mean(dim=(1, 2))
        for i in range(b):
            if mix.index[i] != i:
                assert kept[i].item() == pytest.approx(mix.lam, abs=1e-6)
        # the box is a rectangle of side <= the unclipped one
        g = gen(seed)
        lam0 = sample_beta(1.0, 1.0, g, 1).item()
        cut = int(h * math.sqrt(1 - lam0)) // 2 * 2 * (int(w * math.sqrt(1 - lam0)) // 2 * 2)
        assert (1 - mix.lam) * h * w <= cut + 1e-9
        clipped += (1 - mix.lam) * h * w < cut - 1e-9
    assert clipped > 0


def test_mixing_prob_and_none():
    x = torch.randn(5, 3, 4, 4, generator=gen(0))
    out, mix = mixup(x, gen(0), prob=0.0)
    assert out is x and mix.lam == 1.0 and mix.index.tolist() == list(range(5))
    out, mix = build_mixer("none")(x, gen(0))
    assert out is x and mix.lam == 1.0
    applied = sum(cutmix(x, gen(s), prob=0.5)[1].lam < 1.0 for s in range(40))
    assert 8 < applied < 32


def test_mixed_cross_entropy_and_targets_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    mix = Mix(index=torch.tensor([1, 0]), lam=0.3)

    def ce(row, k):
        return -(row[k] - math.log(sum(math.exp(v) for v in row)))

    rows = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]
    expected = 0.3 * (ce(rows[0], 0) + ce(rows[1], 2)) / 2 + 0.7 * (ce(rows[0], 2) + ce(rows[1], 0)) / 2
    loss = cross_entropy(logits, y, mix=mix)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad is not None
    assert cross_entropy(logits.bfloat16(), y, mix=mix).dtype == torch.float32
    t = mix_targets(y, 3, mix)
    assert torch.allclose(t, torch.tensor([[0.3, 0.0, 0.7], [0.7, 0.0, 0.3]]))
    assert cross_entropy(logits, y, mix=Mix(torch.arange(2), 1.0)).item() == pytest.approx(
        (ce(rows[0], 0) + ce(rows[1], 2)) / 2, rel=1e-6)


def test_mixer_errors():
    assert MIXERS == ("none", "mixup", "cutmix")
    with pytest.raises(ConfigError) as e:
        build_mixer("cutout")
    assert "'cutout'" in one_line(e) and "cutmix" in str(e.value)
    for kw, key in [({"alpha": 0.0}, "alpha"), ({"alpha": -1}, "alpha"), ({"prob": 1.5}, "prob")]:
        with pytest.raises(ConfigError) as e:
            build_mixer("mixup", **kw)
        assert one_line(e).startswith(key)
    with pytest.raises(DataError):
        mixup(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), gen())
    with pytest.raises(ConfigError):
        sample_beta(0.0, 1.0, gen())
    assert repr(build_mixer("cutmix", 0.5, 0.5)) == "Mixer(name='cutmix', alpha=0.5, prob=0.5)"


# ==================================================================================================
# accelerator (skipped without one)
# ==================================================================================================

@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_policies_and_mixers_on_cuda():
    x = batch(32, 3, 32, 32).cuda()
    for name in POLICIES:
        pol = build_policy(name)
        for g in (gen(1, "cuda"), gen(1)):
            a = pol(x, g)
            assert a.device == x.device and a.dtype == torch.uint8 and a.shape == x.shape
        assert torch.equal(pol(x, gen(1, "cuda")), pol(x, gen(1, "cuda")))
    # same draws from a CPU generator: same op choices; Cutout and pure-integer ops agree exactly
    assert torch.equal(Cutout()(x, gen(2)).cpu(), Cutout()(x.cpu(), gen(2)))
    inv = AutoAugment(policy=[(("Invert", 0.5, None), ("Equalize", 0.5, None))])
    assert torch.equal(inv(x, gen(3)).cpu(), inv(x.cpu(), gen(3)))
    xf = torch.randn(8, 3, 32, 32, device="cuda")
    for fn in (mixup, cutmix):
        m1, mix1 = fn(xf, gen(4, "cuda"))
        m2, mix2 = fn(xf, gen(4, "cuda"))
        assert torch.equal(m1, m2) and mix1.lam == mix2.lam and mix1.index.device == xf.device
        fn(xf, gen(4))
