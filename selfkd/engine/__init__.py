"""Training engine: config, trainer, checkpoints, metrics. Imports data, models and methods; never the CLI."""
