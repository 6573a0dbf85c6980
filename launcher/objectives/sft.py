"""Supervised fine-tuning: the next-token cross-entropy summed over the labelled tokens."""

from __future__ import annotations

from typing import Any

import torch

from launcher.data.packing import model_inputs
from launcher.model.loss import count_label_tokens, next_token_loss, positions_of
from launcher.objectives.base import Objective


class SftObjective(Objective):
    name = "sft"

    def __init__(self, loss_impl: str = "chunked") -> None:
        self.loss_impl = loss_impl  # train.loss: see launcher.model.loss

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return count_label_tokens(batch["labels"])

    def loss(self, engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = next_token_loss(
            engine.model,
            model_inputs(batch),
            batch["labels"],
            autocast=engine.autocast(),
            impl=self.loss_impl,
            positions=positions_of(batch),
        )
        return loss, {}
