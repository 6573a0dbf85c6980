"""One writer per run dir: ``RUN_DIR/.ftl-lock`` names the process that holds it (pid, host,
SLURM job, since when). Pure Python, no heavy imports.

Who holds it: the ``ftl train`` launcher while it writes the run dir and its job runs here (its
trainers inherit it through ``FTL_RUN_LOCK``); in a SLURM job or under a torchrun the user started,
rank 0 of the trainer. A second writer is refused with the holder named. A lock is stale, and taken
over, when its process is gone (same host: the pid no longer runs, or is another process now), when
it belongs to this same SLURM job (a requeued job coming back), or when its holder on another host
has not refreshed it for :data:`STALE_S` seconds (holders refresh it every :data:`HEARTBEAT_S`).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.files import mark_dir
from launcher.rundir.paths import RunPaths

LOCK_ENV = "FTL_RUN_LOCK"  # the token of a lock the launcher holds for its trainers
HEARTBEAT_S = 30.0
STALE_S = 180.0


class RunDirBusy(RuntimeError):
    """Another process holds the run dir."""


@dataclass(frozen=True)
class LockInfo:
    pid: int
    host: str
    token: str
    since: str
    role: str
    slurm_job: str = ""
    pid_start: str = ""

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"pid {self.pid} on {self.host}{job} ({self.role}, since {self.since})"


def lock_path(run_dir: Path) -> Path:
    return RunPaths(run_dir).lock


def _pid_start(pid: int) -> str:
    """When a process started (clock ticks since boot), so a reused pid is not mistaken for the
    holder; '' where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start: str) -> bool:
    """The pid runs and is the holder: not gone, not a zombie (exited, not yet reaped by its
    parent: it can write nothing more), not a reused pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    if _pid_state(pid) == "Z":
        return False
    return not start or _pid_start(pid) in ("", start)


def _pid_state(pid: int) -> str:
    """The process's state letter in /proc (R, S, D, Z...), '' where /proc cannot tell."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def read_lock(run_dir: Path) -> Optional[LockInfo]:
    try:
        data = json.loads(lock_path(run_dir).read_text())
        return LockInfo(**{k: data[k] for k in LockInfo.__dataclass_fields__ if k in data})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return LockInfo(pid=-1, host="?", token="", since="?", role="unreadable lock file")


def stale_reason(info: LockInfo, run_dir: Path, environ: Optional[dict[str, str]] = None) -> Optional[str]:
    """Why the holder no longer holds the run dir, or None while it does."""
    env = os.environ if environ is None else environ
    try:
        age = time.time() - lock_path(run_dir).stat().st_mtime
    except FileNotFoundError:
        return "gone"
    if info.pid == -1:
        return "unreadable" if age > 10 else None  # a writer may be between create and write
    if info.slurm_job and info.slurm_job == env.get("SLURM_JOB_ID"):
        return f"it belongs to this SLURM job ({info.slurm_job}), restarted"
    if info.host == socket.gethostname():
        return None if _alive(info.pid, info.pid_start) else f"pid {info.pid} is gone"
    return f"not refreshed for {age:.0f} s" if age > STALE_S else None


def busy_message(run_dir: Path, info: LockInfo) -> str:
    return (
        f"run dir {run_dir} is in use by {info.describe()}: one writer per run dir. Wait for it, stop it, or choose "
        f"another run.dir; if that process is gone for good, delete {lock_path(run_dir)}"
    )


def not_a_lock(run_dir: Path) -> Optional[str]:
    """Why ``.ftl-lock`` cannot be ftl's lock (a directory, say), or None. ftl never removes what it
    did not write, so it cannot take such a lock over: the user decides."""
    path = lock_path(run_dir)
    if not path.is_symlink() and (path.is_file() or not path.exists()):
        return None
    what = "a symbolic link" if path.is_symlink() else "a directory" if path.is_dir() else "not a regular file"
    return (
        f"run dir {run_dir}: {path} is {what}, not the lock file ftl writes, so ftl cannot tell whether another "
        f"run uses this dir. If none does, remove it; or choose another run.dir"
    )


def check_free(run_dir: Path) -> Optional[str]:
    """Read-only: why a writer would be refused now (for `ftl plan`), or None."""
    problem = not_a_lock(run_dir)
    if problem:
        return problem
    info = read_lock(run_dir)
    if info is None or stale_reason(info, run_dir) is not None:
        return None
    if info.token and info.token == os.environ.get(LOCK_ENV):
        return None
    return busy_message(run_dir, info)


class RunDirLock:
    """The run dir's lock, held by this process (``acquire``) or inherited from the launcher that
    started it (``token`` in ``FTL_RUN_LOCK``)."""

    def __init__(self, run_dir: Path, role: str) -> None:
        self.run_dir, self.role = Path(run_dir), role
        self.token = ""
        self.owned = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> "RunDirLock":
        """Hold the lock, taking over a stale one; raises RunDirBusy naming the holder."""
        problem = not_a_lock(self.run_dir)
        if problem:
            raise RunDirBusy(problem)
        inherited = os.environ.get(LOCK_ENV)
        current = read_lock(self.run_dir)
        if current is not None and inherited and current.token == inherited:
            # The launcher holds it for us and releases it; while we run, it names us, so that a
            # trainer outliving a killed launcher still holds the run dir.
            self.token = inherited
            self._write(lock_path(self.run_dir), replace=True)
            self._start_heartbeat()
            return self
        mark_dir(self.run_dir, "run")  # before the lock's own files, so the dir never looks foreign
        for _ in range(3):
            self.token = secrets.token_hex(8)
            if self._write(lock_path(self.run_dir), replace=False):
                self.owned = True
                self._start_heartbeat()
                return self
            current = read_lock(self.run_dir)
            if current is None:
                continue  # released meanwhile
            reason = stale_reason(current, self.run_dir)
            if reason is None:
                raise RunDirBusy(busy_message(self.run_dir, current))
            if read_lock(self.run_dir) == current:  # not replaced by another taker meanwhile
                print(
                    f"ftl: taking over the stale lock of {self.run_dir} ({current.describe()}: {reason})",
                    file=sys.stderr,
                )
                lock_path(self.run_dir).unlink(missing_ok=True)
        raise RunDirBusy(
            f"run dir {self.run_dir}: could not take its lock (another writer is starting at the same moment)"
        )

    def _write(self, path: Path, replace: bool) -> bool:
        """Write the lock with its content in one step (a hard link or a rename of a finished
        file), so no reader ever sees it empty; with ``replace=False``, False when it exists."""
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "token": self.token,
            "role": self.role,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
            "pid_start": _pid_start(os.getpid()),
        }
        tmp = self.run_dir / f"{RunPaths.LOCK}.{os.getpid()}.{self.token}.tmp"
        tmp.write_text(json.dumps(info) + "\n")
        try:
            if replace:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="ftl-run-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(lock_path(self.run_dir))
            except OSError:
                return

    def export(self, environ: Any = os.environ) -> None:
        """Let this process's children (the trainers) know the lock is held for them."""
        environ[LOCK_ENV] = self.token

    def release(self) -> None:
        self._stop.set()
        if not self.owned:
            return
        current = read_lock(self.run_dir)
        if current is not None and current.token == self.token:
            lock_path(self.run_dir).unlink(missing_ok=True)
        self.owned = False

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
