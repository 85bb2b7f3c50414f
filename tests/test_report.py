"""Issues 18 and 20 on `selfkd report`: baselines paired within the other axes, 95% intervals, reliability
diagrams whose ECE is the table's, integer epochs, finetune runs, and forward/backward passes counted apart."""
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from selfkd.engine.config import build_config
from selfkd.engine.setup import build
from selfkd.engine.trainer import Trainer
from selfkd.experiments.intervals import paired_bootstrap, paired_interval
from selfkd.experiments.report import build_report, find_runs, group_runs
from selfkd.experiments.report import plots as plots_mod
from selfkd.experiments.report.stats import pooled_reliability

from test_sweep_report import grid  # noqa: F401  (the module-scoped 2x2 sweep: ce/dlb x seeds 0, 1)


# ---------------------------------------------------------------------------------------------
# forward and backward passes, counted on a real tiny run
def tiny(method: str, epochs: int, **params):
    return build_config({"data": {"name": "digits", "subset": 128}, "model": {"name": "cnn_small"},
                         "method": {"name": method, **params}, "optim": {"batch_size": 32},
                         "train": {"epochs": epochs, "device": "cpu", "seed": 0}})


def counted_run(cfg, run: Path) -> tuple[dict, float, float]:
    """Train ``cfg``; return its summary and the rows the model class forwarded inside training steps, per
    training sample: all of them, and those with autograd on (the ones a backward goes through)."""
    setup = build(cfg)
    cls = type(setup.model)
    rows = {"all": 0, "grad": 0}
    inside = [False]

    def hook(module, args, out):
        if inside[0] and type(module) is cls:  # the model and its copies (a teacher, snapshots), not submodules
            rows["all"] += args[0].shape[0]
            rows["grad"] += args[0].shape[0] * torch.is_grad_enabled()

    trainer = Trainer(setup, run, progress=False, log=lambda m: None)
    step = trainer.method.train_step

    def counting(model, batch):
        inside[0] = True
        try:
            return step(model, batch)
        finally:
            inside[0] = False

    trainer.method.train_step = counting
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        summary = trainer.run()
    finally:
        handle.remove()
    n = len(setup.train)
    return summary, rows["all"] / n, rows["grad"] / n


@pytest.mark.parametrize("method, params, fwd, bwd", [
    ("ce", {}, 2.0, 2.0),
    ("cskd", {}, 4.0, 2.0),  # partners: a no-grad forward
    ("ddgsd", {}, 4.0, 4.0),  # two views, both with gradients
    # 4 steps per epoch, 8 in all; snapshots after steps 2, 4 (and 6): forwarded at steps 3..7 by 1, 1, 2, 2, 2
    ("mrkd", {"interval": 2, "copies": 2}, 2.0 + 8 / 4, 2.0),
])
def test_forward_and_backward_passes_are_the_ones_run(tmp_path, method, params, fwd, bwd):
    summary, all_rows, grad_rows = counted_run(tiny(method, 2, **params), tmp_path / "run")
    assert (summary["forward_passes"], summary["backward_passes"]) == (fwd, bwd) == (all_rows, grad_rows)


def test_mrkd_before_its_first_snapshot_is_charged_as_ce(tmp_path):
    summary, all_rows, grad_rows = counted_run(tiny("mrkd", 1, interval=10), tmp_path / "run")
    assert (summary["forward_passes"], summary["backward_passes"]) == (1.0, 1.0) == (all_rows, grad_rows)
    assert summary["forwards_per_sample"] == 2.0  # the pool-full rate, still reported as such


def test_tfkd_self_teacher_is_a_forward_without_backward(tmp_path):
    teacher = tmp_path / "teacher"
    Trainer(build(tiny("ce", 1)), teacher, progress=False, log=lambda m: None).run()
    summary, all_rows, grad_rows = counted_run(tiny("tfkd-self", 1, teacher=str(teacher)), tmp_path / "run")
    assert (summary["forward_passes"], summary["backward_passes"]) == (2.0, 1.0) == (all_rows, grad_rows)


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_dlb_is_charged_one_plus_r_per_epoch_less_the_first_steps_missing_repeats(tmp_path, fraction):
    summary, all_rows, grad_rows = counted_run(tiny("dlb", 2, repeat_fraction=fraction), tmp_path / "run")
    assert (summary["forward_passes"], summary["backward_passes"]) == (2 * (1 + fraction),) * 2
    first = round(fraction * 32) / 128  # the run's first step has no previous batch to repeat
    assert all_rows == grad_rows == 2 * (1 + fraction) - first
