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

import errno
import json
import os
import random
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from launcher.files import (
    HASH,
    SAVING_MARKER,
    STEP_DIR,
    TMP_PREFIX,
    checkpoint_problem,
    file_hashes,
    hash_problem,
    write_atomic,
)
from launcher.rundir import RunPaths
from launcher.rundir.resume import MARKER, REPLACED, TRAINER_STATE, checkpoints_dir, is_complete, list_complete
from launcher.runtime import distributed
from launcher.runtime.distributed import DistInfo

if TYPE_CHECKING:
    from launcher.engines.base import Engine

# The layout's names and readers (the checkpoints dir via launcher.rundir.RunPaths; MARKER, ..., list_complete in launcher.rundir.resume)
# which reads checkpoints without torch before a run is launched.


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (damaged, or not a checkpoint)."""


@dataclass
class TrainerState:
    """Where training stands: enough, with the engine's files and the RNG, to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    epoch_samples: int = 0  # samples of `epoch` all ranks together have consumed (any world size continues there)
    world_size: int = 1  # the data-parallel size it was saved with
    # What launcher.rundir.resume checks a new config against before resuming:
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
        read_state(path)
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
    """Collective: call on every rank. Saves, publishes and returns the final ``step-N`` directory.
    Pruning keeps ``keep_step``'s checkpoint besides the newest ``keep`` (early stopping's best)."""
    saver = Checkpointer(run_dir, engine, dist, keep, background=False, barrier=barrier)
    path = saver.save(state, keep_step)
    saver.wait()
    return path


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (exit 1); the previous one stays the resume point."""


class Checkpointer:
    """Saves checkpoints, at most one in flight. ``save`` writes into ``.tmp-step-N`` (its
    ``SAVING`` marker says ftl made it); with ``background`` (``checkpoint.async_save``) it returns
    once the engine has staged its state in host memory, and a thread writes the files while
    training goes on. Rank 0 publishes the save once every rank's files are written: the trainer
    state, the ``COMPLETE`` marker with each file's size and hash, the rename to ``step-N``, then
    ``checkpoints/latest``. The next ``save``, the end of training and any exit ``wait`` for it; a
    failed write raises :class:`CheckpointWriteError` there, naming the step, on every rank."""

    def __init__(
        self,
        run_dir: Path,
        engine: Engine,
        dist: DistInfo,
        keep: int,
        *,
        background: bool,
        barrier: Callable[[], None] = distributed.barrier,
    ) -> None:
        self.run_dir, self.engine, self.dist, self.keep = Path(run_dir), engine, dist, keep
        self.background, self.barrier = background, barrier
        self._thread: Optional[threading.Thread] = None
        self._failure: Optional[str] = None
        self._saving: Optional[tuple[TrainerState, Path]] = None  # (state, .tmp dir) of the save in flight

    def save(self, state: TrainerState, keep_step: Optional[int] = None) -> Path:
        """Collective. Returns the ``step-N`` directory the save is published as once written;
        pruning then keeps ``keep_step``'s checkpoint besides the newest ``keep``."""
        self.wait()
        root = checkpoints_dir(self.run_dir)
        tmp, final = root / f"{TMP_PREFIX}step-{state.step}", root / f"step-{state.step}"
        self._saving = (state, tmp)
        try:
            if self.dist.is_main:
                if tmp.exists() and not clean_unpublished(tmp, _say):  # left by a job killed saving this step
                    raise FileExistsError(f"{tmp} exists without ftl's {SAVING_MARKER} marker (move it away)")
                tmp.mkdir(parents=True)
                _write_json(tmp / SAVING_MARKER, {"step": state.step, "host": socket.gethostname(), "pid": os.getpid()})
            self.barrier()
            write = self.engine.save_staged(tmp) if self.background else _saved(self.engine, tmp)
            torch.save(capture_rng(), tmp / f"rng-rank{self.dist.rank}.pt")
        except Exception as e:
            self._fail(e)
            error, self._saving = self._error(), None
            raise error from e
        self.barrier()  # every rank's staging and small files are done: the state may change now

        def finish() -> None:
            try:
                write()
                if self.dist.is_main:
                    self._publish(tmp, final, state, keep_step)
            except Exception as e:  # noqa: BLE001 - any writer's failure is this save's, reported at the wait
                self._fail(e)

        if self.background:
            self._thread = threading.Thread(target=finish, name=f"ftl-checkpoint-step-{state.step}", daemon=True)
            self._thread.start()
        else:
            finish()
        return final

    def wait(self) -> None:
        """Collective: wait for the save in flight to be written and published; when any rank's
        write failed, every rank raises :class:`CheckpointWriteError` naming the step."""
        self._join()
        if self._saving is None:
            return
        failed = distributed.any_rank(self._failure is not None)
        self.barrier()
        error = self._error() if failed else None
        self._saving = None
        if error is not None:
            raise error

    def wait_on_exit(self, warn: Callable[[str], None], timeout_s: float) -> None:
        """A run failing for another reason: finish the save in flight (this rank alone: the others
        may be gone, so at most ``timeout_s``; a write cut short stays unpublished) and say, rather
        than raise, if it failed."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                assert self._saving is not None
                warn(f"ftl: checkpoint {self._saving[1]} was still being written when the run failed; left unpublished")
                return
        self._thread = None
        if self._saving is not None and self._failure is not None:
            warn(f"ftl: {self._error()}")
        self._saving = None

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _publish(self, tmp: Path, final: Path, state: TrainerState, keep_step: Optional[int]) -> None:
        _write_json(tmp / TRAINER_STATE, asdict(state))
        (tmp / SAVING_MARKER).unlink()
        _fsync_tree(tmp)
        files = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
        sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in files}
        hashes = dict(zip(sizes, file_hashes(files)))  # read back from the page cache they were just written to
        marker = {
            "step": state.step,
            "world_size": self.dist.world_size,
            "engine": type(self.engine).__name__,
            "files": sizes,
            HASH: hashes,
        }
        _write_json(tmp / MARKER, marker)
        _replace_dir(tmp, final)
        latest = RunPaths(self.run_dir).latest_checkpoint
        try:  # published: the markers say so; the pointer only tells people and tools
            write_atomic(latest, final.name + "\n")
        except OSError as e:
            _say(f"ftl: {final} is published, but {latest} still names the one before ({type(e).__name__}: {e})")
        prune(self.run_dir, self.keep, keep_step)

    def _fail(self, error: BaseException) -> None:
        """Remember why this rank's save failed; rank 0 removes the unpublished ``.tmp`` dir (ftl
        made it: its SAVING marker), so a full disk gets its space back and nothing half-written stays."""
        assert self._saving is not None
        state, tmp = self._saving
        full = disk_full(error, tmp)
        self._failure = f"{type(error).__name__}: {error}".strip()
        if full:
            self._failure = f"no space left on device ({self._failure})"
        if self.dist.is_main and tmp.exists() and remove_unpublished(tmp):
            self._failure += f"; removed the unpublished {tmp} (ftl wrote it)"

    def _error(self) -> CheckpointWriteError:
        assert self._saving is not None
        state, tmp = self._saving
        latest = find_latest(self.run_dir)
        resume = f"the resume point stays {latest}" if latest else "there is no checkpoint to resume from"
        return CheckpointWriteError(
            f"checkpoint step {state.step} was not saved in {tmp.parent}: "
            f"{self._failure or 'its write failed on another rank'}; {resume}"
        )


def _saved(engine: Engine, tmp: Path) -> Callable[[], None]:
    engine.save(tmp)
    return lambda: None


def disk_full(error: BaseException, where: Path) -> bool:
    """The error is a full disk: ENOSPC anywhere in its chain (torch's writer reports it as a
    RuntimeError without the errno; DCP wraps each rank's), or the filesystem of ``where`` has
    (nearly) no space left."""
    seen: Optional[BaseException] = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    for path in (where, *where.parents):
        if path.exists():
            stat = os.statvfs(path)
            return stat.f_bavail * stat.f_frsize < 1 << 20
    return False


def remove_unpublished(tmp: Path) -> bool:
    """Remove a ``.tmp-step-N`` dir if ftl made it (its SAVING marker, or the marker files of a
    save cut short before this marker existed); True when removed."""
    if not (tmp / SAVING_MARKER).is_file() and not (tmp / MARKER).is_file() and not (tmp / TRAINER_STATE).is_file():
        return False
    shutil.rmtree(tmp, ignore_errors=True)
    return True


def load_checkpoint(path: Path, engine: Engine, dist: DistInfo, *, engine_state: bool = True) -> TrainerState:
    """Collective. Restores the engine, this rank's RNG, and returns the trainer state (its data
    position counts every rank's samples: any data-parallel size continues it). ``engine_state=False``:
    a checkpoint of another engine, whose weights the engine already loaded
    (:meth:`Engine.load_weights`). Either way the LR schedule is this run's config's at the
    checkpoint's step, never the one the checkpoint saved: a changed lr, warmup, run length,
    schedule kind or floor applies from the first resumed step (nothing changed: the same values)."""
    state = read_state(path)
    if engine_state:
        engine.load(path)
    engine.start_at(state.step)
    rng_file = path / f"rng-rank{dist.rank}.pt"
    if rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=True))
    return state


def read_state(path: Path) -> TrainerState:
    """A checkpoint's trainer state. Saved before ``epoch_samples``: each rank's ``epoch_position``
    in its round-robin share, so all ranks together had read that many times the world size."""
    data = json.loads((path / TRAINER_STATE).read_text())
    if "epoch_position" in data:
        data["epoch_samples"] = data.pop("epoch_position") * data.get("world_size", 1)
    return TrainerState(**data)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prune(run_dir: Path, keep: int, keep_step: Optional[int] = None, warn: Callable[[str], None] = _say) -> None:
    """Keep the newest ``keep`` complete checkpoints and the one of ``keep_step``; drop older ones
    and leftovers of killed saves (an unpublished ``.tmp-step-N`` only when ftl made it, saying so)."""
    root = checkpoints_dir(run_dir)
    complete = list_complete(run_dir)
    doomed = [path for step, path in complete[: max(0, len(complete) - keep)] if step != keep_step]
    kept = {path for _, path in complete}
    leftovers = [p for p in root.iterdir() if p.is_dir() and p not in kept]
    # step-N without a marker: a killed deletion; .replaced-*: superseded by a complete step-N.
    # Nothing else there is touched (step-N.corrupt-* stays for the user to see).
    doomed += [p for p in leftovers if p.name.startswith(REPLACED) or STEP_DIR.match(p.name)]
    for path in doomed:
        # The marker goes first: a deletion cut short must never leave a dir that looks complete.
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    for tmp in (p for p in leftovers if p.name.startswith(TMP_PREFIX)):
        if not clean_unpublished(tmp, warn):
            warn(f"ftl: left {tmp} alone: an unpublished save without ftl's {SAVING_MARKER} marker (move it away)")


def clean_unpublished(tmp: Path, warn: Callable[[str], None]) -> bool:
    """Remove a leftover ``.tmp-step-N`` that ftl made, saying so; False when it is not ftl's."""
    if not remove_unpublished(tmp):
        return False
    warn(f"ftl: removed {tmp}, a save that was never published (its job stopped while writing it; ftl wrote it)")
    return True


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
