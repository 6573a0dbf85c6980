"""The learning-rate schedule as one pure function, so it can be tested and plotted without an optimizer.

``lr_at(step, train, total_steps)`` is the learning rate used by optimizer step ``step`` (0-based):

* warmup: linear from ``lr / warmup_steps`` at step 0 to ``lr`` at step ``warmup_steps - 1``
  (never 0: a step at lr 0 would be wasted work), clipped to ``total_steps - 1`` steps when the
  run is shorter than its warmup (with a notice: :func:`warmup_notice`);
* then ``cosine`` or ``linear`` decay from ``lr`` to ``min_lr_ratio * lr``, reached at
  ``step == total_steps``, or ``constant``.
"""

from __future__ import annotations

import math

from launcher.config.schema import TrainConfig


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """``train.warmup_steps``, clipped to ``total_steps - 1`` when the run is not longer than it
    (a recipe shortened with ``train.max_steps``): the last step then runs at the peak lr."""
    return min(train.warmup_steps, max(0, total_steps - 1))


def warmup_notice(train: TrainConfig, total_steps: int) -> str | None:
    """What to tell the user when :func:`warmup_steps` clipped the warmup."""
    used = warmup_steps(train, total_steps)
    if used == train.warmup_steps:
        return None
    return (
        f"train.warmup_steps={train.warmup_steps} is not shorter than this run's {total_steps} steps: "
        f"warming up over {used} step(s) instead (set train.warmup_steps to choose)"
    )


def lr_at(step: int, train: TrainConfig, total_steps: int) -> float:
    peak = train.lr
    warmup = warmup_steps(train, total_steps)
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
