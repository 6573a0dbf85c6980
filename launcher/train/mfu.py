"""Model FLOPs utilisation: the FLOPs a step's tokens needed against what the devices could do.

The FLOPs come from the model as built (:func:`model_flops`), one matmul weight at a time: 2 per
weight and token forward, 2 more for the gradient with respect to its input, 2 more for its own
gradient when it trains (6 for a trainable weight, 4 for a frozen one, as LoRA's base). The input
embedding is a lookup and costs nothing; the output layer runs only at the positions that predict
a label (:mod:`launcher.train.loss`), so it is charged per labelled token. Sizes are the
weights' logical ones (``in_features × out_features``), whatever their storage: 4-bit QLoRA
weights, ZeRO-3 partitions and FSDP shards count in full. Attention's own FLOPs (QKᵀ, AV) are
left out, as in the 6·N estimate: the MFU is a slight underestimate at long sequences.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

# Dense bf16 peak FLOP/s by the model name torch reports for a GPU, matched as whole words ("L4"
# is not "L40", "B200" is not "GB200"), more specific names first; no entry (any CPU) means no MFU.
# Source: NVIDIA's datasheets, dense (the sparse figures halved). B200: 2.25 PFLOPS (HGX B200, 36
# sparse over 8 GPUs); GB200: 2.5 PFLOPS per GPU (GB200 NVL72, 360 sparse over 72 GPUs); H800: the
# H100's compute at a lower interconnect bandwidth, so its SXM and PCIe parts take the H100's peaks.
PEAK_BF16_FLOPS = (
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("H800 PCIe", 756e12), ("H800", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
)  # fmt: skip


def peak_for_name(name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU called ``name`` ("NVIDIA A100-SXM4-80GB"), or None."""
    words = re.split(r"[\s_\-]+", name.upper())
    for key, flops in PEAK_BF16_FLOPS:
        want = key.upper().split()
        if any(words[i : i + len(want)] == want for i in range(len(words))):
            return flops
    return None


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
    (the output layer, :func:`launcher.train.loss.output_layer`) counted per labelled token."""
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
