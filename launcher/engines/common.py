"""Building blocks more than one engine uses: the AdamW and LR schedule every engine trains with
(so all of them train the same numbers), activation checkpointing, and the check that a
checkpoint's weights matched the model."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from launcher.config.schema import TrainConfig
from launcher.runtime.schedule import lr_factor


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Decay matrices only: biases and norm weights (every parameter with fewer than 2 dims) are
    not decayed, as in GPT-2/LLaMA training."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    if len(train.betas) != 2:
        raise ValueError(f"train.betas={train.betas!r}: expected two numbers")
    beta1, beta2 = (float(b) for b in train.betas)
    groups = build_param_groups(model, train.weight_decay)
    return torch.optim.AdamW(groups, lr=train.lr, betas=(beta1, beta2), fused=fused_adamw_ok(groups))


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_adamw_ok(groups: list[dict[str, object]]) -> bool:
    """torch's fused AdamW (one kernel over all tensors; on CPU 6x faster than the default
    for-each update, measured on SmolLM2-sized tensors) takes float CPU/CUDA parameters only."""
    params = [p for g in groups for p in g["params"]]  # type: ignore[attr-defined]
    return all(p.device.type in ("cpu", "cuda") and p.dtype in FUSED_DTYPES for p in params)


def finish_step(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, grad_norm: torch.Tensor
) -> float:
    """After the optimizer stepped: advance the schedule, drop the gradients, and return the
    pre-clip gradient norm as a float (nan when it was not finite)."""
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    value = float(grad_norm)
    return value if math.isfinite(value) else float("nan")


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    # A closure, not a partial: LambdaLR saves no state for plain functions, so a checkpoint
    # restores only `last_epoch` and the schedule itself always comes from the current config.
    def factor(step: int) -> float:
        return lr_factor(step, train, total_steps)

    # The optimizer's other hyperparameters as this config built them: a checkpoint's param groups
    # bring back the values they were saved under, and seek_schedule puts these back. Kept on the
    # closure for the same reason: LambdaLR's state_dict leaves a plain function's attributes alone.
    factor.configured = [{k: g[k] for k in CONFIGURED_KEYS if k in g} for g in optimizer.param_groups]  # type: ignore[attr-defined]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


CONFIGURED_KEYS = ("weight_decay", "betas", "eps")


def seek_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int, peak_lr: float) -> None:
    """The schedule (and its optimizer's learning rates) as this run's config has it after ``step``
    optimizer steps, without stepping anything: a run resumed from weights alone continues its
    schedule, not restarts it, and a run resumed from its own checkpoint follows its current config,
    not the state it restored (the scheduler's ``base_lrs`` and each param group's ``lr`` and
    ``initial_lr`` are the lr the checkpoint was saved under). ``peak_lr``: train.lr, every group's.
    The groups' weight decay and betas go back to the config's too (``build_scheduler`` kept them).
    With nothing changed, these are the very values the checkpoint held."""
    scheduler.last_epoch = step
    scheduler.base_lrs = [peak_lr] * len(scheduler.optimizer.param_groups)
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    configured = getattr(scheduler.lr_lambdas[0], "configured", None) or [{}] * len(lrs)
    for group, lr, values in zip(scheduler.optimizer.param_groups, lrs, configured):
        group["initial_lr"], group["lr"] = peak_lr, lr
        group.update(values)
    scheduler._last_lr = lrs  # what get_last_lr() reports


def apply_activation_checkpointing(model: nn.Module) -> None:
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        name = type(model).__name__
        raise ValueError(f"strategy.activation_checkpointing=true but {name} has no gradient_checkpointing_enable")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False  # the KV cache is useless in training and conflicts with recomputation


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)


# bitsandbytes writes a 4-bit weight's quantization state beside it (weight.absmax, weight.quant_map,
# weight.nested_*, weight.quant_state.bitsandbytes__nf4); loading recomputes it from the same base.
_QUANT_STATE_KEY = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.")


def check_loaded(ckpt_dir: Path, missing: Iterable[str], unexpected: Iterable[str]) -> None:
    """Raise when a checkpoint's weights did not match the model (quantization state aside)."""
    unexpected = sorted(k for k in unexpected if not any(part in k for part in _QUANT_STATE_KEY))
    missing = sorted(missing)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {ckpt_dir} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
