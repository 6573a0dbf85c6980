"""strategy=single: one process, one device, plain PyTorch. strategy=ddp (launcher/engines/ddp.py)
is this engine with a DistributedDataParallel wrapper around the same module.

Checkpoint format (a directory): ``model.safetensors`` (all weights; safetensors' save_model
handles tied embeddings; a LoRA/QLoRA run has none: its weights are the adapter in ``adapter/``,
which every PEFT checkpoint holds, and the base is named in the trainer state, not copied) and
``engine_state.pt`` (optimizer, LR schedule and, for fp16, the grad scaler), loaded with
``weights_only=True``; a PEFT run's optimizer moments are packed losslessly there
(launcher/engines/lossless.py). Written by rank 0 alone (ddp replicas are identical), read by every rank:
a single or ddp checkpoint resumes on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import _remove_duplicate_names, load_file, load_model, save_file
from torch import nn

from launcher.config.schema import FtlConfig
from launcher.engines.base import TorchEngine
from launcher.engines.common import apply_activation_checkpointing, check_loaded, finish_step, trainable_parameters
from launcher.engines.lossless import pack_state, unpack_state
from launcher.runtime.device import autocast_dtype
from launcher.runtime.distributed import DistInfo

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "engine_state.pt"


class SingleEngine(TorchEngine):
    name = "single"

    def __init__(self, cfg: FtlConfig, model: nn.Module, dist: DistInfo, device: torch.device) -> None:
        super().__init__(cfg, model, dist, device)
        self.check_world_size(dist)
        if cfg.strategy.activation_checkpointing:
            apply_activation_checkpointing(model)
        self._model = model.to(device)
        self._model.train()
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
        fp16 = autocast_dtype(cfg.train.precision, device) == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self._stager: Any = None  # checkpoint.async_save: host buffers kept between saves

    def check_world_size(self, dist: DistInfo) -> None:
        if dist.world_size != 1:
            raise ValueError(
                f"strategy=single runs one process, but WORLD_SIZE={dist.world_size}: use strategy=ddp, fsdp or zero*"
            )

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> float:
        optimizer, scheduler = self._require_setup()
        self.scaler.unscale_(optimizer)
        params = list(trainable_parameters(self._model))
        clip = self.cfg.train.grad_clip
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        self.scaler.step(optimizer)
        self.scaler.update()
        return finish_step(optimizer, scheduler, norm)

    def save(self, ckpt_dir: Path) -> None:
        self._write(ckpt_dir, staged=False)()

    def save_staged(self, ckpt_dir: Path) -> Callable[[], None]:
        return self._write(ckpt_dir, staged=True)

    def _write(self, ckpt_dir: Path, *, staged: bool) -> Callable[[], None]:
        """The write of this rank's files; ``staged``: of a host copy taken now (pinned on CUDA)."""
        optimizer, scheduler = self._require_setup()
        self.save_adapter(ckpt_dir)
        if not self.dist.is_main:
            return lambda: None  # ddp replicas are identical: one copy is the checkpoint
        weights: dict[str, torch.Tensor] = {}
        metadata: dict[str, str] = {}
        if self.peft_model is None:  # a PEFT run's weights are adapter/, written above
            weights = self._model.state_dict()
            dropped = _remove_duplicate_names(weights)  # tied weights: safetensors stores one name (as save_model)
            metadata = {name: kept for kept, names in dropped.items() for name in names}
            weights = {k: v.contiguous() for k, v in weights.items() if k not in metadata}
        state: dict[str, Any] = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if staged:
            weights, state = self._stage_on_host(weights, state)

        def write() -> None:
            if self.peft_model is None:
                save_file(weights, str(ckpt_dir / WEIGHTS_FILE), metadata={"format": "pt", **metadata})
                torch.save(state, ckpt_dir / STATE_FILE)
            else:  # the moments are most of a LoRA checkpoint: packed (a few seconds for a 7B's adapters)
                torch.save({**state, "optimizer": pack_state(state["optimizer"])}, ckpt_dir / STATE_FILE)

        return write

    def _stage_on_host(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> tuple[Any, Any]:
        """Copies in host memory (pinned on CUDA) that training cannot change: DCP's stager, whose
        buffers are kept from one save to the next (allocating them is most of a first copy's time)."""
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self._stager is None:
            self._stager = DefaultStager(StagingOptions(torch.cuda.is_available(), False, False, False))
        staged = self._stager.stage({"weights": weights, "state": state})
        return staged["weights"], staged["state"]

    def load(self, ckpt_dir: Path) -> None:
        optimizer, scheduler = self._require_setup()
        weights = ckpt_dir / WEIGHTS_FILE
        if self.peft_model is not None:
            from launcher.model.adapters import ADAPTER_DIR, adapter_parameters

            result = self._model.load_state_dict(adapter_parameters(ckpt_dir / ADAPTER_DIR), strict=False)
            missing = [
                k for k, p in self._model.named_parameters() if p.requires_grad and k in set(result.missing_keys)
            ]
            check_loaded(ckpt_dir, missing, result.unexpected_keys)
        elif not weights.is_file():
            raise RuntimeError(
                f"checkpoint {ckpt_dir} has no {WEIGHTS_FILE}: it was not written by strategy=single or ddp "
                "(an fsdp or deepspeed checkpoint resumes only under its own strategy; `ftl export` converts any of them)"
            )
        else:
            missing, unexpected = load_model(self._model, weights, strict=False, device=str(self.device))
            check_loaded(ckpt_dir, missing, unexpected)
        state = torch.load(ckpt_dir / STATE_FILE, map_location=self.device, weights_only=True)
        optimizer.load_state_dict(unpack_state(state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self._model.state_dict().items()}

    @staticmethod
    def consolidate_checkpoint(ckpt_dir: Path) -> dict[str, torch.Tensor]:
        """The full weights of a checkpoint this engine (or ddp) wrote, on CPU, with no process group.
        Tied weights appear once, under the name safetensors kept. A PEFT run's: its adapter, keyed
        as the PeftModel's parameters."""
        from launcher.model.adapters import ADAPTER_CONFIG, ADAPTER_DIR, adapter_parameters

        weights = Path(ckpt_dir) / WEIGHTS_FILE
        if not weights.is_file() and (Path(ckpt_dir) / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
            return adapter_parameters(Path(ckpt_dir) / ADAPTER_DIR)
        if not weights.is_file():
            raise FileNotFoundError(f"{ckpt_dir} has no {WEIGHTS_FILE}")
        return load_file(weights, device="cpu")
