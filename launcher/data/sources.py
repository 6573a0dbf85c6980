"""Where rows come from: local files and folders (JSONL, JSON, Parquet, CSV), or a hub dataset.

Every reader yields :class:`Row` (a value plus the file and 1-based row it came from) or, for a row
that cannot be read, a :class:`~launcher.data.DataError` naming both, so the caller applies
``on_error``. Problems with a whole file (missing, not a list, unreadable Parquet) raise at once.

Row numbers are what a person looks up: the line in a JSONL or CSV file (CSV: the line the row
ends on), the list index in a JSON file, the row index in a Parquet file or hub split.

Files are opened through :mod:`launcher.safe_read`: a FIFO, device or socket is refused before it
is opened, a file read whole (.json, .csv) or one JSONL row is size-capped, and a row nested too
deeply for Python is a bad row like any other. :func:`check_local_rows` reads and parses every local row
once without a tokenizer, so ``ftl train`` finds unreadable data before it writes or launches anything.
Imports no torch.

Hub datasets (``hub:ORG/NAME``) are a thin, separate path through ``datasets.load_dataset``; they
need the network (or the datasets cache) and are not exercised by the test suite.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from launcher.config.local_paths import HUB_PREFIX, is_hub
from launcher.config.schema import DataConfig, DataSource
from launcher.data.rows import DataError, RowError
from launcher.files import write_atomic
from launcher.safe_read import (
    MAX_DATA_BYTES,
    MAX_ROW_BYTES,
    UnreadableFile,
    decode_utf8,
    file_problem,
    open_regular,
    parse_json,
    read_bytes,
)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class Row:
    path: str
    number: int  # 1-based; see the module docstring
    value: Any


def hub_id(path: str) -> str:
    return path[len(HUB_PREFIX) :]


# --------------------------------------------------------------------------------------------
# local files


def source_files(path: str) -> list[Path]:
    """The data files behind a local source: the file itself, or a folder's files with a known
    suffix (recursively, sorted, hidden ones skipped)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and f.suffix in LOCAL_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise DataError(f"{path}: folder holds no data files ({', '.join(LOCAL_SUFFIXES)})")
        return files
    problem = file_problem(p)
    if problem:
        raise DataError(f"{path}: data file not found" if not p.exists() else problem)
    return [p]


def read_rows(path: str) -> Iterator[Row | DataError]:
    """Rows of one local file, by suffix: .json (one top-level list), .parquet, .csv; anything else
    is read as JSONL."""
    problem = file_problem(path)
    if problem:
        raise DataError(f"{path}: data file not found" if not Path(path).exists() else problem)
    readers = {".json": _read_json_list, ".parquet": _read_parquet, ".csv": _read_csv}
    try:
        yield from readers.get(Path(path).suffix, _read_jsonl)(path)
    except UnreadableFile as e:
        raise DataError(str(e)) from None


def data_sources(data_cfg: DataConfig) -> list[DataSource]:
    """Every source of the run: ``train_files`` and ``eval_files`` (each a source of weight 1 in
    ``data.format``), then ``data.sources``."""
    return (
        [DataSource(path=f) for f in data_cfg.train_files]
        + [DataSource(path=f, split="eval") for f in data_cfg.eval_files]
        + list(data_cfg.sources)
    )


def check_local_rows(data_cfg: DataConfig) -> list[Any]:
    """Read every row of the run's local files and folders as the trainer will, with no tokenizer
    (hub datasets are left to the trainer). Raises DataError for a file that cannot be read and,
    with ``on_error=raise``, for the first row that does not read (bad UTF-8 or JSON, nested too
    deeply, a CSV row of too many cells) or does not parse as its format (chat, instruction,
    completion; a preference row's shape depends on the tokenizer's template and is left to the trainer).
    Scans every row for personal data and credentials (``data.privacy``; a file scanned before
    unchanged is not scanned again): the findings, after raising the refusal with ``refuse``."""
    from launcher.data import privacy
    from launcher.data.chat import parse_conversation
    from launcher.data.completion import parse_text
    from launcher.data.instruction import parse_instruction
    from launcher.paths import cache_dir

    parsers: dict[str, Callable[[Any], Any]] = {
        "chat": parse_conversation,
        "instruction": parse_instruction,
        "completion": lambda row: parse_text(row, data_cfg.text_field),
    }
    findings: list[privacy.Finding] = []
    for source in data_sources(data_cfg):
        if is_hub(source.path):
            continue
        parse = parsers.get(source.format or data_cfg.format)
        for file in source_files(source.path):
            record, known = (
                privacy.remembered(file, file_digest(file, cache_dir() / "data" / "hashes"))
                if data_cfg.privacy != "off"
                else (None, [])
            )
            scanner = privacy.scanner_for(data_cfg.privacy) if known is None else None
            for row in read_rows(str(file)):
                try:
                    if isinstance(row, DataError):
                        raise row
                    if scanner is not None:
                        scanner.scan(row.value, row.path, row.number)
                    if parse is not None:
                        parse(row.value)
                except RowError as e:
                    if data_cfg.on_error != "skip":
                        raise DataError(f"{row.path}, row {row.number}: {e}") from None
                except DataError:
                    if data_cfg.on_error != "skip":
                        raise
            if scanner is not None and record is not None:
                privacy.remember(record, scanner.findings)
            findings += scanner.findings if scanner is not None else known or []
    privacy.check(findings, data_cfg.privacy)
    return findings


def _json_row_error(e: ValueError) -> str:
    return (
        f"invalid JSON ({e.msg} at column {e.colno})" if isinstance(e, json.JSONDecodeError) else f"invalid JSON ({e})"
    )


def _read_jsonl(path: str) -> Iterator[Row | DataError]:
    with open_regular(path) as f:
        number = 0
        while raw := f.readline(MAX_ROW_BYTES + 1):
            number += 1
            if len(raw) > MAX_ROW_BYTES:
                raise DataError(
                    f"{path}, row {number}: longer than {MAX_ROW_BYTES >> 20} MiB, more than ftl reads as one row"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield DataError(f"{path}, row {number}: not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():  # blank lines (a trailing newline, separators) are not rows
                continue
            try:
                yield Row(path, number, parse_json(line))
            except ValueError as e:
                yield DataError(f"{path}, row {number}: {_json_row_error(e)}")


def _read_json_list(path: str) -> Iterator[Row]:
    text = decode_utf8(read_bytes(path, MAX_DATA_BYTES), path)
    try:
        value = parse_json(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:
        raise DataError(f"{path}: {_json_row_error(e)}") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: a .json data file must hold a list of rows, got {type(value).__name__}")
    for number, item in enumerate(value, start=1):
        yield Row(path, number, item)


def _read_parquet(path: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=4096):  # Arrow strings are valid UTF-8 by construction
        for value in batch.to_pylist():
            number += 1
            yield Row(path, number, value)


def _read_csv(path: str) -> Iterator[Row | DataError]:
    """A header line, then one row per record. Bytes that are not UTF-8 are kept as surrogates while
    parsing so one bad row is reported (and skippable) on its own."""
    text = read_bytes(path, MAX_DATA_BYTES).decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for value in reader:
            number = reader.line_num
            if None in value:  # more cells than header names
                yield DataError(f"{path}, row {number}: {len(value[None])} more cell(s) than the header has columns")
                continue
            bad = next((k for k, v in value.items() if _has_surrogates(k) or _has_surrogates(v)), None)
            if bad is not None:
                yield DataError(
                    f"{path}, row {number}: not valid UTF-8 (in column {bad.encode('utf-8', 'replace').decode()!r})"
                )
                continue
            yield Row(path, number, value)
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: invalid CSV ({e})") from None


def _has_surrogates(text: Any) -> bool:
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


# --------------------------------------------------------------------------------------------
# content identity (the cache key)


def file_digest(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file's bytes. With ``memo_dir``, remembered by (path, size, mtime, ctime, inode),
    so a rerun over unchanged files does not read them again."""
    st = path.stat()
    memo = None
    if memo_dir is not None:
        stamp = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}".encode()
        memo = memo_dir / hashlib.sha256(stamp).hexdigest()
        if memo.is_file():
            return memo.read_text().strip()
    digest = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, value)
    return value


# --------------------------------------------------------------------------------------------
# hub datasets (online users; not reachable from the test suite)

_HUB_LOADED: dict[str, Any] = {}


def load_hub_dataset(path: str, hub_args: dict[str, str]) -> Any:
    """``datasets.load_dataset(ORG/NAME, split="train", **hub_args)``, once per process."""
    memo = json.dumps([path, sorted(hub_args.items())])
    if memo not in _HUB_LOADED:
        try:
            from datasets import load_dataset

            _HUB_LOADED[memo] = load_dataset(hub_id(path), **{"split": "train", **hub_args})
        except Exception as e:  # no network, no such dataset or split, a gated dataset
            raise DataError(f"{path}: cannot load the hub dataset ({type(e).__name__}: {e})") from None
    return _HUB_LOADED[memo]


def read_hub_rows(path: str, hub_args: dict[str, str]) -> Iterator[Row]:
    for number, value in enumerate(load_hub_dataset(path, hub_args), start=1):
        yield Row(path, number, value)


def hub_fingerprint(path: str, hub_args: dict[str, str]) -> str:
    """What the datasets library computed from the loaded split's content."""
    dataset = load_hub_dataset(path, hub_args)
    return str(getattr(dataset, "_fingerprint", "")) or f"{path}:{sorted(hub_args.items())}"
