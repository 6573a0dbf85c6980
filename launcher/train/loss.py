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
``train.loss=chunked`` (the default) never makes it: :func:`loss_at_labels` replaces the output
layer's forward for one call with :class:`ChunkedHeadLoss`, which runs the head and the
cross-entropy over :func:`chunk_rows` labelled positions at a time and, while each chunk's logits
exist, makes that chunk's gradients for the hidden states and the head's weight too (the softmax
minus the one-hot target, through the head). Backward only scales them. The loss and gradients
are today's (tested to 1e-5 in fp32), in the same arithmetic: the matmul in the autocast dtype,
logits rounded to it, softmax and loss in fp32. It needs the model's logits to be the head's
output as such (:func:`launcher.model.families.plain_head`): families that scale or softcap them
(Gemma 2/3, Granite) and heads that are not a plain ``nn.Linear`` (a LoRA-adapted head) keep the
logits path. ``train.loss=liger`` uses Liger-Kernel's fused linear cross-entropy instead (CUDA,
``pip install ftl[liger]``), the same idea in Triton kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn

from launcher.data.types import IGNORE_INDEX

# Vocabulary rows of the head's weight gradient accumulated at a time: each block's product and its
# fp32 upcast are temporaries of WEIGHT_GRAD_BLOCK × hidden, not of the whole weight.
WEIGHT_GRAD_BLOCK = 4096


def output_layer(model: nn.Module) -> nn.Module:
    """The model's vocabulary projection (``lm_head``), through DDP/DeepSpeed wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):  # DDP, DeepSpeedEngine
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings) to compute a loss with")
    return head


@contextlib.contextmanager
def logits_at_labels(model: nn.Module, labels: torch.Tensor) -> Iterator[torch.Tensor]:
    """Within the block, ``model``'s forward returns logits only for the positions that predict a
    label (position t predicts labels[t + 1]): shape [n, vocab]. Yields those n labels, in order."""
    keep = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep]

    def select(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        return (hidden[:, :-1][keep], *args[1:])

    handle = output_layer(model).register_forward_pre_hook(select)
    try:
        yield targets
    finally:
        handle.remove()


def chunk_rows(vocab_size: int) -> int:
    """Labelled positions per chunk (:func:`launcher.model.families.loss_chunk_rows`, which the planner reads too)."""
    from launcher.model.families import loss_chunk_rows

    return loss_chunk_rows(vocab_size)


def next_token_loss(
    model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, *, autocast: Optional[ContextManager[object]] = None,
    impl: str = "chunked",
) -> torch.Tensor:  # fmt: skip
    """Sum of the next-token cross-entropies over the labelled positions of one batch, in fp32
    whatever the autocast dtype. ``autocast`` wraps the forward pass only. ``impl``: ``chunked``
    (never the full logits, where the model allows: :func:`fused_head_ok`), ``logits`` (one
    [n_labels, vocab] tensor) or ``liger`` (Liger-Kernel's fused kernel)."""
    if impl != "logits" and fused_head_ok(model):
        with loss_at_labels(model, labels, impl), autocast or contextlib.nullcontext():
            # the head's output as the model returns it: the engines' hooks on it (ZeRO-3 gathers
            # the head's weight again before its backward) hold only on that tensor
            return model(**inputs, use_cache=False).logits
    with logits_at_labels(model, labels) as targets, autocast or contextlib.nullcontext():
        logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits.float(), targets, reduction="sum")


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


@contextlib.contextmanager
def loss_at_labels(model: nn.Module, labels: torch.Tensor, impl: str = "chunked") -> Iterator[None]:
    """Within the block, one forward of ``model`` computes the summed next-token loss inside its
    output layer, which returns it (a 0-d tensor) where the logits would be."""
    keep = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep]
    head = output_layer(model)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden[:, :-1][keep]
        if impl == "liger":
            return liger_loss(hidden, head.weight, head.bias, targets)
        return chunked_head_loss(hidden, head.weight, head.bias, targets)

    head.forward = forward  # the instance's forward: the module's hooks (FSDP, ZeRO-3 gathering) still run around it
    try:
        yield
    finally:
        del head.forward


def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                      rows: Optional[int] = None) -> torch.Tensor:  # fmt: skip
    """Σ cross_entropy(hidden @ weightᵀ + bias, targets), ``rows`` positions at a time (default
    :func:`chunk_rows`), in the autocast dtype where autocast is on (as ``nn.Linear`` would be)."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.result_type(hidden, weight)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return ChunkedHeadLoss.apply(hidden, weight, bias, targets, rows or chunk_rows(weight.shape[0]), dtype, grads)


class ChunkedHeadLoss(torch.autograd.Function):
    """The head and the summed cross-entropy chunk by chunk, gradients made in forward (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                rows: int, dtype: torch.dtype, grads: bool) -> torch.Tensor:  # fmt: skip
        need_h, need_w = grads and hidden.requires_grad, grads and weight.requires_grad
        need_b = grads and bias is not None and bias.requires_grad
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
                if need_b:
                    grad_b += grad.sum(0)
                grad = grad.to(dtype)
                if need_h:
                    grad_h[start : start + rows] = grad @ w
                if need_w:  # in blocks of the vocabulary: a mixed-dtype += makes an fp32 copy of its operand on CPU
                    for v0 in range(0, grad.shape[1], WEIGHT_GRAD_BLOCK):
                        grad_w[v0 : v0 + WEIGHT_GRAD_BLOCK] += grad[:, v0 : v0 + WEIGHT_GRAD_BLOCK].t() @ h
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


def liger_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Liger-Kernel's fused linear cross-entropy (Triton, CUDA), summed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:  # validate() refuses train.loss=liger without the package; this is the backstop
        raise RuntimeError("train.loss=liger needs the liger-kernel package: pip install 'ftl[liger]'") from e
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets, bias)
    return loss[0] if isinstance(loss, tuple) else loss  # versions that can return a z-loss beside it


def count_label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())  # position 0 is never predicted
