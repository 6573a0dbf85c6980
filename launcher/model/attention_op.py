"""Packed attention on CPU as one PyTorch operator, ``ftl::packed_attention_v1``, with its own backward:
what compiled decoder layers call instead of :mod:`launcher.model.attention`'s per-example loop.

The loop's trip count and slice sizes come from each batch's ``position_ids`` (a device→host copy
and Python lists), which dynamo cannot trace without specialising on every split: run as eager
Python (``torch.compiler.disable``), it broke each compiled layer into two graphs, and made dynamo
trace the layer a second time (~2.6 s of a compiled run's first step, docs/BENCHMARKS.md). As a
``torch.library.custom_op`` the whole attention is one opaque node: each layer compiles into one
graph (forward and backward), inductor fuses across it, and the split happens inside at run time.

The forward is :func:`launcher.model.attention.per_example`'s math (fp32 scores, causal softmax,
weighted values, one example at a time) and also returns what the backward needs: the fp32 q, k, v
(key/value heads repeated; made in one copy each) and, for examples of
:data:`~launcher.model.attention.MATH_BELOW` tokens or more, which go to SDPA's CPU flash kernel as
the eager loop sends them to SDPA, that kernel's log-sum-exp. The backward recomputes each short
example's scores and softmax from the saved q and k (two ops) instead of keeping its probability
matrix, as autograd over the loop does, and runs the softmax's fused backward; long examples take
the flash kernel's backward. It also keeps the half-precision q, k, v and output, for their shapes,
dtypes and the flash backward (q, k, v there: ~4 MB per SmolLM2 layer on 2,048 tokens, a
possible saving).

Sliding windows, dropout and GPUs keep the eager loop (:func:`fits`); so do padded batches and
decoding, which never reach the packed path.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from launcher.model.attention import CALLS, MATH_BELOW, autocast_inputs, causal_bias, packed_segments, varlen_attention_forward

# The operators' names carry a version. Inductor's and AOTAutograd's on-disk caches keep compiled
# graphs that call an operator by its name, with nothing of its schema or of the backward formula
# registered for it in their keys: change a schema, what the forward saves, or ``_backward``, and
# bump this, or a cache filled by an earlier ftl replays graphs that no longer fit.
VERSION = 1
FORWARD, BACKWARD = f"ftl::packed_attention_v{VERSION}", f"ftl::packed_attention_backward_v{VERSION}"

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def fits(query: Tensor, dropout: float, window: Optional[int]) -> bool:
    """Whether a packed forward can take the operator: CPU, no dropout, no sliding window."""
    return query.device.type == "cpu" and not dropout and window is None


def _heads_first(t: Tensor, groups: int, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
    """[b, kv_heads, L, d] → [kv_heads·groups, b·L, d] in ``dtype``, each head repeated ``groups``
    times (as transformers' repeat_kv does): layout, repeat and dtype in one copy (into ``out``)."""
    batch, heads, width, dim = t.shape
    wide = t.transpose(0, 1)[:, None].expand(heads, groups, batch, width, dim)
    if out is None:
        out = t.new_empty(heads * groups, batch * width, dim, dtype=dtype)
    out.view(heads, groups, batch, width, dim).copy_(wide)
    return out


def _probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """One short example's causal attention probabilities [heads, n, n] from its q and k [heads, n, d]."""
    return torch.softmax(torch.baddbmm(causal_bias(q.shape[1], q), q, k.transpose(1, 2), alpha=scale), dim=-1)


@torch.library.custom_op(FORWARD, mutates_args=())
def packed_attention(query: Tensor, key: Tensor, value: Tensor, position_ids: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """q [b, heads, L, d], k/v [b, kv_heads, L, d], rows of packed examples (``position_ids``
    restarting at 0 for each) → causal attention within each example, scores scaled by ``scale``:
    (output [b, L, heads, d] in q's dtype; for the backward: the log-sum-exp of the long examples'
    scores [heads, b·L], and q, k, v [3, heads, b·L, d] in fp32, key/value heads repeated)."""
    batch, heads, width, dim = query.shape
    lengths = packed_segments(position_ids, batch).lengths
    CALLS["loop"] += 1
    work = torch.promote_types(query.dtype, torch.float32)
    groups = heads // key.shape[1]
    saved = query.new_empty(3, heads, batch * width, dim, dtype=work)
    q32, k32, v32 = (_heads_first(t, g, work, out=buf) for t, g, buf in zip((query, key, value), (1, groups, groups), saved))
    lse = q32.new_zeros(heads, batch * width)  # the rows of short examples stay 0: their backward recomputes softmax
    outs = []
    start = 0
    for n in lengths:
        end = start + n
        if n < MATH_BELOW:
            outs.append(torch.bmm(_probs(q32[:, start:end], k32[:, start:end], scale), v32[:, start:end]))
        else:  # SDPA's flash kernel on the example in the input dtype (its output, cast up, is exact)
            native = (t[:, start:end].to(query.dtype)[None] for t in (q32, k32, v32))  # exact: cast up, cast back
            out, lse[:, start:end] = _flash(*native, 0.0, True, scale=scale)
            outs.append(out[0].to(work))
        start = end
    out = torch.cat(outs, dim=1).to(query.dtype)
    return out.view(heads, batch, width, dim).permute(1, 2, 0, 3).contiguous(), lse, saved


@packed_attention.register_fake
def _(query: Tensor, key: Tensor, value: Tensor, position_ids: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    batch, heads, width, dim = query.shape
    work = torch.promote_types(query.dtype, torch.float32)
    return (query.new_empty(batch, width, heads, dim), query.new_empty(heads, batch * width, dtype=work),
            query.new_empty(3, heads, batch * width, dim, dtype=work))  # fmt: skip


def _grad_layout(t: Tensor) -> Tensor:
    """An empty tensor shaped like ``t`` [b, h, L, d], laid out as [h, b, L, d] (the backward's heads-first order)."""
    batch, heads, width, dim = t.shape
    return t.new_empty(heads, batch, width, dim).transpose(0, 1)


@torch.library.custom_op(BACKWARD, mutates_args=())
def packed_attention_backward(grad: Tensor, query: Tensor, key: Tensor, value: Tensor, position_ids: Tensor, out: Tensor,
                              lse: Tensor, saved: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of q, k, v (their shapes and dtypes, heads-first in memory) from the output's
    ``grad`` [b, L, heads, d]; each short example's probabilities recomputed from the saved fp32
    q and k, its softmax's backward fused (what autograd runs for ``torch.softmax``)."""
    batch, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    lengths = packed_segments(position_ids, batch).lengths
    q32, k32, v32 = saved
    g32 = grad.permute(2, 0, 1, 3).to(saved.dtype, memory_format=torch.contiguous_format).view(heads, batch * width, dim)
    dq, dk, dv = [], [], []
    start = 0
    for n in lengths:
        end = start + n
        q, k, v, g = (t[:, start:end] for t in (q32, k32, v32, g32))
        if n < MATH_BELOW:
            probs = _probs(q, k, scale)
            dv.append(torch.bmm(probs.transpose(1, 2), g))
            dscores = torch.ops.aten._softmax_backward_data(torch.bmm(g, v.transpose(1, 2)), probs, -1, probs.dtype).mul_(scale)
            dq.append(torch.bmm(dscores, k))
            dk.append(torch.bmm(dscores.transpose(1, 2), q))
        else:
            qi, ki, vi = (t.to(query.dtype)[None] for t in (q, k, v))
            gi = g.to(query.dtype)[None]
            oi = out.view(batch * width, heads, dim)[start:end].transpose(0, 1)[None]
            parts = _flash_backward(gi, qi, ki, vi, oi, lse[:, start:end][None], 0.0, True, scale=scale)
            for acc, part in zip((dq, dk, dv), parts):
                acc.append(part[0].to(saved.dtype))
        start = end

    def back(parts: list[Tensor], like: Tensor) -> Tensor:  # [heads, b·L, d] pieces (repeated heads summed) → like's shape
        flat = torch.cat(parts, dim=1)
        if flat.shape[0] != like.shape[1]:
            flat = flat.view(like.shape[1], groups, -1, dim).sum(1)
        result = _grad_layout(like)
        result.transpose(0, 1).view(like.shape[1], -1, dim).copy_(flat)
        return result

    return back(dq, query), back(dk, key), back(dv, value)


@packed_attention_backward.register_fake
def _(grad: Tensor, query: Tensor, key: Tensor, value: Tensor, position_ids: Tensor, out: Tensor, lse: Tensor, saved: Tensor,
      scale: float) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _grad_layout(query), _grad_layout(key), _grad_layout(value)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    query, key, value, position_ids, scale = inputs
    out, lse, saved = output
    ctx.save_for_backward(query, key, value, position_ids, out, lse, saved)
    ctx.scale = scale
    ctx.set_materialize_grads(False)  # the backward reads no gradient of lse or saved: no zero-filled ones


def _backward(ctx, grad: Tensor, _lse: Optional[Tensor], _saved: Optional[Tensor]):  # type: ignore[no-untyped-def]
    query, key, value, position_ids, out, lse, saved = ctx.saved_tensors
    dq, dk, dv = packed_attention_backward(grad.contiguous(), query, key, value, position_ids, out, lse, saved, ctx.scale)
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
        return varlen_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        position_ids=position_ids, **kwargs)  # fmt: skip
    packed = attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2] > 1
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if packed and plain and fits(query, dropout, kwargs.get("sliding_window")):
        query, key, value = autocast_inputs(query, key, value)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return packed_attention(query, key, value, position_ids, scale)[0], None
    return _eager_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, position_ids=position_ids, **kwargs)
