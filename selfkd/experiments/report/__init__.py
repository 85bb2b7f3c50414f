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
unformatted) and PNG plots (matplotlib on the Agg canvas, no global backend change): test accuracy per
epoch (mean line, min-max band over seeds), accuracy against the label-noise rate per method (when the
runs vary it; error bars: std over seeds) and reliability diagrams (bins summed over seeds). Cost
columns: seconds, seconds per epoch, peak memory, and forward passes per training sample over the run
(a method's ``forwards_per_sample`` x epochs, plus its auto-trained teacher's): groups with equal passes
had equal compute.
"""
from .render import build_report
from .collect import find_runs, group_runs, RunInfo, Group, IGNORED
from .stats import stat, paired, pooled_reliability
from .plots import PLOTS

__all__ = ['build_report', 'find_runs', 'group_runs', 'stat', 'paired', 'pooled_reliability', 'RunInfo', 'Group', 'IGNORED', 'PLOTS']
