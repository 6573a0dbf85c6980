"""The next-token loss, with the output layer run only where a token is predicted.

A causal LM's output layer maps every position's hidden state to a vocabulary-sized row of logits
(49k for SmolLM2, 128k for Llama 3), and the loss needs them in fp32: for a 2,048-token micro-batch
that is a 400 MB buffer and, on a small model, a fifth of the step's matmul work. But only the
positions whose next token has a label count: with chat data and assistant-only labels that is
about half of them, and none of the padding. :func:`logits_at_labels` hooks the model's output
layer so that it receives only those positions' hidden states; the model then returns logits of
shape [n_labels, vocab], in the order of the labels it yields. The loss is the same sum of
cross-entropies as over the full logits (tested), the work and the buffer shrink with the share
of unlabelled positions.

The hook sits on the unwrapped model's output layer (``get_output_embeddings()``), found through
DDP and DeepSpeed wrappers and PEFT models alike, so every engine computes its loss this way.

Even at labelled positions only, the logits are a [n_labels, vocab] tensor, and the loss keeps
three fp32 copies of it alive until backward (the upcast, log-softmax's output, its gradient): on a
small model with a large vocabulary the largest buffer of the step (``ftl plan`` shows it).
``train.loss=chunked`` (the default) never makes it: :func:`head_at_labels` replaces the output
layer's forward for one call with :class:`ChunkedHeadLoss`, which runs the head and the
cross-entropy over :func:`chunk_rows` labelled positions at a time and, while each chunk's logits
exist, makes that chunk's gradients for the hidden states and the head's weight too (the softmax
minus the one-hot target, through the head). Backward only scales them. The loss and gradients
are today's (tested to 1e-5 in fp32), in the same arithmetic: the matmul in the autocast dtype,
logits rounded to it, softmax and loss in fp32. Chunks are shaped per device (:class:`ChunkShape`):
small on CPU, thousands of rows on CUDA. Preference objectives need each position's log-prob
rather than a sum: :class:`ChunkedTokenLogps` makes them chunk by chunk the same way, and runs the
head again in backward (their gradient depends on each sequence's weight in the loss). Both need the model's logits to be the head's
output as such (:func:`launcher.model.families.plain_head`): families that scale or softcap them
(Gemma 2/3, Granite) and heads that are not a plain ``nn.Linear`` (a LoRA-adapted head) keep the
logits path. ``train.loss=liger`` uses Liger-Kernel's fused linear cross-entropy instead (CUDA,
``pip install ftl[liger]``), the same idea in Triton kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ContextManager, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from launcher.data.types import IGNORE_INDEX

# Vocabulary rows of the head's weight gradient accumulated at a time where the accumulation is not
# fused into the matmul (CPU): each block's product and its fp32 upcast are temporaries of
# WEIGHT_GRAD_BLOCK × hidden, not of the whole weight.
WEIGHT_GRAD_BLOCK = 4096


def output_layer(model: nn.Module) -> nn.Module:
    """The model's vocabulary projection (``lm_head``), through DDP/DeepSpeed wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):  # DDP, DeepSpeedEngine
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings) to compute a loss with"
        )
    return head


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """The flat positions (row × width + column) of the hidden states that predict a label
    (position t predicts labels[t + 1]), in row-major order. Its size depends on the data: made on
    the device, it waits for the device (a host sync); the trainer makes it on the host with each
    batch (``label_positions`` in the batch: :func:`positions_of`), where the labels already are."""
    keep = labels[:, 1:] != IGNORE_INDEX
    rows, cols = keep.nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols


def positions_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's :func:`label_positions`: the ones made with it, else from its labels."""
    return batch["label_positions"] if "label_positions" in batch else label_positions(batch["labels"])


def _at(positions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` ([batch, seq, ...]) at flat ``positions``: an index of known size, no host sync."""
    return t.flatten(0, 1).index_select(0, positions)


@contextlib.contextmanager
def logits_at_labels(
    model: nn.Module, labels: torch.Tensor, positions: Optional[torch.Tensor] = None
) -> Iterator[torch.Tensor]:
    """Within the block, ``model``'s forward returns logits only for the positions that predict a
    label (position t predicts labels[t + 1]): shape [n, vocab]. Yields those n labels, in order.
    ``positions``: :func:`label_positions` of ``labels``, when already made."""
    positions = label_positions(labels) if positions is None else positions

    def select(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (_at(positions, args[0]), *args[1:])

    handle = output_layer(model).register_forward_pre_hook(select)
    try:
        yield _at(positions + 1, labels)
    finally:
        handle.remove()


def chunk_rows(vocab_size: int, device_type: str = "cpu") -> int:
    """Labelled positions per chunk on ``device_type`` (:func:`launcher.model.families.loss_chunk_rows`,
    which the planner reads too)."""
    from launcher.model.families import loss_chunk_rows

    return loss_chunk_rows(vocab_size, device_type)


def next_token_loss(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    autocast: Optional[ContextManager[object]] = None,
    impl: str = "chunked",
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sum of the next-token cross-entropies over the labelled positions of one batch, in fp32
    whatever the autocast dtype. ``autocast`` wraps the forward pass only. ``impl``: ``chunked``
    (never the full logits, where the model allows: :func:`fused_head_ok`), ``logits`` (one
    [n_labels, vocab] tensor) or ``liger`` (Liger-Kernel's fused kernel). ``positions``:
    :func:`label_positions` of ``labels``, when already made."""
    positions = label_positions(labels) if positions is None else positions
    if impl != "logits" and fused_head_ok(model):
        with (
            head_at_labels(model, labels, positions, liger_loss if impl == "liger" else chunked_head_loss),
            autocast or contextlib.nullcontext(),
        ):
            # the head's output as the model returns it: the engines' hooks on it (ZeRO-3 gathers
            # the head's weight again before its backward) hold only on that tensor
            return model(**inputs, use_cache=False).logits
    with logits_at_labels(model, labels, positions) as targets, autocast or contextlib.nullcontext():
        logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def next_token_logps(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    autocast: Optional[ContextManager[object]] = None,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Each labelled position's log-probability of its label, fp32 [n_labels], in order; chunk by
    chunk (:func:`chunked_token_logps`) where the model allows, as :func:`next_token_loss`."""
    positions = label_positions(labels) if positions is None else positions
    if fused_head_ok(model):
        with head_at_labels(model, labels, positions, chunked_token_logps), autocast or contextlib.nullcontext():
            return model(**inputs, use_cache=False).logits
    with logits_at_labels(model, labels, positions) as targets, autocast or contextlib.nullcontext():
        logits = model(**inputs, use_cache=False).logits
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def fused_head_ok(model: nn.Module) -> bool:
    """Whether the model's logits are its output layer's output as such (no scaling or softcap
    after it: :func:`launcher.model.families.plain_head`) and that layer a plain ``nn.Linear``."""
    from launcher.model.families import plain_head

    head = output_layer(model)
    config = getattr(_unwrapped(model), "config", None)
    return type(head) is nn.Linear and plain_head(getattr(config, "model_type", None), config)


def _unwrapped(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


HeadFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def head_at_labels(model: nn.Module, labels: torch.Tensor, positions: torch.Tensor, fn: HeadFn) -> Iterator[None]:
    """Within the block, one forward of ``model`` runs ``fn(hidden, weight, bias, targets)`` in
    place of its output layer, on the labelled positions, and returns what it gives (the summed
    loss, or each position's log-prob) where the logits would be."""
    targets = _at(positions + 1, labels)
    head = output_layer(model)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return fn(_at(positions, hidden), head.weight, head.bias, targets)

    head.forward = forward  # the instance's forward: the module's hooks (FSDP, ZeRO-3 gathering) still run around it
    try:
        yield
    finally:
        del head.forward


def chunked_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    rows: Optional[int] = None,
    shape: Optional[str] = None,
) -> torch.Tensor:
    """Σ cross_entropy(hidden @ weightᵀ + bias, targets), ``rows`` positions at a time (default
    :func:`chunk_rows`), in the autocast dtype where autocast is on (as ``nn.Linear`` would be).
    ``shape``: the device type whose chunking to use (default: ``hidden``'s; see :class:`ChunkShape`)."""
    dtype, grads = _compute_dtype(hidden, weight), _needs_grads(hidden, weight, bias)
    chunks = ChunkShape.of(shape or hidden.device.type, weight.shape[0], rows)
    return ChunkedHeadLoss.apply(hidden, weight, bias, targets, chunks, dtype, grads)


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    rows: Optional[int] = None,
    shape: Optional[str] = None,
) -> torch.Tensor:
    """Each position's log-probability of its target, fp32 [n], from the head chunk by chunk as
    :func:`chunked_head_loss` (preference objectives sum them per sequence)."""
    dtype = _compute_dtype(hidden, weight)
    chunks = ChunkShape.of(shape or hidden.device.type, weight.shape[0], rows)
    return ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunks, dtype)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    return (
        torch.get_autocast_dtype(device_type)
        if torch.is_autocast_enabled(device_type)
        else torch.result_type(hidden, weight)
    )


def _needs_grads(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class ChunkShape(NamedTuple):
    """How the chunked head runs on a device type (:data:`launcher.model.families.LOGITS_PER_CHUNK`).
    CPU: chunks of 2**24 logits, the head's weight gradient added into fp32 :data:`WEIGHT_GRAD_BLOCK`
    vocabulary rows at a time (tuned there: a mixed-dtype ``+=`` makes an fp32 copy of its operand
    on CPU). CUDA: chunks of 2**27 logits (thousands of rows) and one fp32 accumulation of the
    weight gradient per chunk, in the matmul itself (``addmm`` into fp32 from bf16/fp16 operands,
    Ampere and later; blocks as on CPU before it)."""

    rows: int
    device_type: str

    @staticmethod
    def of(device_type: str, vocab_size: int, rows: Optional[int] = None) -> "ChunkShape":
        return ChunkShape(rows or chunk_rows(vocab_size, device_type), device_type)


def _head_grads(
    grad: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    dtype: torch.dtype,
    shape: ChunkShape,
    grad_h: Optional[torch.Tensor],
    grad_w: Optional[torch.Tensor],
    grad_b: Optional[torch.Tensor],
) -> None:
    """One chunk's contribution, from ``grad`` (the fp32 gradient of its logits, consumed): the
    hidden states' gradient written into ``grad_h`` (the chunk's rows), the weight's and the bias's
    added into the fp32 ``grad_w`` and ``grad_b``."""
    if grad_b is not None:
        grad_b += grad.sum(0)
    grad = grad.to(dtype)
    if grad_h is not None:
        grad_h.copy_(grad @ w)
    if grad_w is None:
        return
    if shape.device_type == "cuda" and dtype == torch.float32:
        grad_w.addmm_(grad.t(), h)
    elif shape.device_type == "cuda" and grad_w.is_cuda and torch.cuda.get_device_capability(grad_w.device)[0] >= 8:
        torch.addmm(grad_w, grad.t(), h, out_dtype=torch.float32, out=grad_w)
    else:  # in blocks of the vocabulary: each block's product and its fp32 upcast are temporaries of WEIGHT_GRAD_BLOCK × hidden
        for v0 in range(0, grad.shape[1], WEIGHT_GRAD_BLOCK):
            grad_w[v0 : v0 + WEIGHT_GRAD_BLOCK] += grad[:, v0 : v0 + WEIGHT_GRAD_BLOCK].t() @ h


class ChunkedHeadLoss(torch.autograd.Function):
    """The head and the summed cross-entropy chunk by chunk, gradients made in forward (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        targets: torch.Tensor,
        shape: ChunkShape,
        dtype: torch.dtype,
        grads: bool,
    ) -> torch.Tensor:
        need_h, need_w = grads and hidden.requires_grad, grads and weight.requires_grad
        need_b = grads and bias is not None and bias.requires_grad
        rows = shape.rows
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
            for start in range(0, hidden.shape[0], rows):
                h, t = hidden[start : start + rows].to(dtype), targets[start : start + rows]
                logits = F.linear(h, w, b).float()  # rounded to the compute dtype first, as nn.Linear's output is
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                _head_grads(grad, h, w, dtype, shape, grad_h[start : start + rows] if need_h else None, grad_w, grad_b)
                del logits, grad  # before the next chunk's logits exist: one chunk's buffers alive at a time
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scaled = (
            grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
            (grad_w * grad_out).to(w_dtype) if grad_w is not None else None,
            (grad_b * grad_out).to(b_dtype) if grad_b is not None else None,
        )
        return (*scaled, None, None, None, None)


class ChunkedTokenLogps(torch.autograd.Function):
    """Per-position target log-probs, chunk by chunk. Their gradient weighs each position by what
    backward brings (a sequence's share of a preference loss), so it cannot be made in forward:
    forward keeps each position's logsumexp, and backward runs the head again, chunk by chunk."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        targets: torch.Tensor,
        shape: ChunkShape,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lses = torch.empty_like(logps)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            for start in range(0, hidden.shape[0], shape.rows):
                chunk = slice(start, start + shape.rows)
                logits = F.linear(
                    hidden[chunk].to(dtype), w, b
                ).float()  # rounded to the compute dtype, as nn.Linear's output is
                lses[chunk] = torch.logsumexp(logits, dim=-1)
                logps[chunk] = logits.gather(1, targets[chunk, None]).squeeze(1) - lses[chunk]
                del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lses)
        ctx.shape, ctx.dtype = shape, dtype
        return logps

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        hidden, weight, bias, targets, lses = ctx.saved_tensors
        shape, dtype = ctx.shape, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
            for start in range(0, hidden.shape[0], shape.rows):
                chunk = slice(start, start + shape.rows)
                h, t = hidden[chunk].to(dtype), targets[chunk]
                grad = F.linear(h, w, b).float().sub_(lses[chunk, None]).exp_()  # softmax
                grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad.mul_(-grad_out[chunk, None])  # d logp / d logits = onehot - softmax
                _head_grads(grad, h, w, dtype, shape, grad_h[chunk] if need_h else None, grad_w, grad_b)
                del grad
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


def liger_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor
) -> torch.Tensor:
    """Liger-Kernel's fused linear cross-entropy (Triton, CUDA), summed. The head's weight and
    bias gradients are accumulated in fp32 over its chunks (``accum_dtype``, liger-kernel 0.6.2+),
    as :class:`ChunkedHeadLoss` does: in bf16 each chunk's addition would round them to 8 bits."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:  # validate() refuses train.loss=liger without the package; this is the backstop
        raise RuntimeError("train.loss=liger needs the liger-kernel package: pip install 'ftl[liger]'") from e
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum", accum_dtype=torch.float32)(weight, hidden, targets, bias)


def count_label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())  # position 0 is never predicted
