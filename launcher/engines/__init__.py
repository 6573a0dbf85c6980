"""Engines, siblings chosen by ``cfg.strategy.engine``: the interface is :mod:`launcher.engines.base`,
the facts torch-free code needs are :mod:`launcher.engines.traits`. Importing this package imports no
torch: each engine's module is imported when that engine is asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from launcher.config.schema import FtlConfig
    from launcher.engines.base import Engine
    from launcher.runtime.distributed import DistInfo

ENGINE_NAMES = ("single", "ddp", "deepspeed", "fsdp")


def engine_class(name: str) -> type[Engine]:
    """The Engine class called ``name`` (a checkpoint marker's engine, or ``strategy.engine``)."""
    if name == "single":
        from launcher.engines.single import SingleEngine

        return SingleEngine
    if name == "ddp":
        from launcher.engines.ddp import DDPEngine

        return DDPEngine
    if name == "deepspeed":
        from launcher.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine
    if name == "fsdp":
        from launcher.engines.fsdp import FSDPEngine

        return FSDPEngine
    raise ValueError(f"engine {name!r}: no such engine; available: {', '.join(ENGINE_NAMES)}")


def build_engine(cfg: FtlConfig, model: nn.Module, dist: DistInfo, device: torch.device) -> Engine:
    return engine_class(cfg.strategy.engine)(cfg, model, dist, device)
