"""Distributed semantics: collectives on 2 real gloo ranks (torchrun), samplers sharded per rank."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler

from selfkd import distributed
from selfkd.errors import ConfigError
from selfkd.methods import build_method

HERE = Path(__file__).parent


def torchrun(args: list[str], nproc: int = 2, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_collectives_on_two_ranks(tmp_path):
    p = torchrun([str(HERE / "ddp_worker.py"), "collectives", str(tmp_path)])
    assert p.returncode == 0, p.stderr[-3000:]
    # a clean shutdown waits for every rank: rank 0 left after the late rank 1 began to leave
    assert float((tmp_path / "rank0.left").read_text()) >= float((tmp_path / "rank1.leaves").read_text())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["rows"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])) and torch.equal(r0["rows"], r1["rows"])
    full = torch.arange(23, dtype=torch.float32)[:, None] * torch.ones(1, 3)
    assert torch.equal(r0["eval"], full) and torch.equal(r1["eval"], full)
    # PS-KD: identical on both ranks; each sample holds its latest write (step, then rank)
    mem = r0["pskd"]
    assert torch.equal(mem, r1["pskd"])

    def sm(*z):
        return torch.softmax(torch.tensor(z), 0)

    expect = torch.stack([sm(0.0, 0.0, 9.0), sm(1.0, 0.0, 0.0), sm(2.0, 1.0, 0.0), sm(3.0, 1.0, 0.0),
                          sm(4.0, 1.0, 2.0), sm(5.0, 1.0, 1.0)])
    assert torch.allclose(mem, expect, atol=1e-6)
    # MrKD fcn: equal on both ranks, and equal to one process training it on the union batch
    m = build_method("mrkd", ensemble="fcn", copies=2, fcn_lr=0.5)
    m.setup(num_samples=8, num_classes=3, epochs=1)
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(8, 3, generator=g) for _ in range(2)]
    y = torch.randint(0, 3, (8,), generator=g)
    for _ in range(3):
        m.ensemble(outs, y)
    one = m.state_dict()["fcn"]
    for k in one:
        assert torch.equal(r0["fcn"][k], r1["fcn"][k])
        assert torch.allclose(r0["fcn"][k], one[k], atol=1e-6), k


def test_clean_shutdown_when_a_peer_left_after_failing(tmp_path):
    """The waiting shutdown of a rank that finished does not fail when its peer left after an error."""
    p = torchrun([str(HERE / "ddp_worker.py"), "leave", str(tmp_path)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "rank0.left").read_text() == "ok"


@pytest.mark.parametrize("n", [40, 37])
def test_dlb_shards_first_then_pairs_with_equal_rows_per_rank(n):
    b, world = 4, 2
    per_rank = []
    for r in range(world):
        m = build_method("dlb")
        s = m.batch_sampler(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=5), b)
        epochs = []
        for e in range(2):
            s.set_epoch(e)
            shard = list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=5).__iter__()) \
                if e == 0 else None
            batches = []
            for batch in s:
                layout = m.layouts.next()
                m.loss(torch.zeros(len(batch), 3), torch.tensor(batch) % 3, index=torch.tensor(batch))  # consumes it
                batches.append((batch, layout.repeat))
            epochs.append((batches, shard))
        per_rank.append(epochs)
    for e in range(2):
        rows = [[len(bt) for bt, _ in per_rank[r][e][0]] for r in range(world)]
        assert rows[0] == rows[1], rows  # equal row counts on every step
        assert len(rows[0]) == math.ceil(math.ceil(n / world) / b)
    for r in range(world):
        (batches, shard), _ = per_rank[r]
        news = [bt[rep:] for bt, rep in batches]
        assert [i for nb in news for i in nb] == shard  # new rows: this rank's shard, in order
        for (bt, rep), prev in zip(batches[1:], news[:-1]):
            assert bt[:rep] == prev  # repeated rows: this rank's previous new rows
        first_of_next = per_rank[r][1][0][0][0]  # the next epoch repeats this rank's last new rows (carry_over)
        assert first_of_next[: len(news[-1])] == news[-1]


def test_cskd_partners_do_not_depend_on_the_sharding():
    n, b = 30, 4
    labels = torch.arange(n) % 3

    def pairs(sampler) -> dict[int, int]:
        m = build_method("cskd", seed=3)
        out = {}
        for batch in m.batch_sampler(sampler, b, labels=labels):
            k = len(batch) // 2
            out.update(zip(batch[:k], batch[k:]))
        return out

    one = pairs(RandomSampler(range(n), generator=torch.Generator().manual_seed(0)))
    ranks = {}
    for r in range(2):
        ranks.update(pairs(DistributedSampler(range(n), num_replicas=2, rank=r, shuffle=True, seed=1)))
    assert one.keys() == ranks.keys() == set(range(n))
    assert one == ranks
    assert all(labels[a] == labels[p] and a != p for a, p in one.items())


def test_backend_choice_and_nccl_without_cuda():
    assert distributed.pick_backend("auto", torch.device("cpu")) == "gloo"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.backend=nccl needs CUDA"):
            distributed.pick_backend("nccl", torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.backend"):
        distributed.pick_backend("mpi", torch.device("cpu"))
    assert distributed.eval_chunks(10, 3, 1, 2) == [(3, 6), (9, 10)]
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
