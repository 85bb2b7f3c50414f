"""DLB in a Lightning fit on scikit-learn's handwritten digits, offline and on the CPU.

    pip install selfkd[lightning]
    python examples/lightning_digits.py            # add --ddp for 2 CPU processes (gloo)
"""
import sys

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import selfkd
from selfkd.integrations.lightning import SelfKD


class Net(L.LightningModule):
    def __init__(self, kd, data):
        super().__init__()
        self.kd, self.data = kd, data
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def train_dataloader(self):
        return self.kd.loader(self.data, batch_size=32)  # DLB's [repeated | new] batches, with indices

    def training_step(self, batch, i):
        x, y, index = batch
        return self.kd.loss(self.body(x), y, index)  # logs selfkd/ce and selfkd/kd

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


if __name__ == "__main__":
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    train = TensorDataset(x[:1500], y[:1500])
    L.seed_everything(0)  # the weights and the data order (the same in one process and under --ddp)
    kd = SelfKD(selfkd.DLB(temperature=3.0, alpha=1.0), num_classes=10)
    net = Net(kd, train)
    ddp = "--ddp" in sys.argv
    L.Trainer(max_epochs=5, accelerator="cpu", devices=2 if ddp else 1, strategy="ddp" if ddp else "auto",
              enable_progress_bar=False, logger=False, enable_checkpointing=False, callbacks=[kd]).fit(net)
    if not ddp or int(__import__("os").environ.get("LOCAL_RANK", 0)) == 0:
        with torch.no_grad():
            acc = (net.body(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
        print(f"held-out accuracy {100 * acc:.1f}% on {len(y) - 1500} digits")
