"""What a held-out set can measure, said before a run: `ftl plan` and `ftl train` warn when its
rows share their answers with training (its loss then measures recall of trained answers, not
generalisation) and when it is too small for its figures to mean anything.

Reads the local files' raw rows (hub datasets are left out), no tokenizer, no torch. A row that does
not read or parse is skipped here: :func:`launcher.data.sources.check_local_rows` reports it.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from launcher.config.schema import DataConfig, DataSource
from launcher.data.rows import DataError, RowError
from launcher.data.sources import Row, data_sources, is_hub, read_rows, source_files

MIN_ROWS = 20  # below this a held-out loss or accuracy moves by whole points from one row


def normalise(text: str) -> str:
    return " ".join(text.split())


def answers(row: Any, fmt: str) -> list[str]:
    """A row's assistant answers (a preference row: its chosen completion), whitespace normalised."""
    from launcher.data.chat import parse_conversation
    from launcher.data.instruction import parse_instruction

    if fmt == "chat":
        messages = parse_conversation(row)
    elif fmt == "instruction":
        messages = parse_instruction(row)
    elif fmt == "preference" and isinstance(row, dict):
        chosen = row.get("chosen")
        messages = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else chosen or []
    else:  # completion: raw text, no answer to compare
        return []
    return [
        normalise(m["content"])
        for m in messages
        if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str)
    ]


def _rows(source: DataSource) -> Iterator[Row]:
    for file in source_files(source.path):
        for row in read_rows(str(file)):
            if isinstance(row, Row):
                yield row


def held_out_notes(data_cfg: DataConfig) -> list[str]:
    """Warnings about the run's held-out set (none when it looks able to measure generalisation)."""
    local = [s for s in data_sources(data_cfg) if not is_hub(s.path)]
    if len(local) < len(data_sources(data_cfg)):
        return []  # a hub dataset's rows are only read by the trainer
    unit = "pairs" if data_cfg.format == "preference" else "rows"
    trained: set[str] = set()
    held_out: list[list[str]] = []
    try:
        for source in local:
            fmt = source.format or data_cfg.format
            for row in _rows(source):
                try:
                    found = answers(row.value, fmt)
                except RowError:
                    continue
                if source.split == "eval":
                    held_out.append(found)
                else:
                    trained.update(found)
    except DataError:
        return []
    n_train = None
    if not held_out and data_cfg.eval_fraction > 0:  # carved from the training rows by the trainer
        n_train = sum(1 for s in local for _ in _rows(s))
        n_held = min(max(1, math.ceil(data_cfg.eval_fraction * n_train)), n_train - 1)  # build.carve_eval_split
    else:
        n_held = len(held_out)
    notes = []
    if 0 < n_held < MIN_ROWS:
        where = f" ({data_cfg.eval_fraction:g} of {n_train})" if n_train is not None else ""
        notes.append(
            f"warning: the held-out set has {n_held} {unit}{where}: too few for its loss or accuracy to mean much "
            f"(one {unit[:-1]} moves it by {100 / n_held:.0f}%); hold out {MIN_ROWS} or more"
        )
    shared = sum(1 for found in held_out if found and any(a in trained for a in found))
    if shared:
        notes.append(
            f"warning: {shared} of {len(held_out)} held-out {unit} ({shared / len(held_out):.0%}) have an answer "
            "that training also shows word for word (whitespace aside): their eval loss measures recall of "
            "trained answers, not how the model answers questions it has not seen"
        )
    return notes
