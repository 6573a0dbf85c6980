"""The hang watchdog: a thread in every rank that ends a hung job with every rank's stacks on disk.

At scale a job hangs more often than it crashes: one rank stops (a stalled filesystem, a dead link,
a lock nobody holds) and every other rank waits in its next collective until the collective
timeout, then dies without saying where anyone was. Here each rank's main thread reports its
progress: the phase it is in before step 1 (:func:`enter`), each step it completes
(:func:`step_done`), an evaluation or checkpoint between steps (:func:`during`). A thread per rank
holds that progress to a deadline (``train.watchdog``):

* a phase (before step 1, or between steps): ``phase_s`` (default launch.io_timeout_s);
* the first two steps: ``first_step_s``; later ones ``step_multiple`` × the median step so far,
  at least ``floor_s`` (default half of launch.dist_timeout_s, so the watchdog fires before a
  waiting peer's collective times out).

Every rank dumps, though only one hangs: the hung rank's peers wait in a collective, so they make
no progress either and their own watchdogs fire; and the first rank whose watchdog fires writes
the run dir's hang marker (:attr:`RunPaths.hang`, on the filesystem every node shares for the
checkpoints), which every other rank's watchdog polls and fires on at once. No signal is needed:
ranks on other nodes are not this process's to signal, and a main thread stuck in C++ runs no
Python signal handler anyway, while this thread runs (a collective waits without holding the GIL).

Firing, on each rank: every thread's Python stack (faulthandler) is appended to
``logs/stacks-rank-N.txt``; the flight recorder's record of the recent collectives (gloo's or
NCCL's, kept when ``TORCH_FR_BUFFER_SIZE`` is set, see :func:`collective_trace_env`) goes to
``logs/collectives-rank-N.pkl``; the rank waits a little for the others' stacks, leaves its exit
record and exits :data:`EXIT_HUNG` through ``os._exit``: a hung main thread cannot be unwound.
Each rank also says whether its main thread was waiting in a collective when it fired
(:func:`in_collective`, in its exit record and its stacks): those that were are the hang's victims,
one that was not (asleep, stuck in I/O, in Python code) is its cause, and a SLURM job requeues
without that rank's node (:mod:`launcher.launch.bad_nodes`).

Rank 0 also says what each phase before step 1 took, one line each, and a phase still running
after :data:`STILL_AFTER_S` that it still runs: nothing before the first step waits in silence.
Imports no torch.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Optional

from launcher.rundir import RunPaths
from launcher.runtime.nodes import node_name

EXIT_HUNG = 124  # as timeout(1): the job was ended for making no progress
POLL_S = 1.0
PEER_GRACE_S = 20.0  # how long a rank that fired waits for the others' stacks before it exits
STILL_AFTER_S = 30.0  # a phase before step 1 still running says so on rank 0, then this often
TRACE_ENTRIES = "2000"  # collectives the flight recorder keeps per process group
TEST_HANG_ENV = "FTL_TEST_HANG"  # tests only: RANK@POINT[@HOST] stops that rank there (see _test_hang)
# A thread in these modules waits in a collective (c10d's, DDP's broadcasts, FSDP's; DeepSpeed's call
# c10d's), except in torch.distributed.checkpoint, whose file I/O is where a stalled filesystem stops a rank.
COLLECTIVE_MODULES, NOT_COLLECTIVE_MODULES = "torch.distributed.", "torch.distributed.checkpoint"


@dataclass(frozen=True)
class Limits:
    step_multiple: float
    floor_s: float
    first_step_s: float
    phase_s: float


def limits_of(watchdog: Any, dist_timeout_s: float, io_timeout_s: float) -> Optional[Limits]:
    """``train.watchdog`` with its defaults resolved; None when it is off."""
    if not watchdog.enabled:
        return None
    floor = watchdog.floor_s if watchdog.floor_s is not None else dist_timeout_s / 2
    phase = watchdog.phase_s if watchdog.phase_s is not None else io_timeout_s
    return Limits(watchdog.step_multiple, floor, watchdog.first_step_s, phase)


def collective_trace_env(environ: MutableMapping[str, str], paths: RunPaths) -> None:
    """Before the process group exists: torch's flight recorder keeps the last collectives of each
    process group (gloo and NCCL), for the watchdog to dump; on a NCCL collective timeout, NCCL's
    own watchdog dumps it as well (``logs/nccl-timeout-rank-N``). Settings already made win."""
    environ.setdefault("TORCH_FR_BUFFER_SIZE", TRACE_ENTRIES)
    environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(paths.nccl_timeout_trace_prefix))
    environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(paths.nccl_timeout_trace_prefix))


class Watchdog:
    """One rank's progress and the thread that holds it to its deadline (``limits`` None: the
    phases are still reported, nothing is watched)."""

    def __init__(
        self,
        limits: Optional[Limits],
        run_dir: Path,
        rank: int,
        world: int,
        on_hang: Callable[[bool], None] = lambda in_collective: None,
        poll_s: float = POLL_S,
    ) -> None:
        self.limits, self.paths, self.rank, self.world = limits, RunPaths(run_dir), rank, world
        self.on_hang, self.poll_s = on_hang, poll_s
        self.started = time.time()  # a hang marker older than this is an earlier run's
        self._lock = threading.Lock()
        self._what, self._since = "imports", time.monotonic()
        self._limit = limits.phase_s if limits else 0.0
        self._setup = True  # before step 1
        self._steps: deque[float] = deque(maxlen=100)  # step times after the first
        self._done = 0
        self._stopped = threading.Event()
        self.fired = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ftl-watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self.limits is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    # ---- what the main thread reports

    def enter(self, what: str) -> None:
        """A phase before step 1 begins, and the one before it ends."""
        self._say_took(*self._set(what, self._phase_limit()))
        _test_hang(self.rank, what)

    def training(self) -> None:
        """Set up: the first step begins."""
        self._say_took(*self._set("step 1", self.limits.first_step_s if self.limits else 0.0))
        self._setup = False

    def step_done(self, step: int, seconds: float) -> None:
        self._done += 1
        if self._done > 1:  # the first step compiles and warms up: not what a step takes
            self._steps.append(seconds)
        self._set(f"step {step + 1}", self._step_limit())
        _test_hang(self.rank, f"step-{step}")

    @contextlib.contextmanager
    def during(self, what: str) -> Iterator[None]:
        """A phase inside another (an op build while the engine is set up, an evaluation or a
        checkpoint between steps): the phase limit, then the outer phase again from now."""
        outer, _ = self._set(what, self._phase_limit())
        try:
            yield
        finally:
            inner, took = self._set(outer, self._phase_limit() if self._setup else self._step_limit())
            self._say_took(inner, took)

    def current(self) -> tuple[str, float]:
        """(the phase or step this rank is in, the seconds it may take)."""
        with self._lock:
            return self._what, self._limit

    # ---- limits

    def _phase_limit(self) -> float:
        return self.limits.phase_s if self.limits else 0.0

    def _step_limit(self) -> float:
        if self.limits is None:
            return 0.0
        if not self._steps:
            return self.limits.first_step_s
        return max(self.limits.floor_s, self.limits.step_multiple * statistics.median(self._steps))

    def _set(self, what: str, limit: float) -> tuple[str, float]:
        """Now in ``what`` for at most ``limit`` s: (the previous phase, the seconds it took)."""
        with self._lock:
            previous = (self._what, time.monotonic() - self._since)
            self._what, self._since, self._limit = what, time.monotonic(), limit
        return previous

    def _say_took(self, what: str, seconds: float) -> None:
        if self._setup and self.rank == 0:
            print(f"ftl: {what}: {seconds:.1f} s", file=sys.stderr, flush=True)

    # ---- the watching thread

    def _watch(self) -> None:
        said = (0.0, 0.0)  # (the phase's start, its seconds when rank 0 last said it still runs)
        while not self._stopped.wait(self.poll_s):
            with self._lock:
                what, since, limit, setup = self._what, self._since, self._limit, self._setup
            waited = time.monotonic() - since
            if waited > limit:
                return self._fire(f"{what} has taken {waited:.0f} s, over its limit of {limit:.0f} s", own=True)
            peer = self._peer_hang()
            if peer is not None:
                return self._fire(f"rank {peer} found a hang; this rank was in {what} for {waited:.0f} s", own=False)
            last = said[1] if said[0] == since else 0.0
            if setup and self.rank == 0 and waited - last >= STILL_AFTER_S:
                said = (since, waited)
                print(f"ftl: still {what} after {waited:.0f} s (limit {limit:.0f} s)", file=sys.stderr, flush=True)

    def _peer_hang(self) -> Optional[str]:
        """The rank that wrote this run's hang marker, if one did."""
        try:
            if self.paths.hang.stat().st_mtime < self.started:
                return None  # an earlier run's
            return str(json.loads(self.paths.hang.read_text())["rank"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _fire(self, reason: str, own: bool) -> None:
        if self._stopped.is_set():
            return
        self.fired.set()
        waiting = in_collective(sys._current_frames().get(threading.main_thread().ident))
        reason += "; its main thread waits in a collective" if waiting else "; its main thread is in no collective"
        stacks = self.paths.stacks(self.rank)
        try:
            self.paths.logs.mkdir(parents=True, exist_ok=True)
            if own:
                self._write_marker(reason)
            with open(stacks, "a") as f:
                f.write(f"\nftl watchdog, rank {self.rank} of {self.world}, {time.strftime('%Y-%m-%d %H:%M:%S')}: ")
                f.write(f"{reason}\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
        except OSError as e:  # the run dir is unwritable: the stacks go to stderr, and the job still ends
            print(
                f"ftl: rank {self.rank}: hang: {reason}; cannot write {stacks} ({e}): the stacks follow",
                file=sys.stderr,
            )
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
        else:
            trace = dump_collectives(self.paths.collectives_trace(self.rank))
            saved = f"; its recent collectives in {trace}" if trace else ""
            print(f"ftl: rank {self.rank}: hang: {reason}; every thread's stack in {stacks}{saved}", file=sys.stderr)
        missing = self._wait_for_peers()
        if own or self.rank == 0:
            also = f" (none from rank(s) {', '.join(map(str, missing))})" if missing else ""
            print(
                f"ftl: hang: stopping the job (exit code {EXIT_HUNG}); stacks of every rank in {self.paths.logs}{also}",
                file=sys.stderr,
            )
        self.on_hang(waiting)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_HUNG)

    def _write_marker(self, reason: str) -> None:
        tmp = self.paths.hang.with_name(f"{self.paths.hang.name}.{self.rank}.tmp")
        tmp.write_text(json.dumps({"rank": self.rank, "reason": reason, "time": time.time()}))
        os.replace(tmp, self.paths.hang)

    def _wait_for_peers(self) -> list[int]:
        """Ranks whose stacks of this hang are not written yet, after at most :data:`PEER_GRACE_S`
        (torchrun stops the others once one rank exits)."""
        try:
            since = min(self.paths.hang.stat().st_mtime, time.time()) - 1
        except OSError:
            since = time.time() - 1
        deadline = time.monotonic() + PEER_GRACE_S
        while True:
            missing = [r for r in range(self.world) if not _written_since(self.paths.stacks(r), since)]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)


def _written_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def dump_collectives(path: Path) -> Optional[Path]:
    """The flight recorder's pickle of this rank's recent collectives (NCCL's on a NCCL group), if
    torch has a process group and keeps a record."""
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is None or not torch_dist.is_available() or not torch_dist.is_initialized():
        return None
    import torch

    c10d = torch._C._distributed_c10d
    dump = getattr(c10d, "_dump_nccl_trace", None) if torch_dist.get_backend() == "nccl" else None
    dump = dump or getattr(c10d, "_dump_fr_trace", None)
    if dump is None:
        return None
    try:
        path.write_bytes(dump())
    except Exception:  # a dump that fails must not keep the stacks from being reported
        return None
    return path


def in_collective(frame: Optional[FrameType]) -> bool:
    """Whether a thread stopped at ``frame`` waits in a collective: a function of
    :data:`COLLECTIVE_MODULES` is on its stack."""
    while frame is not None:
        name = str(frame.f_globals.get("__name__", ""))
        if name.startswith(COLLECTIVE_MODULES) and not name.startswith(NOT_COLLECTIVE_MODULES):
            return True
        frame = frame.f_back
    return False


def _test_hang(rank: int, point: str, environ: Mapping[str, str] = os.environ) -> None:
    """Tests only: with ``FTL_TEST_HANG=RANK@POINT[@HOST]`` (a phase name, or ``step-N`` once step N
    is done), that rank (on HOST only, when named) stops there for good, as a hung rank does; on
    the job's first run only (SLURM_RESTART_COUNT unset or 0), as FTL_TEST_FAIL_AT fails."""
    if hangs_here(rank, point, environ):
        while True:
            time.sleep(3600)


def hangs_here(rank: int, point: str, environ: Mapping[str, str]) -> bool:
    spec = environ.get(TEST_HANG_ENV, "")
    if not spec or int(environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        return False
    at_rank, at_point, *host = spec.split("@", 2)
    return (at_rank, at_point) == (str(rank), point) and (not host or host[0] == node_name(environ))


# --------------------------------------------------------------------------------------------
# the rank's one watchdog; each call is a no-op when none was started (a Trainer made in a test)

_current: Optional[Watchdog] = None


def start(watchdog: Watchdog) -> Watchdog:
    global _current
    _current = watchdog.start()
    return watchdog


def stop() -> None:
    global _current
    if _current is not None:
        _current.stop()
    _current = None


def hold_if_fired() -> None:
    """For the main thread on its way out with an error: once the watchdog has fired, that error is
    the hang's echo (a peer that finished its dump exited, closing the collective this rank waited
    in), and the watchdog thread, still dumping, ends the process: wait for it, reporting nothing."""
    if _current is not None and _current.fired.is_set():
        while True:
            time.sleep(1)


def enter(what: str) -> None:
    if _current is not None:
        _current.enter(what)


def training() -> None:
    if _current is not None:
        _current.training()


def step_done(step: int, seconds: float) -> None:
    if _current is not None:
        _current.step_done(step, seconds)


@contextlib.contextmanager
def during(what: str) -> Iterator[None]:
    if _current is None:
        yield
        return
    with _current.during(what):
        yield
