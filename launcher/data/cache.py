"""Preprocess once: tokenized (and packed) data cached as Arrow, shared by ranks and runs.

``prepare_datasets`` is what the trainer calls. The datasets live in ``$FTL_CACHE/data/<key>/``
(``train.arrow``, ``eval.arrow``, ``meta.json``, and a ``COMPLETE`` marker written last), where
the key hashes everything the bytes depend on: the content of every data file (not its path; with
``data.on_error=skip`` the paths too, as the skipped rows the cache lists are named by them),
each source's format, weight and split, the tokenizer (its full serialisation and special
tokens), the chat template each format renders with, ``seq_len``, packing, truncation, masking,
error policy, ``data.privacy`` and, where they matter, the eval carve-out and the seed. Change any of them and the
key changes, so a stale cache is never read; the same inputs in another run reuse it.

Who builds. One rank per node (LOCAL_RANK 0), or one per job (RANK 0) with
``data.cache_shared=true`` when the cache sits on a filesystem every node sees. The others wait
on the filesystem, not on a collective: a process-group timeout sized for training steps would
kill ranks during a half-hour tokenization. The barrier:

* the builder takes ``<key>.lock`` (``O_CREAT | O_EXCL``; holds host, pid; mtime refreshed by a
  heartbeat thread), builds into a temp dir, writes ``COMPLETE`` and renames the dir into place,
  so ``<key>/COMPLETE`` existing means the whole dataset is there;
* two builders racing (two jobs, or ``ftl preprocess`` beside a run) serialise on the lock, and
  the second finds the first's result; a lock whose holder died (same host and pid gone, or no
  heartbeat for ``STALE_LOCK_S``) is broken;
* waiters poll for ``COMPLETE`` up to ``data.prepare_timeout_s``; a build that fails writes
  ``<key>.failed`` with its error, which waiters raise at once (a data error stays exit 2).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.config.schema import DataConfig
from launcher.data.build import build_datasets, build_formats, data_sources
from launcher.data.types import DataError, TokenizedDataset
from launcher.paths import cache_dir

CACHE_VERSION = 2  # bump when the cached layout or what the code writes into it changes
COMPLETE = "COMPLETE"
STALE_LOCK_S = 120.0  # a lock without a heartbeat for this long belongs to a dead process
HEARTBEAT_S = 10.0
FAILED_GRACE_S = 300.0  # a failure marker this much older than a waiter's start is from an old run
POLL_S = 1.0


def cache_root() -> Path:
    return cache_dir() / "data"


@dataclass
class Prepared:
    train: TokenizedDataset
    eval: Optional[TokenizedDataset]
    directory: Optional[Path]  # None with data.cache=false
    built: bool  # this process built it (False: reused, or built by another rank)
    seconds: float


def prepare_datasets(
    data_cfg: DataConfig, tokenizer: Any, seq_len: int, seed: int, dist: Any = None
) -> tuple[TokenizedDataset, Optional[TokenizedDataset]]:
    """(train, eval) for the trainer: from the cache, built first by one rank if needed (``dist``:
    a :class:`launcher.runtime.distributed.DistInfo`; None for a single process). Train is packed with
    ``data.packing``; eval never is (generation needs the conversations one by one)."""
    prepared = prepare(data_cfg, tokenizer, seq_len, seed, dist)
    return prepared.train, prepared.eval


def prepare(data_cfg: DataConfig, tokenizer: Any, seq_len: int, seed: int, dist: Any = None) -> Prepared:
    start = time.perf_counter()
    if not data_cfg.cache:
        train, evals = build_in_memory(data_cfg, tokenizer, seq_len, seed)
        return Prepared(train, evals, None, True, time.perf_counter() - start)
    key, material = cache_key(data_cfg, tokenizer, seq_len, seed)
    directory = cache_root() / key
    built = build_once(
        directory,
        lambda tmp: write_datasets(tmp, *build_in_memory(data_cfg, tokenizer, seq_len, seed), material),
        is_builder=is_builder(data_cfg, dist),
        timeout_s=data_cfg.prepare_timeout_s,
    )
    train, evals = read_datasets(directory)
    return Prepared(train, evals, directory, built, time.perf_counter() - start)


def is_builder(data_cfg: DataConfig, dist: Any) -> bool:
    if dist is None:
        return True
    return dist.rank == 0 if data_cfg.cache_shared else dist.local_rank == 0


def build_in_memory(
    data_cfg: DataConfig, tokenizer: Any, seq_len: int, seed: int
) -> tuple[TokenizedDataset, Optional[TokenizedDataset]]:
    from launcher.data.packing import pack_dataset

    train, evals = build_datasets(data_cfg, tokenizer, seq_len, seed)
    if pairs_of(data_cfg):  # a pair is two sequences: always laid out as a pack, packed together on request
        evals = None if evals is None else pack_dataset(evals, seq_len, alone=True)
        return pack_dataset(train, seq_len, alone=not data_cfg.packing), evals
    return (pack_dataset(train, seq_len) if data_cfg.packing else train), evals


def pairs_of(data_cfg: DataConfig) -> bool:
    """Whether the run's data are preference pairs."""
    return data_cfg.format == "preference" or any(s.format == "preference" for s in data_cfg.sources)


# --------------------------------------------------------------------------------------------
# the key


def cache_key(data_cfg: DataConfig, tokenizer: Any, seq_len: int, seed: int) -> tuple[str, dict[str, Any]]:
    """(key, what it hashes). Builds the formats, so a missing template fails here, on every rank."""
    from launcher.data.sources import file_digest, hub_fingerprint, is_hub, source_files

    sources = data_sources(data_cfg)
    formats = build_formats(data_cfg, tokenizer, sources)
    memo = cache_root() / "hashes"

    def content(path: str, hub_args: dict[str, str]) -> Any:
        if is_hub(path):
            return {"hub": path, "args": sorted(hub_args.items()), "fingerprint": hub_fingerprint(path, hub_args)}
        return [file_digest(f, memo) for f in source_files(path)]

    has_eval = any(s.split == "eval" for s in sources)
    carves = data_cfg.eval_fraction > 0 and not has_eval
    samples = any(s.weight != int(s.weight) for s in sources if s.split == "train")
    material = {
        "version": CACHE_VERSION,
        "sources": [
            {
                "split": s.split,
                "format": s.format or data_cfg.format,
                "weight": s.weight,
                "content": content(s.path, s.hub_args),
            }
            for s in sources
        ],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "templates": {name: getattr(fmt, "chat_template", None) for name, fmt in sorted(formats.items())},
        "text_field": data_cfg.text_field if "completion" in formats else None,
        "seq_len": seq_len,
        "packing": data_cfg.packing,
        "truncation": data_cfg.truncation,
        "assistant_only_loss": data_cfg.assistant_only_loss,
        "on_error": data_cfg.on_error,
        "privacy": data_cfg.privacy,  # redact changes the tokens; every mode but off keeps its findings in the stats
        "eval_fraction": data_cfg.eval_fraction if carves else 0.0,
        "max_train_examples": data_cfg.max_train_examples,
        "seed": seed if carves or samples else None,
    }
    if data_cfg.on_error == "skip":  # stats["skipped_rows"] name each row's file
        material["paths"] = [s.path for s in sources]
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]
    return key, material


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Everything about a tokenizer that changes token ids: a fast tokenizer's full serialisation
    (vocab, merges, normalizer, pre-tokenizer, added tokens), else its vocab; its class; bos/eos."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token]).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Arrow on disk


def write_datasets(
    directory: Path, train: TokenizedDataset, evals: Optional[TokenizedDataset], material: dict[str, Any]
) -> None:
    from launcher.data.packing import PackedExamples

    def rows_and_columns(ds: TokenizedDataset) -> tuple[list[dict[str, list[int]]], tuple[str, ...]]:
        if isinstance(ds.examples, PackedExamples):
            return ds.examples.packs, ("input_ids", "labels", "lengths")
        return list(ds.examples), ("input_ids", "labels")

    packed = isinstance(train.examples, PackedExamples)
    _write_table(directory / "train.arrow", *rows_and_columns(train))
    if evals is not None:
        _write_table(directory / "eval.arrow", *rows_and_columns(evals), evals.conversations)
    meta = {
        "material": material,
        "packed": packed,
        "train": {"stats": train.stats, "chat_template": train.chat_template},
        "eval": None if evals is None else {"stats": evals.stats, "chat_template": evals.chat_template},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def _write_table(
    path: Path,
    rows: Sequence[dict[str, list[int]]],
    columns: tuple[str, ...],
    conversations: Optional[list[Any]] = None,
) -> None:
    import pyarrow as pa

    data = {name: pa.array([row[name] for row in rows], type=pa.large_list(pa.int32())) for name in columns}
    if conversations is not None:
        data["conversation"] = pa.array(
            [json.dumps(c, ensure_ascii=False) for c in conversations], type=pa.large_string()
        )
    table = pa.table(data)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_datasets(directory: Path) -> tuple[TokenizedDataset, Optional[TokenizedDataset]]:
    meta = json.loads((directory / "meta.json").read_text())
    train = TokenizedDataset(
        ArrowExamples(directory / "train.arrow"), [], meta["train"]["stats"], meta["train"]["chat_template"]
    )
    evals = None
    if meta["eval"] is not None:
        examples = ArrowExamples(directory / "eval.arrow")
        conversations = [json.loads(c) for c in examples.table.column("conversation").to_pylist()]
        evals = TokenizedDataset(examples, conversations, meta["eval"]["stats"], meta["eval"]["chat_template"])
    return train, evals


class ArrowExamples(Sequence):
    """Examples (or packs, which also give ``position_ids``) read from a memory-mapped Arrow file:
    nothing is copied until an example is asked for."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        self.table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        self._columns = {
            name: _offsets_and_values(self.table.column(name))
            for name in ("input_ids", "labels", "lengths")
            if name in self.table.column_names
        }
        self.packed = "lengths" in self._columns

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> dict[str, list[int]]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        row = {
            name: values[offsets[index] : offsets[index + 1]].tolist()
            for name, (offsets, values) in self._columns.items()
        }
        if self.packed:
            from launcher.data.packing import position_ids_of

            row["position_ids"] = position_ids_of(row.pop("lengths"))
        return row


def _offsets_and_values(column: Any) -> tuple[Any, Any]:
    array = column.combine_chunks()
    return _numpy_view(array.offsets, "int64"), _numpy_view(array.values, "int32")


def _numpy_view(array: Any, dtype: str) -> Any:
    """A null-free Arrow array of fixed-width integers as a numpy view of its buffer. pyarrow's own
    ``to_numpy`` imports pandas on first use: ~0.5 s of every rank's start."""
    import numpy as np

    if array.null_count or array.type.bit_width != 8 * np.dtype(dtype).itemsize:  # not what _write_table writes
        return array.to_numpy()
    return np.frombuffer(array.buffers()[1], dtype=dtype)[array.offset : array.offset + len(array)]


# --------------------------------------------------------------------------------------------
# the file barrier


def build_once(
    directory: Path,
    build: Callable[[Path], None],
    *,
    is_builder: bool,
    timeout_s: float,
    poll_s: Optional[float] = None,
) -> bool:
    """Make ``directory`` exist complete. A builder takes the lock and runs ``build(tmp_dir)`` unless
    someone finished first; a waiter only waits. True when this call built it."""
    marker = directory / COMPLETE
    if marker.is_file():
        return False
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory.with_name(directory.name + ".lock"))
    failed = directory.with_name(directory.name + ".failed")
    started = time.time()
    while True:
        if marker.is_file():
            return False
        if is_builder and lock.acquire():
            try:
                if marker.is_file():
                    return False
                failed.unlink(missing_ok=True)
                for leftover in directory.parent.glob(
                    f".{directory.name}.tmp-*"
                ):  # a killed builder's; we hold the lock
                    shutil.rmtree(leftover, ignore_errors=True)
                _build_atomically(directory, build, failed)
                return True
            finally:
                lock.release()
        if is_builder and lock.is_stale():
            lock.break_stale()
            continue
        _raise_if_failed(failed, started)
        if time.time() - started > timeout_s:
            raise TimeoutError(
                f"waited {timeout_s:.0f}s for the data cache {directory} ({lock.describe_owner()}); "
                f"raise data.prepare_timeout_s, or run `ftl preprocess` with the same overrides first"
            )
        time.sleep(POLL_S if poll_s is None else poll_s)


def _build_atomically(directory: Path, build: Callable[[Path], None], failed: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        build(tmp)
        (tmp / COMPLETE).write_text(f"built by {socket.gethostname()} pid {os.getpid()}\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
        if directory.exists():  # a leftover without its marker (we hold the lock)
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, KeyboardInterrupt):
            kind = "data" if isinstance(e, DataError) else type(e).__name__
            failed.write_text(json.dumps({"kind": kind, "message": str(e)}))
        raise


def _raise_if_failed(failed: Path, started: float) -> None:
    try:
        if failed.stat().st_mtime < started - FAILED_GRACE_S:
            return
        info = json.loads(failed.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return
    if info.get("kind") == "data":
        raise DataError(info["message"])
    raise RuntimeError(f"the rank preparing the data failed: {info.get('kind')}: {info.get('message')}")


class FileLock:
    """An exclusive lock file that works across hosts on a shared filesystem (no flock, which some
    network filesystems do not honour): created with O_EXCL, kept fresh by a heartbeat."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="ftl-data-lock", daemon=True)
        self._thread.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.path.unlink(missing_ok=True)

    def owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def is_stale(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        owner = self.owner()
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
            return True
        return age > STALE_LOCK_S

    def break_stale(self) -> None:
        # Renamed first, so two processes breaking the same lock cannot delete a fresh one.
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)

    def describe_owner(self) -> str:
        owner = self.owner()
        if not owner:
            return "no build in progress: the preparing rank has not started or has died"
        return f"being built by {owner.get('host')} pid {owner.get('pid')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
