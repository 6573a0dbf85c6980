"""The engine seam: one small interface over model + optimizer + schedule + checkpoint format.

Siblings (single, ddp, deepspeed, fsdp) implement :class:`Engine`; the trainer only ever talks to
this interface, so it never imports deepspeed or torch.distributed.fsdp. What they share (AdamW,
the LR schedule, activation checkpointing) is in :mod:`launcher.engines.common`; facts about them
that torch-free code needs, in :mod:`launcher.engines.traits`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, ContextManager, Optional

import torch
from torch import nn

from launcher.config.schema import FtlConfig
from launcher.runtime.device import autocast_dtype
from launcher.runtime.distributed import DistInfo


@dataclass(frozen=True)
class ModelLoading:
    """How a rank builds its model before the engine takes it. ``empty``: the architecture on the
    meta device, no weights read; the engine fills this rank's shards (FSDP: from rank 0).
    ``context``: entered around loading (DeepSpeed ZeRO-3: partition each tensor as it is made)."""

    empty: bool = False
    context: Callable[[], ContextManager[object]] = contextlib.nullcontext


class Engine(ABC):
    """Wraps one rank's model and its optimizer.

    Call order: ``Engine(cfg, model, dist, device)`` → optionally ``load_weights(read)`` (another
    engine's checkpoint) → ``setup(total_steps)`` → a resume: ``load(ckpt_dir)`` (its own
    checkpoint; not after ``load_weights``) then ``start_at(step)`` → per optimizer step, for each micro-batch
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

    def save_staged(self, ckpt_dir: Path) -> Callable[[], None]:
        """``save`` in two halves, for ``checkpoint.async_save``: now, the collectives and a copy of
        this rank's state in host memory (training may change the originals once this returns);
        returned, the write of that copy, which a background thread runs. The write does no
        collective on the training process group, and once it returns on rank 0 every rank's files
        are written. Only engines whose :class:`~launcher.engines.traits.EngineTraits` say
        ``async_checkpoint`` are asked."""
        raise NotImplementedError(f"strategy {self.name} saves checkpoints synchronously")

    @abstractmethod
    def load(self, ckpt_dir: Path) -> None:
        """Restore what ``save`` wrote; called after ``setup``."""

    @abstractmethod
    def start_at(self, step: int) -> None:
        """After ``setup`` (and ``load``), in a resumed run: put the LR schedule at ``step`` as this
        run's config has it (lr, warmup, run length, kind, floor), whatever a loaded checkpoint's
        schedule state and param groups held. After another engine's weights (:meth:`load_weights`)
        the optimizer state starts fresh."""

    def load_weights(self, read: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Before ``setup``: give the model full (unsharded) weights by name, read from another
        engine's checkpoint (a resume across engines). ``read()`` returns them on CPU, keyed as the
        unwrapped model's parameters; a subset (LoRA: the adapter) is fine, a name the model lacks
        is an error. Collective. This default serves engines whose every rank holds the whole
        module (single, ddp; deepspeed before ZeRO-3 partitions anything)."""
        from launcher.engines.common import check_loaded

        module = unwrap(self.model)
        result = module.load_state_dict(read(), strict=False)
        check_loaded(Path("(another engine's checkpoint)"), [], result.unexpected_keys)

    @abstractmethod
    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded weights on CPU for export (complete on rank 0; collective)."""

    @staticmethod
    @abstractmethod
    def consolidate_checkpoint(ckpt_dir: Path) -> dict[str, torch.Tensor]:
        """The full weights of a checkpoint this engine wrote, on CPU, offline: no process group,
        any machine (`ftl export`, `ftl eval`, `ftl generate` read checkpoints through this)."""

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


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DDP's (or DeepSpeed's) ``.module`` wrappers; a PEFT model stays itself."""
    while not hasattr(module, "peft_config") and isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    return module


class TorchEngine(Engine):
    """An engine whose optimizer and schedule are plain torch objects it builds itself (single, ddp,
    fsdp; DeepSpeed builds its own inside ``deepspeed.initialize``). Subclasses set ``self._model``."""

    _model: nn.Module

    def __init__(self, cfg: FtlConfig, model: nn.Module, dist: DistInfo, device: torch.device) -> None:
        super().__init__(cfg, model, dist, device)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None

    @property
    def model(self) -> nn.Module:
        return self._model

    def setup(self, total_steps: int) -> None:
        from launcher.engines.common import build_optimizer, build_scheduler

        # Built on the parameters the engine trains: under FSDP2 each rank's AdamW states are its shards only.
        self.optimizer = build_optimizer(self._model, self.cfg.train)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, total_steps)

    @property
    def lr(self) -> float:
        return float(self._require_setup()[0].param_groups[0]["lr"])

    def start_at(self, step: int) -> None:
        from launcher.engines.common import seek_schedule

        seek_schedule(self._require_setup()[1], step, self.cfg.train.lr)

    def _require_setup(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        if self.optimizer is None or self.scheduler is None:
            raise RuntimeError("Engine.setup(total_steps) must be called first")
        return self.optimizer, self.scheduler
