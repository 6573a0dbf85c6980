"""Engines chosen by ``cfg.strategy.engine``. See :mod:`launcher.engines.base` for the interface."""

from __future__ import annotations

import torch
from torch import nn

from launcher.config.schema import FtlConfig
from launcher.train.distributed import DistInfo
from launcher.engines.base import Engine, ModelLoading
from launcher.engines.ddp import DDPEngine
from launcher.engines.deepspeed import DeepSpeedEngine
from launcher.engines.fsdp import FSDPEngine
from launcher.engines.single import SingleEngine

ENGINES: dict[str, type[Engine]] = {"single": SingleEngine, "ddp": DDPEngine, "deepspeed": DeepSpeedEngine, "fsdp": FSDPEngine}


def engine_class(cfg: FtlConfig) -> type[Engine]:
    name = cfg.strategy.engine
    engine_cls = ENGINES.get(name)
    if engine_cls is None:
        raise ValueError(f"strategy.engine={name!r} has no engine in this build; available: {', '.join(sorted(ENGINES))}")
    return engine_cls


def build_engine(cfg: FtlConfig, model: nn.Module, dist: DistInfo, device: torch.device) -> Engine:
    return engine_class(cfg)(cfg, model, dist, device)


__all__ = ["ENGINES", "DDPEngine", "DeepSpeedEngine", "Engine", "FSDPEngine", "ModelLoading", "SingleEngine", "build_engine", "engine_class"]
