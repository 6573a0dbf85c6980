"""The objective seam: what the trainer minimises, behind one small interface.

Per optimizer step the trainer asks each micro-batch for its ``weight`` (what the loss is a mean
over: label tokens for SFT, pairs for preference objectives), sums it over the window and the
ranks, and back-propagates each micro-batch's summed ``loss`` divided by that total, so every
token (or pair) weighs the same whatever micro-batch or rank it fell in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from launcher.engines.base import Engine


class Objective(ABC):
    name: str

    def prepare(self, trainer: Any) -> None:  # noqa: B027 (a hook: most objectives need no preparation)
        """Work before the first step (preference objectives: the reference log-probs)."""

    @abstractmethod
    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many units (tokens, pairs) this micro-batch's loss sums over."""

    @abstractmethod
    def loss(self, engine: Engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the summed loss of the micro-batch, summed statistics to log as means per unit)."""

    def eval_metrics(self, trainer: Any) -> Optional[dict[str, float]]:
        """The loss-based eval metrics, when not perplexity (None: perplexity)."""
        return None


class StatSums:
    """An optimizer step's sums of the statistics :meth:`Objective.loss` returns, kept as float64
    tensors where they were made and read once, when logged: a ``float()`` per statistic per
    micro-batch waits for the device each time. The same sums as adding their floats."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for name, value in stats.items():
            value = value.detach().double()
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def read(self) -> dict[str, float]:
        """The sums as floats: one transfer from the device for all of them."""
        if not self.sums:
            return {}
        return dict(zip(self.sums, torch.stack(list(self.sums.values())).tolist()))
