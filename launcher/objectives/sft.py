"""Supervised fine-tuning: the next-token cross-entropy summed over the labelled tokens, and with
``objective.kl_to_base`` > 0 an anchor to the base: plus that weight times KL(base || tuned) at
each labelled position (the estimators: :mod:`launcher.objectives.base_dist`)."""

from __future__ import annotations

from typing import Any

import torch

from launcher.data.packing import model_inputs
from launcher.model.loss import count_label_tokens, next_token_loss, positions_of
from launcher.objectives.base import Objective


class SftObjective(Objective):
    name = "sft"

    def __init__(
        self, loss_impl: str = "chunked", kl_to_base: float = 0.0, top_k: int = 64, base_mode: str = ""
    ) -> None:
        self.loss_impl = loss_impl  # train.loss: see launcher.model.loss
        self.kl_to_base, self.top_k = kl_to_base, top_k
        self.base_mode = base_mode  # adapters_off or precomputed (launcher.objectives.base_dist)
        self.base: Any = None  # launcher.objectives.reference.ReferenceLogps of the base's rows, when precomputed

    def prepare(self, trainer: Any) -> None:
        if self.kl_to_base and self.base_mode == "precomputed":
            from launcher.objectives.reference import prepare_base_rows

            self.base = prepare_base_rows(trainer, self.top_k)

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return count_label_tokens(batch["labels"])

    def loss(self, engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.kl_to_base:
            return self.anchored_loss(engine, batch)
        loss = next_token_loss(
            engine.model,
            model_inputs(batch),
            batch["labels"],
            autocast=engine.autocast(),
            impl=self.loss_impl,
            positions=positions_of(batch),
        )
        return loss, {}

    def anchored_loss(
        self, engine: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed cross-entropy plus kl_to_base times the summed KL to the base; the labelled
        positions' logits are made whole here (train.loss does not apply)."""
        from launcher.objectives.base_dist import base_logprobs, kl_full, kl_topk, label_logprobs

        logq, targets = label_logprobs(engine.model, batch, engine.autocast())
        cross_entropy = -logq.gather(-1, targets[:, None]).sum()
        if self.base_mode == "adapters_off":
            kl = kl_full(base_logprobs(engine, batch), logq)
        else:
            rows = self.base.lookup("train", batch["index"].tolist()).to(logq.device)
            kl = kl_topk(rows, logq)
        return cross_entropy + self.kl_to_base * kl.sum().float(), {"kl_to_base": kl.detach().sum()}
