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


def same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


def new_rows(seen, method):
    """Each step's new samples (DLB: after the repeated rows), a [steps, 16] tensor."""
    out, r = [], 0
    for b in seen:
        out.append(b[r:])
        r = len(b) - r if method == "dlb" else 0
    return torch.tensor(out)


def check_dlb_batches(seen, batch_size):
    """[previous new rows | new rows], carried across the epoch boundary (one epoch = 96 / world samples)."""
    prev = []
    for b in seen:
        r = len(prev)
        assert b[:r] == prev and len(b) - r <= batch_size
        prev = b[r:]


@pytest.mark.parametrize("method", ["dlb", "pskd"])
def test_fit_and_resume_equals_uninterrupted(tmp_path, method):
    res = lightning_fit.run(method, tmp_path, epochs=2, n=96)
    same_state({k: v for k, v in res["full"].items()}, res["resumed"])
    same_state(res["full_state"], res["resumed_state"])
    assert res["resumed_seen"] == res["full_seen"][len(res["full_seen"]) // 2:]  # the second epoch, batch for batch
    if method == "dlb":
        check_dlb_batches(res["full_seen"], 16)
        assert sorted(new_rows(res["full_seen"], method)[:6].flatten().tolist()) == list(range(96))
    else:  # PS-KD's memory holds a prediction of every sample after the first epoch
        assert torch.all(res["full_state"]["memory"].float().sum(1) > 0.99)


def test_ddp_two_ranks_dlb_and_pskd(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "dlb", "pskd", "--ddp"], check=True, env=env,
                   cwd=tmp_path, timeout=300, capture_output=True)
    for method in ("dlb", "pskd"):
        ranks = [torch.load(tmp_path / method / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        for res in ranks:
            assert res["world"] == 2
            same_state(res["full"], res["resumed"])
            same_state(res["full_state"], res["resumed_state"])
        same_state(ranks[0]["full"], ranks[1]["full"])  # DDP keeps the replicas equal
        for epoch in (slice(0, 3), slice(3, 6)):  # Lightning's DistributedSampler: disjoint shards per epoch
            shards = [set(new_rows(res["full_seen"], method)[epoch].flatten().tolist()) for res in ranks]
            assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 96
        if method == "pskd":  # on_epoch_end: one memory on every rank, a prediction for every sample
            same_state(ranks[0]["full_state"], ranks[1]["full_state"])
            assert torch.all(ranks[0]["full_state"]["memory"].float().sum(1) > 0.99)
        if method == "dlb":
            for res in ranks:
                check_dlb_batches(res["full_seen"], 16)
            # each rank's cache is its own
            assert not torch.equal(ranks[0]["full_state"]["prev_new"], ranks[1]["full_state"]["prev_new"])


def test_refusals():
    with pytest.raises(ConfigError, match="forward passes of its own"):
        SelfKD(selfkd.build_method("cskd"), num_classes=10).loss(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long))
    kd = SelfKD(selfkd.DLB(), num_classes=10)
    with pytest.raises(ConfigError, match="do not pass sampler"):
        kd.loader(range(4), 2, shuffle=True)
    with pytest.raises(ConfigError, match="checkpoint holds method 'pskd'"):
        kd.load_state_dict({"method": "pskd", "ranks": [{}]})
