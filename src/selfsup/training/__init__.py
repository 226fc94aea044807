"""Training: the loop, schedules, optimiser groups, checkpoints, distributed helpers."""
