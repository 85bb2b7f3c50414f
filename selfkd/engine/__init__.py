"""Training engine: config, the trainer and its rooms (setup, run_state, system, stages), run directories,
checkpoints, metrics. Imports data, models and methods; never the CLI."""
