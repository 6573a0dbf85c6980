"""The types every part of the data pipeline shares: a format's contract, a tokenized dataset, a
parsed row, and the errors that name the file and row (defined in :mod:`launcher.data.rows`).
Formats, packing, the cache and the trainer import these; nothing here imports them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Protocol

from torch.utils.data import Dataset

from launcher.data.rows import IGNORE_INDEX, DataError, RowError

__all__ = ["DataError", "RowError", "IGNORE_INDEX", "Format", "TokenizedDataset", "Record", "Loaded"]


class Format(Protocol):
    """One data format: parse a raw row, then encode the parsed record to (input_ids, labels).

    Optional: ``chat_template`` (the Jinja text it renders with, kept for generation at eval) and
    ``conversation(record)`` (the messages evaluation generates from; default: the record itself,
    which for chat and instruction is already a message list)."""

    def parse(self, row: Any) -> Any:
        """Validate and normalise one row; raise RowError saying what is wrong."""
        ...

    def encode(self, record: Any) -> tuple[list[int], list[int]]:
        """Token ids and labels (IGNORE_INDEX where no loss), same length, before truncation."""
        ...


@dataclass
class TokenizedDataset(Dataset):
    """Encoded examples, the source records they came from (for generation-based eval), and
    counts of what happened on the way."""

    examples: Sequence[dict[str, list[int]]]  # a list, or a view of cached Arrow columns
    conversations: list[Any]  # each example's messages (for generation); empty for cached training data
    stats: dict[str, Any] = field(default_factory=dict)
    chat_template: Optional[str] = None  # the template the examples were rendered with, if any

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        return iter(self.examples)


@dataclass
class Record:
    """A parsed row, where it came from (so errors found while encoding can name it too), the
    format that encodes it and the index of its source in :func:`data_sources`."""

    path: str
    number: int
    value: Any
    fmt: Format
    source: int = 0


@dataclass
class Loaded:
    records: list[Record]
    skipped: list[str]  # data.on_error=skip: each skipped row's error ("FILE, row N: why")
    privacy: list[Any] = field(default_factory=list)  # launcher.data.privacy.Finding: what the scan found
