"""Model FLOPs utilisation: the FLOPs a step's tokens needed against what the devices could do."""

from __future__ import annotations

from typing import Optional

import torch

# Dense bf16 peak FLOP/s by the name torch reports for a GPU; no entry (any CPU) means no MFU.
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12))


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def model_flops_utilization(tokens_per_s: float, n_params: int, world_size: int, device: torch.device) -> Optional[float]:
    """MFU with the 6·N FLOPs per trained token estimate (forward + backward, attention ignored),
    against the peak of all ``world_size`` devices; None where the device's peak is unknown."""
    peak = peak_flops(device)
    return None if peak is None else 6.0 * n_params * tokens_per_s / (peak * world_size)
