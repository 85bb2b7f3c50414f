"""DLB: batch composition, loss values against hand computation, gradients, state and errors."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

import selfkd
from selfkd.errors import ConfigError, TrainingError
from selfkd.methods import Batch
from selfkd.methods.losses import kd_kl

from handmath import hand_ce, hand_kl


class Indexed(Dataset):
    """Item i is (features, label, i); features are fresh random noise on every fetch (an 'augmentation')."""

    def __init__(self, n, k=3, dim=4):
        self.n, self.k, self.dim = n, k, dim

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.randn(self.dim), i % self.k, i


def batches(dlb, n=10, bs=4, epochs=2, sampler=None, **kw):
    ds = Indexed(n)
    bsampler = dlb.batch_sampler(sampler or SequentialSampler(ds), bs, **kw)
    out = []
    for _ in range(epochs):
        ep = []
        for idx in bsampler:
            layout = dlb.layouts.next()
            ep.append((idx, layout.repeat))
            logits = torch.zeros(len(idx), 3)
            dlb.loss(logits, torch.tensor([i % 3 for i in idx]), index=torch.tensor(idx))
        out.append(ep)
    return out


def test_batch_composition_repeats_previous_new_rows_across_epochs():
    got = batches(selfkd.DLB())
    assert got[0] == [([0, 1, 2, 3], 0), ([0, 1, 2, 3, 4, 5, 6, 7], 4), ([4, 5, 6, 7, 8, 9], 4)]
    # carry-over: the first step of epoch 2 repeats the short last batch of epoch 1
    assert got[1] == [([8, 9, 0, 1, 2, 3], 2), ([0, 1, 2, 3, 4, 5, 6, 7], 4), ([4, 5, 6, 7, 8, 9], 4)]


def test_no_carry_over_starts_each_epoch_without_repeats():
    got = batches(selfkd.DLB(carry_over=False))
    assert got[1][0] == ([0, 1, 2, 3], 0)
    assert got[1][1] == ([0, 1, 2, 3, 4, 5, 6, 7], 4)


def test_repeat_fraction_takes_leading_share_of_previous_new_rows():
    got = batches(selfkd.DLB(repeat_fraction=0.5), epochs=1)
    assert got[0] == [([0, 1, 2, 3], 0), ([0, 1, 4, 5, 6, 7], 2), ([4, 5, 8, 9], 2)]
    assert selfkd.DLB(repeat_fraction=0.5).forwards_per_sample == 1.5


def test_drop_last_skips_short_batch():
    got = batches(selfkd.DLB(), epochs=1, drop_last=True)
    assert [b for b, _ in got[0]] == [[0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert len(selfkd.DLB().batch_sampler(range(10), 4, drop_last=True)) == 2
    assert len(selfkd.DLB().batch_sampler(range(10), 4)) == 3


def test_repeated_rows_are_fetched_again_with_a_fresh_augmentation():
    torch.manual_seed(0)
    ds = Indexed(12)
    dlb = selfkd.DLB()
    loader = DataLoader(ds, batch_sampler=dlb.batch_sampler(RandomSampler(ds), batch_size=4))
    prev = None
    for x, y, idx in loader:
        r = dlb.layouts.next().repeat
        if prev is not None:
            px, pidx = prev
            assert torch.equal(idx[:r], pidx)  # same samples ...
            assert not torch.allclose(x[:r], px)  # ... under a new view
        prev = (x[r:], idx[r:])
        dlb.loss(torch.zeros(len(y), 3), y, index=idx)


def test_kd_kl_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 2.0]])
    expected = 4.0 * (hand_kl([3, 2, 1], [1, 2, 3], 2.0) + hand_kl([0, 0, 2], [0.5, -1, 0], 2.0)) / 2
    assert kd_kl(s, t, 2.0).item() == pytest.approx(expected, rel=1e-6)
    assert kd_kl(s, t, 2.0).item() == pytest.approx(0.9185262, rel=1e-6)  # fixed value guards the formula
    assert kd_kl(s, s, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_kl(s[:0], t[:0], 3.0).item() == 0.0


def drive(dlb, steps):
    """Feed ``steps`` (logits, labels) through a DLB sampler over a 4-sample sequential data set."""
    sampler = dlb.batch_sampler(SequentialSampler(range(4)), batch_size=2)
    it = iter(sampler)
    outs = []
    for logits, labels in steps:
        next(it)
        outs.append(dlb.loss(logits, labels))
    return outs


def test_dlb_loss_matches_hand_computation():
    dlb = selfkd.DLB(temperature=2.0, alpha=0.5)
    z0 = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])  # step 0: new rows 0,1
    y0 = torch.tensor([0, 1])
    z1 = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.3, 0.1], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])  # rep 0,1 | new 2,3
    y1 = torch.tensor([0, 1, 2, 0])
    out0, out1 = drive(dlb, [(z0, y0), (z1, y1)])
    ce0 = (hand_ce([2, 0, -1], 0) + hand_ce([0, 1, 0.5], 1)) / 2
    assert out0.loss.item() == pytest.approx(ce0, rel=1e-6)
    assert out0.parts["kd"].item() == 0.0
    ce1 = sum(hand_ce(r, y) for r, y in zip(z1.tolist(), y1.tolist())) / 4
    kl = (hand_kl([2, 0, -1], [1, 0.5, 0], 2) + hand_kl([0, 1, 0.5], [0.2, 0.3, 0.1], 2)) / 2
    assert out1.parts["ce"].item() == pytest.approx(ce1, rel=1e-6)
    assert out1.parts["kd"].item() == pytest.approx(4 * kl, rel=1e-6)
    assert out1.loss.item() == pytest.approx(ce1 + 0.5 * 4 * kl, rel=1e-6)


def test_ce_rows_new_scores_only_new_rows():
    dlb = selfkd.DLB(ce_rows="new")
    z0 = torch.zeros(2, 3)
    z1 = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0.0, 0, 3], [1.0, 1, 1]])
    _, out1 = drive(dlb, [(z0, torch.tensor([0, 1])), (z1, torch.tensor([0, 1, 2, 0]))])
    assert out1.parts["ce"].item() == pytest.approx((hand_ce([0, 0, 3], 2) + hand_ce([1, 1, 1], 0)) / 2, rel=1e-6)


def test_gradients_flow_only_into_current_logits():
    dlb = selfkd.DLB(temperature=3.0, alpha=1.0)
    z0 = torch.randn(2, 3, requires_grad=True)
    y = torch.tensor([0, 1])
    z1 = torch.randn(4, 3, requires_grad=True)
    y1 = torch.tensor([0, 1, 2, 2])
    out0, out1 = drive(dlb, [(z0, y), (z1, y1)])
    assert not dlb.cached_logits.requires_grad
    out1.loss.backward()
    assert z0.grad is None  # the teacher (previous step's logits) receives nothing
    # new rows get exactly the CE gradient; repeated rows get CE + KD
    z1c = z1.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(z1c, y1).backward()
    assert torch.allclose(z1.grad[2:], z1c.grad[2:], atol=1e-7)
    assert not torch.allclose(z1.grad[:2], z1c.grad[:2])


def test_loss_without_sampler_is_a_clear_error():
    with pytest.raises(TrainingError, match="batch_sampler"):
        selfkd.DLB()(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_layout_mismatch_is_a_clear_error():
    dlb = selfkd.DLB()
    it = iter(dlb.batch_sampler(SequentialSampler(range(4)), batch_size=2))
    next(it)
    with pytest.raises(TrainingError, match="2 rows"):
        dlb.loss(torch.zeros(3, 3), torch.tensor([0, 1, 2]))


def test_relabelled_repeated_rows_are_a_clear_error():
    dlb = selfkd.DLB()
    drive(dlb, [(torch.zeros(2, 3), torch.tensor([0, 1]))])
    it = iter(dlb.batch_sampler(SequentialSampler(range(4)), batch_size=2))  # new pass, carries over
    next(it)
    with pytest.raises(TrainingError, match="labels of the repeated rows"):
        dlb.loss(torch.zeros(4, 3), torch.tensor([1, 1, 2, 2]))


@pytest.mark.parametrize("bad", [{"temperature": 0}, {"temperature": -1}, {"alpha": -0.1},
                                 {"repeat_fraction": 0}, {"repeat_fraction": 1.5}, {"ce_rows": "some"}])
def test_bad_hyper_parameters_are_rejected(bad):
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=key):
        selfkd.DLB(**bad)


def test_unknown_hyper_parameter_is_rejected_with_known_names():
    with pytest.raises(ConfigError, match="unknown key 'temprature'.*known hyper-parameters: temperature"):
        selfkd.DLB(temprature=3)
    with pytest.raises(ConfigError, match="unknown method 'dbl'"):
        selfkd.build_method("dbl")


def run_steps(dlb, sampler, model, data, steps):
    """Consume ``steps`` batches from a fresh pass; return the losses."""
    losses = []
    for i, idx in enumerate(sampler):
        if i == steps:
            break
        x, y = data[0][idx], data[1][idx]
        losses.append(dlb.loss(model(x), y, index=torch.tensor(idx)).loss.item())
    return losses


def test_state_dict_resumes_mid_epoch_exactly():
    torch.manual_seed(0)
    data = (torch.randn(23, 5), torch.randint(0, 3, (23,)))
    model = nn.Linear(5, 3)

    def fresh():
        dlb = selfkd.DLB()
        g = torch.Generator().manual_seed(7)
        return dlb, dlb.batch_sampler(RandomSampler(range(23), generator=g), batch_size=4), g

    dlb, sampler, _ = fresh()
    full = run_steps(dlb, sampler, model, data, 99) + run_steps(dlb, sampler, model, data, 99)

    dlb_a, sampler_a, g_a = fresh()
    first = run_steps(dlb_a, sampler_a, model, data, 3)
    state, gstate = dlb_a.state_dict(), g_a.get_state()
    assert state["cache_logits"].shape == (4, 3) and state["position"] == 3

    dlb_b, sampler_b, g_b = fresh()
    dlb_b.load_state_dict(state)
    g_b.set_state(gstate)
    rest = run_steps(dlb_b, sampler_b, model, data, 99) + run_steps(dlb_b, sampler_b, model, data, 99)
    assert first + rest == full


def test_split_forward_equals_joint_without_batchnorm_and_differs_with_it():
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    y = torch.randint(0, 3, (8,))

    def two_steps(model, mode):
        dlb = selfkd.DLB(forward=mode)
        it = iter(dlb.batch_sampler(SequentialSampler(range(8)), batch_size=4))
        out = None
        for _ in range(2):
            idx = next(it)
            out = dlb.train_step(model, Batch(x[idx], y[idx], torch.tensor(idx)))
        return out.loss.item()

    lin = nn.Linear(5, 3)
    assert two_steps(lin, "split") == pytest.approx(two_steps(lin, "joint"), rel=1e-6)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).train()
    assert two_steps(bn, "split") != pytest.approx(two_steps(bn, "joint"), rel=1e-4)


def test_works_with_worker_processes_and_prefetching():
    ds = Indexed(30)
    dlb = selfkd.DLB()
    loader = DataLoader(ds, batch_sampler=dlb.batch_sampler(SequentialSampler(ds), 4), num_workers=2,
                        prefetch_factor=2)
    seen = []
    for x, y, idx in loader:
        out = dlb.loss(torch.zeros(len(y), 3), y, index=idx)
        seen.append(len(idx))
    assert seen == [4] + [8] * 6 + [6]
    assert out.parts["kd"].item() == 0.0


def test_wraps_distributed_sampler_per_rank():
    ds = Indexed(16)
    per_rank = []
    for rank in (0, 1):
        dlb = selfkd.DLB()
        ds_sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        bs = dlb.batch_sampler(ds_sampler, 4)
        bs.set_epoch(1)
        got = batches_from(dlb, bs)
        per_rank.append(got)
        assert len(bs) == 2
    new_rows = [set(b[r:]) for got in per_rank for b, r in got]
    assert set().union(*new_rows) == set(range(16))  # the ranks' new rows cover the data once


def batches_from(dlb, bsampler):
    out = []
    for idx in bsampler:
        r = dlb.layouts.next().repeat
        out.append((idx, r))
        dlb.loss(torch.zeros(len(idx), 3), torch.tensor([i % 3 for i in idx]), index=torch.tensor(idx))
    return out


def test_plain_loop_contract_three_lines():
    torch.manual_seed(0)
    x = torch.randn(40, 5)
    y = (x[:, 0] > 0).long()
    ds = torch.utils.data.TensorDataset(x, y)
    model = nn.Linear(5, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    dlb = selfkd.DLB(temperature=3.0, alpha=1.0)
    loader = DataLoader(ds, batch_sampler=dlb.batch_sampler(RandomSampler(ds), batch_size=8))
    for _ in range(5):
        for xb, yb in loader:
            loss = dlb(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert set(dlb.last_parts) == {"ce", "kd"}
    assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_label_smoothing_in_the_ce_term():
    dlb = selfkd.DLB(label_smoothing=0.2)
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    (out,) = drive(dlb, [(z, torch.tensor([0, 1]))])

    def ls_ce(row, y, eps=0.2):
        lse = math.log(sum(math.exp(a) for a in row))
        return sum(-((1 - eps) * (k == y) + eps / 3) * (a - lse) for k, a in enumerate(row))

    assert out.loss.item() == pytest.approx((ls_ce([2, 0, -1], 0) + ls_ce([0, 1, 0.5], 1)) / 2, rel=1e-6)


def test_linear_schedule_ramps_alpha_and_temperature_with_epoch_progress():
    dlb = selfkd.DLB(schedule="linear", ramp_epochs=2, alpha=1.0, alpha_start=0.0, temperature=3.0,
                     temperature_start=5.0)
    sampler = dlb.batch_sampler(SequentialSampler(range(8)), batch_size=4)  # 2 steps per epoch
    seen = []
    for _ in range(3):
        for idx in sampler:
            out = dlb.loss(torch.zeros(len(idx), 3), torch.tensor([i % 3 for i in idx]))
            if "alpha" in out.parts:
                seen.append((out.parts["alpha"].item(), out.parts["temperature"].item()))
    # progress of the steps with repeated rows: 0.5, 1.0, 1.5, 2.0, 2.5
    expected = [(0.25, 4.5), (0.5, 4.0), (0.75, 3.5), (1.0, 3.0), (1.0, 3.0)]
    assert [a for a, _ in seen] == pytest.approx([a for a, _ in expected])
    assert [t for _, t in seen] == pytest.approx([t for _, t in expected])


def test_confidence_schedule_follows_teacher_confidence():
    dlb = selfkd.DLB(schedule="confidence", alpha=2.0, temperature=3.0)
    z0 = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    z1 = torch.zeros(4, 3)
    y1 = torch.tensor([0, 1, 2, 0])
    _, out1 = drive(dlb, [(z0, torch.tensor([0, 1])), (z1, y1)])
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    p1 = math.exp(1) / (1 + math.exp(1) + math.exp(0.5))
    c = (p0 + p1) / 2
    assert out1.parts["alpha"].item() == pytest.approx(2.0 * c, rel=1e-6)
    assert out1.parts["temperature"].item() == pytest.approx(3.0 * (2 - c), rel=1e-6)
    t = 3.0 * (2 - c)
    kl = (hand_kl([2, 0, -1], [0, 0, 0], t) + hand_kl([0, 1, 0.5], [0, 0, 0], t)) / 2
    assert out1.parts["kd"].item() == pytest.approx(t * t * kl, rel=1e-5)
