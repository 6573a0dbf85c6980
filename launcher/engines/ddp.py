"""strategy=ddp: DistributedDataParallel, a full replica of model and optimizer on every rank.

Gradients are all-reduced in buckets of ``strategy.bucket_cap_mb`` once per optimizer step: every
micro-batch but the last of an accumulation window runs under ``no_sync()``.

Checkpoint format: the same as strategy=single (``model.safetensors`` + ``engine_state.pt``),
written by rank 0 alone (all replicas are identical) and read by every rank. So a ddp checkpoint
resumes on any number of ranks, and under strategy=single too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from launcher.config.schema import FtlConfig
from launcher.distributed import DistInfo, autocast_dtype
from launcher.engines.base import (
    Engine,
    apply_activation_checkpointing,
    build_optimizer,
    build_scheduler,
    check_loaded,
    trainable_parameters,
)
from launcher.engines.single import STATE_FILE, WEIGHTS_FILE, consolidate_checkpoint

__all__ = ["DDPEngine", "consolidate_checkpoint"]


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, cfg: FtlConfig, model: nn.Module, dist: DistInfo, device: torch.device) -> None:
        super().__init__(cfg, model, dist, device)
        if cfg.strategy.activation_checkpointing:
            apply_activation_checkpointing(model)
        model = model.to(device)
        model.train()
        self._module = model
        self._ddp: Optional[DistributedDataParallel] = None
        if torch.distributed.is_initialized():
            self._ddp = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=cfg.strategy.bucket_cap_mb,
            )
        # One rank (WORLD_SIZE=1, no process group): nothing to reduce, the module trains as is.
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None
        fp16 = autocast_dtype(cfg.train.precision, device) == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    @property
    def model(self) -> nn.Module:
        return self._ddp if self._ddp is not None else self._module

    def setup(self, total_steps: int) -> None:
        self.optimizer = build_optimizer(self._module, self.cfg.train)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, total_steps)

    def grad_sync(self, sync: bool) -> ContextManager[object]:
        if self._ddp is None or sync:
            return super().grad_sync(sync)
        return self._ddp.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> float:
        optimizer, scheduler = self._require_setup()
        self.scaler.unscale_(optimizer)
        # After the all-reduce every rank holds the same full gradients: the local norm is global.
        params = list(trainable_parameters(self._module))
        clip = self.cfg.train.grad_clip
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        self.scaler.step(optimizer)
        self.scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(norm)
        return value if math.isfinite(value) else float("nan")

    @property
    def lr(self) -> float:
        optimizer, _ = self._require_setup()
        return float(optimizer.param_groups[0]["lr"])

    def save(self, ckpt_dir: Path) -> None:
        optimizer, scheduler = self._require_setup()
        self.save_adapter(ckpt_dir)
        if not self.dist.is_main:
            return  # replicas are identical: one copy is the checkpoint
        save_model(self._module, str(ckpt_dir / WEIGHTS_FILE))
        state: dict[str, Any] = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        torch.save(state, ckpt_dir / STATE_FILE)

    def load(self, ckpt_dir: Path) -> None:
        optimizer, scheduler = self._require_setup()
        weights = ckpt_dir / WEIGHTS_FILE
        if not weights.is_file():
            raise RuntimeError(
                f"checkpoint {ckpt_dir} has no {WEIGHTS_FILE}: it was not written by strategy=single or ddp "
                "(an fsdp or deepspeed checkpoint resumes only under its own strategy; `ftl export` converts any of them)"
            )
        missing, unexpected = load_model(self._module, weights, strict=False, device=str(self.device))
        check_loaded(ckpt_dir, missing, unexpected)
        state = torch.load(ckpt_dir / STATE_FILE, map_location=self.device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self._module.state_dict().items()}

    def _require_setup(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        if self.optimizer is None or self.scheduler is None:
            raise RuntimeError("Engine.setup(total_steps) must be called first")
        return self.optimizer, self.scheduler
