"""The engine seam: one small interface over model + optimizer + schedule + checkpoint format.

Siblings (single, ddp, deepspeed, fsdp) implement :class:`Engine`; the trainer only ever talks to
this interface, so it never imports deepspeed or torch.distributed.fsdp. The helpers below
(optimizer, schedule) are shared so every engine trains with the same numbers.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, ContextManager, Optional

import torch
from torch import nn

from launcher.config.schema import FtlConfig, TrainConfig
from launcher.train.distributed import DistInfo, autocast_dtype
from launcher.train.schedule import lr_factor


@dataclass(frozen=True)
class ModelLoading:
    """How a rank builds its model before the engine takes it. ``empty``: the architecture on the
    meta device, no weights read; the engine fills this rank's shards (FSDP: from rank 0).
    ``context``: entered around loading (DeepSpeed ZeRO-3: partition each tensor as it is made)."""

    empty: bool = False
    context: Callable[[], ContextManager[object]] = contextlib.nullcontext


class Engine(ABC):
    """Wraps one rank's model and its optimizer.

    Call order: ``Engine(cfg, model, dist, device)`` → ``setup(total_steps)`` → optionally
    ``load(ckpt_dir)`` → per optimizer step, for each micro-batch
    ``with grad_sync(last): with autocast(): loss = f(model); backward(loss)`` then ``step()``.
    ``save``/``load``/``consolidated_state_dict`` are collective: call them on every rank.
    """

    name: ClassVar[str]

    @classmethod
    def model_loading(cls, cfg: FtlConfig, dist: DistInfo, device: torch.device) -> ModelLoading:
        """Default: every rank loads the whole model (and the engine shards it, if it does)."""
        return ModelLoading()

    def __init__(self, cfg: FtlConfig, model: nn.Module, dist: DistInfo, device: torch.device) -> None:
        from launcher.model.adapters import is_peft_model

        self.cfg = cfg
        self.dist = dist
        self.device = device
        self.peft_model: Optional[nn.Module] = model if is_peft_model(model) else None  # LoRA/QLoRA runs

    @property
    @abstractmethod
    def model(self) -> nn.Module:
        """The module to call forward on (possibly a wrapper: DDP, a DeepSpeed engine, an FSDP root)."""

    @abstractmethod
    def setup(self, total_steps: int) -> None:
        """Build the optimizer and the LR schedule for a run of ``total_steps`` optimizer steps."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> float:
        """Clip (train.grad_clip > 0), step the optimizer and the schedule, zero the grads.
        Returns the gradient norm before clipping."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """The learning rate the next ``step()`` will use."""

    @abstractmethod
    def save(self, ckpt_dir: Path) -> None:
        """Write this engine's checkpoint files (weights, optimizer, schedule) into ``ckpt_dir``,
        which exists. Called on every rank; each rank writes only what it owns."""

    @abstractmethod
    def load(self, ckpt_dir: Path) -> None:
        """Restore what ``save`` wrote; called after ``setup``."""

    @abstractmethod
    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded weights on CPU for export (complete on rank 0; collective)."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Full values of the trainable parameters (LoRA adapters in a PEFT run), on CPU, keyed as
        the unwrapped model's parameters; collective. Engines that shard parameters gather them."""
        module = self.model
        while not hasattr(module, "peft_config") and hasattr(module, "module"):  # DDP
            module = module.module
        return {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters() if p.requires_grad}

    def save_adapter(self, ckpt_dir: Path) -> None:
        """PEFT runs: ``ckpt_dir/adapter`` in PEFT's save_pretrained format, from the gathered
        trainable parameters (never a rank's shards). Collective; rank 0 writes. Each engine's
        ``save`` calls this, so every checkpoint of a PEFT run carries a loadable adapter."""
        if self.peft_model is None:
            return
        from launcher.model.adapters import ADAPTER_DIR, write_adapter

        tensors = self.trainable_state_dict()
        if self.dist.is_main:
            write_adapter(self.peft_model, tensors, ckpt_dir / ADAPTER_DIR)

    def autocast(self) -> ContextManager[object]:
        """Context for the forward pass. Engines that cast the model themselves return a no-op."""
        dtype = autocast_dtype(self.cfg.train.precision, self.device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_sync(self, sync: bool) -> ContextManager[object]:
        """Context around forward + backward of one micro-batch. ``sync`` is False for all but the
        last micro-batch of an accumulation window, so engines that reduce gradients across ranks
        (ddp no_sync, fsdp, deepspeed boundaries) reduce once per optimizer step."""
        return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# shared building blocks


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


def finish_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, grad_norm: torch.Tensor) -> float:
    """After the optimizer stepped: advance the schedule, drop the gradients, and return the
    pre-clip gradient norm as a float (nan when it was not finite)."""
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    value = float(grad_norm)
    return value if math.isfinite(value) else float("nan")


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    # A closure, not a partial: LambdaLR saves no state for plain functions, so a checkpoint
    # restores only `last_epoch` and the schedule itself always comes from the current config.
    def factor(step: int) -> float:
        return lr_factor(step, train, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
        raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
