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


# ---------------------------------------------------------------------------------------------
# report: runs made from the grid's real ones, with the numbers a test chooses
def fake(src: Path, dst: Path, config: dict | None = None, summary: dict | None = None,
         epochs: int | None = None) -> Path:
    """A copy of the real run ``src`` at ``dst``: ``config`` sets dotted keys of config.yaml, ``summary``
    keys of summary.json; ``epochs`` rewrites metrics.jsonl as that many epochs (test_acc 50 + epoch)."""
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    for key, value in (config or {}).items():
        *path, last = key.split(".")
        node = cfg
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    s = json.loads((dst / "summary.json").read_text())
    (dst / "summary.json").write_text(json.dumps({**s, **(summary or {})}))
    if "last_acc" in (summary or {}):  # the real run's per-image correctness no longer describes it
        (dst / "test_correct.npy").unlink()
    if epochs is not None:
        row = json.loads((dst / "metrics.jsonl").read_text().splitlines()[0])
        rows = [{**row, "epoch": e, "test_acc": 50.0 + e} for e in range(1, epochs + 1)]
        (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def real(grid, method: str, seed: int) -> Path:  # noqa: F811
    return grid[0] / "runs" / f"method.name={method}" / f"train.seed={seed}"


NOISY = {"data.noise.kind": "symmetric", "data.noise.rate": 0.4}
# last_acc per (method, noisy, seed): DLB - CE is +1, +3 clean and -2, -6 at 40% noise
ACC = {("ce", False, 0): 80.0, ("ce", False, 1): 82.0, ("dlb", False, 0): 81.0, ("dlb", False, 1): 85.0,
       ("ce", True, 0): 70.0, ("ce", True, 1): 74.0, ("dlb", True, 0): 68.0, ("dlb", True, 1): 68.0}


@pytest.fixture
def noise_grid(grid, tmp_path):  # noqa: F811
    """method (ce, dlb) x noise (clean, symmetric 0.4) x seed (0, 1), with the accuracies of ACC."""
    root = tmp_path / "runs"
    for (method, noisy, seed), acc in ACC.items():
        fake(real(grid, method, seed), root / f"{method}-{'noisy' if noisy else 'clean'}-{seed}",
             config=NOISY if noisy else None, summary={"last_acc": acc})
    return root


def test_a_baseline_method_is_paired_within_each_noise_value(noise_grid, tmp_path):
    md = build_report([str(noise_grid)], out=str(tmp_path / "rep"), baseline="method=ce", plots=False)
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    rows = {p["label"]: p for p in data["paired"]}
    assert set(rows) == {"method=dlb, noise=clean", "method=dlb, noise=symmetric 0.4"}
    clean, noisy = rows["method=dlb, noise=clean"], rows["method=dlb, noise=symmetric 0.4"]
    assert (clean["baseline"], noisy["baseline"]) == ("method=ce, noise=clean", "method=ce, noise=symmetric 0.4")
    assert (clean["pairs"], clean["compared"], noisy["pairs"], noisy["compared"]) == (2, 1, 2, 1)
    assert (clean["last_acc"]["mean"], clean["last_acc"]["better"]) == (2.0, 2)
    assert (noisy["last_acc"]["mean"], noisy["last_acc"]["better"]) == (-4.0, 0)
    assert noisy["last_acc"]["std"] == pytest.approx(statistics.stdev([-2.0, -6.0]), rel=1e-12)
    row = next(line for line in md.splitlines() if line.startswith("| method=dlb, noise=symmetric 0.4 | 2 |"))
    assert f"| -4.00 ± {statistics.stdev([-2.0, -6.0]):.2f} (0/2 better) |" in row
    assert row.endswith("| method=ce, noise=symmetric 0.4 | 1 |")
    assert "in the baseline group at the same values of the other axes" in md


def test_a_baseline_noise_value_is_paired_within_each_method(noise_grid, tmp_path):
    build_report([str(noise_grid)], out=str(tmp_path / "rep"), baseline="noise=clean", plots=False)
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [(p["label"], p["baseline"], p["last_acc"]["mean"]) for p in data["paired"]] == [
        ("method=ce, noise=symmetric 0.4", "method=ce, noise=clean", -9.0),
        ("method=dlb, noise=symmetric 0.4", "method=dlb, noise=clean", -15.0)]


def test_a_bad_or_ambiguous_baseline_is_one_line_and_writes_nothing(noise_grid, grid, tmp_path, capsys):  # noqa: F811
    from selfkd.cli import main

    for baseline, message in [
            ("method", "report: --baseline 'method': 'method' is not name=value (the form of the group labels, e.g. "
                       "'method=ce')"),
            ("method=cee", "report: --baseline 'method=cee' is not a group; groups: 'method=ce, noise=clean', ")]:
        assert main(["report", str(noise_grid), "--out", str(tmp_path / "rep"), "--baseline", baseline]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"selfkd: error: {message}") and err.count("\n") == 1, err
    root = tmp_path / "ls"  # two CE groups that differ only in a CE hyper-parameter: which one is DLB's baseline?
    for seed in (0, 1):
        fake(real(grid, "ce", seed), root / f"ce-{seed}")
        fake(real(grid, "ce", seed), root / f"ce-ls-{seed}", config={"method.label_smoothing": 0.1})
        fake(real(grid, "dlb", seed), root / f"dlb-{seed}")
    assert main(["report", str(root), "--out", str(tmp_path / "rep"), "--baseline", "method=ce"]) == 2
    err = capsys.readouterr().err
    assert err == ("selfkd: error: report: --baseline 'method=ce' is ambiguous for 'method=dlb': "
                   "'method=ce, label_smoothing=unset' and 'method=ce, label_smoothing=0.1' both match; "
                   "name more of the label\n"), err
    assert not (tmp_path / "rep").exists()


def test_paired_differences_carry_the_intervals_of_intervals_py(noise_grid, tmp_path):
    """Without per-image correctness: paired_interval on the summaries; with RUN/test_correct.npy: the bootstrap."""
    build_report([str(noise_grid)], out=str(tmp_path / "rep"), baseline="method=ce", plots=False)
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    n_test = json.loads((next(noise_grid.iterdir()) / "summary.json").read_text())["test_images"]
    for noisy in (False, True):
        row = next(p for p in data["paired"] if p["label"].endswith("symmetric 0.4" if noisy else "clean"))
        want = paired_interval([ACC["dlb", noisy, s] for s in (0, 1)], [ACC["ce", noisy, s] for s in (0, 1)], n_test)
        assert row["last_acc"]["interval"] == {"mean": want.mean, "lo": want.lo, "hi": want.hi, "units": 2,
                                               "method": "t+binomial"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"[{want.lo:+.2f}, {want.hi:+.2f}] | t + binomial |" in md and "binomial test-sampling error" in md

    rng = np.random.default_rng(0)
    correct = {}
    for run in sorted(noise_grid.iterdir()):  # per-image correctness whose mean is the run's last_acc
        arr = rng.random(n_test) < 0.75
        correct[run.name] = arr
        np.save(run / "test_correct.npy", arr)
        s = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**s, "last_acc": 100.0 * arr.mean()}))
    md = build_report([str(noise_grid)], out=str(tmp_path / "rep2"), baseline="method=ce", plots=False)
    data = json.loads((tmp_path / "rep2" / "report.json").read_text())
    row = next(p for p in data["paired"] if p["label"] == "method=dlb, noise=clean")
    want = paired_bootstrap(np.stack([correct[f"dlb-clean-{s}"] for s in (0, 1)]),
                            np.stack([correct[f"ce-clean-{s}"] for s in (0, 1)]))
    assert row["last_acc"]["interval"] == {"mean": want.mean, "lo": want.lo, "hi": want.hi, "units": 2,
                                           "method": "bootstrap"}
    assert f"[{want.lo:+.2f}, {want.hi:+.2f}] | bootstrap |" in md and "per-image correctness" in md


def bootstrap_of(runs: dict[str, list[Path]], row: dict) -> None:
    """``row``'s interval is the paired bootstrap of the runs' own RUN/test_correct.npy ("a" vs "b")."""
    a, b = (np.stack([np.load(r / "test_correct.npy", allow_pickle=False) for r in runs[k]]) for k in "ab")
    want = paired_bootstrap(a, b)
    assert row["last_acc"]["interval"] == {"mean": want.mean, "lo": want.lo, "hi": want.hi, "units": 2,
                                           "method": "bootstrap"}
    assert row["last_acc"]["mean"] == pytest.approx(want.mean, abs=1e-9)  # the bootstrap's mean is the paired mean


def test_selfkd_train_runs_report_the_bootstrap_interval(grid, tmp_path):  # noqa: F811
    """`selfkd train` writes RUN/test_correct.npy, so `selfkd report` on real runs uses the paired bootstrap."""
    from selfkd.cli import main

    assert main(["report", str(grid[0] / "runs"), "--out", str(tmp_path / "rep"), "--baseline", "method=ce",
                 "--no-plots"]) == 0
    (row,) = json.loads((tmp_path / "rep" / "report.json").read_text())["paired"]
    bootstrap_of({"a": [real(grid, "dlb", s) for s in (0, 1)], "b": [real(grid, "ce", s) for s in (0, 1)]}, row)
    i = row["last_acc"]["interval"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"[{i['lo']:+.2f}, {i['hi']:+.2f}] | bootstrap |" in md and "per-image correctness" in md

    root = tmp_path / "noise"  # a second grid, method x noise x seed, of copies of the real runs and their files
    for method in ("ce", "dlb"):
        for seed in (0, 1):
            fake(real(grid, method, seed), root / f"{method}-clean-{seed}")
            fake(real(grid, method, seed), root / f"{method}-noisy-{seed}", config=NOISY)
    build_report([str(root)], out=str(tmp_path / "rep2"), baseline="method=ce", plots=False)
    rows = {p["label"]: p for p in json.loads((tmp_path / "rep2" / "report.json").read_text())["paired"]}
    for noise in ("clean", "noisy"):
        label = "method=dlb, noise=" + ("clean" if noise == "clean" else "symmetric 0.4")
        bootstrap_of({"a": [root / f"dlb-{noise}-{s}" for s in (0, 1)], "b": [root / f"ce-{noise}-{s}" for s in (0, 1)]},
                     rows[label])


def test_several_arms_against_one_baseline_are_counted(grid, tmp_path):  # noqa: F811
    root = tmp_path / "runs"
    for seed in (0, 1):
        fake(real(grid, "ce", seed), root / f"ce-{seed}")
        for alpha in (0.5, 1.0, 2.0):
            fake(real(grid, "dlb", seed), root / f"dlb-{alpha}-{seed}", config={"method.alpha": alpha})
    md = build_report([str(root)], out=str(tmp_path / "rep"), baseline="method=ce", plots=False)
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [(p["label"], p["pairs"], p["compared"]) for p in data["paired"]] == [
        (f"method=dlb, alpha={a:g}", 2, 3) for a in (0.5, 1.0, 2.0)]
    assert "Up to 3 groups are compared with one baseline group" in md and "best of 3 differences" in md


def test_best_epoch_accuracy_is_labelled_test_selected(grid, tmp_path):  # noqa: F811
    md = build_report([str(grid[0] / "runs")], out=str(tmp_path / "rep"), baseline="method=ce", plots=False)
    assert "| best-epoch acc % (test-selected) |" in md and "| Δ best-epoch acc (test-selected) |" in md
    assert "| last acc % |" in md and "the headline" in md
    assert "wall s (measured)" in md and "possibly shared with other work" in md


# ---------------------------------------------------------------------------------------------
# plots, read from the figure objects
def figure(draw, root: Path, tmp_path: Path):
    groups = group_runs(find_runs([root]))
    fig = draw(groups, plots_mod._colors(len(groups)), tmp_path / "plot.png")
    assert fig is not None and (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    return groups, fig


def test_reliability_titles_carry_the_tables_ece_and_the_bins_show_their_counts(grid, tmp_path):  # noqa: F811
    runs = tmp_path / "runs"
    for method in ("ce", "dlb"):  # ECEs far from the pooled bins' ECE, so the title shows which one it carries
        for seed, ece in ((0, 0.05), (1, 0.25)):
            fake(real(grid, method, seed), runs / f"{method}-{seed}", summary={"ece": ece})
    build_report([str(runs)], out=str(tmp_path / "rep"), plots=False)
    table = {g["label"]: g["stats"]["ece"] for g in json.loads((tmp_path / "rep" / "report.json").read_text())["groups"]}
    groups, fig = figure(plots_mod.plot_reliability, runs, tmp_path)
    diagrams = [ax for ax in fig.axes if ax.get_title()]
    counts = [ax for ax in fig.axes if ax.get_ylabel() == "test images"]
    assert len(diagrams) == len(counts) == len(groups) == 2
    for g, ax, low in zip(groups, diagrams, counts):
        st = table[g.label]
        assert f"ECE {st['mean']:.4f} ± {st['std']:.4f} (mean over 2 runs)" in ax.get_title()
        pooled = pooled_reliability(g.finished)
        assert f"{st['mean']:.4f} ± {st['std']:.4f}" == "0.1500 ± 0.1414" and f"{pooled['ece']:.4f}" != "0.1500"
        assert [p.get_height() for p in low.patches] == pooled["count"]
        assert sum(pooled["count"]) == 2 * g.finished[0].summary["test_images"]
    assert "15 equal-width confidence bins" in fig.get_suptitle() and "(n_b / N)" in fig.get_suptitle()


def test_epoch_axes_have_integer_ticks(grid, tmp_path):  # noqa: F811
    root = tmp_path / "runs"
    for seed in (0, 1):  # 20 epochs: matplotlib's own ticks would be 0, 2.5, 5, ...
        fake(real(grid, "ce", seed), root / f"ce-{seed}", config={"train.epochs": 20}, epochs=20)
    _, fig = figure(plots_mod.plot_curves, root, tmp_path)
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = ax.get_xticks()
        assert len(ticks) > 2 and all(float(t).is_integer() for t in ticks), ticks


def test_a_finetune_run_gets_no_training_accuracy_panel(tmp_path):
    """selfkd finetune logs test accuracy and macro-F1 (%) and the training loss, no training accuracy: those
    three panels are drawn, and its summary counts its passes like selfkd train's."""
    import tinylm
    from selfkd.cli import main

    torch.set_num_threads(1)
    model, corpus = tinylm.make_model(tmp_path / "model"), tinylm.make_corpus(tmp_path / "corpus")
    root = tmp_path / "runs"
    for seed in (0, 1):
        assert main(["finetune", "--data", str(corpus), "--model", str(model), "--method", "ce", "--epochs", "2",
                     "--batch-size", "4", "--lr", "2e-3", "--seed", str(seed), "--out", str(root / f"ce-{seed}"),
                     "--set", "data.max_length=24", "--set", "train.log_every=50"]) == 0
    summary = json.loads((root / "ce-0" / "summary.json").read_text())
    assert (summary["forward_passes"], summary["backward_passes"]) == (2.0, 2.0)
    _, fig = figure(plots_mod.plot_curves, root, tmp_path)
    assert [ax.get_ylabel() for ax in fig.axes] == ["test accuracy (%)", "test macro-F1 (%)",
                                                    "training loss (nats, the method's objective)"]
    rows = [[json.loads(line) for line in (root / f"ce-{s}" / "metrics.jsonl").read_text().splitlines()] for s in (0, 1)]
    for ax, key in zip(fig.axes, ("test_acc", "test_macro_f1", "train_loss")):
        assert list(ax.lines[0].get_ydata()) == pytest.approx([statistics.mean(r[e][key] for r in rows) for e in (0, 1)],
                                                              rel=1e-12)
        assert list(ax.lines[0].get_xdata()) == [1, 2]
    assert all(ax.get_ylim()[1] > 1.0 for ax in fig.axes[:2])  # percent axes, not an empty 0-1 frame


def test_compute_plot_spreads_groups_at_one_compute_and_prints_no_labels(grid, tmp_path):  # noqa: F811
    """CE at 2 epochs and DLB at 1 both cost 2 forward + 2 backward passes per sample: two points, apart."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        fake(real(grid, "ce", seed), root / f"ce1-{seed}")
        fake(real(grid, "ce", seed), root / f"ce2-{seed}", config={"train.epochs": 2},
             summary={"epochs": 2, "forward_passes": 2.0, "backward_passes": 2.0})
        fake(real(grid, "dlb", seed), root / f"dlb-{seed}")
    md = build_report([str(root)], out=str(tmp_path / "rep"), plots=False)
    assert "| 2.00 ± 0.00 | 2.00 ± 0.00 |" in next(line for line in md.splitlines() if line.startswith("| method=dlb, epochs=1 |"))
    groups, fig = figure(plots_mod.plot_compute, root, tmp_path)
    ax = fig.axes[0]
    assert "forward + 2 × backward passes" in ax.get_xlabel()
    points = {c.get_label(): c.lines[0].get_xdata()[0] for c in ax.containers}
    assert set(points) == {g.label for g in groups} == {"method=ce, epochs=1", "method=ce, epochs=2",
                                                        "method=dlb, epochs=1"}
    assert points["method=ce, epochs=1"] == 3.0  # 1 + 2 x 1, alone at its compute: not moved
    a, b = points["method=ce, epochs=2"], points["method=dlb, epochs=1"]
    assert a != b and (a + b) / 2 == pytest.approx(6.0) and abs(a - b) < 0.5
    assert not ax.texts  # the groups are named in the legend, not printed over each other
