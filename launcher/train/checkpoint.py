"""Atomic, resumable checkpoints under ``RUN_DIR/checkpoints``.

A checkpoint is a directory ``step-N`` holding the engine's own files (its format), the trainer
state (``trainer_state.json``: step and position in the data order), one RNG file per rank, and a
``COMPLETE`` marker listing every file with its size and sha256 and the step. It is written as
``.tmp-step-N``; rank 0 writes the marker last and renames the directory, so a directory named
``step-N`` with a marker is always whole, and anything else (a ``.tmp-*`` left by a killed job, a
half-deleted directory) is ignored and later pruned.

Saving a step that already has a checkpoint moves the old one to ``.replaced-step-N`` (still
complete, still found) before the new one takes its name, so there is never a moment without a
complete step N. Loading checks the files against the marker first (the step in the name, the
marker and the trainer state agree; every file has its size and its hash); a checkpoint that fails the
check or does not load is moved aside to ``step-N.corrupt-*`` (never deleted) with a warning
naming it, and the run resumes from the previous complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from launcher.files import HASH, STEP_DIR, checkpoint_problem, file_hashes, hash_problem
from launcher.runtime import distributed
from launcher.runtime.distributed import DistInfo
from launcher.train.resume import MARKER, REPLACED, TRAINER_STATE, checkpoints_dir, is_complete, list_complete

if TYPE_CHECKING:
    from launcher.engines.base import Engine

# The layout's names and readers (the checkpoints dir via launcher.rundir.RunPaths; MARKER, ..., list_complete in launcher.train.resume)
# which reads checkpoints without torch before a run is launched.


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (damaged, or not a checkpoint)."""


@dataclass
class TrainerState:
    """Where training stands: enough, with the engine's files and the RNG, to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    epoch_position: int = 0  # samples this rank has consumed in `epoch`
    world_size: int = 1  # the data-parallel size epoch_position was counted with
    # What launcher.train.resume checks a new config against before resuming:
    total_steps: int = 0  # the run length this was saved under
    train_samples: int = 0  # training samples (examples or packs) per epoch
    config: dict[str, Any] = field(default_factory=dict)  # the run's config (secrets redacted)
    early_stopping: dict[str, Any] = field(default_factory=dict)  # launcher.train.early_stop.EarlyStopping.state()
    stopped_early: bool = False  # the run ended here by early stopping: resuming it has nothing to do
    base: dict[str, Any] = field(default_factory=dict)  # LoRA/QLoRA: the frozen base, named and hashed (not saved)


def find_latest(run_dir: Path) -> Optional[Path]:
    complete = list_complete(run_dir)
    return complete[-1][1] if complete else None


def resolve_resume(resume: str, run_dir: Path) -> Optional[Path]:
    """checkpoint.resume: ``auto`` (latest complete, or a fresh start), ``never``, or a checkpoint dir."""
    if resume == "never":
        return None
    if resume == "auto":
        return find_latest(run_dir)
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint.resume={resume!r}: no such directory")
    if not is_complete(path):
        raise ValueError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint (a step-N dir with a {MARKER} marker)"
        )
    return path


def verify(path: Path, dist: DistInfo = DistInfo()) -> Optional[str]:
    """What is wrong with a complete checkpoint's files, or None (:func:`launcher.files.checkpoint_problem`,
    the trainer state must bind, and the files must hold what was saved: :func:`launcher.files.hash_problem`,
    each of ``dist``'s ranks hashing its share of the files)."""
    problem = checkpoint_problem(path)
    if problem:
        return problem
    try:
        TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        return f"{TRAINER_STATE} does not read back ({type(e).__name__}: {e})"
    return hash_problem(path, dist.rank, dist.world_size)


def resume_checkpoint(
    resume: str, run_dir: Path, engine: Engine, dist: DistInfo, warn: Callable[[str], None]
) -> Optional[tuple[Path, TrainerState]]:
    """Collective. Load the checkpoint ``checkpoint.resume`` names: the one given (which must be
    sound), or for ``auto`` the newest complete one that verifies and loads, older ones in turn.
    A damaged one is moved aside (``step-N.corrupt-*``) by rank 0 with a warning naming it.
    Returns (path, state), or None for a fresh start."""
    if resume == "never":
        return None
    if resume != "auto":
        path = resolve_resume(resume, run_dir)
        assert path is not None
        problem = verify(path, dist)
        if distributed.any_rank(problem is not None):
            raise CheckpointError(f"checkpoint.resume={resume!r} is damaged: {problem or 'on another rank'}")
        return path, load_checkpoint(path, engine, dist)
    for _, path in reversed(list_complete(run_dir)):
        problem = verify(path, dist)
        state = None
        if problem is None:
            try:
                state = load_checkpoint(path, engine, dist)
            except Exception as e:  # noqa: BLE001 - any engine's reader: a damaged file raises its own kind
                problem = f"it does not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if not distributed.any_rank(problem is not None):
            assert state is not None
            return path, state
        if dist.is_main:
            aside = _move_aside(path)
            warn(
                f"ftl: checkpoint {path} is damaged ({problem or 'on another rank'}); moved it to {aside}, "
                "resuming from the previous complete checkpoint"
            )
        distributed.barrier()
    return None


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    os.rename(path, aside)
    return aside


# --------------------------------------------------------------------------------------------
# save / load


def save_checkpoint(
    run_dir: Path,
    state: TrainerState,
    engine: Engine,
    dist: DistInfo,
    keep: int,
    barrier: Callable[[], None] = distributed.barrier,
    keep_step: Optional[int] = None,
) -> Path:
    """Collective: call on every rank. Returns the final ``step-N`` directory. Pruning keeps
    ``keep_step``'s checkpoint besides the newest ``keep`` (early stopping's best)."""
    root = checkpoints_dir(run_dir)
    tmp = root / f".tmp-step-{state.step}"
    final = root / f"step-{state.step}"
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a job killed while saving this same step
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp)
    torch.save(capture_rng(), tmp / f"rng-rank{dist.rank}.pt")
    barrier()
    if dist.is_main:
        _write_json(tmp / TRAINER_STATE, asdict(state))
        _fsync_tree(tmp)
        files = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
        sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in files}
        hashes = dict(zip(sizes, file_hashes(files)))  # read back from the page cache they were just written to
        _write_json(
            tmp / MARKER,
            {
                "step": state.step,
                "world_size": dist.world_size,
                "engine": type(engine).__name__,
                "files": sizes,
                HASH: hashes,
            },
        )
        _replace_dir(tmp, final)
        prune(run_dir, keep, keep_step)
    barrier()
    return final


def load_checkpoint(path: Path, engine: Engine, dist: DistInfo, *, engine_state: bool = True) -> TrainerState:
    """Collective. Restores the engine, this rank's RNG, and returns the trainer state, with the
    data position rescaled when the data-parallel size changed since the save. ``engine_state=False``:
    a checkpoint of another engine, whose weights the engine already loaded
    (:meth:`Engine.load_weights`). Either way the LR schedule is this run's config's at the
    checkpoint's step, never the one the checkpoint saved: a changed lr, warmup, run length,
    schedule kind or floor applies from the first resumed step (nothing changed: the same values)."""
    state = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
    if engine_state:
        engine.load(path)
    engine.start_at(state.step)
    rng_file = path / f"rng-rank{dist.rank}.pt"
    if rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=True))
    if state.world_size != dist.world_size:
        # Each rank read epoch_position samples of its shard: keep the same global position.
        consumed = state.epoch_position * state.world_size
        state.epoch_position = consumed // dist.world_size
        state.world_size = dist.world_size
    return state


def prune(run_dir: Path, keep: int, keep_step: Optional[int] = None) -> None:
    """Keep the newest ``keep`` complete checkpoints and the one of ``keep_step``; drop older ones
    and leftovers of killed saves."""
    root = checkpoints_dir(run_dir)
    complete = list_complete(run_dir)
    doomed = [path for step, path in complete[: max(0, len(complete) - keep)] if step != keep_step]
    kept = {path for _, path in complete}
    leftovers = [p for p in root.iterdir() if p.is_dir() and p not in kept]
    # .tmp-*: a killed save; step-N without a marker: a killed deletion; .replaced-*: superseded by
    # a complete step-N. Nothing else there is touched (step-N.corrupt-* stays for the user to see).
    doomed += [p for p in leftovers if p.name.startswith((".tmp-", REPLACED)) or STEP_DIR.match(p.name)]
    for path in doomed:
        # The marker goes first: a deletion cut short must never leave a dir that looks complete.
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# RNG


def capture_rng() -> dict[str, Any]:
    """Every RNG a step may draw from, as plain types so ``torch.load(weights_only=True)`` reads it."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(_as_tuple(rng["python"]))
    n = rng["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# --------------------------------------------------------------------------------------------
# files


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    """Flush the engine's files before the marker vouches for them (a crash after the rename must
    not leave a 'complete' checkpoint whose data never reached the disk)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path, after_move_aside: Callable[[], None] = lambda: None) -> None:
    """Rename the finished ``tmp`` to ``final``. When ``final`` exists (a step saved again), it
    moves to ``.replaced-<name>`` first, keeping its marker: list_complete still finds it there
    until the new one is in place, so a crash at any point leaves a complete checkpoint of the step.
    (``after_move_aside``: a test's hook into that moment.)"""
    if final.exists():
        old = final.with_name(REPLACED + final.name)
        if old.exists():  # left by a crash in this very spot: step-N is complete again, so it goes
            (old / MARKER).unlink(missing_ok=True)
            shutil.rmtree(old)
        os.rename(final, old)
        _fsync_dir(final.parent)
        after_move_aside()
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        (old / MARKER).unlink(missing_ok=True)  # the marker first: a deletion cut short never looks complete
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tmp, final)
    _fsync_dir(final.parent)
