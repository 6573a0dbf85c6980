"""How a run ended, as one exit code: 0 done, 1 failed, 2 bad config or data, 124 hung (the
watchdog dumped every rank's stacks into the run dir's logs/ and ended the job), 130 stopped by a
signal after a clean checkpoint. Never a raw signal number.

Every trainer rank leaves ``RUN_DIR/.ftl-exit/rank-N.json`` with its own exit code and node as it returns
(:func:`record_exit`); torchrun reports only "failed", so the launcher reads these back
(:func:`summarize`). A rank with no record was killed by a signal: SIGKILL is what the kernel's
out-of-memory killer sends, and the message says so. Pure Python.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Optional

from launcher.rundir import RunPaths
from launcher.runtime.nodes import node_name

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_STOPPED, EXIT_HUNG = 0, 1, 2, 130, 124
OOM_HINT = "SIGKILL is what the kernel's out-of-memory killer sends: it may have run out of memory (see `dmesg`)"


def record_exit(run_dir: Path, rank: int, world_size: int, code: int, in_collective: Optional[bool] = None) -> None:
    """``in_collective``, for a hang: whether the rank's main thread waited in a collective when the
    watchdog fired (a victim of the hang) or not (its cause); the key is left out otherwise."""
    record = {"rank": rank, "world_size": world_size, "code": code, "time": time.time(), "node": node_name()}
    if in_collective is not None:
        record["in_collective"] = in_collective
    try:
        folder = RunPaths(run_dir).exits
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{rank}.json").write_text(json.dumps(record))
    except OSError:
        pass  # a record is a courtesy to the launcher; never fail a finished run over it


def clear_exits(run_dir: Path) -> None:
    folder = RunPaths(run_dir).exits
    if folder.is_dir():
        for path in folder.glob("rank-*.json"):
            path.unlink(missing_ok=True)


def read_exits(run_dir: Path) -> tuple[dict[int, int], int]:
    """{rank: code} of the records left, and the world size they report (0: no record)."""
    codes, world = {}, 0
    for path in RunPaths(run_dir).exits.glob("rank-*.json"):
        try:
            data = json.loads(path.read_text())
            codes[int(data["rank"])] = int(data["code"])
            world = max(world, int(data["world_size"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return codes, world


def signal_name(code: int) -> Optional[str]:
    """The signal a child's exit status reports: -N from Popen, or 128+N from a shell."""
    number = -code if code < 0 else code - 128 if 128 < code < 128 + 65 else 0
    if not number:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def summarize(code: int, run_dir: Optional[Path], interrupted: Optional[str]) -> tuple[int, str]:
    """(exit code, what to tell the user) for a job that exited with ``code``; ``interrupted`` is
    the signal the launcher forwarded to it, if any."""
    codes, world = read_exits(run_dir) if run_dir is not None else ({}, 0)
    missing = sorted(set(range(world)) - set(codes))
    killed = signal_name(code)
    if code == 0:
        return EXIT_OK, "done"
    if (codes and not missing and all(c == EXIT_STOPPED for c in codes.values())) or (
        not codes and code == EXIT_STOPPED
    ):
        by = f" by {interrupted}" if interrupted else ""
        return EXIT_STOPPED, f"stopped{by} after a checkpoint; run the same command again to resume"
    if EXIT_HUNG in codes.values() or (not codes and code == EXIT_HUNG):
        hung = sorted(r for r, c in codes.items() if c == EXIT_HUNG)
        ranks = f" (rank(s) {', '.join(map(str, hung))})" if hung else ""
        logs = RunPaths(run_dir).logs if run_dir is not None else "the run dir's logs/"
        return EXIT_HUNG, (
            f"hung: the watchdog found no progress{ranks} and stopped the job; every rank's stacks are in {logs}; "
            "running the same command again resumes from the last checkpoint"
        )
    if EXIT_INVALID in codes.values() or (not codes and code == EXIT_INVALID):
        return EXIT_INVALID, "the config or the training data is unusable (see above)"
    if interrupted:
        return EXIT_FAILED, (
            f"interrupted by {interrupted} before a checkpoint of the current step was written; "
            "running the same command again resumes from the last complete one"
        )
    if missing:
        ranks = ", ".join(map(str, missing))
        return EXIT_FAILED, (f"rank(s) {ranks} ended without an exit status: killed by a signal. {OOM_HINT}")
    if killed:
        hint = f"; {OOM_HINT}" if killed == "SIGKILL" else ""
        return EXIT_FAILED, f"the trainer was killed by {killed}{hint}"
    return EXIT_FAILED, f"failed (exit code {code}; see above)"
