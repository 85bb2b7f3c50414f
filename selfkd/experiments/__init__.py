"""Experiment tooling above the engine: sweeps (grids of runs, parallel jobs, resumable) and reports
(tables, plots and paired comparisons read back from run directories). Imports the engine, never the
reverse."""
