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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn

from launcher.data.types import IGNORE_INDEX


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


def next_token_loss(
    model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, *, autocast: Optional[ContextManager[object]] = None
) -> torch.Tensor:
    """Sum of the next-token cross-entropies over the labelled positions of one batch, in fp32
    whatever the autocast dtype. ``autocast`` wraps the forward pass only."""
    with logits_at_labels(model, labels) as targets, autocast or contextlib.nullcontext():
        logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def count_label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())  # position 0 is never predicted
