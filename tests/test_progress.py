"""What ftl shows while it works (launcher/progress.py): in a log, plain lines with counts, elapsed
time and an estimate of what is left, nothing for phases shorter than 5 s, no colour codes and no
wrapping; on a terminal a bar that eval phases add to the training display; nothing on other ranks."""

from __future__ import annotations

import io
import sys
import time

import pytest
from rich.console import Console
from rich.progress import Progress, TextColumn

from launcher import progress
from launcher.progress import make_console, phase


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A clock the test moves; the phases' ticker thread stays idle unless a test lets it run."""
    fake = Clock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    monkeypatch.setattr(progress, "_tick_until", lambda shown, stop: None)
    monkeypatch.delenv("RANK", raising=False)
    return fake


def log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, color_system=None, soft_wrap=True, width=120), out


def wait_for_ticker() -> None:
    time.sleep(0.4)  # the phase's ticker thread looks at the clock every 0.25 s


def test_log_lines_count_elapsed_and_what_is_left(clock: Clock) -> None:
    console, out = log_console()
    with phase("eval: answers", total=40, console=console) as shown:
        clock.now += 1.0
        shown.advance(8)
        assert out.getvalue() == ""  # under 5 s: nothing yet
        clock.now += 5.0
        shown.advance(8)  # 16/40 after 6 s
        clock.now += 5.0
        shown.advance(8)  # 5 s after the last line: too soon for another
        clock.now += 5.0
        shown.advance(8)  # 32/40 after 16 s
        clock.now += 2.0
        shown.advance(8)
    lines = out.getvalue().splitlines()
    assert lines == [
        "eval: answers: 16/40 (40%), 0:06 elapsed, ~0:09 left",
        "eval: answers: 32/40 (80%), 0:16 elapsed, ~0:04 left",
        "eval: answers: done in 0:18",
    ]


def test_a_phase_with_a_unit_shows_seconds_per_unit(clock: Clock) -> None:
    console, out = log_console()
    with phase("eval: loss", total=10, console=console, unit="batch") as shown:
        clock.now += 6.0
        shown.advance(3)  # 2 s a batch
        clock.now += 1.0
    assert out.getvalue().splitlines() == [
        "eval: loss: 3/10 (30%), 2 s/batch, 0:06 elapsed, ~0:14 left",
        "eval: loss: done in 0:07",
    ]


def test_a_long_call_without_steps_still_shows_it_is_alive(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real ticker thread, with the fake clock again
    monkeypatch.setattr(progress.time, "monotonic", clock)
    monkeypatch.delenv("RANK", raising=False)
    console, out = log_console()
    with phase("model: loading", console=console):
        clock.now += 5.5
        wait_for_ticker()
    assert out.getvalue().splitlines() == ["model: loading: 0:06 elapsed", "model: loading: done in 0:06"]


def test_short_phases_and_other_ranks_print_nothing(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    console, out = log_console()
    with phase("data: tokenizing", total=10, console=console) as shown:
        shown.advance(10)
    monkeypatch.setenv("RANK", "1")
    with phase("eval: loss", total=3, console=console) as shown:
        clock.now += 30
        shown.advance(3)
    assert out.getvalue() == ""


def test_phases_join_the_live_training_display(clock: Clock) -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    live = Progress(TextColumn("{task.description} {task.fields[detail]}"), console=console, auto_refresh=False)
    live.add_task("train", total=10, detail="loss 1.0")
    live.start()
    progress.attach(live)
    try:
        with phase("eval: loss", total=4, console=console) as shown:
            clock.now += 1.0
            shown.advance()
            assert [t.description for t in live.tasks] == ["train", "eval: loss"]
            assert live.tasks[1].completed == 1
        assert [t.description for t in live.tasks] == ["train"]
    finally:
        progress.attach(None)
        live.stop()


def test_a_piped_console_neither_colours_nor_wraps(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    console = make_console()
    line = "ftl: " + "word " * 60
    console.print(f"[green]{line}[/green]")
    assert out.getvalue() == line + "\n"
    assert "\x1b" not in out.getvalue()


def test_the_clock_format() -> None:
    assert [progress.clock_text(s) for s in (0, 59.6, 61, 3600 + 62)] == ["0:00", "1:00", "1:01", "1:01:02"]
