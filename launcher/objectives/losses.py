"""The arithmetic of preference objectives, shared by training, evaluation and the reference pass.

A batch holds whole pairs, each as two sequences (chosen, then rejected) with restarting
``position_ids`` (see :mod:`launcher.data.preference`), one or several pairs per row. One forward
pass gives the log-probability of every labelled token (the output layer runs at those positions
only and, where the model allows, chunk by chunk without the fp32 logits, as for SFT:
:func:`launcher.model.loss.next_token_logps`); :func:`sequence_logps` sums them per sequence. The losses follow the papers:

* DPO (Rafailov et al. 2023): ``z = β·((π_c − ref_c) − (π_r − ref_r))`` over summed log-probs,
  loss ``−(1−ε)·log σ(z) − ε·log σ(−z)`` (ε: ``label_smoothing``, the conservative variant);
* IPO (Azar et al. 2023): ``(h − 1/(2β))²`` with ``h`` the same log-ratio difference over
  length-averaged log-probs;
* SimPO (Meng et al. 2024): ``z = β·(π̄_c − π̄_r) − γ`` over length-averaged log-probs, no reference.

Rewards are β times the (averaged, for IPO and SimPO) log-ratios to the reference (SimPO: the
averaged log-probs); accuracy counts chosen above rejected, a tie as one half.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from launcher.data.packing import model_inputs
from launcher.model.loss import next_token_logps, positions_of

STATS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected")


def sequence_ids(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's sequence, numbered across the whole batch in row-major order; -1 on padding.
    A sequence starts where its position restarts at 0."""
    real = attention_mask.bool()
    starts = (position_ids == 0) & real
    ids = torch.cumsum(starts.flatten().long(), 0).view_as(position_ids) - 1
    return torch.where(real, ids, torch.full_like(ids, -1))


def count_sequences(batch: dict[str, torch.Tensor]) -> int:
    return int(((batch["position_ids"] == 0) & batch["attention_mask"].bool()).sum())


def sequence_logps(
    model: Any, batch: dict[str, torch.Tensor], autocast: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the labelled tokens' log-probs, number of labelled tokens) per sequence, float64."""
    positions = positions_of(batch)
    owner = label_owners(batch, positions)
    n = count_sequences(batch)
    # Summed in float64: a sequence's log-prob is a sum of ~100-1000 terms, and a reward is the
    # difference of two such sums.
    token_logps = next_token_logps(
        model, model_inputs(batch), batch["labels"], autocast=autocast, positions=positions
    ).double()
    sums = torch.zeros(n, dtype=torch.float64, device=token_logps.device).index_add(0, owner, token_logps)
    counts = torch.zeros(n, dtype=torch.float64, device=token_logps.device).index_add(
        0, owner, torch.ones_like(token_logps)
    )
    return sums, counts


def label_owners(batch: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """The sequence of each labelled token (at ``positions + 1``: position t predicts label t + 1)."""
    ids = sequence_ids(batch["position_ids"], batch["attention_mask"])
    return ids.flatten().index_select(0, positions + 1)


def label_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labelled tokens per sequence, from the labels alone (what :func:`sequence_logps` counts)."""
    return torch.bincount(label_owners(batch, positions_of(batch)), minlength=count_sequences(batch)).double()


def preference_losses(
    objective: Any, policy: torch.Tensor, counts: torch.Tensor, reference: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) from per-sequence log-prob sums laid out
    chosen, rejected, chosen, rejected, ... (``counts``: labelled tokens per sequence)."""
    pc, pr = policy[0::2], policy[1::2]
    nc, nr = counts[0::2], counts[1::2]
    beta, smoothing = objective.beta, objective.label_smoothing
    if objective.method == "simpo":
        chosen, rejected = beta * pc / nc, beta * pr / nr
        z = chosen - rejected - objective.gamma
        return -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z), chosen, rejected
    assert reference is not None, "DPO needs reference log-probs"
    rc, rr = reference[0::2], reference[1::2]
    if objective.loss == "ipo":
        h = (pc - rc) / nc - (pr - rr) / nr
        return (h - 1 / (2 * beta)) ** 2, beta * (pc - rc) / nc, beta * (pr - rr) / nr
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    z = chosen - rejected
    return -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z), chosen, rejected


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor, policy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the pairs of what is logged as a mean per pair."""
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    values = (chosen, rejected, chosen - rejected, wins, policy[0::2], policy[1::2])
    return {name: value.detach().sum() for name, value in zip(STATS, values)}
