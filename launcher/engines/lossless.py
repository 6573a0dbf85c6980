"""Lossless packing of optimizer state for LoRA/QLoRA checkpoints (strategy=single and ddp).

A LoRA checkpoint holds the fp32 adapter and AdamW's two fp32 moments: 12 bytes per trainable
parameter, which no exact resume can drop. What does compress is the top byte of each float (the
sign and the high exponent bits): a tensor's values span few magnitudes, so that byte takes a few
bits, while the mantissa bytes are noise. ``pack_state`` splits every large floating tensor of an
optimizer state dict into its low bytes (kept as they are) and its top byte (LZMA-compressed);
``unpack_state`` puts the bytes back, bit for bit (NaN payloads and -0.0 included). Measured on the
demo model in docs/BENCHMARKS.md ("LoRA checkpoint size").

The packed form is plain tensors, strings and ints, so ``torch.load(weights_only=True)`` reads it;
a state dict without packed records (a checkpoint from before) passes through ``unpack_state``
unchanged.
"""

from __future__ import annotations

import lzma
import math
from typing import Any, Callable

import torch

PACKED = "ftl-top-byte-lzma/1"
MIN_NUMEL = 256  # smaller tensors (AdamW's step counts) are not worth a record
_FLOATS = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}
_BY_NAME = {name: dtype for dtype, name in _FLOATS.items()}


def pack_tensor(t: torch.Tensor) -> dict[str, Any]:
    """The packed record of one floating tensor (on any device; the bytes are read on the host)."""
    host = t.detach().to("cpu").contiguous()
    size = host.element_size()
    planes = host.reshape(-1).view(torch.uint8).reshape(-1, size)
    top = planes[:, size - 1].contiguous().numpy().tobytes()  # little-endian: the last byte is the top
    packed_top = lzma.compress(top, preset=1)
    compressed = len(packed_top) < len(top)
    return {
        "packed": PACKED,
        "dtype": _FLOATS[host.dtype],
        "shape": list(host.shape),
        "low": planes[:, : size - 1].contiguous(),
        "top": torch.frombuffer(bytearray(packed_top if compressed else top), dtype=torch.uint8),
        "top_compressed": int(compressed),
    }


def unpack_tensor(record: dict[str, Any]) -> torch.Tensor:
    dtype = _BY_NAME[record["dtype"]]
    low = record["low"].to("cpu")
    top_bytes = record["top"].to("cpu").numpy().tobytes()
    if record["top_compressed"]:
        top_bytes = lzma.decompress(top_bytes)
    n = low.shape[0]
    size = low.shape[1] + 1
    if len(top_bytes) != n or math.prod(record["shape"]) != n or size != _BY_NAME[record["dtype"]].itemsize:
        raise ValueError(
            f"packed {record['dtype']} tensor of shape {record['shape']} has {n} rows of {size} bytes "
            f"and a top-byte plane of {len(top_bytes)}"
        )
    planes = torch.empty((n, size), dtype=torch.uint8)
    planes[:, : size - 1] = low
    planes[:, size - 1] = torch.frombuffer(bytearray(top_bytes), dtype=torch.uint8)
    return planes.reshape(-1).view(dtype).reshape(record["shape"]).to(record["low"].device)


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and value.get("packed") == PACKED


def pack_state(state: Any) -> Any:
    """``state`` (nested dicts and lists, as an optimizer's state_dict) with every floating tensor of
    at least MIN_NUMEL values packed; everything else as it is. ``state`` itself is not changed."""
    if isinstance(state, torch.Tensor):
        if state.dtype in _FLOATS and state.numel() >= MIN_NUMEL:
            return pack_tensor(state)
        return state
    return _each_item(state, pack_state)


def unpack_state(state: Any) -> Any:
    """The inverse of :func:`pack_state`; an unpacked state comes back equal to itself."""
    if _is_record(state):
        return unpack_tensor(state)
    return _each_item(state, unpack_state)


def _each_item(state: Any, fn: Callable[[Any], Any]) -> Any:
    """A dict, list or tuple with ``fn`` applied to each of its values; anything else as it is."""
    if isinstance(state, dict):
        return {key: fn(value) for key, value in state.items()}
    if isinstance(state, list):
        return [fn(value) for value in state]
    if isinstance(state, tuple):
        return tuple(fn(value) for value in state)
    return state
