"""World, batch and device arithmetic of a config: pure, no torch. Validation checks it, `ftl plan`
prints it, the launch backends and the DeepSpeed JSON are built from it."""

from __future__ import annotations

import os

from launcher.config.schema import FtlConfig
from launcher.engines.traits import engine_traits

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


QLORA_UNPROVEN = (
    "bitsandbytes re-wraps each 4-bit weight in every forward and, under FSDP2, shares its storage with the "
    "all-gather buffer: never yet run compiled"
)


def compile_choice(cfg: FtlConfig, device_type: str) -> tuple[bool, str]:
    """``train.compile`` resolved on ``device_type``, and why (what ``ftl plan`` shows). null
    means on CUDA yes, on CPU no, and never where the engine cannot run compiled layers
    (``EngineTraits.compiles_layers``: ZeRO-3) or the model is QLoRA (:data:`QLORA_UNPROVEN`).
    On the project's 2-core CPU a compiled SmolLM2 step was 4.5-26% faster (three benches) but a
    cold first compile took ~60 s, and a whole demo-sized run (84 steps) was 11% slower with it
    (docs/BENCHMARKS.md); on a GPU a run's compile is seconds of hours."""
    setting, qlora = cfg.train.compile, cfg.peft.method == "qlora"
    if setting is not None:
        unproven = f"; unproven with QLoRA: {QLORA_UNPROVEN}" if setting and qlora else ""
        return setting, f"{'on' if setting else 'off'} (train.compile={str(setting).lower()}{unproven})"
    traits = engine_traits(cfg.strategy)
    if device_type != "cuda":
        return False, f"off (train.compile=null: off on {device_type})"
    if not traits.compiles_layers:
        return False, f"off (train.compile=null: {traits.title} frees each layer's gathered weights after forward)"
    if qlora:
        return (
            False,
            f"off (train.compile=null: QLoRA stays eager until a GPU run proves it compiles; {QLORA_UNPROVEN}; train.compile=true tries it)",
        )
    return True, "on (train.compile=null: on CUDA)"
