"""A torch C++ extension's build lock left behind by a killed build: recognised and cleared.

torch's just-in-time extension builds (``torch.utils.cpp_extension.load``, which DeepSpeed's ops
use) take a ``lock`` file in the extension's build dir (``$TORCH_EXTENSIONS_DIR/<name>``) with
``FileBaton``: the builder creates it with ``O_CREAT | O_EXCL``, keeps that descriptor open while
it compiles and links, and deletes the file when it is done; every other process waits, polling,
for as long as the file exists. A build killed part way (an interrupted first ZeRO run) leaves
the file with no builder: every later run waits on it forever, printing nothing.

The lock is stale when no process on this machine holds it open (``/proc/*/fd``) and nothing in
its build dir changed for :data:`QUIET_S` seconds: a live builder on another node sharing the
dir (a shared home) writes object files as it goes. Then ftl deletes that one file, saying why
first. ftl did not create it: torch did, to mean "a build is under way", and no build is; its
removal is what the killed builder would have done, and torch's next build starts over from
whatever the dir holds (ninja rebuilds what its log does not record as built). Nothing else in
the build dir is touched. Imports no torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

LOCK = "lock"  # torch.utils.cpp_extension's name for it
QUIET_S = 300.0


def lock_holders(lock: Path) -> list[int]:
    """The processes on this machine that have ``lock`` open (those this user may inspect)."""
    target = os.path.realpath(lock)
    holders = []
    for fds in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fds.iterdir()):
                holders.append(int(fds.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return holders


def stale_lock(build_dir: Path, quiet_s: float = QUIET_S, now: Optional[float] = None) -> Optional[str]:
    """Why ``build_dir``'s lock is stale, or None: no lock, a live holder, or a build dir still changing."""
    lock = build_dir / LOCK
    if not lock.exists():
        return None
    holders = lock_holders(lock)
    if holders:
        return None
    try:
        newest = max(p.lstat().st_mtime for p in build_dir.iterdir())
    except (OSError, ValueError):
        return None
    quiet = (time.time() if now is None else now) - newest
    if quiet < quiet_s:
        return None
    return f"no process on this machine holds it, and nothing in its build dir has changed for {quiet:.0f} s"


def clear_stale_lock(build_dir: Path, say: Callable[[str], None], quiet_s: float = QUIET_S) -> bool:
    """Delete ``build_dir``'s lock if it is stale (saying why before, and what after); True if it did."""
    reason = stale_lock(build_dir, quiet_s)
    if reason is None:
        return False
    lock = build_dir / LOCK
    try:
        judged = lock.stat().st_ino
    except FileNotFoundError:
        return False
    say(
        f"ftl: {lock}: a build lock with no build: {reason}. ftl did not create it (torch's extension "
        "builder did, and deletes it when a build ends); torch would wait on it forever, so ftl deletes "
        "this one file and leaves the build dir for torch to finish the build"
    )
    try:
        if lock.stat().st_ino != judged or lock_holders(lock):  # a builder took a fresh lock meanwhile
            return False
        lock.unlink()
    except FileNotFoundError:  # another rank cleared it first
        return False
    say(f"ftl: cleared a stale build lock left by a killed build: {lock}")
    return True
