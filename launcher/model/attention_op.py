"""Packed attention on CPU as one PyTorch operator, ``ftl::packed_attention_v2``, with its own backward:
what compiled decoder layers call instead of :mod:`launcher.model.attention`'s per-example loop.

The loop's trip count and slice sizes come from each batch's ``position_ids`` (a device→host copy
and Python lists), which dynamo cannot trace without specialising on every split: run as eager
Python (``torch.compiler.disable``), it broke each compiled layer into two graphs, and made dynamo
trace the layer a second time (~2.6 s of a compiled run's first step, docs/BENCHMARKS.md). As a
``torch.library.custom_op`` the whole attention is one opaque node: each layer compiles into one
graph (forward and backward), inductor fuses across it, and the split happens inside at run time.

The forward is :func:`launcher.model.attention.per_example`'s math (fp32 scores, causal softmax,
weighted values, one example at a time, autocast off) and also returns what the backward needs,
as autograd over the loop would keep it: the fp32 q, k, v (key/value heads repeated; made in one
copy each), each short example's probabilities (one flat tensor whose size depends on the split:
an unbacked size to the compiler, so :func:`launcher.model.compile.compile_decoder_layers` lets
dynamo capture such outputs) and, for examples of :data:`~launcher.model.attention.MATH_BELOW`
tokens or more, which go to SDPA's CPU flash kernel as the eager loop sends them to SDPA, that
kernel's log-sum-exp. The backward runs each short example's softmax backward fused, the long
ones through the flash kernel's backward. Outputs and gradients are written in the layouts their
next users want ([b, L, heads, d] out; heads-first gradients), never concatenated then copied.
v1 recomputed the softmax in the backward and kept the half-precision q, k, v: 1.08x the loop's
time for one layer's attention, against 0.90x for v2, in the same run (docs/BENCHMARKS.md).

Sliding windows, dropout and GPUs keep the eager loop (:func:`fits`); so do padded batches and
decoding, which never reach the packed path.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from launcher.model.attention import (
    CALLS,
    MATH_BELOW,
    autocast_inputs,
    causal_bias,
    packed_segments,
    varlen_attention_forward,
)

# The operators' names carry a version. Inductor's and AOTAutograd's on-disk caches keep compiled
# graphs that call an operator by its name, with nothing of its schema or of the backward formula
# registered for it in their keys: change a schema, what the forward saves, or ``_backward``, and
# bump this, or a cache filled by an earlier ftl replays graphs that no longer fit.
VERSION = 2
FORWARD, BACKWARD = f"ftl::packed_attention_v{VERSION}", f"ftl::packed_attention_backward_v{VERSION}"

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def fits(query: Tensor, key: Tensor, value: Tensor, dropout: float, window: Optional[int]) -> bool:
    """Whether a packed forward can take the operator: CPU, one dtype for q, k and v, no dropout,
    no sliding window."""
    return query.device.type == "cpu" and query.dtype == key.dtype == value.dtype and not dropout and window is None


def _heads_first(t: Tensor, groups: int, dtype: torch.dtype, out: Tensor) -> Tensor:
    """[b, kv_heads, L, d] → ``out`` [kv_heads·groups, b·L, d] in ``dtype``, each head repeated
    ``groups`` times (as transformers' repeat_kv does): layout, repeat and dtype in one copy."""
    batch, heads, width, dim = t.shape
    out.view(heads, groups, batch, width, dim).copy_(
        t.transpose(0, 1)[:, None].expand(heads, groups, batch, width, dim)
    )
    return out


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """One short example's causal attention scores [heads, n, n] from its q and k [heads, n, d]."""
    return torch.baddbmm(causal_bias(q.shape[1], q), q, k.transpose(1, 2), alpha=scale)


@torch.library.custom_op(FORWARD, mutates_args=())
def packed_attention(
    query: Tensor, key: Tensor, value: Tensor, position_ids: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q [b, heads, L, d], k/v [b, kv_heads, L, d] of one dtype, rows of packed examples
    (``position_ids`` restarting at 0 for each) → causal attention within each example, scores
    scaled by ``scale``: (output [b, L, heads, d] in q's dtype; for the backward: q, k, v
    [3, heads, b·L, d] in fp32, key/value heads repeated; the short examples' probabilities, each
    [heads, n, n], end to end in one flat fp32 tensor; the log-sum-exp of the long examples'
    scores [heads, b·L])."""
    with torch.autocast("cpu", enabled=False):  # called eagerly under bf16 autocast, the matmuls would run in bf16
        batch, heads, width, dim = query.shape
        lengths = packed_segments(position_ids, batch).lengths
        CALLS["loop"] += 1
        work = torch.promote_types(query.dtype, torch.float32)
        groups = heads // key.shape[1]
        saved = query.new_empty(3, heads, batch * width, dim, dtype=work)
        q32, k32, v32 = (
            _heads_first(t, g, work, buf) for t, g, buf in zip((query, key, value), (1, groups, groups), saved)
        )
        probs = q32.new_empty(heads * sum(n * n for n in lengths if n < MATH_BELOW))
        lse = q32.new_zeros(heads, batch * width)  # the rows of short examples stay 0
        out = query.new_empty(
            batch * width, heads, dim
        )  # the layer's next layout, [b, L, heads, d], filled one example at a time
        start = offset = 0
        for n in lengths:
            end = start + n
            q, k, v = q32[:, start:end], k32[:, start:end], v32[:, start:end]
            if n < MATH_BELOW:
                p = probs[offset : offset + heads * n * n].view(heads, n, n)
                torch.ops.aten._softmax.out(_scores(q, k, scale), -1, False, out=p)
                out[start:end].transpose(0, 1).copy_(
                    torch.bmm(p, v)
                )  # (bmm's out= into a strided view loops head by head)
                offset += heads * n * n
            else:  # SDPA's flash kernel on the example in the input dtype (cast up then back: exact)
                o, lse[:, start:end] = _flash(*(t.to(query.dtype)[None] for t in (q, k, v)), 0.0, True, scale=scale)
                out[start:end].transpose(0, 1).copy_(o[0])
            start = end
        return out.view(batch, width, heads, dim), saved, probs, lse


@packed_attention.register_fake
def _(
    query: Tensor, key: Tensor, value: Tensor, position_ids: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, heads, width, dim = query.shape
    work = torch.promote_types(query.dtype, torch.float32)
    probs = query.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=work)  # its size depends on the split
    return (
        query.new_empty(batch, width, heads, dim),
        query.new_empty(3, heads, batch * width, dim, dtype=work),
        probs,
        query.new_empty(heads, batch * width, dtype=work),
    )


def _grad_layout(batch: int, heads: int, width: int, dim: int, like: Tensor) -> Tensor:
    """An empty [b, heads, L, d] tensor laid out as [heads, b, L, d] (the backward's heads-first order)."""
    return like.new_empty(heads, batch, width, dim).transpose(0, 1)


@torch.library.custom_op(BACKWARD, mutates_args=())
def packed_attention_backward(
    grad: Tensor,
    position_ids: Tensor,
    out: Tensor,
    saved: Tensor,
    probs: Tensor,
    lse: Tensor,
    kv_heads: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q [b, heads, L, d] and k, v [b, kv_heads, L, d] (in the output's dtype,
    heads-first in memory) from the output's ``grad`` [b, L, heads, d] and what the forward saved:
    each short example's softmax backward fused (what autograd runs for ``torch.softmax``), the
    long ones through the flash kernel's backward."""
    with torch.autocast("cpu", enabled=False):  # called eagerly under bf16 autocast, the matmuls would run in bf16
        batch, width, heads, dim = grad.shape
        groups = heads // kv_heads
        lengths = packed_segments(position_ids, batch).lengths
        q32, k32, v32 = saved
        g32 = grad.to(saved.dtype).view(batch * width, heads, dim)
        # q's gradient is made in its final layout; k's and v's too, unless their repeated heads are summed at the end
        dqkv = [_grad_layout(batch, heads, width, dim, saved) for _ in range(3)]
        heads_first = [t.transpose(0, 1).reshape(heads, batch * width, dim) for t in dqkv]  # views
        start = offset = 0
        for n in lengths:
            end = start + n
            q, k, v, dq, dk, dv = (t[:, start:end] for t in (q32, k32, v32, *heads_first))
            g = g32[start:end].transpose(0, 1)
            if n < MATH_BELOW:
                p = probs[offset : offset + heads * n * n].view(heads, n, n)
                dv.copy_(torch.bmm(p.transpose(1, 2), g))
                dscores = torch.ops.aten._softmax_backward_data(torch.bmm(g, v.transpose(1, 2)), p, -1, p.dtype).mul_(
                    scale
                )
                dq.copy_(torch.bmm(dscores, k))
                dk.copy_(torch.bmm(dscores.transpose(1, 2), q))
                offset += heads * n * n
            else:
                native = (
                    t.to(grad.dtype)[None]
                    for t in (g, q, k, v, out.view(batch * width, heads, dim)[start:end].transpose(0, 1))
                )
                for acc, part in zip(
                    (dq, dk, dv), _flash_backward(*native, lse[:, start:end][None], 0.0, True, scale=scale)
                ):
                    acc.copy_(part[0])
            start = end

        def final(
            t: Tensor, h: int
        ) -> Tensor:  # [b, heads, L, d] → [b, h, L, d] in grad's dtype (repeated heads summed)
            if h != heads:
                t = t.unflatten(1, (h, groups)).sum(2)
            elif t.dtype == grad.dtype:
                return t
            return _grad_layout(batch, h, width, dim, grad).copy_(t)

        return final(dqkv[0], heads), final(dqkv[1], kv_heads), final(dqkv[2], kv_heads)


@packed_attention_backward.register_fake
def _(
    grad: Tensor,
    position_ids: Tensor,
    out: Tensor,
    saved: Tensor,
    probs: Tensor,
    lse: Tensor,
    kv_heads: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    batch, width, heads, dim = grad.shape
    return tuple(_grad_layout(batch, h, width, dim, grad) for h in (heads, kv_heads, kv_heads))


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    query, key, value, position_ids, scale = inputs
    out, saved, probs, lse = output
    ctx.save_for_backward(position_ids, out, saved, probs, lse)
    ctx.kv_heads, ctx.scale = key.shape[1], scale
    ctx.set_materialize_grads(False)  # the backward reads no gradient of what it saved: no zero-filled ones


def _backward(ctx, grad: Tensor, *_unused: Optional[Tensor]):  # type: ignore[no-untyped-def]
    dq, dk, dv = packed_attention_backward(grad.contiguous(), *ctx.saved_tensors, ctx.kv_heads, ctx.scale)
    return dq, dk, dv, None, None


packed_attention.register_autograd(_backward, setup_context=_setup_context)


_eager_forward = torch.compiler.disable(varlen_attention_forward)


def compiled_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    position_ids: Optional[Tensor] = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """``sdpa_varlen`` once compiled layers exist (transformers' attention-function signature).
    While dynamo traces a layer, a packed training forward that :func:`fits` is the operator,
    inside the layer's graph, and anything else is
    :func:`~launcher.model.attention.varlen_attention_forward` run eagerly between two graphs; code
    that runs eagerly (evaluation, a model that is not compiled) gets that function itself."""
    if not torch.compiler.is_compiling():
        return varlen_attention_forward(
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
    packed = attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2] > 1
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if packed and plain:
        query, key, value = autocast_inputs(query, key, value)
    if packed and plain and fits(query, key, value, dropout, kwargs.get("sliding_window")):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return packed_attention(query, key, value, position_ids, scale)[0], None
    return _eager_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, position_ids=position_ids, **kwargs
    )
