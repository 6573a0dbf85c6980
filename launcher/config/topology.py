"""World, batch and device arithmetic of a config: pure, no torch. Validation checks it, `ftl plan`
prints it, the launch backends and the DeepSpeed JSON are built from it."""

from __future__ import annotations

import os

from launcher.config.schema import FtlConfig

PRECISIONS = ("fp32", "bf16", "fp16")


def nodes(cfg: FtlConfig) -> int:
    launch = cfg.launch
    return getattr(launch, "nnodes", None) or getattr(launch, "nodes", None) or 1


def gpus_per_node(cfg: FtlConfig) -> int:
    """GPUs a SLURM job asks for on each node: launch.gpus_per_node, else one per rank
    (launch.nproc_per_node) unless train.device=cpu. Decided by the launch group, never by the
    submitting machine: a login node without a GPU plans the same job as a GPU node. 0 for the
    other backends, which run where the GPUs already are."""
    launch = cfg.launch
    if launch.backend != "slurm":
        return 0
    if launch.gpus_per_node is not None:
        return launch.gpus_per_node
    return 0 if cfg.train.device == "cpu" else launch.nproc_per_node


def procs_per_node(cfg: FtlConfig) -> int:
    """Ranks per node: one per GPU a SLURM job asks for, else launch.nproc_per_node."""
    return gpus_per_node(cfg) or cfg.launch.nproc_per_node


def world_size(cfg: FtlConfig) -> int:
    return nodes(cfg) * procs_per_node(cfg)


def global_batch(cfg: FtlConfig) -> int:
    """Sequences per optimizer step: micro batch × grad accum × data-parallel size."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum * world_size(cfg)


def planned_device_type(cfg: FtlConfig) -> str:
    """The device type a run will train on, guessed without torch: train.device when set, else
    under SLURM cuda when the job asks for GPUs (:func:`gpus_per_node`), elsewhere cuda when this
    machine has an NVIDIA driver, else cpu."""
    if cfg.train.device != "auto":
        return cfg.train.device
    if cfg.launch.backend == "slurm":
        return "cuda" if gpus_per_node(cfg) > 0 else "cpu"
    return "cuda" if os.path.exists("/proc/driver/nvidia/version") else "cpu"


def resolve_precision(precision: str, device_type: str) -> str:
    """fp32, bf16 or fp16 for train.precision on a device type (what the planner shows; the engine
    passes the precision it resolved on the real device instead)."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: expected auto, fp32, bf16 or fp16")
    return precision
