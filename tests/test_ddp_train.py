"""DDP training evidence (gloo, 2 processes, CPU): the same training as one process on the union batch,
bit-identical resume after SIGKILL, two "nodes" on one machine, and the distributed errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddp_worker import EQUIV_METHODS, tiny_config
from selfkd.engine import checkpoint as ckpt
from selfkd.engine.trainer import Trainer
from selfkd.engine.setup import build
from test_distributed import free_port, torchrun
from union import UnionSampler

HERE = Path(__file__).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
RUN = ["--data", "digits", "--model", "cnn_small", "--method", "dlb", "--seed", "1", "--batch-size", "16",
       "--epochs", "3", "--set", "data.subset=320", "--set", "train.sync_bn=true", "--no-progress", "--threads", "1"]


def weights(run: Path) -> dict:
    return ckpt.load(run / "checkpoint.pt")["model"]


def test_two_ranks_train_as_one_process_on_the_union_batch(tmp_path):
    p = torchrun([str(HERE / "ddp_worker.py"), "equivalence", str(tmp_path / "ddp")], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for method in EQUIV_METHODS:
        run = tmp_path / "ddp" / method
        summary = json.loads((run / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["batch_size"] == 8 and summary["global_batch"] == 16
        assert {f.name for f in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoint.pt", "best.pt"}
        cfg = tiny_config(method, 16)  # one process, batch 2b: the union of both ranks' batches
        twin = Trainer(build(cfg), tmp_path / "one" / method, progress=False, log=lambda m: None,
                       sampler=UnionSampler(64, cfg.train.seed + 1, 8))  # the trainer seeds its sampler with seed + 1
        twin.run()
        a, b = weights(run), weights(tmp_path / "one" / method)
        init = build(cfg).model.state_dict()  # the seeded initial weights both runs started from
        assert a.keys() == b.keys()
        for k in a:
            if not a[k].is_floating_point():
                assert torch.equal(a[k], b[k]), (method, k)
                continue
            # float32 sums in another order differ by ~1e-7; a ReLU input that close to 0 flips and routes one
            # row's gradient differently, so after 8 steps the runs may differ by more than rounding. Measured
            # against how far training moved the weights, they must agree to 3% (a wrong reduction, no
            # sync_bn or another sample order moves them by 10-100%; the largest gap measured here was 1.5%)
            moved = (b[k].double() - init[k].double()).norm()
            gap = (a[k].double() - b[k].double()).norm()
            assert gap <= 0.03 * moved + 1e-6, (method, k, float(gap), float(moved))
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        twin_rows = [json.loads(x) for x in (tmp_path / "one" / method / "metrics.jsonl").read_text().splitlines()]
        assert abs(rows[-1]["train_loss"] - twin_rows[-1]["train_loss"]) < 1e-2 * twin_rows[-1]["train_loss"]
        # the sharded, gathered evaluation equals one process evaluating the same weights
        twin.model.load_state_dict(a)
        one = twin.evaluate()
        assert (one["acc"], one["nll"], one["ece"]) == (rows[-1]["test_acc"], rows[-1]["test_nll"], rows[-1]["test_ece"])
        # rank 0's per-image correctness is the gathered evaluation's, in test-set order: one process's
        saved = np.load(run / "test_correct.npy", allow_pickle=False)
        assert saved.dtype == np.bool_ and saved.tolist() == twin.test_correct.tolist()


def selfkd(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selfkd", *args], env=ENV, capture_output=True, text=True,
                          timeout=300, **kw)


def test_sigkill_mid_epoch_then_resume_is_bit_identical_and_two_nodes_match(tmp_path):
    # the uninterrupted reference: two "nodes" on one machine (torchrun --nnodes=2 over 127.0.0.1), which must be
    # the same 2-rank run as --nproc 2 (a drift between the launchers fails the comparison below as well)
    port = free_port()
    ref = tmp_path / "nodes"
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "-m", "selfkd", "train", *RUN, "--out", str(ref)],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert json.loads((ref / "summary.json").read_text())["world_size"] == 2
    assert "2 ranks (gloo, sync_bn; batch 16/rank = 32 global)" in outs[0][1]
    assert outs[0][1].count("epoch 1/3") == 1 and "epoch 1/3" not in outs[1][1]  # rank 0 alone logs

    # --nproc 2, SIGKILLed in epoch 2 (the launcher and both ranks), resumed: bit for bit the reference
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "selfkd", "train", *RUN, "--nproc", "2", "--out", str(run)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and
                                          (run / "metrics.jsonl").read_text().count("\n") >= 1):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists()
    p = selfkd("train", "--resume", str(run), "--nproc", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed" in p.stderr
    a, b = weights(ref), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "test_correct.npy").read_bytes() == (ref / "test_correct.npy").read_bytes()
    state = ckpt.load(run / "checkpoint.pt")
    assert state["world_size"] == 2 and len(state["ranks"]) == 1 and "cache_logits" in state["ranks"][0]["method"]
    assert not torch.equal(state["method"]["cache_logits"], state["ranks"][0]["method"]["cache_logits"])

    # a resume with another world size: one line, every rank exits non-zero, nothing written
    before = {f.name: f.stat().st_mtime_ns for f in run.iterdir()}
    (run / "summary.json").unlink()
    p = selfkd("train", "--resume", str(run), "--nproc", "3")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"selfkd: error: --resume {run}: the checkpoint was written by 2 ranks, this run has 3; resume with the same "
        "world size (--nproc 2, or torchrun with nnodes x nproc_per_node = 2)"]
    assert {f.name: f.stat().st_mtime_ns for f in run.iterdir()} == {k: v for k, v in before.items() if k != "summary.json"}


def test_distributed_bad_input_is_one_line_on_rank_zero(tmp_path, monkeypatch, capsys):
    """A training set smaller than one global step: rank 0 prints one line, every rank exits 2, nothing written."""
    out = tmp_path / "small"
    p = selfkd("train", "--data", "digits", "--model", "cnn_small", "--epochs", "1", "--no-progress",
               "--set", "data.subset=40", "--batch-size", "16", "--nproc", "3", "--out", str(out))
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "selfkd: error: optim.batch_size=16 per rank x 3 ranks = 48 samples per step, but the training set has 40: "
        "lower the batch size or the rank count"], p.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())
    # NCCL without CUDA, under torchrun's environment: refused before any rendezvous, on every rank
    from selfkd.cli import main

    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        code = main(["train", "--data", "digits", "--model", "cnn_small", "--device", "cpu", "--set",
                     "train.backend=nccl", "--out", str(tmp_path / "nccl")])
        err = capsys.readouterr().err
        assert code == 2
        assert err.splitlines() == ([] if rank == "1" else [
            "selfkd: error: train.backend=nccl needs CUDA devices, but training runs on the CPU (use "
            "train.backend=gloo or auto on CPU machines)"])
    assert not (tmp_path / "nccl").exists()


def test_sync_bn_on_a_model_without_batchnorm_is_an_error(monkeypatch):
    from torch import nn

    from selfkd import models
    from selfkd.engine.config import build_config
    from selfkd.errors import ConfigError

    def plain(num_classes: int, in_channels: int = 1) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))

    with models.MODELS.scope():
        models.register_model("plain_linear")(plain)
        cfg = build_config({"data": {"name": "digits"}, "model": {"name": "plain_linear"}, "train": {"sync_bn": True}})
        with pytest.raises(ConfigError, match="train.sync_bn = true: model.name=plain_linear has no BatchNorm layer"):
            build(cfg)


def test_tfkd_self_teacher_stage_on_two_ranks_is_the_ce_run_of_the_same_config(tmp_path):
    base = ["--data", "digits", "--model", "cnn_small", "--seed", "1", "--batch-size", "16", "--epochs", "2",
            "--set", "data.subset=160", "--no-progress", "--threads", "1", "--nproc", "2"]
    p = selfkd("train", *base, "--method", "tfkd-self", "--out", str(tmp_path / "kd"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "training the CE teacher first" in p.stderr
    teacher = tmp_path / "kd" / "teacher"
    for run in (teacher, tmp_path / "kd"):
        assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    p = selfkd("train", *base, "--method", "ce", "--out", str(tmp_path / "ce"))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = weights(teacher), weights(tmp_path / "ce")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the stage is that run, bit for bit
    rows = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_kd"] > 0 for r in rows)  # the student distils from it on both epochs
