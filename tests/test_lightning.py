"""selfkd.integrations.lightning: a real lightning.Trainer on digits, one process and 2-process DDP (gloo)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

import selfkd  # noqa: E402
from selfkd.errors import ConfigError  # noqa: E402
from selfkd.integrations.lightning import SelfKD  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "lightning_fit.py"
sys.path.insert(0, str(SCRIPT.parent))
import lightning_fit  # noqa: E402

NOT_RESUMABLE = "dataloader is not resumable"


@pytest.fixture(autouse=True)
def _no_global_seed(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything sets it for the whole process


def same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


def new_rows(seen, method):
    """Each step's new samples (DLB: after the repeated rows; CS-KD: the anchors), a [steps, 16] tensor."""
    out, r = [], 0
    for b in seen:
        out.append(b[: len(b) // 2] if method == "cskd" else b[r:])
        r = len(b) - r if method == "dlb" else 0
    return torch.tensor(out)


def epoch_orders(seen, method, epochs):
    """The sample order of each epoch (its new rows, in step order)."""
    return [e.flatten().tolist() for e in new_rows(seen, method).chunk(epochs)]


def randperm(n, seed):
    """What torch.utils.data.DistributedSampler and SeededShuffle draw for seed + epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def interleave(shards):
    """Rank r holds the entries r::world of the order (DistributedSampler): the order they come from."""
    return [i for group in zip(*shards) for i in group]


def check_dlb_batches(seen, batch_size):
    """[previous new rows | new rows], carried across the epoch boundary (one epoch = 96 / world samples)."""
    prev = []
    for b in seen:
        r = len(prev)
        assert b[:r] == prev and len(b) - r <= batch_size
        prev = b[r:]


@pytest.mark.parametrize("method", ["dlb", "pskd", "cskd"])
def test_fit_and_resume_equals_uninterrupted(tmp_path, method):
    res = lightning_fit.run(method, tmp_path, epochs=2, n=96)
    same_state({k: v for k, v in res["full"].items()}, res["resumed"])
    same_state(res["full_state"], res["resumed_state"])
    assert res["resumed_seen"] == res["full_seen"][len(res["full_seen"]) // 2:]  # the second epoch, batch for batch
    # from the mid-epoch checkpoint: the epoch's next batch, bit-identical, and Lightning sees a resumable loader
    assert res["mid"] == 8 and res["mid_seen"] == res["full_seen"][8:]
    same_state(res["full"], res["mid_weights"])
    same_state(res["full_state"], res["mid_state"])
    assert not [w for w in res["mid_warnings"] if NOT_RESUMABLE in w]
    # seed_everything(7): epoch e is randperm(96) from 7 + e
    assert epoch_orders(res["full_seen"], method, 2) == [randperm(96, lightning_fit.SEED + e) for e in (0, 1)]
    if method == "dlb":
        check_dlb_batches(res["full_seen"], 16)
    elif method == "pskd":  # PS-KD's memory holds a prediction of every sample after the first epoch
        assert torch.all(res["full_state"]["memory"].float().sum(1) > 0.99)


def first_batch(tmp_path, seed, loader_seed=None):
    L.seed_everything(seed, verbose=False)
    kd = SelfKD(selfkd.build_method("ce"), num_classes=10)
    net = lightning_fit.Net(kd, lightning_fit.digits(96), 16, loader_seed)
    L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, callbacks=[kd],
              default_root_dir=tmp_path).fit(net)
    return net.seen[0]


def test_order_follows_seed_everything(tmp_path):
    zero, one = first_batch(tmp_path, 0), first_batch(tmp_path, 1)
    assert zero != one
    assert zero == randperm(96, 0)[:16] and one == randperm(96, 1)[:16]
    # an explicit loader seed wins over seed_everything's
    assert first_batch(tmp_path, 0, loader_seed=5) == first_batch(tmp_path, 1, loader_seed=5) == randperm(96, 5)[:16]


def fit_steps(tmp_path, **trainer_kwargs):
    torch.manual_seed(0)
    kd = SelfKD(selfkd.build_method("pskd"), num_classes=10)
    net = lightning_fit.Net(kd, lightning_fit.digits(96), 16)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[kd], default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(net)
    return kd.method, trainer, net


@pytest.mark.parametrize("kwargs, epochs, steps", [
    ({"max_steps": 20}, 4, 20),                                # 6 batches an epoch: 4 epochs, the last one partial
    ({"max_steps": 20, "max_epochs": 2}, 2, 12),               # the smaller limit
    ({"max_steps": 5, "accumulate_grad_batches": 2}, 2, 5),    # 3 optimizer steps an epoch
    ({"max_steps": 7, "limit_train_batches": 3}, 3, 7),        # 3 batches an epoch
])
def test_max_steps_sets_the_epochs(tmp_path, kwargs, epochs, steps):
    pskd, trainer, net = fit_steps(tmp_path, **kwargs)
    assert trainer.global_step == steps
    assert (pskd.epochs, pskd.epoch) == (epochs, epochs - 1)  # on_epoch_start(epoch, epochs) of the last epoch
    assert pskd.alpha_t == pytest.approx(pskd.hp.alpha_T, rel=1e-12)  # the schedule reached its end with the fit


@pytest.mark.parametrize("kwargs, match", [
    ({"max_steps": 0}, r"trains no step \(max_epochs=-1, max_steps=0\)"),
    ({"max_epochs": 0}, r"trains no step \(max_epochs=0, max_steps=-1\)"),
    ({"max_epochs": -1}, r"has no limit \(max_epochs=-1, max_steps=-1\)"),
])
def test_fit_without_a_length_is_refused(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        fit_steps(tmp_path, **kwargs)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("PL_GLOBAL_SEED", None)
    subprocess.run([sys.executable, str(SCRIPT), str(out), "dlb", "pskd", "--ddp", "--orders"], check=True, env=env,
                   cwd=out, timeout=400, capture_output=True)
    return out


@pytest.mark.parametrize("method", ["dlb", "pskd"])
def test_ddp_two_ranks(ddp_runs, method):
    ranks = [torch.load(ddp_runs / method / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for res in ranks:
        assert res["world"] == 2
        same_state(res["full"], res["resumed"])
        same_state(res["full_state"], res["resumed_state"])
        # mid-epoch (second epoch, after 2 of its 3 batches): every rank continues bit-identically
        assert res["mid"] == 5 and res["mid_seen"] == res["full_seen"][5:]
        same_state(res["full"], res["mid_weights"])
        same_state(res["full_state"], res["mid_state"])
    assert ranks[0]["mid_warnings"] is not None and not [w for w in ranks[0]["mid_warnings"] if NOT_RESUMABLE in w]
    same_state(ranks[0]["full"], ranks[1]["full"])  # DDP keeps the replicas equal
    # Lightning's DistributedSampler follows seed_everything(7): the union of the shards is the one-process order
    shards = [epoch_orders(res["full_seen"], method, 2) for res in ranks]
    for e in (0, 1):
        assert interleave([shards[0][e], shards[1][e]]) == randperm(96, lightning_fit.SEED + e)
    if method == "pskd":  # on_epoch_end: one memory on every rank, a prediction for every sample
        same_state(ranks[0]["full_state"], ranks[1]["full_state"])
        assert torch.all(ranks[0]["full_state"]["memory"].float().sum(1) > 0.99)
    if method == "dlb":
        for res in ranks:
            check_dlb_batches(res["full_seen"], 16)
        # each rank's cache is its own
        assert not torch.equal(ranks[0]["full_state"]["prev_new"], ranks[1]["full_state"]["prev_new"])


def test_ddp_explicit_loader_seed_is_the_one_process_order(ddp_runs, tmp_path):
    ranks = [torch.load(ddp_runs / "orders" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    one = lightning_fit.orders(tmp_path)
    assert one["world"] == 1 and [ranks[0]["world"], ranks[1]["world"]] == [2, 2]
    order = sum(one["seen"], [])
    assert order == randperm(96, lightning_fit.LOADER_SEED)  # loader(seed=5), not seed_everything(7)
    assert interleave([sum(r["seen"], []) for r in ranks]) == order


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="forward passes of its own"):
        SelfKD(selfkd.build_method("cskd"), num_classes=10).loss(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long))
    kd = SelfKD(selfkd.DLB(), num_classes=10)
    with pytest.raises(ConfigError, match="do not pass sampler"):
        kd.loader(range(4), 2, shuffle=True)
    with pytest.raises(ConfigError, match="checkpoint holds method 'pskd'"):
        kd.load_state_dict({"method": "pskd", "ranks": [{}]})
    with pytest.raises(ConfigError, match="set up when the fit starts"):  # outside a fit with the callback
        kd.loss(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long), torch.arange(2))

    class OwnLoader(lightning_fit.Net):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(self.data, batch_size=16)

    kd = SelfKD(selfkd.build_method("ce"), num_classes=10)
    with pytest.raises(ConfigError, match="train_dataloader must return kd.loader"):
        L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_checkpointing=False, callbacks=[kd], default_root_dir=tmp_path).fit(
            OwnLoader(kd, lightning_fit.digits(32), 16))
