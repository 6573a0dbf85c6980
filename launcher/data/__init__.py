"""Training data: files of rows → token ids + labels, whatever the row format.

The format-independent half lives here: reading JSONL/JSON files with errors that name the file
and row, the ``on_error: skip`` policy, carving a held-out split, truncation, statistics, and
padding a batch. A *format* (``chat`` in :mod:`launcher.data.chat`; instruction and completion
to come) only parses one row and encodes it; ``FORMATS`` maps ``data.format`` to it.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from torch.utils.data import Dataset

from launcher.config.schema import DataConfig

IGNORE_INDEX = -100  # the label torch's cross-entropy (and HF models) skip


class DataError(ValueError):
    """Unusable training data; the message names the file and, where there is one, the 1-based row."""


class RowError(ValueError):
    """Raised by a format for one bad row; the reader adds the file and row and applies `on_error`."""


class Format(Protocol):
    """One data format: parse a raw row, then encode the parsed record to (input_ids, labels)."""

    def parse(self, row: Any) -> Any:
        """Validate and normalise one row; raise RowError saying what is wrong."""
        ...

    def encode(self, record: Any) -> tuple[list[int], list[int]]:
        """Token ids and labels (IGNORE_INDEX where no loss), same length, before truncation."""
        ...


def _build_chat_format(data_cfg: DataConfig, tokenizer: Any) -> Format:
    # Imported here because launcher.data.chat imports RowError/DataError from this module.
    from launcher.data.chat import ChatFormat

    return ChatFormat.from_config(data_cfg, tokenizer)


FORMATS: dict[str, Callable[[DataConfig, Any], Format]] = {"chat": _build_chat_format}


# --------------------------------------------------------------------------------------------
# the dataset


@dataclass
class TokenizedDataset(Dataset):
    """Encoded examples, the source records they came from (for generation-based eval), and
    counts of what happened on the way."""

    examples: list[dict[str, list[int]]]
    conversations: list[Any]  # the parsed source record of each example, same order
    stats: dict[str, int] = field(default_factory=dict)
    chat_template: Optional[str] = None  # the template the examples were rendered with, if any

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        return iter(self.examples)


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Padding is masked by position, never by id: many
    tokenizers pad with their eos token, which is also a trained label."""
    width = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, example in enumerate(batch):
        n = len(example["input_ids"])
        input_ids[i, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# --------------------------------------------------------------------------------------------
# reading files


@dataclass
class Row:
    path: str
    number: int  # 1-based: the line in a JSONL file, the list index in a JSON file
    value: Any


def read_rows(path: str) -> Iterator[Row | DataError]:
    """Yield each row of a JSONL file (``.json``: one top-level list), or a DataError for a row that
    cannot be read, so the caller decides whether to raise or skip. Whole-file problems raise."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: data file not found")
    if file.suffix == ".json":
        yield from _read_json_list(path, file.read_bytes())
        return
    with file.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield DataError(f"{path}, row {number}: not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():  # blank lines (a trailing newline, separators) are not rows
                continue
            try:
                yield Row(path, number, json.loads(line))
            except json.JSONDecodeError as e:
                yield DataError(f"{path}, row {number}: invalid JSON ({e.msg} at column {e.colno})")


def _read_json_list(path: str, data: bytes) -> Iterator[Row]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 ({e.reason})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: a .json data file must hold a list of rows, got {type(value).__name__}")
    for number, item in enumerate(value, start=1):
        yield Row(path, number, item)


@dataclass
class Record:
    """A parsed row and where it came from, so errors found while encoding can name it too."""

    path: str
    number: int
    value: Any


@dataclass
class Loaded:
    records: list[Record]
    skipped: int


def load_records(paths: list[str], fmt: Format, on_error: str) -> Loaded:
    records: list[Record] = []
    skipped = 0
    for path in paths:
        for row in read_rows(path):  # whole-file problems raise here even with on_error=skip
            try:
                records.append(_parse(fmt, row))
            except DataError:
                if on_error != "skip":
                    raise
                skipped += 1
    return Loaded(records, skipped)


def _parse(fmt: Format, row: Row | DataError) -> Record:
    if isinstance(row, DataError):
        raise row
    return Record(row.path, row.number, _call(fmt.parse, row.value, row.path, row.number))


def _call(fn: Callable[[Any], Any], value: Any, path: str, number: int) -> Any:
    try:
        return fn(value)
    except RowError as e:
        raise DataError(f"{path}, row {number}: {e}") from None


# --------------------------------------------------------------------------------------------
# splitting and encoding


def carve_eval_split(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out ``fraction`` of the records (at least one, never all), chosen by ``seed``; both
    parts keep file order so the split is reproducible and readable."""
    if len(records) < 2:
        raise DataError(f"eval_fraction={fraction} needs at least 2 training rows, found {len(records)}")
    n_eval = min(max(1, math.ceil(fraction * len(records))), len(records) - 1)
    held_out = set(random.Random(seed).sample(range(len(records)), n_eval))
    train = [r for i, r in enumerate(records) if i not in held_out]
    evals = [r for i, r in enumerate(records) if i in held_out]
    return train, evals


def encode_records(
    records: list[Record], fmt: Format, seq_len: int, on_error: str, *, skipped: int = 0
) -> TokenizedDataset:
    examples: list[dict[str, list[int]]] = []
    kept: list[Any] = []
    stats = {"examples": 0, "skipped": skipped, "truncated": 0, "dropped": 0, "tokens": 0, "trainable_tokens": 0}
    for record in records:
        try:
            input_ids, labels = _call(fmt.encode, record.value, record.path, record.number)
        except DataError:
            if on_error != "skip":
                raise
            stats["skipped"] += 1
            continue
        if len(input_ids) > seq_len:
            input_ids, labels = input_ids[:seq_len], labels[:seq_len]
            stats["truncated"] += 1
        trainable = count_trainable(labels)
        if trainable == 0:  # nothing left to learn from (e.g. the answer was truncated away)
            stats["dropped"] += 1
            continue
        examples.append({"input_ids": input_ids, "labels": labels})
        kept.append(record.value)
        stats["tokens"] += len(input_ids)
        stats["trainable_tokens"] += trainable
    stats["examples"] = len(examples)
    return TokenizedDataset(examples, kept, stats, getattr(fmt, "chat_template", None))


def count_trainable(labels: list[int]) -> int:
    # A causal LM predicts token t from tokens < t, so a label at position 0 never enters the loss.
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def build_datasets(
    data_cfg: DataConfig, tokenizer: Any, seq_len: int, seed: int
) -> tuple[TokenizedDataset, Optional[TokenizedDataset]]:
    """(train, eval) datasets; eval is None when there are no eval files and no eval_fraction."""
    if data_cfg.format not in FORMATS:
        raise DataError(f"unknown data format {data_cfg.format!r}; known: {', '.join(sorted(FORMATS))}")
    if not data_cfg.train_files:
        raise DataError("data.train_files is empty: list at least one JSONL file")
    fmt = FORMATS[data_cfg.format](data_cfg, tokenizer)

    train = load_records(list(data_cfg.train_files), fmt, data_cfg.on_error)
    train_records, eval_records = train.records, None
    eval_skipped = 0
    if data_cfg.eval_files:
        evals = load_records(list(data_cfg.eval_files), fmt, data_cfg.on_error)
        eval_records, eval_skipped = evals.records, evals.skipped
    elif data_cfg.eval_fraction > 0:
        # Carved before the max_train_examples cap, so capping never changes the eval set.
        train_records, eval_records = carve_eval_split(train_records, data_cfg.eval_fraction, seed)
    if data_cfg.max_train_examples is not None:
        train_records = train_records[: data_cfg.max_train_examples]

    train_ds = encode_records(train_records, fmt, seq_len, data_cfg.on_error, skipped=train.skipped)
    if len(train_ds) == 0:
        raise DataError(f"no usable training examples in {', '.join(data_cfg.train_files)} (stats: {train_ds.stats})")
    eval_ds = None
    if eval_records is not None:
        eval_ds = encode_records(eval_records, fmt, seq_len, data_cfg.on_error, skipped=eval_skipped)
    return train_ds, eval_ds


__all__ = [
    "DataError",
    "FORMATS",
    "IGNORE_INDEX",
    "RowError",
    "TokenizedDataset",
    "build_datasets",
    "carve_eval_split",
    "collate",
    "count_trainable",
]
