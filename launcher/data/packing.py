"""Packing: several examples in one ``train.seq_len`` sequence, with no attention across them.

A pack is its examples' tokens back to back, ``position_ids`` that restart at 0 for each example,
and labels where each example's first position is -100: a causal LM predicts token t from the
logits at t-1, and at an example's first token those logits belong to the previous example.

No 4-D mask is built here. transformers (5.x) derives the boundaries from ``position_ids`` when
the model gets them *without* an ``attention_mask``:

* sdpa / eager (CPU, or GPUs without flash-attn): a block-diagonal causal mask, [batch, L, L];
* flash_attention_2/3: the varlen kernel with ``cu_seqlens`` from the position restarts. That
  path only reads packed sequences from a batch of one row, so :func:`collate_packed` with
  ``flatten=True`` lays a micro-batch out as one row of every pack end to end (no padding at all).

Padding at the end of a row gets positions restarting at 0 too, so it forms its own segment that
nothing else attends to, and its labels are -100. ``attention_mask`` still comes with the batch
(1 on real tokens) for counting; :func:`model_inputs` leaves it out of the forward pass, since a
2-D mask would make transformers ignore the position restarts.

Examples are assigned to packs by best-fit decreasing (each example, longest first, goes to the
open pack it fills most tightly), which leaves well under 1% padding once examples are short next
to ``seq_len``. Packs are built once, at preprocessing; the sampler shuffles packs each epoch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from launcher.data.types import IGNORE_INDEX, TokenizedDataset


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total at most ``capacity`` (best-fit
    decreasing; deterministic: ties go to the lower index and the older bin). Each bin lists
    its indices in ascending order."""
    if any(n > capacity or n < 1 for n in lengths):
        raise ValueError(f"every length must be in [1, {capacity}]")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    spaces: list[int] = []  # sorted distinct free spaces that some open bin has
    open_bins: dict[int, list[int]] = {}  # free space -> bins with exactly that much, oldest first
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(spaces, n)
        if at == len(spaces):
            b = len(bins)
            bins.append([i])
            free = capacity - n
        else:
            space = spaces[at]
            b = open_bins[space].pop(0)
            if not open_bins[space]:
                del open_bins[space]
                spaces.pop(at)
            bins[b].append(i)
            free = space - n
        if free > 0:
            if free not in open_bins:
                open_bins[free] = []
                bisect.insort(spaces, free)
            bisect.insort(open_bins[free], b)
    return [sorted(b) for b in bins]


def position_ids_of(lengths: Sequence[int]) -> list[int]:
    return [p for n in lengths for p in range(n)]


def pack_examples(
    examples: Sequence[dict[str, list[int]]], seq_len: int, *, alone: bool = False
) -> list[dict[str, list[int]]]:
    """Packs of ``examples`` (each at most ``seq_len`` long): ``input_ids``, ``labels`` (-100 at
    each sequence's first position) and ``lengths`` (of the sequences, in order). An example that
    is itself several sequences (a preference pair: ``lengths``) stays whole and in order.
    ``alone``: one example per pack (preference pairs without ``data.packing``)."""
    sizes = [len(e["input_ids"]) for e in examples]
    groups = [[i] for i in range(len(examples))] if alone else pack_lengths(sizes, seq_len)
    packs = []
    for members in groups:
        input_ids: list[int] = []
        labels: list[int] = []
        lengths: list[int] = []
        for i in members:
            parts = examples[i].get("lengths") or [sizes[i]]
            start = 0
            for n in parts:
                input_ids += examples[i]["input_ids"][start : start + n]
                labels += [IGNORE_INDEX] + list(examples[i]["labels"][start + 1 : start + n])
                start += n
            lengths += parts
        packs.append({"input_ids": input_ids, "labels": labels, "lengths": lengths})
    return packs


def packing_efficiency(tokens: int, packs: int, seq_len: int) -> float:
    """Real tokens over the tokens of ``packs`` full sequences: what padding every pack to
    ``seq_len`` would cost (padding a micro-batch to its longest pack costs at most this)."""
    return tokens / (packs * seq_len) if packs else 0.0


def packed_stats(stats: dict[str, Any], packs: Sequence[dict[str, list[int]]], seq_len: int) -> dict[str, Any]:
    """The unpacked counts (tokens and trainable tokens do not change: an example's first label
    never entered the loss) plus the number of packs and the packing efficiency."""
    tokens = sum(len(p["input_ids"]) for p in packs)
    return {
        **stats,
        "packs": len(packs),
        "packing_efficiency": round(packing_efficiency(tokens, len(packs), seq_len), 6),
    }


class PackedExamples(Sequence):
    """Packs as the trainer reads them: ``input_ids``, ``labels``, ``position_ids``."""

    def __init__(self, packs: list[dict[str, list[int]]]) -> None:
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> dict[str, list[int]]:  # type: ignore[override]
        pack = self.packs[index]
        return {
            "input_ids": pack["input_ids"],
            "labels": pack["labels"],
            "position_ids": position_ids_of(pack["lengths"]),
        }


def pack_dataset(dataset: TokenizedDataset, seq_len: int, *, alone: bool = False) -> TokenizedDataset:
    """The training set packed in memory (the cache stores the same packs as Arrow). ``alone`` keeps
    one example per pack, and the conversations evaluation generates from."""
    packs = pack_examples(dataset.examples, seq_len, alone=alone)
    stats = dataset.stats if alone else packed_stats(dataset.stats, packs, seq_len)
    return TokenizedDataset(PackedExamples(packs), dataset.conversations if alone else [], stats, dataset.chat_template)


# --------------------------------------------------------------------------------------------
# batches


def collate_packed(batch: list[dict[str, list[int]]], pad_id: int, *, flatten: bool = False) -> dict[str, torch.Tensor]:
    """Packs → tensors. ``flatten``: one row of every pack end to end (flash-attention's varlen
    path); otherwise one row per pack, right-padded to the longest, padding as its own segment."""
    if flatten:
        batch = [{k: [v for example in batch for v in example[k]] for k in ("input_ids", "labels", "position_ids")}]
    width = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(batch), 1)
    for i, example in enumerate(batch):
        n = len(example["input_ids"])
        input_ids[i, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(example["labels"], dtype=torch.long)
        position_ids[i, :n] = torch.tensor(example["position_ids"], dtype=torch.long)
        position_ids[i, n:] = torch.arange(width - n, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward-pass arguments of a batch: packed batches pass ``position_ids`` and no
    ``attention_mask`` (see the module docstring); padded batches pass the mask."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def flattens_packs(attn_implementation: str) -> bool:
    """Whether packed micro-batches go to the model as one flattened row (flash attention)."""
    return attn_implementation.startswith("flash_attention")
