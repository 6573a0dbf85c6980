"""launcher/objectives/base.py StatSums: an objective's statistics stay tensors over a step's
micro-batches and are read once, with the sums that adding their floats gave."""

from __future__ import annotations

import torch

from launcher.objectives.base import StatSums
from launcher.objectives.losses import pair_stats


def test_statistics_stay_tensors_until_read_and_sum_as_their_floats() -> None:
    g = torch.Generator().manual_seed(0)
    micro_batches = [
        pair_stats(
            torch.randn(4, generator=g, dtype=torch.float64),
            torch.randn(4, generator=g, dtype=torch.float64),
            torch.randn(8, generator=g, dtype=torch.float64),
        )
        for _ in range(3)
    ]
    sums, floats = StatSums(), {}
    for stats in micro_batches:
        sums.add(stats)
        for name, value in stats.items():
            floats[name] = floats.get(name, 0.0) + float(value)  # what the trainer did per micro-batch before
    assert all(isinstance(v, torch.Tensor) for v in sums.sums.values())  # nothing read from the device before the log
    assert sums.read() == floats  # exactly: float64 sums in the same order
    assert StatSums().read() == {}  # SFT: no statistics
