"""The learning-rate schedule as one pure function, so it can be tested and plotted without an optimizer.

``lr_at(step, train, total_steps)`` is the learning rate used by optimizer step ``step`` (0-based):

* warmup: linear from ``lr / warmup_steps`` at step 0 to ``lr`` at step ``warmup_steps - 1``
  (never 0: a step at lr 0 would be wasted work);
* then ``cosine`` or ``linear`` decay from ``lr`` to ``min_lr_ratio * lr``, reached at
  ``step == total_steps``, or ``constant``.
"""

from __future__ import annotations

import math

from launcher.config.schema import TrainConfig


def lr_at(step: int, train: TrainConfig, total_steps: int) -> float:
    peak = train.lr
    warmup = train.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if train.schedule == "constant":
        return peak
    floor = peak * train.min_lr_ratio
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if train.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if train.schedule == "linear":
        return peak - (peak - floor) * progress
    raise ValueError(f"train.schedule={train.schedule!r}: expected one of cosine, linear, constant")


def lr_factor(step: int, train: TrainConfig, total_steps: int) -> float:
    """The multiplier of the peak lr, the form torch's LambdaLR wants."""
    return lr_at(step, train, total_steps) / train.lr
