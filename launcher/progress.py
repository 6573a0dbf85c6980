"""How ftl shows work in progress, on a terminal and in a log.

* :func:`make_console`: rich on a terminal; written to a file or a pipe (a SLURM job's log, ``| tee``)
  plain text: no colour codes, no hard wrapping at 80 columns.
* :func:`phase`: a step that may take a while (converting a model, tokenizing, evaluating,
  generating answers, exporting). On a terminal a rich bar with the count, elapsed time and ETA
  (or a spinner when the total is unknown), which appears only once the phase has run for half a
  second; in a log, one line once it has run for 5 s, then one every 10 s, and a last one when it
  ends. A phase counting in a ``unit`` (batch, token) also shows the seconds per unit. Shown by
  global rank 0 only (``RANK``), so ranks never interleave.

While training, the trainer's progress bar is live on the console; :func:`attach` lets phases
that run inside training (evaluation) add their bar to it instead of starting a second display.
Imports rich only when something is shown; no torch.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Iterator, Optional

LOG_FIRST_S = 5.0  # a phase shorter than this prints nothing in a log
LOG_EVERY_S = 10.0
TTY_AFTER_S = 0.5

_live: Optional[Any] = None  # a started rich.progress.Progress that phases add their tasks to


def make_console(stderr: bool = False) -> Any:
    """A rich Console for ``sys.stdout`` (or stderr) that writes plain, unwrapped text when that
    stream is not a terminal."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if _isatty(stream):
        return Console(stderr=stderr)
    width = int(os.environ.get("COLUMNS") or 120)  # tables need a width; plain lines are not wrapped to it
    return Console(stderr=stderr, force_terminal=False, color_system=None, soft_wrap=True, width=width, highlight=False)


def attach(live: Optional[Any]) -> None:
    """Phases from now on add their task to ``live`` (a started rich Progress whose columns may
    show a ``detail`` field, which phases leave empty); None detaches."""
    global _live
    _live = live


def shows_progress() -> bool:
    return os.environ.get("RANK", "0") == "0"


class Phase:
    """What a running phase is told: :meth:`advance` by ``n`` units of ``total``."""

    def __init__(
        self, description: str, total: Optional[int], console: Any, every_s: float, unit: Optional[str] = None
    ) -> None:
        self.description, self.total, self.console, self.every_s, self.unit = description, total, console, every_s, unit
        self.done = 0
        self.started = time.monotonic()
        self._printed_at: Optional[float] = None
        self._own: Any = None  # a rich Progress this phase started
        self._task: Any = None
        self._bar: Any = None  # the Progress its task lives in (its own, or the attached one)
        self._lock = threading.Lock()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._tick()

    def _tick(self) -> None:
        with self._lock:  # the ticker thread and advance() both get here
            self._show()

    def _show(self) -> None:
        elapsed = time.monotonic() - self.started
        if self.console.is_terminal or _live is not None:
            if self._bar is None and elapsed >= TTY_AFTER_S:
                self._start_bar()
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done, detail=self._rate(elapsed))
            return
        due = LOG_FIRST_S if self._printed_at is None else self._printed_at + self.every_s - self.started
        if elapsed >= due and not (self.total and self.done >= self.total):  # the end has its own line
            self.console.print(self._line(elapsed), highlight=False)
            self._printed_at = time.monotonic()

    def _start_bar(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if _live is not None:
            self._bar = _live
        else:
            columns = [SpinnerColumn(), TextColumn("{task.description}")]
            if self.total:
                columns += [
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[detail]}"),
                    TimeElapsedColumn(),
                    TextColumn("ETA"),
                    TimeRemainingColumn(),
                ]
            else:
                columns += [TimeElapsedColumn()]
            self._own = self._bar = Progress(*columns, console=self.console, transient=True)
            self._own.start()
        self._task = self._bar.add_task(self.description, total=self.total, completed=self.done, detail="")

    def _rate(self, elapsed: float) -> str:
        """'2.1 s/batch': the mean so far, once a unit is done (phases with a unit)."""
        return f"{elapsed / self.done:.3g} s/{self.unit}" if self.unit and self.done else ""

    def _line(self, elapsed: float) -> str:
        text = f"{self.description}: "
        if self.total:
            rate = f", {self._rate(elapsed)}" if self._rate(elapsed) else ""
            text += f"{self.done:,}/{self.total:,} ({self.done / self.total:.0%}){rate}, {clock_text(elapsed)} elapsed"
            if 0 < self.done < self.total:
                text += f", ~{clock_text(elapsed * (self.total - self.done) / self.done)} left"
        else:
            text += f"{clock_text(elapsed)} elapsed"
        return text

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        elapsed = time.monotonic() - self.started
        if self._bar is not None:
            self._bar.remove_task(self._task)
            if self._own is not None:
                self._own.stop()
            if elapsed >= LOG_FIRST_S:
                self.console.print(f"{self.description}: done in {clock_text(elapsed)}", highlight=False)
        elif self._printed_at is not None:
            self.console.print(f"{self.description}: done in {clock_text(elapsed)}", highlight=False)


class _Silent:
    def advance(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def phase(
    description: str,
    total: Optional[int] = None,
    *,
    console: Any = None,
    every_s: float = LOG_EVERY_S,
    unit: Optional[str] = None,
) -> Iterator[Any]:
    """``with phase("eval: loss", total=10, unit="batch") as p: ... p.advance()``; see the module
    docstring. ``total`` None: one long call (loading a model), shown with its elapsed time.
    ``console``: where to show it (default: stderr, plain when not a terminal). ``unit``: what one
    advance counts, shown with the seconds each took on average."""
    if not shows_progress():
        yield _Silent()
        return
    shown = Phase(description, total, console if console is not None else _default_console(), every_s, unit)
    stop = threading.Event()
    # Between advances (one batch of answers can take a minute on a CPU) the elapsed time and the
    # log lines keep coming.
    ticker = threading.Thread(target=lambda: _tick_until(shown, stop), name="ftl-progress", daemon=True)
    ticker.start()
    try:
        yield shown
    finally:
        stop.set()
        ticker.join()
        shown.close()


def _tick_until(shown: Phase, stop: threading.Event) -> None:
    while not stop.wait(0.25):
        shown._tick()


_console: Optional[Any] = None


def _default_console() -> Any:
    global _console
    if _console is None:
        _console = make_console(stderr=True)
    return _console


def clock_text(seconds: float) -> str:
    """'1:05', '1:01:02': a duration in a progress line."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
