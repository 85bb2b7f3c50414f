"""``selfkd report DIR...``: aggregate run directories into a markdown report with tables and plots.

Run directories are the folders under the given ones that hold ``config.yaml`` (or ``failed.json``);
the search does not descend into a run (a method's auto-trained ``RUN/teacher`` is part of its run).
Runs are grouped by their config with ``train.seed`` and the keys that do not change results
(:data:`IGNORED`; also an auto-filled ``method.teacher``) removed; a group's label names the keys that
differ across the groups (``method=dlb, noise=symmetric 0.4``; a method's hyper-parameters only where
they differ between groups of that method). Each group reports mean ± sample standard deviation (n-1)
over its finished runs; failed, unfinished and not yet started runs are listed with their status and
error, never dropped (a run whose ``summary.json`` does not parse is *unreadable*, with a warning on
stderr), and a ``runs.json`` written by ``selfkd sweep`` adds planned runs that have no
directory yet.

``REPORT_DIR`` (default ``<first dir>/report``) gets ``report.md``, ``report.json`` (the same numbers,
unformatted) and PNG plots (matplotlib on the Agg canvas, no global backend change): the per-epoch metrics the
runs logged (mean line, min-max band over seeds; integer epochs), accuracy against the label-noise rate per
method (when the runs vary it; error bars: std over seeds), accuracy against compute, and reliability diagrams
(bins summed over seeds, the test images per bin under each, the title's ECE the table's). Cost columns:
wall-clock seconds and peak memory (measured, possibly on a shared machine), and forward and backward passes per
training sample over the run (``forward_passes`` / ``backward_passes`` of ``summary.json``, counted by the method;
older runs: ``forwards_per_sample`` x epochs and no backward count; plus an auto-trained teacher's).
``--baseline``: a group label, or some of its ``name=value`` parts (each group is then paired with the baseline
group at the same values of the other axes); the last-epoch accuracy difference gets a 95% interval with
test-sampling error (:mod:`selfkd.experiments.intervals`).
"""
from .render import build_report
from .collect import find_runs, group_runs, RunInfo, Group, IGNORED
from .stats import stat, paired, pooled_reliability, baselines, interval
from .plots import PLOTS

__all__ = ['build_report', 'find_runs', 'group_runs', 'stat', 'paired', 'pooled_reliability', 'baselines', 'interval', 'RunInfo', 'Group', 'IGNORED', 'PLOTS']
