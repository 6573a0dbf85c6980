"""No NaN trained on, saved or exported: the checks the trainer and `ftl export` make.

The loop checks once per optimizer step, on values it has already reduced over the ranks (the
loss mean, the global gradient norm): no extra host sync, and every rank sees the same numbers,
so all stop at the same step and none is left waiting in a collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional

import torch

from launcher.rundir.resume import ResumeError, list_complete
from launcher.runtime.distributed import any_rank


class TrainingStopped(RuntimeError):
    """The run stopped itself at a step, on figures every rank shares, so every rank raises it at
    the same step and none is left in a collective (exit 1: not a success)."""


class NonFiniteError(TrainingStopped):
    """Training produced a NaN or infinite loss or gradient norm (exit 1; nothing saved of it)."""


def check_step(
    step: int,
    metrics: dict[str, float],
    *,
    loss_scaled: bool,
    run_dir: Path,
    settle: Callable[[], None] = lambda: None,
) -> None:
    """Raise NonFiniteError when step ``step``'s loss, or its gradient norm, is not finite.
    ``loss_scaled``: fp16's loss scaler, which skips a step whose gradients overflowed and lowers
    its scale; a non-finite gradient norm is then its business, a non-finite loss still is not.
    ``settle``: collective (the values are the same on every rank), before the message names the
    resume point: the checkpoint being written in the background is published first."""
    bad = [
        name
        for name in ("loss", "grad_norm")
        if not math.isfinite(metrics[name]) and not (name == "grad_norm" and loss_scaled)
    ]
    if bad:
        values = ", ".join(f"{name} {metrics[name]}" for name in bad)
        settle()
        saved = list_complete(run_dir)
        resume = (
            f"the last good checkpoint, {saved[-1][1]}, stays the resume point"
            if saved
            else "no checkpoint was written before it"
        )
        raise NonFiniteError(
            f"training diverged at step {step} ({values}); stopped without saving that state; {resume}. "
            "Lower train.lr or raise train.warmup_steps, or check the objective's settings (objective.beta) and the data"
        )


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> Optional[str]:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def local_values(module: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """``module``'s parameters as this rank holds them: its ZeRO-3 partition, its FSDP2 shard, or the whole tensor."""
    for name, p in module.named_parameters():
        if hasattr(p, "ds_tensor"):
            yield name, p.ds_tensor
        elif hasattr(p, "to_local"):
            yield name, p.to_local()
        else:
            yield name, p.detach()


def refuse_nonfinite_weights(module: torch.nn.Module, path: Path) -> None:
    """Collective. Raise ResumeError (exit 2) when the weights just loaded from checkpoint ``path`` hold a NaN or an infinity."""
    name = first_nonfinite(local_values(module))
    if any_rank(name is not None):
        raise ResumeError(
            f"checkpoint {path} holds non-finite weights ({name or 'found on another rank'}): training "
            "cannot continue from it; resume from an earlier one (checkpoint.resume=RUN_DIR/checkpoints/step-N)"
        )
