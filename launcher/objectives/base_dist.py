"""The base model's next-token distributions, and the KL of the tuned model's to them.

Two consumers: the retain set's drift (:mod:`launcher.train.retain`) and the anchored SFT objective
(``objective.kl_to_base``). Both compare, at every position that predicts a label, the base's
next-token distribution p with the tuned model's q, in the forward direction KL(p || q) = Σ p log(p/q)
("RL's Razor", arXiv 2509.04259: forgetting tracks this KL). The base is had in one of two ways,
chosen as the DPO reference is (:func:`launcher.objectives.preference.reference_mode`):

* ``adapters_off`` (LoRA/QLoRA): the same model with its adapters switched off gives p over the whole
  vocabulary, live; :func:`kl_full` is the exact KL.
* ``precomputed`` (full fine-tuning): one pass with the starting model before the first step keeps,
  per labelled position, the base's top-k log-probs, their token ids and the label's log-prob
  (:func:`summarize`: one float64 row of 2k + 1 values; ids are exact in float64). :func:`kl_topk`
  then lumps the tail: the k tokens and one "other" outcome holding the rest of the mass,
  ``Σ_{i≤k} p_i log(p_i/q_i) + p_rest log(p_rest/q_rest)`` with ``p_rest = 1 − Σ_{i≤k} p_i`` and
  ``q_rest = 1 − Σ_{i≤k} q_i``. That is the exact KL of the two distributions coarsened to k + 1
  outcomes, so never above the full KL (coarsening loses information) and equal to it when k covers
  the vocabulary or the base puts no mass outside its top k.

The precomputed rows are stored like the DPO reference (:class:`launcher.objectives.reference.ReferenceLogps`:
one row per labelled position, examples in dataset order, offsets per example), computed on each
rank's share of the batches and summed over the ranks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from launcher.data.build import collate, count_trainable
from launcher.data.packing import model_inputs
from launcher.eval.metrics import eval_mode, rank_batches
from launcher.model.loss import logits_at_labels, positions_of
from launcher.runtime.distributed import all_reduce_sum


def label_logprobs(
    model: Any, batch: dict[str, torch.Tensor], autocast: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-softmax of the logits at each labelled position, fp32 [n, vocab]; the n labels), in the
    order of :func:`launcher.model.loss.label_positions`."""
    with logits_at_labels(model, batch["labels"], positions_of(batch)) as targets, autocast or contextlib.nullcontext():
        logits = model(**model_inputs(batch), use_cache=False).logits
    return F.log_softmax(logits.float(), dim=-1), targets


def summarize(logp: torch.Tensor, targets: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per position: the top-k log-probs, their token ids, the label's log-prob ([n, 2k + 1], float64)."""
    values, ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    label = logp.gather(-1, targets[:, None])
    return torch.cat([values.double(), ids.double(), label.double()], dim=-1)


def base_loss_terms(rows: torch.Tensor) -> torch.Tensor:
    """Each position's next-token loss under the base, from :func:`summarize`'s rows."""
    return -rows[:, -1]


def kl_topk(rows: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(base || tuned) per position over the base's top k and the lumped rest (float64, [n]);
    ``rows`` from :func:`summarize`, ``logq`` the tuned model's log-softmax [n, vocab]. Differentiable in ``logq``."""
    k = (rows.shape[1] - 1) // 2
    logp, ids = rows[:, :k], rows[:, k : 2 * k].long()
    logq_k = logq.gather(-1, ids).double()
    head = (logp.exp() * (logp - logq_k)).sum(-1)
    tiny = torch.finfo(torch.float64).tiny
    p_rest = (1 - logp.exp().sum(-1)).clamp_min(0)
    q_rest = (1 - logq_k.exp().sum(-1)).clamp_min(tiny)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(tiny).log() - q_rest.log()), torch.zeros_like(p_rest))
    return head + rest


def kl_full(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(base || tuned) per position over the whole vocabulary (float64, [n])."""
    return (logp.exp().double() * (logp.double() - logq.double())).sum(-1)


def base_logprobs(engine: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """adapters_off: the base's log-softmax at the labelled positions, the adapters switched off."""
    with torch.no_grad(), engine.peft_model.disable_adapter():
        return label_logprobs(engine.peft_model, batch, engine.autocast())[0]


def positions_per_example(dataset: Any) -> list[int]:
    return [count_trainable(example["labels"]) for example in dataset]


def base_pass(
    model: Any,
    dataset: Any,
    *,
    top_k: int,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast: Any = None,
    flatten: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, list[int]]:
    """:func:`summarize`'s rows of every labelled position of ``dataset`` (one example after another)
    and each example's first row, with the model as it is now: this rank's share of the batches
    (the same number of forward passes on every rank), summed over the ranks."""
    offsets = np.concatenate([[0], np.cumsum(positions_per_example(dataset))]).astype(int).tolist()
    vocab = None
    rows: Optional[torch.Tensor] = None
    with eval_mode(model):
        for indices in rank_batches(len(dataset), batch_size, rank, world_size):
            chosen = list(indices) if indices is not None else [0]  # a short rank keeps step with a repeat
            batch = collate([dataset[i] for i in chosen], pad_id, flatten=flatten)
            logp, targets = label_logprobs(model, {k: v.to(device) for k, v in batch.items()}, autocast)
            vocab = logp.shape[-1]
            if rows is None:
                rows = torch.zeros(offsets[-1], 2 * min(top_k, vocab) + 1, dtype=torch.float64, device=device)
            if indices is not None:
                rows[offsets[chosen[0]] : offsets[chosen[-1] + 1]] = summarize(logp, targets, top_k)
    assert rows is not None, "an empty dataset"
    return all_reduce_sum(rows).cpu(), offsets
