"""README.md's commands work as written, in order, in a fresh copy of the repository.

The shell blocks README marks runnable on CPU (an HTML comment, ``RUNNABLE``, on the line before
the block) are read out of README itself, each line run by bash in a copy of the checkout (its
tracked and untracked-but-not-ignored files: what a fresh clone of this working tree holds) with
``ftl`` on the PATH, ``recipe=demo`` replaced by ``recipe=tiny`` so that it takes minutes, not
hours. Every command must exit 0 without a traceback, and the files README says they make must be
there. Editing README changes what this test runs: the README cannot drift from ftl again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ftl_env

from launcher.paths import ROOT

RUNNABLE = "<!-- runnable on CPU:"
FENCE = re.compile(r"^```(\w*)\s*$")


def runnable_blocks(text: str) -> list[list[str]]:
    """The command lines of every marked block: comments dropped, backslash continuations joined."""
    blocks: list[list[str]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith(RUNNABLE):
            continue
        opening = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        assert opening and opening.group(1) in ("bash", "sh"), f"README line {i + 1}: the marker must precede a ```bash block"
        commands, pending = [], ""
        for body in lines[i + 2 :]:
            if FENCE.match(body):
                break
            body = pending + strip_comment(body)
            if body.endswith("\\"):
                pending = body[:-1] + " "
                continue
            pending = ""
            if body.strip():
                commands.append(body.strip())
        blocks.append(commands)
    return blocks


def strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a # outside quotes, at the start or after a space)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def on_cpu(command: str) -> str:
    return re.sub(r"\brecipe=demo\b", "recipe=tiny", command)


def test_the_marked_blocks_are_found_and_read() -> None:
    blocks = runnable_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 3 and all(blocks)
    commands = [c for block in blocks for c in block]
    assert "ftl recipes" in commands and all("#" not in c.split("'")[0] for c in commands)
    assert strip_comment("ftl a 'x # y'   # note") == "ftl a 'x # y'"


def test_every_train_line_composes_and_validates(tmp_path: Path) -> None:
    """Fast: in a fresh copy, each `ftl train` line of the marked blocks passes `--cfg job` (compose
    and validate, nothing run) after the shell lines before it (which make its files) ran."""
    clone = fresh_copy(tmp_path / "ftl")
    checked = 0
    for command in (c for block in runnable_blocks((clone / "README.md").read_text()) for c in block):
        if not re.search(r"\bftl\b", command):  # a plain shell line, e.g. the `cp` that makes a data file
            subprocess.run(["bash", "-c", command], cwd=clone, check=True, timeout=60)
            continue
        words = on_cpu(command).split()
        if words[:2] != ["ftl", "train"] or "-m" in words:
            continue  # other commands need a run first; a multirun line composes like the lines around it
        proc = subprocess.run([sys.executable, "-m", "launcher", "train", "--cfg", "job", *words[2:]], cwd=clone,
                              env=ftl_env(PYTHONPATH=str(clone)), capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, f"{command}\n{proc.stderr}"
        checked += 1
    assert checked >= 5


def fresh_copy(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.mark.slow
def test_readme_commands_run_in_order_in_a_fresh_copy(tmp_path: Path) -> None:
    clone = fresh_copy(tmp_path / "ftl")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "ftl"  # the console script, running this copy's code
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m launcher \"$@\"\n")
    shim.chmod(0o755)
    env = ftl_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(clone))
    env.pop("PYTHONWARNINGS", None)  # README's output as a user sees it
    transcript = []
    for block in runnable_blocks((clone / "README.md").read_text()):
        for command in block:
            proc = subprocess.run(["bash", "-c", on_cpu(command)], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
            transcript.append(f"$ {on_cpu(command)}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
            assert proc.returncode == 0, "\n".join(transcript[-3:])
            assert "Traceback" not in proc.stdout + proc.stderr, transcript[-1]
    runs = clone / "runs"
    assert (runs / "tiny" / "eval.json").is_file() and (runs / "demo-zero3" / "checkpoints").is_dir()
    assert "is complete" in transcript[3]  # the same command twice: the second does nothing
    assert (runs / "my-data" / "eval.json").is_file()
    assert (clone / "exports" / "demo-lora-merged" / "config.json").is_file()
    assert (clone / "exports" / "demo-lora" / "adapter_config.json").is_file()
    assert next(t for t in transcript if t.startswith("$ ftl generate")).count("\n") >= 2  # something was generated
