"""No host-device synchronisation in a training step, counted on the CPU (see tests/syncs.py)."""
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from selfkd.data import ArrayDataset, BatchAugment, BatchView, build_mixer
from selfkd.methods import Batch, build_method
from selfkd.methods.base import host_equal
from selfkd.models import build_model
from syncs import SyncCounter

N, K, B = 48, 4, 8
METHODS = [
    ("ce", {}), ("dlb", {}), ("dlb", {"schedule": "confidence"}), ("dlb", {"schedule": "entropy"}), ("dlb", {"schedule": "margin"}),
    ("dlb", {"schedule": "linear", "ramp_epochs": 1}),
    ("dlb", {"forward": "split", "ce_rows": "new"}), ("dlb", {"cache_topk": 2, "cache_dtype": "bfloat16"}),
    ("dlb", {"cache_topk": 3, "schedule": "margin", "cache_dtype": "float16"}), ("cskd", {}), ("pskd", {}), ("pskd", {"memory_device": "cpu"}),
    ("ddgsd", {}), ("byot", {}), ("mrkd", {"interval": 2, "ensemble": "fcn", "copies": 2, "knowledge_adjustment": True}),
    ("mrkd-tc", {"interval": 2}), ("zipf-ls", {}), ("ls", {}), ("lsrkd", {}), ("lsrkd-tc", {}), ("tfkd-reg", {}),
]


def data() -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(torch.randint(0, 256, (N, 1, 16, 16), dtype=torch.uint8, generator=g), torch.arange(N) % K, K)


def steps(name: str, params: dict, mixer=None, epochs: int = 2):
    """Train ``epochs`` epochs as the trainer does; yield the sync calls of each step."""
    torch.manual_seed(0)
    ds, aug = data(), BatchAugment(crop_padding=1, flip=True)
    m = build_method(name, **params)
    m.setup(num_samples=N, num_classes=K, epochs=epochs)
    model = m.prepare_model(build_model("resnet8" if name == "byot" else "cnn_small", num_classes=K, in_channels=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sampler = m.batch_sampler(RandomSampler(ds, generator=torch.Generator().manual_seed(1)), B, labels=ds.labels)
    loader = DataLoader(BatchView(ds), sampler=sampler, batch_size=None)
    ag, mg = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    for epoch in range(epochs):
        m.on_epoch_start(epoch, epochs)
        for x, y, idx in loader:
            with SyncCounter() as c:
                y_dev = y.clone()  # "on the device": the step must not read it back
                batch = Batch(aug(x, ag), y_dev, idx, raw=x, augment=lambda r: aug(r, ag), y_host=y)
                if mixer is not None:
                    batch = m.mix(batch, mixer, mg)
                out = m.train_step(model, batch)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
            yield c.calls
        m.on_epoch_end()


@pytest.mark.parametrize("name,params", METHODS, ids=[f"{n}-{'-'.join(map(str, p.values()))}" for n, p in METHODS])
def test_a_step_reads_no_device_value(name, params):
    calls = [c for step in steps(name, params) for c in step]
    assert calls == [], f"{name}: host syncs per step {sorted(set(calls))}"


@pytest.mark.parametrize("name", ["ce", "dlb", "cskd", "pskd"])
def test_mixed_steps_read_only_host_draws(name):
    """mixup/CutMix draw lam and the box from a CPU generator (the trainer's ``mix`` generator): the only
    scalar reads are of those CPU draws, inside the mixing functions, never of a device value."""
    for mixer in (build_mixer("mixup", alpha=1.0, prob=0.5), build_mixer("cutmix", alpha=1.0, prob=1.0)):
        calls = [c for step in steps(name, {}, mixer, epochs=1) for c in step]
        assert calls and {where.split(":")[0] for _, where in calls} == {"data/mixing.py"}, sorted(set(calls))


def test_the_counter_sees_what_would_sync():
    """The counter is not blind: the checks this issue removed, and the usual culprits, are counted."""
    a, b = torch.arange(4), torch.arange(4)
    with SyncCounter() as c:
        torch.equal(a, b)
        float(a.sum())
        bool(a[0] == 0)
        a[a > 1]
        torch.nonzero(a)
        torch.nn.functional.one_hot(a, 5)
    assert [op.split(".")[1] for op, _ in c.calls][:4] == ["equal", "_local_scalar_dense", "_local_scalar_dense", "index"]
    assert len(c.calls) >= 6
    with SyncCounter() as c:
        assert host_equal(a, b) and not host_equal(a, b + 1)
    assert c.calls == []


def test_host_checks_stay_strict():
    """The checks moved to the CPU still fire: DLB's repeated rows must be the previous step's new rows."""
    from selfkd.errors import TrainingError

    m = build_method("dlb")
    ds = data()
    sampler = m.batch_sampler(RandomSampler(ds, generator=torch.Generator().manual_seed(1)), B)
    it = iter(DataLoader(BatchView(ds), sampler=sampler, batch_size=None))
    x, y, idx = next(it)
    m.loss(torch.zeros(len(y), K), y.clone(), index=idx, target_host=y)
    x, y, idx = next(it)
    wrong = y.clone()
    wrong[0] = (wrong[0] + 1) % K
    with pytest.raises(TrainingError, match="labels of the repeated rows"):
        m.loss(torch.zeros(len(y), K), y.clone(), index=idx, target_host=wrong)


def test_the_trainer_step_reads_no_device_value(tmp_path):
    """The trainer's own step (Trainer._step: transfer, augment, method, backward, optimiser, scheduler), DLB with
    the confidence schedule and a policy, counted over a whole epoch."""
    from selfkd.engine.config import build_config
    from selfkd.engine.trainer import Trainer
    from selfkd.engine.setup import build

    per_step = []

    class Counted(Trainer):
        def _step(self, *args):
            with SyncCounter() as c:
                out = super()._step(*args)
            per_step.append(c.calls)
            return out

    cfg = build_config({"data": {"name": "digits", "subset": 200}, "model": {"name": "cnn_small"},
                        "method": {"name": "dlb", "schedule": "confidence"}, "augment": {"policy": "trivialaugment"},
                        "optim": {"batch_size": 32}, "train": {"epochs": 1, "device": "cpu", "log_every": 1000}})
    Counted(build(cfg), tmp_path / "run", progress=False, log=lambda m: None).run()
    assert len(per_step) == 7 and all(calls == [] for calls in per_step), per_step


def test_compiled_model_takes_every_batch_size_with_one_graph():
    """DLB's batches alternate B rows (first step) and 2B (the rest), a last batch is short: the trainer's
    compile wrapper marks the batch dimension dynamic, so one graph serves them all (no recompiles)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from selfkd.nn_utils import DynamicBatch

    torch._dynamo.reset()
    counter = CompileCounter()
    model = build_model("cnn_small", num_classes=K, in_channels=1).eval()
    fwd = DynamicBatch(torch.compile(model, backend=counter))
    # DLB at batch 4: 4 rows first, then 8, a short last batch (3 new + 4 repeated); all below 16, where
    # PyTorch's CPU convolution guards on the batch size by itself (its kernel choice changes there)
    shapes = (4, 8, 8, 8, 7, 3, 8)
    for rows in shapes:
        fwd(torch.randn(rows, 1, 16, 16))
    assert counter.frame_count == 1
    torch._dynamo.reset()
    plain = CompileCounter()
    eager = torch.compile(model, backend=plain)
    for rows in shapes:
        eager(torch.randn(rows, 1, 16, 16))
    assert plain.frame_count == 2  # without the wrapper: a static graph, then a recompile at the new size
