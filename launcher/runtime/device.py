"""Which device a rank trains on and in which precision: cuda when present (each rank the GPU of its
LOCAL_RANK), else cpu; bf16 autocast where the hardware has it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from torch.utils.hooks import RemovableHandle

from launcher.config.schema import TrainConfig
from launcher.runtime.distributed import read_dist_env


def select_device(train: TrainConfig, environ: Mapping[str, str] = os.environ) -> torch.device:
    """auto: cuda when present, else cpu. On cuda each rank takes the GPU of its LOCAL_RANK."""
    want = train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch sees no CUDA device (use train.device=auto or cpu)")
    local_rank = read_dist_env(environ).local_rank
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", local_rank)


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags in /proc/cpuinfo; aarch64 lists "bf16"


def cpu_has_native_bf16(cpuinfo: Optional[str] = None) -> bool:
    """Whether this CPU multiplies bf16 natively: AVX512-BF16 or AMX on x86, the BF16 extension on
    aarch64. Not oneDNN's ``_is_mkldnn_bf16_supported``: it also says yes on AVX512 CPUs without
    AVX512-BF16, where bf16 is emulated (an Ice Lake Xeon: SmolLM2's demo step 13.2 s in bf16
    autocast against 3.4 s in fp32, docs/BENCHMARKS.md). ``cpuinfo``: /proc/cpuinfo's text (tests)."""
    if cpuinfo is None:
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if all(probe is not None for probe in probes):
            return any(probe() for probe in probes)  # type: ignore[misc]
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return any(flag in flags for flag in (*CPU_BF16_FLAGS, "bf16"))


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype to autocast the forward pass to; None means plain fp32.

    auto picks bf16 where the hardware has it: GPUs with bf16, and CPUs with native bf16 dot products
    (AVX512-BF16 / AMX; measured 1.6x faster than fp32 for SmolLM2 on such a CPU). On other CPUs bf16
    is emulated and slower (3.9x on an AVX512 CPU without AVX512-BF16), so auto stays fp32; fp16 needs loss scaling that auto should not spring
    on anyone.
    """
    cuda = device.type == "cuda"
    if precision == "fp32":
        return None
    if precision == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if precision == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise RuntimeError("train.precision=bf16 but this GPU has no bf16 (use fp16 or fp32)")
        return torch.bfloat16
    if precision == "fp16":
        if not cuda:
            raise RuntimeError("train.precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
        return torch.float16
    raise ValueError(f"train.precision={precision!r}: expected auto, fp32, bf16 or fp16")


def bf16_residual_stream(model: torch.nn.Module) -> RemovableHandle:
    """Under bf16 autocast, keep the residual stream (the hidden states each decoder layer adds
    to) in bf16 by casting the input embeddings' output; outside autocast nothing changes.

    Over fp32 weights (single and ddp, FSDP on one rank) autocast runs each matmul in bf16 but
    leaves the stream in fp32: the embedding's output is fp32 and every residual sum keeps it so.
    FSDP's mixed precision and DeepSpeed's bf16 cast the weights, so their stream is bf16, as is
    Megatron's by default (``fp32_residual_connection`` off), and LoRA's base is loaded in bf16;
    this gives single and ddp the same. Measured on CPU (SmolLM2-135M, 4 packs of 512, one model
    taking turns): 9% less time per step in eager mode, none with compiled layers (inductor fuses
    the fp32 stream's casts anyway); the stream's tensors take half the memory (the planner
    charges it so). ``train.fp32_residual=true`` keeps fp32 (HF Trainer's numbers); fp16 never
    casts it (its range is too small for a residual stream)."""

    def cast(module: torch.nn.Module, args: object, output: torch.Tensor) -> Optional[torch.Tensor]:
        device = output.device.type
        if (
            output.dtype == torch.float32
            and torch.is_autocast_enabled(device)
            and torch.get_autocast_dtype(device) == torch.bfloat16
        ):
            return output.to(torch.bfloat16)
        return None

    return model.get_input_embeddings().register_forward_hook(cast)


def set_residual_stream(model: torch.nn.Module, train: TrainConfig, compute: Optional[torch.dtype]) -> None:
    """The stream as ``train`` asks for it: :func:`bf16_residual_stream` when autocasting to bf16
    (``compute``) unless ``train.fp32_residual``. The trainer and ``ftl eval`` both call this, so an
    eval computes what the run's own evals did."""
    if compute == torch.bfloat16 and not train.fp32_residual:
        bf16_residual_stream(model)
