"""Model FLOPs utilisation: the FLOPs a step's tokens needed against what the devices could do.

The FLOPs come from the model as built (:func:`model_flops`), one matmul weight at a time: 2 per
weight and token forward, 2 more for the gradient with respect to its input, 2 more for its own
gradient when it trains (6 for a trainable weight, 4 for a frozen one, as LoRA's base). The input
embedding is a lookup and costs nothing; the output layer runs only at the positions that predict
a label (:mod:`launcher.model.loss`), so it is charged per labelled token. Sizes are the
weights' logical ones (``in_features × out_features``), whatever their storage: 4-bit QLoRA
weights, ZeRO-3 partitions and FSDP shards count in full. Attention's own FLOPs (QKᵀ, AV) are
left out, as in the 6·N estimate: the MFU is a slight underestimate at long sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from launcher.plan.scale import peak_for_name  # the table lives with the planner: `ftl plan` imports no torch


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


@dataclass(frozen=True)
class ModelFlops:
    """Training FLOPs per token through the decoder (``body``) and per labelled token through the
    output layer (``head``)."""

    body: float
    head: float

    def step(self, tokens: float, labelled: float) -> float:
        return self.body * tokens + self.head * labelled


def model_flops(model: nn.Module, head: nn.Module) -> ModelFlops:
    """The FLOPs of ``model``'s matmul weights (its linear layers, LoRA's included), with ``head``
    (the output layer, :func:`launcher.model.loss.output_layer`) counted per labelled token."""
    body = 0.0
    head_flops = 0.0
    for module in model.modules():
        if next(module.children(), None) is not None or not hasattr(module, "in_features"):
            continue  # a wrapper (PEFT's LoRA layer) counts through its leaves
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        flops = (6.0 if weight.requires_grad else 4.0) * module.in_features * module.out_features
        if module is head:
            head_flops += flops
        else:
            body += flops
    return ModelFlops(body, head_flops)


def model_flops_utilization(flops_per_s: float, world_size: int, device: torch.device) -> Optional[float]:
    """The share of the peak of all ``world_size`` devices that ``flops_per_s`` is; None where the
    device's peak is unknown."""
    peak = peak_flops(device)
    return None if peak is None else flops_per_s / (peak * world_size)
