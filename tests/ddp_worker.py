"""Run under ``torchrun --nproc_per_node=2`` by tests/test_distributed.py; writes OUT/rank{r}.pt."""
import sys
import time
from pathlib import Path

import torch

from selfkd import distributed
from selfkd.methods import build_method


def collectives(out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    r, w = distributed.rank(), distributed.world_size()
    res = {}
    # all_gather_rows with unequal counts
    res["rows"] = distributed.all_gather_rows(torch.full((r + 1, 2), float(r)))
    # sharded evaluation: rank r computes its chunks; gathered = single-process order
    n, chunk = 23, 4
    mine = [torch.arange(s, e, dtype=torch.float32)[:, None] * torch.ones(1, 3) for s, e in distributed.eval_chunks(n, chunk, r, w)]
    local = torch.cat(mine) if mine else torch.empty(0, 3)
    res["eval"] = distributed.gather_chunks(local, n, chunk)
    # PS-KD: rank 0 writes samples [0, 1], [4], [0] at steps 0, 1, 2; rank 1 writes [2, 3], [5], [4]
    p = build_method("pskd", memory_dtype="float32")
    p.setup(num_samples=6, num_classes=3, epochs=2)
    p.on_epoch_start(0, 2)
    plan = {0: [[0, 1], [4]], 1: [[2, 3], [4]]}
    for step, idx in enumerate(plan[r]):
        if r == 1 and step == 1:
            idx = [5]
        logits = torch.tensor([[float(i), float(r), float(step)] for i in idx])
        p.loss(logits, torch.zeros(len(idx), dtype=torch.int64), index=torch.tensor(idx))
    if r == 1:  # sample 4 again, at a later step than rank 0's write: rank 1's row must win
        p.loss(torch.tensor([[4.0, 1.0, 2.0]]), torch.zeros(1, dtype=torch.int64), index=torch.tensor([4]))
    else:
        p.loss(torch.tensor([[0.0, 0.0, 9.0]]), torch.zeros(1, dtype=torch.int64), index=torch.tensor([0]))
    p.on_epoch_end()
    res["pskd"] = p.state_dict()["memory"]
    # MrKD's fcn layer: each rank trains it on its own half of a batch; gradients averaged
    m = build_method("mrkd", ensemble="fcn", copies=2, fcn_lr=0.5)
    m.setup(num_samples=8, num_classes=3, epochs=1)
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(8, 3, generator=g) for _ in range(2)]
    y = torch.randint(0, 3, (8,), generator=g)
    half = slice(4 * r, 4 * r + 4)
    for _ in range(3):
        m.ensemble([o[half] for o in outs], y[half])
    res["fcn"] = m.state_dict()["fcn"]
    torch.save(res, f"{out}/rank{r}.pt")
    if r == 1:  # late: rank 0's shutdown waits for it
        time.sleep(0.3)
        Path(f"{out}/rank1.leaves").write_text(repr(time.time()))
    distributed.shutdown()
    if r == 0:
        Path(f"{out}/rank0.left").write_text(repr(time.time()))


def leave(out: str) -> None:
    """Rank 1 leaves after a failure (shutdown(synced=False)) while rank 0 ends cleanly: rank 0 still exits 0."""
    distributed.init(torch.device("cpu"))
    distributed.barrier()
    if distributed.rank() == 1:
        time.sleep(0.3)
        distributed.shutdown(synced=False)
        return
    distributed.shutdown()
    Path(f"{out}/rank0.left").write_text("ok")


EQUIV_METHODS = ("ce", "dlb", "cskd", "pskd")


def tiny_config(method: str, batch: int, **train):
    """A few steps of a tiny model; augmentation off so that a 1-process twin sees the very same inputs."""
    from selfkd.engine.config import build_config

    return build_config({
        "data": {"name": "digits", "subset": 64},
        "augment": {"crop_padding": 0, "flip": False},
        "model": {"name": "resnet8"}, "method": {"name": method},
        "optim": {"batch_size": batch, "lr": 0.1},
        "train": {"epochs": 2, "seed": 3, "device": "cpu", "log_every": 1000, **train},
    })


def equivalence(out: str) -> None:
    """Each method trained by 2 ranks with per-rank batch 8 and sync_bn; rank 0 writes OUT/<method>/."""
    from selfkd.engine.trainer import Trainer
    from selfkd.engine.setup import build

    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    for method in EQUIV_METHODS:
        Trainer(build(tiny_config(method, 8, sync_bn=True)), Path(out) / method, progress=False,
                log=lambda m: None).run()
    distributed.shutdown()


if __name__ == "__main__":
    {"collectives": collectives, "equivalence": equivalence, "leave": leave}[sys.argv[1]](sys.argv[2])
