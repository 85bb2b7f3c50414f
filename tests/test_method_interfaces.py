"""The internal contract made public: the one cross-entropy call for mixed and unmixed targets, and the
methods' public interface to their batch samplers (DLB's plan_epoch, CS-KD's set_train_labels/plan_epoch);
no selfkd class reads another object's private attributes."""
import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import selfkd
from selfkd.data.mixing import Mix, MixBlocks
from selfkd.errors import TrainingError
from selfkd.methods import CSKD, DLB, DLBBatchSampler, PairBatchSampler
from selfkd.methods import losses
from selfkd.methods.losses import cross_entropy, mix_targets, one_hot

from handmath import hand_ce

ROWS = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.5, -0.5, 0.25], [-1.0, 2.0, 0.0]]
Y = [0, 2, 1, 1]


def smoothed_ce(row, k, eps):
    """PyTorch's label smoothing: targets (1-eps)·onehot + eps/K."""
    lse = math.log(sum(math.exp(v) for v in row))
    return (1 - eps) * (lse - row[k]) + eps * sum(lse - v for v in row) / len(row)


def mean(xs):
    return sum(xs) / len(xs)


# -- the one call ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_unmixed_by_hand_and_as_the_old_branch(eps):
    z, y = torch.tensor(ROWS), torch.tensor(Y)
    got = cross_entropy(z, y, eps, mix=None)
    assert got.item() == pytest.approx(mean([smoothed_ce(r, k, eps) for r, k in zip(ROWS, Y)]), rel=1e-6)
    assert torch.equal(got, F.cross_entropy(z, y, label_smoothing=eps))  # the old `if mix is None` branch
    assert torch.equal(got, cross_entropy(z, y, eps))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_with_a_mix_by_hand_and_as_the_old_branch(eps):
    z, y = torch.tensor(ROWS), torch.tensor(Y)
    mix = Mix(index=torch.tensor([1, 0, 3, 2]), lam=0.3)
    got = cross_entropy(z, y, eps, mix=mix)
    other = [Y[i] for i in (1, 0, 3, 2)]
    expected = 0.3 * mean([smoothed_ce(r, k, eps) for r, k in zip(ROWS, Y)]) + \
        0.7 * mean([smoothed_ce(r, k, eps) for r, k in zip(ROWS, other)])
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_with_mix_blocks_by_hand():
    z, y = torch.tensor(ROWS), torch.tensor(Y)
    blocks = MixBlocks([(0, Mix(torch.tensor([1, 0]), 0.25)), (2, Mix(torch.tensor([0, 1]), 1.0))], rows=4)
    got = cross_entropy(z, y, mix=blocks)
    per_row = [0.25 * hand_ce(ROWS[0], 0) + 0.75 * hand_ce(ROWS[0], 2),
               0.25 * hand_ce(ROWS[1], 2) + 0.75 * hand_ce(ROWS[1], 0),
               hand_ce(ROWS[2], 1), hand_ce(ROWS[3], 1)]
    assert got.item() == pytest.approx(mean(per_row), rel=1e-6)


def test_cross_entropy_mix_keeps_float32_gradients_and_refuses_tokens():
    z = torch.tensor(ROWS, requires_grad=True)
    mix = Mix(index=torch.tensor([1, 0, 3, 2]), lam=0.6)
    assert cross_entropy(z.bfloat16(), torch.tensor(Y), mix=mix).dtype == torch.float32
    cross_entropy(z, torch.tensor(Y), mix=mix).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), mix=Mix(torch.arange(2), 0.5))


def test_cross_entropy_has_one_name():
    assert not hasattr(losses, "mixed_cross_entropy")  # its older name is gone: cross_entropy(..., mix=...)


def test_mix_targets_without_a_mix_is_the_one_hot():
    y = torch.tensor(Y)
    assert torch.equal(mix_targets(y, 3), one_hot(y, 3))
    assert torch.equal(one_hot(y, 3), F.one_hot(y, 3).float())


def test_data_layer_keeps_mixing_and_drops_the_losses():
    import selfkd.data as data
    import selfkd.data.mixing as mixing
    for name in ("mixed_cross_entropy", "mix_targets", "mixed_log_probs", "one_hot"):
        assert not hasattr(mixing, name) and not hasattr(data, name), name
    assert data.mix_rows is mixing.mix_rows and data.remix is mixing.remix


# -- DLB: the sampler asks the method for layouts ------------------------------------------


class OnlyPlans:
    """Stands in for DLB with nothing but the public planning call: the sampler needs no more."""

    def __init__(self, dlb):
        self.plan_epoch = dlb.plan_epoch


def test_dlb_sampler_uses_only_plan_epoch():
    dlb = DLB()
    sampler = DLBBatchSampler(OnlyPlans(dlb), list(range(10)), 4, drop_last=False)
    seen = []
    for _ in range(2):
        for idx in sampler:
            layout = dlb.layouts.next()
            seen.append((idx, layout.repeat))
            assert idx == layout.indices() == layout.repeat_index.tolist() + layout.new_index.tolist()
            dlb.loss(torch.zeros(len(idx), 3), torch.tensor(idx) % 3, index=torch.tensor(idx))
    assert seen[:3] == [([0, 1, 2, 3], 0), ([0, 1, 2, 3, 4, 5, 6, 7], 4), ([4, 5, 6, 7, 8, 9], 4)]
    assert seen[3] == ([8, 9, 0, 1, 2, 3], 2)  # carried over the epoch boundary


def test_dlb_plan_epoch_gives_the_sampler_batches_and_resumes():
    def step(dlb, idx):
        dlb.loss(torch.zeros(len(idx), 2), torch.tensor(idx) % 2, index=torch.tensor(idx))

    def run(dlb, steps):
        out = []
        for layout in dlb.plan_epoch(list(range(9)), 3, False):
            if len(out) == steps:
                break
            out.append(layout.indices())
            step(dlb, out[-1])
        return out

    via_sampler, sampled = DLB(), []
    for idx in via_sampler.batch_sampler(list(range(9)), 3):
        sampled.append(idx)
        step(via_sampler, idx)
    full = run(DLB(), 3)
    assert full == sampled
    first = DLB()
    head = run(first, 1)
    resumed = DLB()
    resumed.load_state_dict(first.state_dict())
    assert resumed.resumes_at() == 1 and resumed.steps == 1
    assert head + run(resumed, 2) == full


# -- CS-KD: labels in, an epoch plan out ---------------------------------------------------


def test_cskd_set_train_labels_and_plan_epoch():
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    m = CSKD(seed=3)
    m.set_train_labels(labels)
    order, partners, start = m.plan_epoch(list(range(8)), 3, False)
    assert start == 0 and order.tolist() == list(range(8))
    assert torch.equal(labels[partners], labels[order]) and (partners != order).all()

    other = CSKD(seed=3)
    batches = list(PairBatchSampler(other, list(range(8)), 3, False, labels))
    assert batches == [torch.cat([order[i:i + 3], partners[i:i + 3]]).tolist() for i in range(0, 8, 3)]
    # the loss checks pairs against the labels it was given
    out = other.loss(torch.zeros(6, 3), labels[torch.tensor(batches[0])], index=torch.tensor(batches[0]))
    assert out.loss.item() == pytest.approx(math.log(3), rel=1e-6)


def test_cskd_plan_epoch_resumes_and_needs_labels():
    with pytest.raises(TrainingError, match="set_train_labels"):
        CSKD().plan_epoch(list(range(4)), 2, False)
    with pytest.raises(TrainingError, match="1-D integer"):
        CSKD().set_train_labels(torch.tensor([0.5, 1.0]))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    m = CSKD()
    m.set_train_labels(labels)
    order, partners, _ = m.plan_epoch(list(range(6)), 2, False)
    rows = torch.cat([order[:2], partners[:2]])
    m.loss(torch.zeros(4, 3), labels[rows], index=rows)
    resumed = CSKD()
    resumed.load_state_dict(m.state_dict())
    resumed.set_train_labels(labels)
    again = resumed.plan_epoch([5, 4, 3, 2, 1, 0], 2, False)  # continues the saved order at batch 1
    assert torch.equal(again[0], order) and torch.equal(again[1], partners) and again[2] == 1


# -- no private reads across classes -------------------------------------------------------

#: private attributes of third-party objects with no public accessor
THIRD_PARTY = {"_orig_mod"}  # torch.compile's OptimizedModule: the module it wraps


def test_no_class_reads_another_objects_private_attributes():
    root = Path(selfkd.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        modules = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree)
                   if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                attr, owner = node.attr, node.value
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr")
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                attr, owner = node.args[1].value, node.args[0]
            else:
                continue
            if not attr.startswith("_") or attr.startswith("__") or attr in THIRD_PARTY:
                continue
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            root_name = owner
            while isinstance(root_name, ast.Attribute):
                root_name = root_name.value
            if isinstance(root_name, ast.Name) and root_name.id in modules:  # a module's name (torch._dynamo)
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


def test_capabilities_are_declared_on_every_method_not_found_by_getattr():
    from selfkd.methods.base import Method
    from selfkd.methods.registry import available_methods, method_class

    caps = ("supports_mix", "own_forward", "needs_teacher", "needs_stages")
    for name in available_methods():
        cls = method_class(name)
        assert issubclass(cls, Method)
        assert all(isinstance(getattr(cls, c), bool) for c in caps), name
    assert [n for n in available_methods() if method_class(n).needs_teacher] == ["tfkd-self"]
    src = "\n".join(p.read_text() for p in (Path(selfkd.__file__).parent).rglob("*.py"))
    for c in caps:
        assert f'getattr(cls, "{c}"' not in src and f"hasattr(method, \"{c}\"" not in src
