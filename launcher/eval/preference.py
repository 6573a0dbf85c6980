"""Preference metrics on held-out pairs: the objective's loss, the rewards of the chosen and the
rejected answers, their margin and how often chosen wins (a tie counts one half), the summed
log-probs, and ``logp_accuracy``: how often the model alone finds the chosen answer more likely
per token (meaningful before training too, when every reward is 0).

Shared among ranks like perplexity: each rank its batches (the same number of forward passes on
every rank), ``reduce_fn`` sums the totals."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from launcher.data.build import collate
from launcher.eval.metrics import eval_mode, rank_batches
from launcher.objectives.losses import STATS, label_counts, pair_stats, preference_losses, sequence_logps
from launcher.progress import phase

Reference = Callable[[dict[str, torch.Tensor]], Optional[torch.Tensor]]


def preference_metrics(
    model: Any,
    dataset: Any,
    objective: Any,
    reference: Reference,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device | str,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    max_batches: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    flatten: bool = False,
) -> dict[str, float]:
    """``reference(batch)``: per-sequence reference log-prob sums (None for SimPO)."""
    device = torch.device(device)
    totals = torch.zeros(len(STATS) + 3, dtype=torch.float64, device=device)
    batches = rank_batches(len(dataset), batch_size, rank, world_size, max_batches)
    with eval_mode(model), phase("eval: preference pairs", total=len(batches), unit="batch") as shown:
        for indices in batches:
            chosen = list(indices) if indices is not None else [0]  # a short rank keeps step with a repeat
            batch = {k: v.to(device) for k, v in collate([dataset[i] for i in chosen], pad_id, flatten=flatten).items()}
            batch["index"] = torch.tensor(chosen)
            policy, counts = sequence_logps(model, batch, autocast())
            losses, good, bad = preference_losses(objective, policy, counts, reference(batch))
            shown.advance()
            if indices is None:
                continue
            per_token = policy / label_counts(batch)
            prefers = (per_token[0::2] > per_token[1::2]).double().sum()
            pairs = torch.tensor(float(len(losses)), dtype=torch.float64, device=device)
            totals += torch.stack(
                [losses.sum().double(), *(v.double() for v in pair_stats(good, bad, policy).values()), prefers, pairs]
            )
    totals = reduce_fn(totals)
    pairs = float(totals[-1])
    if pairs == 0:
        raise ValueError("the eval split has no preference pairs")
    out = {"loss": float(totals[0]) / pairs, **{name: float(totals[1 + i]) / pairs for i, name in enumerate(STATS)}}
    out["logp_accuracy"] = float(totals[-2]) / pairs
    out["pairs"] = int(pairs)
    return out
