"""Training on one rank: the per-rank entry (``python -m launcher.train``), the loop, the loss,
the LR schedule, checkpoints, the process group and what a run logs."""
