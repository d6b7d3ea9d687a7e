"""Training: state, optimiser, step, loop, checkpoints; wires models, data and losses together."""
