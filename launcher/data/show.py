"""`ftl preprocess --show N`: training examples decoded as the model sees them, the tokens the loss
trains on marked, so a user sees what the chat template added (a default system prompt, its turn
markers) and which spans are learned. On a terminal the trained spans are green; in a pipe or a file
they are bracketed, ``[[...]]``, plain text."""

from __future__ import annotations

import itertools
import re
from typing import Any, Iterator

from launcher.data.types import IGNORE_INDEX, TokenizedDataset

PLAIN = ("[[", "]]")
GREEN = ("\x1b[32m", "\x1b[0m")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline: shown escaped


def sequences(example: dict[str, list[int]]) -> Iterator[tuple[list[int], list[int]]]:
    """(token ids, labels) of each sequence in an example: one, the examples of a pack (each starts
    at position 0), or a preference pair's chosen and rejected (``lengths``)."""
    ids, labels = example["input_ids"], example["labels"]
    if "position_ids" in example:
        starts = [i for i, p in enumerate(example["position_ids"]) if p == 0]
    else:
        starts = [0, *itertools.accumulate(example.get("lengths", [len(ids)]))][:-1]
    bounds = [*starts, len(ids)]
    for a, b in zip(bounds, bounds[1:]):
        yield ids[a:b], labels[a:b]


def marked_text(tokenizer: Any, ids: list[int], labels: list[int], mark: tuple[str, str] = PLAIN) -> str:
    """The decoded sequence (special tokens kept: they are what the template added), each run of
    trained tokens (label not ignored) between ``mark``'s two strings."""
    parts = []
    for trained, run in itertools.groupby(zip(ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX):
        text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], tokenizer.decode([i for i, _ in run]))
        parts.append(f"{mark[0]}{text}{mark[1]}" if trained else text)
    return "".join(parts)


def shown_examples(dataset: TokenizedDataset, tokenizer: Any, n: int, *, color: bool = False) -> list[str]:
    """The first ``n`` training sequences of ``dataset`` (in the order the cache holds them), each
    under a header line with its length and trained-token count."""
    mark = GREEN if color else PLAIN
    how = "in green" if color else "between [[ and ]]"
    lines = [f"\nthe first {n} training examples as the model reads them; the tokens it trains on {how}:"]
    found = (seq for example in dataset.examples for seq in sequences(example))
    for number, (ids, labels) in enumerate(itertools.islice(found, n), start=1):
        trained = sum(label != IGNORE_INDEX for label in labels)
        lines += [
            f"--- example {number}: {len(ids)} tokens, {trained} trained ---",
            marked_text(tokenizer, ids, labels, mark),
        ]
    return lines
