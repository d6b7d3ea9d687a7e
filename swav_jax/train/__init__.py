"""Training: the loop, config validation, checkpoints, metrics and the run's config.json."""
