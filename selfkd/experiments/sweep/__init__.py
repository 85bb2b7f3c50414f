"""``selfkd sweep FILE``: a grid of runs from one YAML file, validated up front, resumable, one progress view.

A sweep file::

    out: runs/noise-study          # root of the run directories; relative to the sweep file's folder
    preset: cpu-short              # optional, below ``base``
    base:                          # config layers, like a --config file (nested sections or dotted keys)
      data: {name: digits}
      train: {epochs: 10}
    grid:                          # axes: dotted config key -> list of values; the runs are the product
      data.noise.rate: [0.0, 0.4]
      train.seed: [0, 1, 2]
    import: [my_pkg.my_models]     # optional: modules to import first (user models and methods)
    variants:                      # optional named axes whose values set several keys at once
      method:
        - {method.name: ce}
        - {name: dlb-T4, method.name: dlb, method.temperature: 4}   # `name`: the label (optional)

Layers per run: defaults < preset < base < the run's axis values. No two axes may set the same key.

Run directories are ``OUT/<axis>=<label>/<axis>=<label>/...``: variant axes first, then grid axes, in the
file's order, with ``train.seed`` always last, e.g. ``OUT/method=dlb-T4/data.noise.rate=0.4/train.seed=1``.
Labels are the values as written (floats via ``repr``, lists joined with ``+``); a label with characters
outside ``[A-Za-z0-9._,+=-]`` or longer than 48 characters is cleaned and gets a short hash of the value.
A variant without ``name`` is labelled by its values (``dlb,temperature=4``). Runs execute with the seed
axis outermost (every group gets its first seed before any gets its second).

The out folder must be new, empty (the sweep file itself aside) or a sweep root selfkd wrote before
(marked by ``OUT/.selfkd-sweep``, or for sweeps from before the marker by selfkd's own ``runs.json`` or
``sweep.yaml``): a folder of other files is refused, never written into.

Everything is checked before anything runs or is written: unknown top-level keys, unknown config keys
in ``base`` and in every axis, every run's resolved config (a typo in the last grid value fails at
once), and that an existing run directory holds the same config (keys added to the config since
then count with their defaults). Then ``OUT/sweep.yaml`` (the resolved spec; ``sweep.resolved.yaml``
when the sweep file itself is ``OUT/sweep.yaml``), ``OUT/runs.json`` (run name -> axis values and
status) and every run's ``config.yaml`` are written, so a report shows the runs not started yet.

Relative paths in the file (``out``, ``data.dir``, ``data.cache_dir``, ``method.teacher``, ``train.compile_cache``) are relative to
the sweep file's folder, wherever the command runs; they are stored absolute in each run's ``config.yaml``.
A compiled run (``train.compile``) without ``train.compile_cache`` keeps its graphs in ``OUT/compile_cache``,
shared by the sweep's runs. ``--out`` on the command line is relative to the working directory. Path errors (the out root not
writable, a data root missing or unreadable) are reported once, before anything is written.

Per run: ``summary.json`` exists -> skipped; ``checkpoint.pt`` exists -> resumed exactly; otherwise
started fresh (a run that failed before is retried). A run that raises a :class:`SelfKDError` (e.g. a
non-finite loss, a missing data set) or runs out of GPU memory gets ``RUN/failed.json`` with the
one-line error and the sweep goes on; the result counts finished (trained from scratch), resumed
(continued and finished), skipped (already finished), failed runs and runs left to other processes
(``elsewhere``). Ctrl-C stops the sweep; the interrupted run resumes from its last checkpoint next time.

Several processes may run one sweep at once (:func:`run_jobs`, ``selfkd sweep --jobs N``, or the same
command started twice on one machine): a process trains a run only while it holds an exclusive lock on
``RUN/.lock`` (``flock``, dropped by the OS when the process dies) and passes over runs another process
holds.
On a 2-core CPU, two 1-thread processes train small models about 18% faster than one 2-thread
process (measured with ``benchmarks/step_cost.py``, ResNet-8, batch 64).
"""
from .spec import plan, check_paths, label, Sweep, Run, Axis, RUNS, SPEC, check_root
from .runner import run_sweep
from .jobs import run_jobs

__all__ = ['plan', 'check_paths', 'label', 'run_sweep', 'run_jobs', 'Sweep', 'Run', 'Axis', 'RUNS', 'SPEC', 'check_root']
