"""strategy=ddp: DistributedDataParallel, a full replica of model and optimizer on every rank.

Everything but the wrapper is strategy=single's (optimizer, clipping, checkpoint format): after the
all-reduce every rank holds the same full gradients, so the local norm is the global one. Gradients
are all-reduced in buckets of ``strategy.bucket_cap_mb`` once per optimizer step: every micro-batch
but the last of an accumulation window runs under ``no_sync()``.
"""

from __future__ import annotations

from typing import ContextManager, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from launcher.config.schema import FtlConfig
from launcher.engines.single import SingleEngine
from launcher.runtime.distributed import DistInfo


class DDPEngine(SingleEngine):
    name = "ddp"

    def __init__(self, cfg: FtlConfig, model: nn.Module, dist: DistInfo, device: torch.device) -> None:
        super().__init__(cfg, model, dist, device)
        # One rank (WORLD_SIZE=1, no process group): nothing to reduce, the module trains as is.
        self._ddp: Optional[DistributedDataParallel] = None
        if torch.distributed.is_initialized():
            self._ddp = DistributedDataParallel(
                self._model,
                device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=cfg.strategy.bucket_cap_mb,
            )

    def check_world_size(self, dist: DistInfo) -> None:
        pass  # any number of replicas

    @property
    def model(self) -> nn.Module:
        return self._ddp if self._ddp is not None else self._model

    def grad_sync(self, sync: bool) -> ContextManager[object]:
        if self._ddp is None or sync:
            return super().grad_sync(sync)
        return self._ddp.no_sync()
