"""Every registered method: trains on real digits through the reference trainer, resumes bit-identically
from a checkpoint taken mid-run, lists its hyper-parameters, and keeps checkpoint-safe state."""
import json

import pytest
import torch

from selfkd.engine import checkpoint as ckpt
from selfkd.engine.config import build_config
from selfkd.engine.trainer import TIMING_KEYS
from selfkd.engine.stages import train_run
from selfkd.methods import available_methods, method_class

def cfg_for(method: str, epochs: int):
    params = {"interval": 5} if method.startswith("mrkd") else {}  # snapshots refresh within an epoch
    staged = method_class(method).needs_stages  # multi-exit: 8x8 digits go through resnet8
    return build_config({
        "data": {"name": "digits"}, "model": {"name": "resnet8" if staged else "cnn_small"},
        "method": {"name": method, **params}, "optim": {"batch_size": 64},
        "train": {"epochs": epochs, "device": "cpu", "seed": 0},
    })


def rows(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


class Stop(KeyboardInterrupt):
    pass


def stop_at(n):
    """A log callback that interrupts the process at the n-th finished epoch (teacher epochs count)."""
    seen = []

    def log(msg):
        if msg.startswith("epoch "):
            seen.append(msg)
            if len(seen) == n:
                raise Stop

    return log


METHODS = [m for m in available_methods() if not m.startswith("test-")]


@pytest.mark.parametrize("method", METHODS)
def test_trains_and_resumes_bit_identically(tmp_path, method):
    ref = tmp_path / "ref"
    summary = train_run(cfg_for(method, 2), ref, progress=False, log=lambda m: None)
    assert summary["epochs"] == 2 and 0 <= summary["last_acc"] <= 100
    first = rows(ref)[0]
    assert all(v == v for v in first.values() if isinstance(v, float)), "NaN in metrics"

    run = tmp_path / "run"
    with pytest.raises(Stop):
        train_run(cfg_for(method, 2), run, progress=False, log=stop_at(1))
    assert not (run / "summary.json").exists()
    train_run(cfg_for(method, 2), run, resume=True, progress=False, log=lambda m: None)
    assert rows(run) == rows(ref)
    a, b = ckpt.load(run / "checkpoint.pt"), ckpt.load(ref / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    torch.save(a["method"], tmp_path / "state.pt")  # method state survives a weights_only round trip
    torch.load(tmp_path / "state.pt", weights_only=True)


@pytest.mark.parametrize("method", METHODS)
def test_documented_contract(method):
    cls = method_class(method)
    assert cls.formula and cls.__doc__ and cls.__doc__.strip()
    for key, field in cls.Params.model_fields.items():
        assert field.description, f"{method}.{key} has no description"
    instance = cls()
    assert instance.forwards_per_sample >= 1
