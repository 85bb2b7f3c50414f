"""DLB's cache of the last step's logits at lower precision (``cache_dtype``) and as the top-K logits plus the
tail's mass (``cache_topk``): exact where it must be, within a derived bound where it rounds, hand-computed
bucket losses, state round trips, bad input, and the config/CLI and Hugging Face routes."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import RandomSampler

import selfkd
from selfkd.errors import ConfigError
from selfkd.methods.losses import IGNORE, kd_kl, kd_kl_topk, topk_logits

from handmath import softmax
from test_safety import TINY, last_line_error, one_line_error, run_cli

# unit roundoff of round-to-nearest: bfloat16 keeps 8 significant bits (7 stored + the implicit one), float16 11
ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def token_batch(rows, width, lengths, v, g, scale=3.0):
    """Logits [rows, width, v] and labels [rows, width] with ``lengths[i]`` real tokens in row i (right padding)."""
    z = torch.randn(rows, width, v, generator=g) * scale
    y = torch.full((rows, width), IGNORE)
    for i, n in enumerate(lengths):
        y[i, :n] = torch.randint(0, v, (n,), generator=g)
    return z, y


def drive(dlb, steps, v, seed=0, drift=0.5):
    """Feed DLB ``steps`` batches of token logits from a fixed 'model' (a logit table per sample that drifts after
    every step); the padded width changes from step to step (dynamic padding). Returns the (loss, gradient) pairs."""
    g = torch.Generator().manual_seed(seed)
    n = 3 * steps
    lengths = [int(x) for x in torch.randint(1, 6, (n,), generator=g)]
    table = torch.randn(n, 6, v, generator=g) * 3.0
    labels = torch.randint(0, v, (n, 6), generator=g)
    out = []
    sampler = iter(dlb.batch_sampler(range(n), 3))
    for _ in range(steps):
        idx = next(sampler)
        width = max(lengths[i] for i in idx) + 1
        z = table[idx, :width].clone().requires_grad_(True)
        y = torch.full((len(idx), width), IGNORE)
        for r, i in enumerate(idx):
            y[r, :lengths[i]] = labels[i, :lengths[i]]
        res = dlb.loss(z, y, index=torch.tensor(idx))
        res.loss.backward()
        out.append((res.loss.detach(), res.parts["kd"], z.grad.clone()))
        table = table + drift * torch.randn(table.shape, generator=g)
    return out


# ---------------------------------------------------------------------------------------------------------
# cache_topk = V is the full cache
@pytest.mark.parametrize("schedule", ["constant", "entropy", "margin"])
def test_topk_of_the_whole_vocabulary_is_the_full_cache_exactly(schedule):
    v = 7
    full = drive(selfkd.DLB(temperature=2.0, alpha=0.7, schedule=schedule), 6, v)
    top = drive(selfkd.DLB(temperature=2.0, alpha=0.7, schedule=schedule, cache_topk=v), 6, v)
    assert any(kd > 0 for _, kd, _ in full)
    for (la, ka, ga), (lb, kb, gb) in zip(full, top):
        assert torch.equal(la, lb) and torch.equal(ka, kb) and torch.equal(ga, gb)


def test_topk_of_all_classes_is_the_full_cache_exactly_on_class_logits():
    torch.manual_seed(0)
    data = (torch.randn(10, 5), torch.randint(0, 4, (10,)))

    def run(**kw):
        torch.manual_seed(1)
        model, dlb = nn.Linear(5, 4), selfkd.DLB(**kw)
        out = []
        for idx in dlb.batch_sampler(range(10), 3):
            model.zero_grad()
            loss = dlb.loss(model(data[0][idx]), data[1][idx], index=torch.tensor(idx)).loss
            loss.backward()
            out.append((loss.detach(), model.weight.grad.clone()))
            with torch.no_grad():
                model.weight -= 0.5 * model.weight.grad
        return out

    for (la, ga), (lb, gb) in zip(run(), run(cache_topk=4)):
        assert torch.equal(la, lb) and torch.equal(ga, gb)


# ---------------------------------------------------------------------------------------------------------
# the K+1-bucket loss against hand computation
def hand_bucket_kl(teacher, student, k, t):
    """KL over the teacher's k largest tokens and one bucket for the rest, in plain math."""
    keep = sorted(range(len(teacher)), key=lambda j: -teacher[j])[:k]
    p, q = softmax(teacher, t), softmax(student, t)
    pk, qk = [p[j] for j in keep], [q[j] for j in keep]
    p_rest, q_rest = 1 - sum(pk), 1 - sum(qk)
    return sum(a * math.log(a / b) for a, b in zip(pk, qk)) + p_rest * math.log(p_rest / q_rest)


def test_bucket_loss_matches_hand_computation():
    t = 2.0
    teacher = torch.tensor([[3.0, -1.0, 0.5, 2.0, -2.0], [0.0, 1.0, 4.0, 1.5, 1.0]])
    student = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5], [-1.0, 2.0, 2.0, 0.0, 0.5]], requires_grad=True)
    values, index, tail = topk_logits(teacher, 2, t)
    assert index.tolist() == [[0, 3], [2, 3]] and values.tolist() == [[3.0, 2.0], [4.0, 1.5]]  # vocabulary order
    assert tail.tolist() == pytest.approx([math.log(math.exp(-0.5) + math.exp(0.25) + math.exp(-1.0)),
                                           math.log(1 + 2 * math.exp(0.5))], rel=1e-6)
    want = [hand_bucket_kl(teacher[i].tolist(), student[i].tolist(), 2, t) for i in range(2)]
    got = kd_kl_topk(student, values, index, tail, t)
    assert got.item() == pytest.approx(t * t * sum(want) / 2, rel=1e-6)
    # the bucket KL is a lower bound of the full KL (chain rule), and K=1 is a two-bucket KL
    assert got.item() < kd_kl(student, teacher, t).item()
    v1, i1, tail1 = topk_logits(teacher, 1, t)
    one = [hand_bucket_kl(teacher[i].tolist(), student[i].tolist(), 1, t) for i in range(2)]
    assert kd_kl_topk(student, v1, i1, tail1, t).item() == pytest.approx(t * t * sum(one) / 2, rel=1e-6)
    # gradient: against autograd of the bucket form written out in torch
    got.backward()
    s = student.detach().clone().requires_grad_(True)
    q = torch.softmax(s / t, dim=1)
    p = torch.softmax(teacher / t, dim=1)
    keep = torch.zeros(2, 5, dtype=torch.bool).scatter(1, index, True)
    pb = torch.cat([p[keep].view(2, 2), (p * ~keep).sum(1, keepdim=True)], 1)
    qb = torch.cat([q[keep].view(2, 2), (q * ~keep).sum(1, keepdim=True)], 1)
    (t * t * (pb * (pb / qb).log()).sum(1).mean()).backward()
    assert torch.allclose(student.grad, s.grad, rtol=1e-5, atol=1e-7)
    # on the kept tokens it is the full KL's gradient T·(q − p)/N; only the tail's tokens differ
    full = (t * (q - p) / 2).detach()
    assert torch.allclose(student.grad[keep], full[keep], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(student.grad[~keep], full[~keep], rtol=1e-3)


def test_dlb_topk_step_matches_hand_computation_on_tokens():
    """Step 1 caches 2 rows of token logits (V=5, K=2); step 2's distillation term is the bucket KL of each real
    token of the repeated rows, averaged over those tokens; the CE term is unchanged."""
    t, k = 3.0, 2
    dlb = selfkd.DLB(temperature=t, alpha=0.5, cache_topk=k)
    it = iter(dlb.batch_sampler(range(4), 2))
    g = torch.Generator().manual_seed(3)
    z1, y1 = token_batch(2, 3, [3, 2], 5, g)
    next(it)
    dlb.loss(z1, y1)
    assert dlb.cached_logits.shape == (2, 3, k) and dlb.cache_bytes == 2 * 3 * (k * 4 + k * 4 + 4)
    next(it)
    z2, y2n = token_batch(2, 3, [1, 3], 5, g)
    z_rep = torch.randn(2, 3, 5, generator=g)
    out = dlb.loss(torch.cat([z_rep, z2]), torch.cat([y1, y2n]))
    toks = [(i, p) for i in range(2) for p in range(3) if y1[i, p] != IGNORE]
    kd = sum(hand_bucket_kl(z1[i, p].tolist(), z_rep[i, p].tolist(), k, t) for i, p in toks) / len(toks) * t * t
    assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# bfloat16 / float16: within the rounding bound
def rounding_bound(teacher, student, mask, u):
    """Bound on |KD(rounded teacher) − KD(teacher)| for T²·KL averaged over the masked tokens, per token
    ``u·‖z‖∞·(range(z − s) + 2u·‖z‖∞)`` (docs/methods.md derives it); the mean is at most the largest."""
    zmax = teacher.abs().amax(-1)
    d = teacher - student
    per = u * zmax * (d.amax(-1) - d.amin(-1) + 2 * u * zmax)
    return per[mask].max().item()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("topk", [None, 3])
def test_lower_precision_cache_stays_within_the_rounding_bound(dtype, topk):
    v, t = 11, 2.0
    g = torch.Generator().manual_seed(5)
    z1, y1 = token_batch(3, 4, [4, 2, 3], v, g, scale=6.0)
    z_rep = (z1 + 4 * torch.randn(z1.shape, generator=g)).requires_grad_(True)
    z_new, y_new = token_batch(3, 4, [1, 4, 2], v, g, scale=6.0)

    def step2(**kw):
        dlb = selfkd.DLB(temperature=t, alpha=1.0, **kw)
        it = iter(dlb.batch_sampler(range(6), 3))
        next(it)
        dlb.loss(z1, y1)
        next(it)
        out = dlb.loss(torch.cat([z_rep, z_new]), torch.cat([y1, y_new]))
        grad, = torch.autograd.grad(out.loss, z_rep)  # CE is the same in both: the difference is the KD term
        return out.parts["kd"].item(), grad, dlb

    exact, g_exact, _ = step2(cache_topk=topk)
    low, g_low, dlb = step2(cache_topk=topk, cache_dtype=dtype)
    assert dlb.cached_logits.dtype == getattr(torch, dtype)
    mask = y1 != IGNORE
    u = ROUNDOFF[dtype]
    bound = rounding_bound(z1, z_rep.detach(), mask, u)
    assert 0 < abs(low - exact) <= bound + 1e-6 * exact  # + float32 arithmetic
    assert bound < 0.5 * exact  # a worst case (every rounding against us), yet not vacuous here
    # the gradient of T²·KL wrt the student is T·(q − p)/N per token: |Δp| <= p·(e^{2ε} − 1), ε = u·‖z‖∞/T
    eps = u * z1.abs().amax(-1)[mask].max().item() / t
    assert (g_low - g_exact).abs().sum().item() <= t * (math.exp(2 * eps) - 1) + 1e-6


def test_float16_cache_clamps_logits_beyond_its_range():
    dlb = selfkd.DLB(cache_dtype="float16")
    next(iter(dlb.batch_sampler(range(4), 2)))
    dlb.loss(torch.tensor([[1e6, 0.0, -1e6], [2.0, 1.0, 0.0]]), torch.tensor([0, 1]))
    assert dlb.cached_logits.tolist() == [[65504.0, 0.0, -65504.0], [2.0, 1.0, 0.0]]


def test_cache_bytes_per_setting():
    b, t, v = 2, 5, 40
    z, y = token_batch(b, t, [5, 3], v, torch.Generator().manual_seed(0))
    sizes = {}
    for kw in [{}, {"cache_dtype": "bfloat16"}, {"cache_dtype": "float16"}, {"cache_topk": 8},
               {"cache_topk": 8, "cache_dtype": "bfloat16"}, {"cache_topk": 8, "schedule": "entropy"}]:
        dlb = selfkd.DLB(**kw)
        next(iter(dlb.batch_sampler(range(4), 2)))
        dlb.loss(z, y)
        sizes[tuple(kw.items())] = dlb.cache_bytes
    assert list(sizes.values()) == [b * t * v * 4, b * t * v * 2, b * t * v * 2, b * t * (8 * 4 + 8 * 4 + 4),
                                    b * t * (8 * 2 + 8 * 4 + 4), b * t * (8 * 4 + 8 * 4 + 4 + 4)]


# ---------------------------------------------------------------------------------------------------------
# state: the cache round-trips with its dtype and top-K; resume is bit-identical
class TinyTagger(nn.Module):
    def __init__(self, vocab=9, v=13):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, 6), nn.Linear(6, v)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))


def run_tokens(dlb, sampler, model, data, steps, opt):
    losses = []
    for i, idx in enumerate(sampler):
        if i == steps:
            break
        ids, y = data[0][idx], data[1][idx]
        opt.zero_grad()
        loss = dlb.loss(model(ids), y, index=torch.tensor(idx)).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kw", [{"cache_topk": 4, "cache_dtype": "bfloat16"}, {"cache_topk": 4, "schedule": "margin"},
                                {"cache_dtype": "float16"}], ids=["top4-bf16", "top4-margin", "fp16"])
def test_state_dict_round_trips_the_cache_and_resumes_bit_identically(kw):
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (17, 5))
    y = torch.randint(0, 13, (17, 5))
    y[:, 3:][torch.rand(17, 2) < 0.5] = IGNORE
    data = (ids, y)

    def fresh():
        torch.manual_seed(1)
        model = TinyTagger()
        dlb = selfkd.DLB(temperature=2.0, **kw)
        g = torch.Generator().manual_seed(7)
        return dlb, dlb.batch_sampler(RandomSampler(range(17), generator=g), 3), g, model, \
            torch.optim.SGD(model.parameters(), lr=0.5)

    dlb, sampler, _, model, opt = fresh()
    full = run_tokens(dlb, sampler, model, data, 99, opt) + run_tokens(dlb, sampler, model, data, 99, opt)

    dlb_a, sampler_a, g_a, model_a, opt_a = fresh()
    first = run_tokens(dlb_a, sampler_a, model_a, data, 4, opt_a)
    state, gstate = dlb_a.state_dict(), g_a.get_state()
    want_dtype = getattr(torch, kw.get("cache_dtype", "float32"))
    assert state["cache_logits"].dtype == want_dtype
    if "cache_topk" in kw:
        assert state["cache_logits"].shape == state["cache_index"].shape == (3, 5, 4)
        assert state["cache_index"].dtype == torch.int32 and state["cache_tail"].shape == (3, 5)
        assert ("cache_weight" in state) == (kw.get("schedule") == "margin")

    dlb_b, sampler_b, g_b, model_b, opt_b = fresh()
    dlb_b.load_state_dict(state)
    model_b.load_state_dict(model_a.state_dict())
    opt_b.load_state_dict(opt_a.state_dict())
    g_b.set_state(gstate)
    again = dlb_b.state_dict()
    assert again.keys() == state.keys() and all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(state.values(), again.values()))
    rest = run_tokens(dlb_b, sampler_b, model_b, data, 99, opt_b) + run_tokens(dlb_b, sampler_b, model_b, data, 99, opt_b)
    assert first + rest == full


def test_loading_a_cache_of_another_dtype_or_topk_is_a_one_line_error():
    dlb = selfkd.DLB(cache_topk=2, cache_dtype="bfloat16")
    next(iter(dlb.batch_sampler(range(4), 2)))
    dlb.loss(torch.randn(2, 5), torch.tensor([0, 1]))
    state = dlb.state_dict()
    for other in [selfkd.DLB(), selfkd.DLB(cache_topk=3, cache_dtype="bfloat16"), selfkd.DLB(cache_topk=2)]:
        with pytest.raises(ConfigError, match=r"^method 'dlb' state: the checkpoint's cache has "
                           r"cache_dtype=bfloat16, cache_topk=2 but this DLB has cache_dtype=\w+, cache_topk=\w+$"):
            other.load_state_dict(state)
    selfkd.DLB(cache_topk=2, cache_dtype="bfloat16").load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# bad input
@pytest.mark.parametrize("bad, needle", [
    ({"cache_topk": 0}, "cache_topk: Input should be greater than 0 (got 0)"),
    ({"cache_topk": -3}, "cache_topk: Input should be greater than 0 (got -3)"),
    ({"cache_topk": True}, "cache_topk: expected an integer K >= 1 or None (got True)"),
    ({"cache_dtype": "fp8"}, "cache_dtype: Input should be 'float32', 'bfloat16' or 'float16' (got 'fp8')"),
    ({"cache_topk": 4, "schedule": "confidence"}, "cache_topk=4 keeps the tail's mass at one temperature, but schedule "
                                                  "'confidence' moves T"),
    ({"cache_topk": 4, "schedule": "linear", "temperature_start": 1.0}, "a linear temperature ramp moves T"),
])
def test_bad_cache_options_are_one_line_errors(bad, needle):
    with pytest.raises(ConfigError) as err:
        selfkd.DLB(**bad)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_topk_larger_than_the_vocabulary_names_the_value_and_v():
    dlb = selfkd.DLB(cache_topk=6)
    next(iter(dlb.batch_sampler(range(4), 2)))
    with pytest.raises(ConfigError, match=r"^method 'dlb': cache_topk=6 is larger than the logits' last dimension "
                                          r"V=5: expected 1 <= cache_topk <= 5$"):
        dlb.loss(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("setting, needle", [("method.cache_topk=0", "cache_topk: Input should be greater than 0"),
                                             ("method.cache_dtype=half", "cache_dtype: Input should be 'float32'")])
def test_cli_refuses_bad_cache_options_in_one_line(tmp_path, capsys, setting, needle):
    code, _, err = run_cli(capsys, "train", *TINY, "--method", "dlb", "--epochs", "1", "--set", setting,
                           "--out", tmp_path / "run")
    one_line_error(code, err, needle)
    assert not (tmp_path / "run").exists()


def test_cli_topk_above_the_class_count_stops_at_the_first_step(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--method", "dlb", "--epochs", "1", "--set", "method.cache_topk=11",
                           "--out", run)
    last_line_error(code, err, "cache_topk=11 is larger than the logits' last dimension V=10")
    assert not (run / "checkpoint.pt").exists()


def test_cli_trains_and_checkpoints_a_top_k_bfloat16_cache(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--method", "dlb", "--epochs", "1", "--set", "method.cache_topk=4",
                           "--set", "method.cache_dtype=bfloat16", "--out", run)
    assert code == 0, err
    state = torch.load(run / "checkpoint.pt", weights_only=False)["method"]
    assert state["cache_logits"].dtype == torch.bfloat16 and state["cache_index"].shape[-1] == 4


# ---------------------------------------------------------------------------------------------------------
# Hugging Face: SelfKDTrainer on token logits [B, T, V] (a real transformers Trainer, tiny BERT tagger)
def test_hf_token_classification_with_a_top_k_bfloat16_cache_distils_the_buckets(tmp_path):
    pytest.importorskip("transformers")
    from test_hf import Recorder, trainer

    t, k = 3.0, 2
    dlb = selfkd.DLB(temperature=t, alpha=1.0, cache_topk=k, cache_dtype="bfloat16")
    rec = Recorder(dlb)
    trainer(tmp_path, dlb, kind="tok", num_train_epochs=1, learning_rate=0.3).train()
    assert dlb.cached_logits.dtype == torch.bfloat16 and dlb.cached_logits.shape[-1] == k
    prev, checked = None, 0
    for z, y, _, out in rec.calls:
        r = 0 if prev is None else prev[0].shape[0]
        if r:
            pz, py = prev
            toks = [(i, p) for i in range(r) for p in range(y.shape[1]) if y[i, p] != IGNORE]
            kd = 0.0
            for i, p in toks:  # right padding: a repeated token keeps its position
                assert py[i, p] == y[i, p]
                values, index, tail = topk_logits(pz[i, p][None], k, t)
                kd += kd_kl_topk(z[i, p][None], values.bfloat16().float(), index, tail, t).item()
            assert out.parts["kd"].item() == pytest.approx(kd / len(toks), rel=1e-5)
            checked += 1
        prev = (z[r:], y[r:])
    assert checked >= 2


def test_hf_resume_with_a_top_k_bfloat16_cache_equals_uninterrupted(tmp_path):
    pytest.importorskip("transformers")
    from test_hf import STATE, trainer, weights

    def method():
        return selfkd.DLB(cache_topk=2, cache_dtype="bfloat16")

    full = trainer(tmp_path, method(), kind="tok", name="full")
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-5"
    saved = torch.load(ckpt / STATE, weights_only=False)["state"]
    assert saved["cache_logits"].dtype == torch.bfloat16 and saved["cache_index"].shape[-1] == 2
    resumed = trainer(tmp_path, method(), kind="tok", name="resumed")
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = weights(full.model), weights(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    sa, sb = full.method.state_dict(), resumed.method.state_dict()
    assert sa.keys() == sb.keys() and all(
        torch.equal(x, sb[n]) if isinstance(x, torch.Tensor) else x == sb[n] for n, x in sa.items())
