"""Writing files so that a reader never sees half of one, and knowing which directories ftl made
(and so may overwrite or prune). Imports nothing heavy."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping, Optional, Sequence

from launcher.rundir import RunPaths


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` (named per process: nodes and ranks may
    share a directory) and rename it over ``path``: a failed write (a full disk) leaves ``path``
    as it was, never empty or cut short."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain mkdir/open would have under this
    process's umask. Before a finished temporary directory is renamed into place: mkdtemp creates
    it 0700 and mkstemp-style writers (safetensors among them) make files 0600, which would hide
    the result from the group on a shared filesystem."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# --------------------------------------------------------------------------------------------
# what ftl made: a marker file in each directory it creates and may later overwrite or prune

MARKERS = {"run": RunPaths.MARKER, "export": ".ftl-export", "eval": ".ftl-eval"}
CHECKPOINT_MARKER = "COMPLETE"  # a checkpoint dir is complete once it holds this file
SAVING_MARKER = "SAVING"  # in a .tmp-step-N dir from its creation: ftl is writing it (step, host, pid, start)


TRAINER_STATE = "trainer_state.json"  # in a checkpoint: the step and the position in the data order
STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"  # .tmp-step-N: a checkpoint being written, published by renaming it to step-N
REPLACED = ".replaced-"  # a complete checkpoint moved aside while its step is saved again
HASH = "sha256"  # the marker's per-file content hashes (hashlib's name; sha256 runs on the CPU's SHA extensions)


def step_of(name: str) -> Optional[int]:
    """N for ``step-N`` (and for ``.replaced-step-N``, a complete checkpoint a new save of its step moved aside)."""
    match = STEP_DIR.match(name.removeprefix(REPLACED))
    return int(match.group(1)) if match else None


def checkpoint_problem(path: Path) -> Optional[str]:
    """What is wrong with a checkpoint dir that has its marker, or None: every file the marker
    lists must be there with the size it had when saved (a truncated or lost file fails), the
    trainer state must read back, and the step in it, the step the marker recorded and the step
    the directory's name says must agree (a renamed dir or a hand-edited state fails). (Checkpoints
    saved before markers listed files are checked for the trainer state alone.) Cheap and pure:
    ``ftl plan`` checks ``checkpoint.resume`` with it; :func:`hash_problem` reads the contents."""
    try:
        marker = json.loads((path / CHECKPOINT_MARKER).read_text() or "{}")
        listed = dict(marker.get("files") or {})
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return f"its {CHECKPOINT_MARKER} marker does not read back ({type(e).__name__})"
    for name, size in listed.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when saved (truncated?)"
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as e:
        return f"{TRAINER_STATE} does not read back ({type(e).__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{TRAINER_STATE} holds no step"
    named, recorded = step_of(Path(path).name), marker.get("step")
    if recorded is not None and recorded != state["step"]:
        return f"{TRAINER_STATE} says step {state['step']}, its {CHECKPOINT_MARKER} marker step {recorded} (edited by hand?)"
    if named is not None and named != state["step"]:
        return f"it holds step {state['step']}, not the step {named} its name says (a renamed directory?)"
    return None


def file_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def file_hashes(paths: Sequence[Path]) -> list[str]:
    """:func:`file_hash` of each path, several files at once (hashlib releases the GIL while it
    hashes: a checkpoint's weights and optimizer files hash on as many cores)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(file_hash, paths))


def hash_problem(path: Path, rank: int = 0, world: int = 1) -> Optional[str]:
    """The first file of a checkpoint whose contents differ from the hash its marker recorded when
    saved (a file damaged, or swapped for another of the same size), or None. Each of ``world``
    ranks checks every ``world``-th file from ``rank`` on. Checkpoints saved before markers held
    hashes pass."""
    try:
        hashes = dict(json.loads((path / CHECKPOINT_MARKER).read_text() or "{}").get(HASH) or {})
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return f"its {CHECKPOINT_MARKER} marker does not read back ({type(e).__name__})"
    names = sorted(hashes)[rank::world]
    try:
        found = file_hashes([path / name for name in names])
    except OSError as e:
        return f"a file does not read back ({type(e).__name__}: {e})"
    return next(
        (
            f"{name} does not hold what was saved (its {HASH} differs from the marker's)"
            for name, digest in zip(names, found)
            if digest != hashes[name]
        ),
        None,
    )


def mark_dir(path: Path, kind: str) -> None:
    """Create ``path`` (and parents) if needed and mark it as an ftl ``kind`` dir. The marker is
    created in place, not renamed in, so the directory is never non-empty and unmarked."""
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKERS[kind]
    if not marker.is_file():
        marker.write_text(json.dumps({"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def dir_kind(path: Path) -> Optional[str]:
    """Which kind of ftl dir ``path`` is (its marker), or None."""
    for kind, name in MARKERS.items():
        if (path / name).is_file():
            return kind
    return None


def is_run_dir(path: Path) -> bool:
    """Only the marker says so: a folder that merely holds a config.yaml and a launch.sh may be
    anyone's, and ftl would overwrite both."""
    return dir_kind(path) == "run"


def output_dir_problems(path: Path, kind: str, protect: Mapping[str, Path] = {}) -> list[str]:
    """Why ftl must not write an ftl ``kind`` dir at ``path`` (and later overwrite or prune what is
    in it), or [] when it may. Refused: the working or home directory or anything containing one,
    the paths in ``protect`` (label -> path: a source run, a checkpoint) or anything containing
    them, a file, a non-empty directory without this kind's marker (whatever it holds: only the marker
    says ftl made it), anything inside a run's checkpoints/, a run dir inside another run dir, and
    a place this user cannot write."""
    path = Path(path).expanduser().absolute()
    real = path.resolve()
    out: list[str] = []
    guarded = {"the working directory": Path.cwd().resolve(), "your home directory": Path.home().resolve(), **protect}
    for label, p in guarded.items():
        p = Path(p).resolve()
        if real == p:
            out.append(f"is {label}")
        elif p.is_relative_to(real):
            out.append(f"contains {label} ({p})")
    if out:
        return out
    if real.exists() and not real.is_dir():
        return ["is a file, not a directory"]
    if real.is_dir() and any(real.iterdir()) and dir_kind(real) != kind:
        other = dir_kind(real)
        if other:
            out.append(f"is an ftl {other} dir, not an {kind} dir")
        else:
            out.append(
                f"exists and holds files ftl did not write (no {MARKERS[kind]} marker); ftl writes only into "
                "a new or empty directory or one it made: choose another, or move these files away"
            )
    for parent in real.parents:
        if parent.name == RunPaths.CHECKPOINTS and is_run_dir(parent.parent):
            out.append(f"sits inside the checkpoints of the run {parent.parent} (ftl prunes what it finds there)")
            break
        if kind == "run" and is_run_dir(parent):
            out.append(f"sits inside the ftl run dir {parent}")
            break
    existing = next((p for p in (real, *real.parents) if p.exists()), Path("/"))
    if not existing.is_dir():
        out.append(f"cannot be created: {existing} is a file")
    elif not os.access(existing, os.W_OK | os.X_OK):
        out.append(f"is not writable by this user ({existing})")
    return out
