"""Training data: sources of rows → token ids + labels, whatever the row format.

The format-independent half lives here: the sources of a run (``data.sources`` plus the
``train_files`` / ``eval_files`` shorthand), the ``on_error: skip`` policy, carving a held-out
split, truncation, mixing sources by weight, statistics, and padding a batch. Reading files is
:mod:`launcher.data.sources`; packing :mod:`launcher.data.packing`; the on-disk cache and the
barrier ranks wait on :mod:`launcher.data.cache`. A *format* (``chat``, ``instruction``,
``completion``, each in its own module) only parses one row and encodes it; ``FORMATS`` maps a
format name to it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from launcher.config.schema import DataConfig, DataSource
from launcher.data import privacy
from launcher.data.chat import ChatFormat
from launcher.data.completion import CompletionFormat
from launcher.data.instruction import InstructionFormat
from launcher.data.preference import PreferenceFormat
from launcher.data.sources import data_sources
from launcher.data.types import IGNORE_INDEX, DataError, Format, Loaded, Record, RowError, TokenizedDataset
from launcher.progress import phase

FORMATS: dict[str, Callable[[DataConfig, Any], Format]] = {
    "chat": ChatFormat.from_config,
    "instruction": InstructionFormat.from_config,
    "completion": CompletionFormat.from_config,
    "preference": PreferenceFormat.from_config,
}


def collate(batch: list[dict[str, list[int]]], pad_id: int, *, flatten: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Padding is masked by position, never by id: many
    tokenizers pad with their eos token, which is also a trained label. Packed sequences (examples
    with ``position_ids``) go to :func:`launcher.data.packing.collate_packed`, with ``flatten``."""
    if "position_ids" in batch[0]:
        from launcher.data.packing import collate_packed

        return collate_packed(batch, pad_id, flatten=flatten)
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


def load_records(sources: list[tuple[int, DataSource, Format]], on_error: str, privacy: str = "off") -> Loaded:
    """Every row of ``sources`` parsed, scanned for personal data and credentials first
    (``data.privacy``; with ``redact`` the parsed row is the redacted copy)."""
    from launcher.data.privacy import scanner_for
    from launcher.data.sources import is_hub, read_hub_rows, read_rows, source_files

    records: list[Record] = []
    skipped: list[str] = []
    scanner = scanner_for(privacy)
    for index, source, fmt in sources:
        if is_hub(source.path):
            readers = [read_hub_rows(source.path, source.hub_args)]
        else:
            readers = [read_rows(str(f)) for f in source_files(source.path)]
        for rows in readers:
            for row in rows:  # whole-file problems raise here even with on_error=skip
                try:
                    if isinstance(row, DataError):
                        raise row
                    raw = row.value if scanner is None else scanner.scan(row.value, row.path, row.number)
                    value = _call(fmt.parse, raw, row.path, row.number)
                    records.append(Record(row.path, row.number, value, fmt, index))
                except DataError as e:
                    if on_error != "skip":
                        raise
                    skipped.append(str(e))
    return Loaded(records, skipped, [] if scanner is None else scanner.findings)


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
    records: list[Record],
    seq_len: int,
    on_error: str,
    *,
    skipped: Sequence[str] = (),
    truncation: str = "clip",
    split: str = "train",
) -> tuple[TokenizedDataset, list[int]]:
    """Encode each record with its format; returns the dataset and each example's source index.
    ``truncation``: ``clip`` cuts an example to ``seq_len``, ``drop`` leaves it out (both counted).
    ``skipped``: the rows already skipped while reading; with those skipped here, they are the
    stats' ``skipped`` count and ``skipped_rows`` list (each "FILE, row N: why").
    A preference pair is one example of two sequences (``lengths``); see :func:`_encode_pair`."""
    with phase(f"data: tokenizing {split} examples", total=len(records)) as shown:
        return _encode_records(records, seq_len, on_error, skipped, truncation, shown)


def _encode_records(
    records: list[Record], seq_len: int, on_error: str, skipped: Sequence[str], truncation: str, shown: Any
) -> tuple[TokenizedDataset, list[int]]:
    examples: list[dict[str, list[int]]] = []
    kept: list[Any] = []
    source_of: list[int] = []
    skipped_rows = list(skipped)
    stats: dict[str, Any] = {"examples": 0, "skipped": 0, "truncated": 0, "dropped": 0, "tokens": 0}
    stats["trainable_tokens"] = 0
    template = None
    for record in records:
        shown.advance()
        encode = _encode_pair if hasattr(record.fmt, "encode_pair") else _encode_one
        try:
            example, outcomes = encode(record, seq_len, truncation)
        except DataError as e:
            if on_error != "skip":
                raise
            skipped_rows.append(str(e))
            continue
        for outcome in outcomes:
            stats[outcome] = stats.get(outcome, 0) + 1  # "empty" and "identical" only where there are some
        if example is None:
            continue
        examples.append(example)
        kept.append(getattr(record.fmt, "conversation", _same)(record.value))
        source_of.append(record.source)
        stats["tokens"] += len(example["input_ids"])
        stats["trainable_tokens"] += count_trainable(example["labels"])
        template = template or getattr(record.fmt, "chat_template", None)
    stats.update(examples=len(examples), skipped=len(skipped_rows))
    if skipped_rows:
        stats["skipped_rows"] = skipped_rows
    return TokenizedDataset(examples, kept, stats, template), source_of


def skipped_rows_note(path: Path, *datasets: Optional[TokenizedDataset], shown: int = 3) -> Optional[str]:
    """data.on_error=skip: every skipped row with its reason written to ``path`` (the run dir's
    list), and a line naming how many and the first few; None when no row was skipped."""
    rows = [row for ds in datasets if ds is not None for row in ds.stats.get("skipped_rows", ())]
    if not rows:
        return None
    from launcher.files import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)  # as metrics.jsonl's writer: a Trainer run without a launcher
    write_atomic(path, "".join(f"{row}\n" for row in rows))
    more = f"; and {len(rows) - shown} more" if len(rows) > shown else ""
    return f"ftl: data.on_error=skip skipped {len(rows)} row(s): {'; '.join(rows[:shown])}{more}; all in {path}"


def _encode_one(
    record: Record, seq_len: int, truncation: str
) -> tuple[Optional[dict[str, list[int]]], tuple[str, ...]]:
    """(example or None, what happened to it on the way: "truncated" and/or "dropped", or "empty":
    a format's ``is_empty`` row, e.g. a conversation whose answers have no content, is no example)."""
    if getattr(record.fmt, "is_empty", lambda value: False)(record.value):
        return None, ("empty",)
    input_ids, labels = _call(record.fmt.encode, record.value, record.path, record.number)
    outcomes: tuple[str, ...] = ()
    if len(input_ids) > seq_len:
        if truncation == "drop":
            return None, ("dropped",)
        input_ids, labels, outcomes = input_ids[:seq_len], labels[:seq_len], ("truncated",)
    if count_trainable(labels) == 0:  # nothing left to learn from (e.g. the answer was truncated away)
        return None, (*outcomes, "dropped")
    return {"input_ids": input_ids, "labels": labels}, outcomes


def _encode_pair(
    record: Record, seq_len: int, truncation: str
) -> tuple[Optional[dict[str, list[int]]], tuple[str, ...]]:
    """A preference pair as one example: chosen then rejected, ``lengths`` [chosen, rejected]. Both
    must fit in ``seq_len`` together; ``clip`` cuts each to its first seq_len // 2 tokens. A pair
    whose two sequences are the same teaches nothing (its DPO loss is log 2 whatever the weights):
    dropped, counted as "identical"."""
    pair = _call(record.fmt.encode_pair, record.value, record.path, record.number)
    outcomes: tuple[str, ...] = ()
    if sum(len(ids) for ids, _ in pair) > seq_len:
        if truncation == "drop":
            return None, ("dropped",)
        pair, outcomes = tuple((ids[: seq_len // 2], labels[: seq_len // 2]) for ids, labels in pair), ("truncated",)
    if pair[0] == pair[1]:
        return None, (*outcomes, "identical")
    if any(count_trainable(labels) == 0 for _, labels in pair):  # a completion truncated away
        return None, (*outcomes, "dropped")
    (chosen, chosen_labels), (rejected, rejected_labels) = pair
    return {
        "input_ids": chosen + rejected,
        "labels": chosen_labels + rejected_labels,
        "lengths": [len(chosen), len(rejected)],
    }, outcomes


def _same(value: Any) -> Any:
    return value


def count_trainable(labels: Sequence[int]) -> int:
    # A causal LM predicts token t from tokens < t, so a label at position 0 never enters the loss.
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def mix_by_weight(
    dataset: TokenizedDataset, source_of: list[int], weights: dict[int, float], seed: int
) -> TokenizedDataset:
    """Each source's examples repeated ``weight`` times per epoch: whole passes, then a seeded
    subset for the fraction (weight 0.5: a fixed random half). Counts are of the mixed epoch."""
    if all(weights.get(s, 1.0) == 1.0 for s in set(source_of)):
        return dataset
    rng = random.Random(seed)
    picked: list[int] = []
    for source in sorted(set(source_of)):
        members = [i for i, s in enumerate(source_of) if s == source]
        whole, fraction = divmod(weights.get(source, 1.0), 1.0)
        picked += members * int(whole)
        picked += sorted(rng.sample(members, round(fraction * len(members))))
    examples = [dataset.examples[i] for i in picked]
    stats = dict(dataset.stats, examples=len(examples), tokens=sum(len(e["input_ids"]) for e in examples))
    stats["trainable_tokens"] = sum(count_trainable(e["labels"]) for e in examples)
    return TokenizedDataset(examples, [dataset.conversations[i] for i in picked], stats, dataset.chat_template)


def build_formats(data_cfg: DataConfig, tokenizer: Any, sources: list[DataSource]) -> dict[str, Format]:
    """One Format per format name the sources use (built once: template lookup, tokenizer checks)."""
    names = [s.format or data_cfg.format for s in sources]
    unknown = sorted({n for n in names if n not in FORMATS})
    if unknown:
        raise DataError(f"unknown data format {', '.join(map(repr, unknown))}; known: {', '.join(sorted(FORMATS))}")
    return {name: FORMATS[name](data_cfg, tokenizer) for name in dict.fromkeys(names)}


def build_datasets(
    data_cfg: DataConfig, tokenizer: Any, seq_len: int, seed: int
) -> tuple[TokenizedDataset, Optional[TokenizedDataset]]:
    """(train, eval) datasets, unpacked and in memory; eval is None when there is no eval source and
    no eval_fraction. :func:`launcher.data.cache.prepare_datasets` adds packing and the cache."""
    sources = data_sources(data_cfg)
    train_sources = [(i, s) for i, s in enumerate(sources) if s.split == "train"]
    if not train_sources:
        raise DataError("no training data: set data.train_files (JSONL, JSON, Parquet or CSV files) or data.sources")
    formats = build_formats(data_cfg, tokenizer, sources)

    def with_format(pairs: list[tuple[int, DataSource]]) -> list[tuple[int, DataSource, Format]]:
        return [(i, s, formats[s.format or data_cfg.format]) for i, s in pairs]

    train = load_records(with_format(train_sources), data_cfg.on_error, data_cfg.privacy)
    train_records, eval_records = train.records, None
    eval_skipped: list[str] = []
    eval_privacy: list[Any] = []
    eval_sources = [(i, s) for i, s in enumerate(sources) if s.split == "eval"]
    if eval_sources:
        evals = load_records(with_format(eval_sources), data_cfg.on_error, data_cfg.privacy)
        eval_records, eval_skipped, eval_privacy = evals.records, evals.skipped, evals.privacy
    elif data_cfg.eval_fraction > 0:
        # Carved before the max_train_examples cap, so capping never changes the eval set.
        train_records, eval_records = carve_eval_split(train_records, data_cfg.eval_fraction, seed)
    if data_cfg.max_train_examples is not None:
        train_records = train_records[: data_cfg.max_train_examples]
    privacy.check(train.privacy + eval_privacy, data_cfg.privacy)

    encode = dict(seq_len=seq_len, on_error=data_cfg.on_error, truncation=data_cfg.truncation)
    train_ds, source_of = encode_records(train_records, skipped=train.skipped, **encode)
    if len(train_ds) == 0:
        names = ", ".join(s.path for _, s in train_sources)
        why = (
            "every preference pair has chosen identical to rejected; "
            if train_ds.stats.get("identical") == len(train_records)
            else ""
        )
        counts = {k: v for k, v in train_ds.stats.items() if k != "skipped_rows"}
        raise DataError(f"no usable training examples in {names} ({why}stats: {counts})")
    train_ds = mix_by_weight(train_ds, source_of, {i: s.weight for i, s in train_sources}, seed)
    eval_ds = None
    if eval_records is not None:
        eval_ds, _ = encode_records(eval_records, skipped=eval_skipped, split="eval", **encode)
    if data_cfg.privacy != "off":  # kept with the cache, so a reused cache reports them too
        train_ds.stats["privacy"] = privacy.to_stats(train.privacy)
        if eval_ds is not None:
            eval_ds.stats["privacy"] = privacy.to_stats(eval_privacy)
    return train_ds, eval_ds


__all__ = [
    "DataError",
    "FORMATS",
    "IGNORE_INDEX",
    "RowError",
    "TokenizedDataset",
    "build_datasets",
    "data_sources",
    "carve_eval_split",
    "collate",
    "count_trainable",
]
