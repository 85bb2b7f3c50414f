"""A Lightning fit on digits with a selfkd method: run directly (one process) or with --ddp (2 CPU ranks, gloo).

Fits ``epochs`` epochs with a checkpoint per epoch, then a second Trainer resumes from the first epoch's
checkpoint and fits to the same end; writes each rank's weights, method state and batches of both fits.
Used by tests/test_lightning.py.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
import lightning as L  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import selfkd  # noqa: E402
from selfkd.integrations.lightning import SelfKD  # noqa: E402


def digits(n):
    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32) / 16.0
    return TensorDataset(x, torch.tensor(d.target[:n]))


class Net(L.LightningModule):
    def __init__(self, kd, data, batch_size):
        super().__init__()
        self.kd, self.data, self.batch_size = kd, data, batch_size
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.seen = []

    def train_dataloader(self):
        return self.kd.loader(self.data, batch_size=self.batch_size)

    def training_step(self, batch, i):
        x, y, index = batch
        self.seen.append(index.tolist())
        return self.kd.loss(self.body(x), y, index)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def build(method):
    if method == "dlb":
        return selfkd.DLB(temperature=3.0, alpha=1.0)
    return selfkd.build_method(method)


def fit(method, epochs, out, ddp, n, ckpt=None):
    torch.manual_seed(0)
    kd = SelfKD(build(method), num_classes=10)
    net = Net(kd, digits(n), 16)
    save = L.pytorch.callbacks.ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=2 if ddp else 1,
                        strategy="ddp" if ddp else "auto", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[kd, save], num_sanity_val_steps=0)
    trainer.fit(net, ckpt_path=ckpt)
    return net, kd, trainer


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("methods", nargs="+")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--ddp", action="store_true")
    a = p.parse_args(argv)
    for method in a.methods:
        run(method, Path(a.out) / method, a.epochs, a.ddp, a.n)


def run(method, out, epochs=2, ddp=False, n=96):
    net, kd, trainer = fit(method, epochs, out / "full", ddp, n)
    rank = trainer.global_rank
    first = sorted((out / "full").glob("epoch=0*.ckpt"))[0]
    net2, kd2, _ = fit(method, epochs, out / "resumed", ddp, n, ckpt=str(first))
    result = {"full": {k: v.clone() for k, v in net.state_dict().items()}, "full_state": kd.method.state_dict(),
              "full_seen": net.seen, "resumed": {k: v.clone() for k, v in net2.state_dict().items()},
              "resumed_state": kd2.method.state_dict(), "resumed_seen": net2.seen, "world": trainer.world_size}
    torch.save(result, out / f"rank{rank}.pt")
    return result

if __name__ == "__main__":
    sys.exit(main())
