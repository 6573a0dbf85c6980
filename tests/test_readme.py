"""README.md's and docs/*.md's commands work as written, in order, in a fresh copy of the repository.

The shell blocks these pages mark runnable on CPU (an HTML comment, ``RUNNABLE``, on the line before
the block) are read out of the pages themselves (README first, then docs/ by name), each line run by
bash in a copy of the checkout (its tracked and untracked-but-not-ignored files: what a fresh clone
of this working tree holds) with ``ftl`` on the PATH, ``recipe=demo`` replaced by ``recipe=tiny`` so
that it takes minutes, not hours. Every command must exit 0 without a traceback, and the files the
pages say they make must be there. Editing a page changes what this test runs: the docs cannot
drift from ftl again.

The README stays a front door: at most ``README_MAX_LINES`` lines, no dated measurement (those
belong in docs/BENCHMARKS.md), and every relative link of README and docs/ names a file that exists.
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
README_MAX_LINES = 250
ISO_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def pages(root: Path) -> list[Path]:
    """The pages whose runnable blocks run, in the order they run: README, then docs/ by name."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def page_blocks(root: Path) -> list[list[str]]:
    return [block for page in pages(root) for block in runnable_blocks(page.read_text())]


def runnable_blocks(text: str) -> list[list[str]]:
    """The command lines of every marked block: comments dropped, backslash continuations joined."""
    blocks: list[list[str]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith(RUNNABLE):
            continue
        opening = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        assert opening and opening.group(1) in ("bash", "sh"), f"line {i + 1}: the marker must precede a ```bash block"
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
    assert runnable_blocks((ROOT / "README.md").read_text())  # the front door shows a runnable block itself
    blocks = page_blocks(ROOT)
    assert len(blocks) >= 3 and all(blocks)
    commands = [c for block in blocks for c in block]
    assert "ftl recipes" in commands and all("#" not in c.split("'")[0] for c in commands)
    assert strip_comment("ftl a 'x # y'   # note") == "ftl a 'x # y'"


def test_every_train_line_composes_and_validates(tmp_path: Path) -> None:
    """Fast: in a fresh copy, each `ftl train` line of the marked blocks passes `--cfg job` (compose
    and validate, nothing run) after the shell lines before it (which make its files) ran."""
    clone = fresh_copy(tmp_path / "ftl")
    checked = 0
    for command in (c for block in page_blocks(clone) for c in block):
        if not re.search(r"\bftl\b", command):  # a plain shell line, e.g. the `cp` that makes a data file
            subprocess.run(["bash", "-c", command], cwd=clone, check=True, timeout=60)
            continue
        words = on_cpu(command).split()
        if words[:2] != ["ftl", "train"] or "-m" in words:
            continue  # other commands need a run first; a multirun line composes like the lines around it
        proc = subprocess.run(
            [sys.executable, "-m", "launcher", "train", "--cfg", "job", *words[2:]],
            cwd=clone,
            env=ftl_env(PYTHONPATH=str(clone)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"{command}\n{proc.stderr}"
        checked += 1
    assert checked >= 5


def fresh_copy(dest: Path) -> Path:
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.mark.slow
@pytest.mark.heavy
def test_readme_commands_run_in_order_in_a_fresh_copy(tmp_path: Path) -> None:
    clone = fresh_copy(tmp_path / "ftl")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "ftl"  # the console script, running this copy's code
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m launcher "$@"\n')
    shim.chmod(0o755)
    env = ftl_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(clone))
    env.pop("PYTHONWARNINGS", None)  # README's output as a user sees it
    transcript = []
    for block in page_blocks(clone):
        for command in block:
            proc = subprocess.run(
                ["bash", "-c", on_cpu(command)], cwd=clone, env=env, capture_output=True, text=True, timeout=900
            )
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


def test_the_readme_is_a_front_door_not_a_notebook() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move a topic to a docs/ page"
    dated = [f"README.md:{n}: {line}" for n, line in enumerate(lines, 1) if ISO_DATE.search(line)]
    assert not dated, "dated measurements belong in docs/BENCHMARKS.md:\n" + "\n".join(dated)


def relative_links(page: Path) -> list[str]:
    """The targets of the page's markdown links that are neither web addresses nor in-page anchors."""
    targets = (m.group(1).split("#")[0] for m in LINK.finditer(page.read_text()))
    return [t for t in targets if t and not re.match(r"^[a-z]+:", t)]


def test_every_relative_link_names_an_existing_file() -> None:
    broken = []
    for page in pages(ROOT):
        broken += [f"{page.relative_to(ROOT)} -> {t}" for t in relative_links(page) if not (page.parent / t).exists()]
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_reached_from_the_readme(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("[a](docs/A.md#x), [web](https://x.org/b.md), [here](#anchor), [b](../B.md)")
    assert relative_links(page) == ["docs/A.md", "../B.md"]
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        for target in relative_links(page):
            linked = (page.parent / target).resolve()
            if linked.suffix == ".md" and linked.is_file() and linked not in reached:
                reached.add(linked)
                todo.append(linked)
    unreached = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in reached)
    assert not unreached, f"docs pages no link from README.md leads to: {unreached}"
