"""``sdpa_varlen``: scaled-dot-product attention that attends within each packed example only.

transformers' own ``sdpa`` handles a packed row (``position_ids`` restarting at 0 for each
example, no ``attention_mask``) by building a block-diagonal [batch, L, L] mask and running one
masked attention over the whole row: every example pays for attention over the full ``seq_len``,
and on CPU a masked call cannot use the causal fast path. ``sdpa_varlen`` splits each row at its
position restarts instead and runs one unmasked causal attention per example, the way
flash-attention's varlen kernel does on GPU. The result is the same attention (tested against
``sdpa`` to bf16/fp32 rounding); the work falls from L² to Σ lengthᵢ² per row.

Everything that is not a packed training forward goes to transformers' ``sdpa`` unchanged:
padded batches (a 2-D ``attention_mask`` with zeros), decoding with a KV cache (query shorter than
keys), rows without restarts. On CPU, examples shorter than :data:`MATH_BELOW` tokens skip SDPA's
flash kernel, slower there for short rows (measured on the project's 2-core machine: 85-token
examples, SmolLM2 head shapes, forward + backward, 32 ms against 20 ms for SDPA's math kernel per
2,048 tokens per layer), and SDPA altogether: :func:`short_causal` computes what the math kernel
does (fp32 scores, softmax, weighted values) in three ops per example instead of about a dozen,
on fp32 copies of the batch made once (1.5× faster per layer than the math kernel one by one,
~4% of a compiled SmolLM2 step's CPU time; docs/BENCHMARKS.md).
On an Ampere, Ada, Hopper or Blackwell GPU (bf16/fp16, no dropout; :func:`varlen_capable`) a packed batch is one call of PyTorch's own
flash-attention varlen kernel (``torch.nn.attention.varlen``, PyTorch 2.11+) instead of a Python
loop over examples; elsewhere the loop runs. Under autocast over fp32 weights (the single, ddp and
LoRA paths) RoPE hands over fp32 queries and keys; they are cast to the autocast dtype first, as
SDPA itself would cast them, so those runs take the one-call path too. :data:`CALLS` counts which
path each packed attention call took (the trainer logs the share of one-call ones on CUDA).

A packed batch's examples are found once per forward (:func:`packed_segments`): every layer, and
activation checkpointing's recompute of it, gets the same ``position_ids`` tensor, so one
look at the position restarts serves them all; the trainer notes the collator's host copy of the
tensor (:func:`note_host_copy`), so that look costs no device→host copy either.

:func:`register` makes the name known to transformers; :func:`launcher.model.loading.load_model_and_tokenizer`
calls it before loading. A model saved from a run carries ``sdpa`` in its config as usual, since
the attention implementation is not serialised.
"""

from __future__ import annotations

import inspect
import weakref
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # flash attention over concatenated sequences (CUDA only)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older PyTorch: the per-example loop everywhere
    varlen_attn = None
_VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()
if not {"window_size", "scale"} <= _VARLEN_PARAMS:  # PyTorch 2.9/2.10's prototype has neither: the loop there
    varlen_attn = None
# Versions without enable_gqa get the key/value heads repeated to the query heads' count.
VARLEN_GQA = varlen_attn is not None and "enable_gqa" in _VARLEN_PARAMS

NAME = "sdpa_varlen"
MATH_BELOW = (
    256  # CPU: examples shorter than this take short_causal, longer ones SDPA's flash kernel (module docstring)
)
# Packed attention calls since the last take_calls(), by path: "flash" (one varlen kernel call for
# the micro-batch) or "loop" (one SDPA call per example).
CALLS: Counter[str] = Counter()


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, end)`` spans of consecutive positions (a packed example each)."""
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    width = position_ids.shape[1]
    spans = []
    for row in restarts.cpu():
        cuts = [0, *(torch.nonzero(row).flatten() + 1).tolist(), width]
        spans.append(list(zip(cuts[:-1], cuts[1:])))
    return spans


@dataclass
class Segments:
    """The packed examples of a batch: (start, end) spans per row, their lengths row after row,
    and (made on first use) their int32 cumulative offsets on the device, for the flash kernel."""

    spans: list[list[tuple[int, int]]]
    lengths: list[int]
    _offsets: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def offsets(self, device: torch.device) -> torch.Tensor:
        if device not in self._offsets:
            self._offsets[device] = torch.tensor([0, *accumulate(self.lengths)], dtype=torch.int32, device=device)
        return self._offsets[device]


# The last batch's segments, keyed by its position_ids tensor (alive, same version, same width).
_last: Optional[tuple[Any, int, int, Segments]] = None
# The host copy of the next batch's position_ids, keyed by the device tensor made from it.
_host: Optional[tuple[Any, int, torch.Tensor]] = None


def note_host_copy(on_device: Optional[torch.Tensor], host: Optional[torch.Tensor]) -> None:
    """``host`` is the collator's copy of the position_ids that ``on_device`` was copied from: the
    forward finds the batch's segments in it, with no device→host copy (on CUDA, a wait for
    everything queued before it, once per micro-batch). Either None: nothing to note."""
    global _host
    if on_device is not None and host is not None and on_device is not host:
        _host = (weakref.ref(on_device), on_device._version, host)


def packed_segments(position_ids: torch.Tensor, batch: int) -> Segments:
    """The segments of ``position_ids`` (broadcast to ``batch`` rows), computed once per tensor:
    a model's forward passes the same one to every layer, and checkpointing's recompute again.
    Read from its host copy where :func:`note_host_copy` noted one."""
    global _last
    if _last is not None:
        ref, version, rows, segments = _last
        if ref() is position_ids and version == position_ids._version and rows == batch:
            return segments
    source = position_ids
    if _host is not None and _host[0]() is position_ids and _host[1] == position_ids._version:
        source = _host[2]
    spans = segment_bounds(source.expand(batch, -1))
    segments = Segments(spans, [e - s for row in spans for s, e in row])
    _last = (weakref.ref(position_ids), position_ids._version, batch, segments)
    return segments


def take_calls() -> dict[str, int]:
    """:data:`CALLS` since the last call, then zeroed."""
    out = dict(CALLS)
    CALLS.clear()
    return out


def attention_paths(device: torch.device) -> dict[str, float]:
    """For a step's metrics on CUDA: ``attn_varlen_flash``, the share of the packed attention
    calls since the last step that ran as one flash varlen call (1.0 when the fast path ran
    throughout); nothing when no packed sdpa_varlen call ran, or on CPU, where the loop is the path."""
    calls = take_calls()
    total = sum(calls.values())
    if device.type != "cuda" or not total:
        return {}
    return {"attn_varlen_flash": calls.get("flash", 0) / total}


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the tensors in its dtype, as SDPA would take them (it is on autocast's
    lower-precision list): RoPE's fp32 cos/sin over an fp32 residual stream leave q and k in fp32
    while v, a projection's output, is already bf16."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in tensors)


def _window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal and at most ``window`` tokens back (transformers' sliding-window convention)."""
    distance = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return (distance >= 0) & (distance < window)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float], dropout: float, window: Optional[int]
) -> torch.Tensor:
    length = q.shape[2]
    mask = _window_mask(length, window, q.device) if window is not None and length > window else None
    kwargs: dict[str, Any] = {"scale": scale, "dropout_p": dropout, "enable_gqa": q.shape[1] != k.shape[1]}
    if mask is None:
        kwargs["is_causal"] = True
    else:
        kwargs["attn_mask"] = mask
    if q.device.type == "cpu" and length < MATH_BELOW:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    position_ids: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q [b, heads, L, d], k/v [b, kv_heads, L, d] →
    ([b, L, heads, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed_forward = (
        attention_mask is None and query.shape[2] == key.shape[2] > 1 and kwargs.get("position_bias") is None
    )
    if not packed_forward:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            position_ids=position_ids,
            **kwargs,
        )
    if position_ids is None:
        raise RuntimeError(
            f"{NAME}: {type(module).__name__} does not pass position_ids to its attention; use model.attn_implementation=sdpa"
        )
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{NAME} does not support attention logit softcapping; use model.attn_implementation=eager")
    window = kwargs.get("sliding_window")
    segments = packed_segments(position_ids, query.shape[0])
    if all(len(row) == 1 for row in segments.spans):  # no packing: one causal attention for the batch
        return _attend(query, key, value, scale=scaling, dropout=dropout, window=window).transpose(
            1, 2
        ).contiguous(), None
    query, key, value = autocast_inputs(query, key, value)
    # One autograd split per tensor (its backward is one concatenation); slicing per example
    # would zero-fill a full-size gradient for every slice in backward.
    lengths = segments.lengths
    if one_kernel(
        query, dropout, gqa=key.shape[1] != query.shape[1], window=window is not None and window < max(lengths)
    ):
        CALLS["flash"] += 1
        return packed_flash(
            query,
            key,
            value,
            lengths,
            scale=scaling,
            window=window,
            kernel=varlen_attn,
            native_gqa=VARLEN_GQA,
            offsets=segments.offsets(query.device),
        ), None
    CALLS["loop"] += 1
    batch, heads, width, dim = query.shape
    out = per_example(query, key, value, lengths, scale=scaling, dropout=dropout, window=window)
    return out[0].reshape(heads, batch, width, dim).permute(1, 2, 0, 3).contiguous(), None


def per_example(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: list[int],
    *,
    scale: Optional[float],
    dropout: float,
    window: Optional[int],
) -> torch.Tensor:
    """[b, heads, L, d] rows of packed examples (``lengths``, rows end to end) → [1, heads, b·L, d]:
    one causal attention per example. On CPU the short ones go to :func:`short_causal`, on fp32
    copies of the batch made once (key/value heads repeated once too); the rest to SDPA one by one
    (:func:`_attend`)."""
    short = [
        query.device.type == "cpu" and n < MATH_BELOW and not dropout and (window is None or n <= window)
        for n in lengths
    ]
    if not any(short):
        return sdpa_per_example(query, key, value, lengths, scale=scale, dropout=dropout, window=window)
    parts: list[Optional[torch.Tensor]] = [None] * len(lengths)
    if not all(short):
        for i, (q, k, v) in enumerate(
            zip(_examples(query, lengths), _examples(key, lengths), _examples(value, lengths))
        ):
            if not short[i]:
                parts[i] = _attend(q, k, v, scale=scale, dropout=dropout, window=window)
    groups = query.shape[1] // key.shape[1]
    scale = query.shape[-1] ** -0.5 if scale is None else scale

    work = torch.promote_types(query.dtype, torch.float32)  # fp32 (fp64 stays fp64)

    def wide(
        t: torch.Tensor,
    ) -> torch.Tensor:  # [b, heads, L, d] → [heads, b·L, d] in ``work``, layout and dtype in one copy
        return t.transpose(0, 1).to(work, memory_format=torch.contiguous_format).reshape(t.shape[1], -1, t.shape[3])

    q32 = (wide(query) * scale).split(lengths, dim=1)  # scaled once here, not in every example's backward
    k32, v32 = (wide(t).repeat_interleave(groups, dim=0).split(lengths, dim=1) for t in (key, value))
    # Training runs under bf16 autocast, which would cast each example's fp32 operands back to bf16
    # for its matmuls (bf16 scores and softmax, five casts per example): the fp32 math stays fp32.
    with torch.autocast(query.device.type, enabled=False):
        for i, (q, k, v) in enumerate(zip(q32, k32, v32)):
            parts[i] = short_causal(q, k, v) if short[i] else parts[i][0].to(work)
    return torch.cat(parts, dim=1).to(query.dtype)[None]


def sdpa_per_example(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: list[int],
    *,
    scale: Optional[float],
    dropout: float,
    window: Optional[int],
) -> torch.Tensor:
    """:func:`per_example`'s contract, every example through SDPA (GPUs; and on CPU the reference
    that the short path is tested and benchmarked against)."""
    examples = zip(_examples(query, lengths), _examples(key, lengths), _examples(value, lengths))
    return torch.cat([_attend(q, k, v, scale=scale, dropout=dropout, window=window) for q, k, v in examples], dim=2)


_BIAS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def short_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one short example on CPU: [heads, n, d] each, fp32 (or fp64), the queries already
    scaled, key/value heads already repeated to the query heads. What SDPA's math kernel computes
    (it upcasts half precision to fp32 too), in three ops (scores plus the causal bias, softmax,
    weighted values) where SDPA spends about a dozen per example: mask building, casts, a check for
    rows with nothing to attend to (a causal row never is)."""
    scores = torch.baddbmm(causal_bias(q.shape[1], q), q, k.transpose(1, 2))
    return torch.bmm(torch.softmax(scores, dim=-1), v)


def causal_bias(n: int, like: torch.Tensor) -> torch.Tensor:
    """[n, n] additive causal mask (0 on and below the diagonal, -inf above) in ``like``'s dtype
    and device, n < :data:`MATH_BELOW`: a view of one kept per dtype and device."""
    key = (like.device, like.dtype)
    if key not in _BIAS:
        _BIAS[key] = torch.full((MATH_BELOW, MATH_BELOW), float("-inf"), dtype=like.dtype, device=like.device).triu(1)
    return _BIAS[key][:n, :n]


def one_kernel(query: torch.Tensor, dropout: float, *, gqa: bool = False, window: bool = False) -> bool:
    """Whether the packed batch can go to one flash varlen call: half precision, no dropout,
    head_dim a multiple of 8 up to 256, on a GPU :func:`varlen_capable` accepts."""
    if varlen_attn is None or not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or dropout:
        return False
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > 256:
        return False
    index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    return varlen_capable(torch.cuda.get_device_capability(index), routes_to_cudnn(index), gqa=gqa, window=window)


def varlen_capable(capability: tuple[int, int], cudnn: bool, *, gqa: bool, window: bool) -> bool:
    """Whether ``varlen_attn`` runs a packed batch on a GPU of compute ``capability``: Ampere and
    Ada (8.x), Hopper (9.x), datacenter Blackwell (10.x: B200, GB200) and consumer Blackwell
    (12.x: RTX 50, RTX PRO), the architectures PyTorch's flash-attention kernels are built for
    (sm80 and newer; Turing and older have none). ``cudnn``: this PyTorch sends the device to
    cuDNN's attention for every call (:func:`routes_to_cudnn`; 2.9's prototype did for 10.x and
    newer, later versions with cuDNN 9.18+ for 9.x and 10.x), which refuses grouped-query
    attention and a sliding window, so those batches take the loop there. 11.x (Thor) is left to
    the loop: untested."""
    if capability[0] not in (8, 9, 10, 12):
        return False
    return not (cudnn and (gqa or window))


def routes_to_cudnn(device_index: int) -> bool:
    """Whether the installed PyTorch's varlen_attn sends this device to cuDNN whatever the call
    (its private choice, read where it exists). Versions with a per-call backend choice
    (``_select_backend``) take cuDNN only where it accepts the call and flash otherwise: False."""
    if varlen_attn is None:
        return False
    varlen = torch.nn.attention.varlen
    choose = getattr(varlen, "_should_use_cudnn", None)
    if choose is None or hasattr(varlen, "_select_backend"):
        return False
    return bool(choose(device_index))


def packed_flash(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: list[int],
    *,
    scale: Optional[float],
    window: Optional[int],
    kernel: Callable[..., torch.Tensor],
    native_gqa: bool = True,
    offsets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[b, heads, L, d] rows of packed examples (``lengths``, rows end to end) → [b, L, heads, d]
    through ``kernel``, which has ``torch.nn.attention.varlen.varlen_attn``'s contract: tokens
    concatenated as [T, heads, d], example boundaries as int32 cumulative offsets, ``window_size``
    (left, right) with (-1, 0) meaning causal, ``enable_gqa`` where ``native_gqa`` (else the
    key/value heads are repeated to the query heads' count, as transformers' repeat_kv does).
    ``offsets``: those offsets already on the device (:class:`Segments`), else made here."""
    batch, heads, width, dim = query.shape
    gqa: dict[str, bool] = {}
    if key.shape[1] != heads:
        if native_gqa:
            gqa["enable_gqa"] = True
        else:
            key, value = (t.repeat_interleave(heads // key.shape[1], dim=1) for t in (key, value))

    def tokens(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(batch * width, t.shape[1], dim)

    if offsets is None:
        offsets = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=query.device)
    longest = max(lengths)
    # transformers' sliding window covers the token itself and window - 1 before it
    window_size = (-1, 0) if window is None or window >= longest else (window - 1, 0)
    out = kernel(
        tokens(query),
        tokens(key),
        tokens(value),
        offsets,
        offsets,
        longest,
        longest,
        scale=scale,
        window_size=window_size,
        **gqa,
    )
    return out.reshape(batch, width, heads, dim)


def _examples(t: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, ...]:
    """[b, heads, L, d] → one [1, heads, length, d] view per example, rows end to end."""
    flat = t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[3])
    return tuple(part.unsqueeze(0) for part in flat.split(lengths, dim=1))


_registered: Callable[..., Any] = varlen_attention_forward


def varlen_mask(*args: Any, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Optional[torch.Tensor]:
    """No mask for unpadded inputs (the attention reads example boundaries from ``position_ids``);
    transformers' 4-D sdpa mask when the batch is padded."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None or bool(attention_mask.all()):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register(forward: Optional[Callable[..., Any]] = None) -> None:
    """Make ``sdpa_varlen`` a valid ``attn_implementation`` for transformers (idempotent).
    ``forward``: the function behind the name from now on, for the rest of the process; compiled
    decoder layers (:mod:`launcher.model.compile`) register
    :func:`launcher.model.attention_op.compiled_forward`, which runs :func:`varlen_attention_forward`
    for every caller that dynamo is not tracing."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    global _registered
    if forward is not None:
        _registered = forward
    AttentionInterface.register(NAME, _registered)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)
