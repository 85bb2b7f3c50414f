"""A Lightning fit on digits with a selfkd method: run directly (one process) or with --ddp (2 CPU ranks, gloo).

Under ``seed_everything(SEED)``, fits ``epochs`` epochs with a checkpoint per epoch and one mid-epoch
(after the second batch of the second epoch), then two more Trainers resume, one from the first epoch's
checkpoint and one from the mid-epoch one, and fit to the same end; writes each rank's weights, method
state, batches and warnings of the three fits. ``--orders`` adds a one-epoch CE fit with
``loader(seed=LOADER_SEED)``. Used by tests/test_lightning.py.
"""
import argparse
import math
import sys
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)
import lightning as L  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import selfkd  # noqa: E402
from selfkd.integrations.lightning import SelfKD  # noqa: E402
from selfkd.methods import Batch  # noqa: E402

SEED, LOADER_SEED, BATCH = 7, 5, 16


def digits(n):
    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32) / 16.0
    return TensorDataset(x, torch.tensor(d.target[:n]))


class Net(L.LightningModule):
    def __init__(self, kd, data, batch_size, loader_seed=None):
        super().__init__()
        self.kd, self.data, self.batch_size, self.loader_seed = kd, data, batch_size, loader_seed
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.seen = []

    def train_dataloader(self):
        seed = {} if self.loader_seed is None else {"seed": self.loader_seed}
        return self.kd.loader(self.data, batch_size=self.batch_size, labels=self.data.tensors[1], **seed)

    def training_step(self, batch, i):
        x, y, index = batch
        self.seen.append(index.tolist())
        if not self.kd.method.runs_on_logits:  # CS-KD: forward passes of its own
            return self.kd.method.train_step(self.body, Batch(x, y, index, y_host=y)).loss
        return self.kd.loss(self.body(x), y, index)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def build(method):
    if method == "dlb":
        return selfkd.DLB(temperature=3.0, alpha=1.0)
    return selfkd.build_method(method)


def fit(method, epochs, out, ddp, n, ckpt=None, mid=None, loader_seed=None):
    """One fit; returns (net, kd, trainer, warning messages)."""
    L.seed_everything(SEED, verbose=False)
    torch.manual_seed(0)
    kd = SelfKD(build(method), num_classes=10)
    net = Net(kd, digits(n), BATCH, loader_seed)
    saves = [L.pytorch.callbacks.ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_epochs=1, filename="{epoch}")]
    if mid is not None:
        saves.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_train_steps=mid,
                                                         filename="mid-{step}"))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=2 if ddp else 1,
                        strategy="ddp" if ddp else "auto", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[kd, *saves], num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(net, ckpt_path=ckpt)
    return net, kd, trainer, [str(w.message) for w in caught]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("methods", nargs="+")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--orders", action="store_true")
    a = p.parse_args(argv)
    for method in a.methods:
        run(method, Path(a.out) / method, a.epochs, a.ddp, a.n)
    if a.orders:
        orders(Path(a.out) / "orders", a.ddp, a.n)


def weights(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def run(method, out, epochs=2, ddp=False, n=96):
    world = 2 if ddp else 1
    mid = math.ceil(n / world / BATCH) + 2  # the second epoch, after its second batch
    net, kd, trainer, _ = fit(method, epochs, out / "full", ddp, n, mid=mid)
    rank = trainer.global_rank
    first = sorted((out / "full").glob("epoch=0*.ckpt"))[0]
    net2, kd2, _, _ = fit(method, epochs, out / "resumed", ddp, n, ckpt=str(first))
    net3, kd3, _, caught = fit(method, epochs, out / "resumed_mid", ddp, n, ckpt=str(out / "full" / f"mid-step={mid}.ckpt"))
    result = {"full": weights(net), "full_state": kd.method.state_dict(), "full_seen": net.seen,
              "resumed": weights(net2), "resumed_state": kd2.method.state_dict(), "resumed_seen": net2.seen,
              "mid": mid, "mid_weights": weights(net3), "mid_state": kd3.method.state_dict(), "mid_seen": net3.seen,
              "mid_warnings": caught, "world": trainer.world_size}
    torch.save(result, out / f"rank{rank}.pt")
    return result


def orders(out, ddp=False, n=96):
    """A one-epoch CE fit with loader(seed=LOADER_SEED): each rank's batches."""
    net, _, trainer, _ = fit("ce", 1, out, ddp, n, loader_seed=LOADER_SEED)
    result = {"seen": net.seen, "world": trainer.world_size}
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
    return result


if __name__ == "__main__":
    sys.exit(main())
