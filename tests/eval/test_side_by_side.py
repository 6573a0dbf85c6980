"""The side-by-side page: every example present, every value escaped (hostile prompts and answers),
per-example ROUGE-L; written by training's evals beside the base answers, with a W&B table."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from helpers import ftl, wandb_offline_attempts

from launcher.eval.side_by_side import render_html, side_by_side_rows, write_side_by_side
from launcher.rundir import RunPaths

HOSTILE = [
    {
        "question": '<script>alert("pwned")</script> and \'quotes\' & "more"',
        "reference": "</td></tr></table><b>bold</b>",
        "prediction": "<img src=x onerror=alert(1)> café ✓",
    },
    {"question": "Plain?", "reference": "Rerun the same command.", "prediction": "Rerun the command."},
    {"question": "a\nmulti-line\nprompt", "reference": "x < y > z", "prediction": ""},
]
BASE = [
    {**HOSTILE[0], "prediction": '"><script>document.write(1)</script>'},
    {**HOSTILE[1], "prediction": "I do not know."},
    {**HOSTILE[2], "prediction": "y"},
]


class Cells(HTMLParser):
    """The text of every table cell, row by row, and every tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.tags: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(text: str) -> Cells:
    cells = Cells()
    cells.feed(text)
    cells.close()
    return cells


def test_every_example_present_and_escaped(tmp_path: Path) -> None:
    from rouge_score import rouge_scorer

    page = tmp_path / "page.html"
    assert write_side_by_side(page, {"samples": BASE}, {"samples": HOSTILE}, 'Title <b>"x"</b>')
    text = page.read_text(encoding="ascii")
    cells = parse(text)
    assert set(cells.tags) == {"html", "head", "meta", "title", "style", "body", "h1", "p", "table", "thead"} | {
        "tbody",
        "tr",
        "th",
        "td",
    }  # no <script>, <img>, <b> from the data
    header, *rows = cells.rows
    assert header == ["#", "prompt", "reference", "base", "ROUGE-L", "fine-tuned", "ROUGE-L"]
    assert len(rows) == len(HOSTILE)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for i, (row, tuned, base) in enumerate(zip(rows, HOSTILE, BASE), start=1):
        assert row[:4] == [str(i), tuned["question"], tuned["reference"], base["prediction"]]
        assert row[5] == tuned["prediction"]
        for answer, cell in ((base["prediction"], row[4]), (tuned["prediction"], row[6])):
            assert cell == f"{100 * scorer.score(tuned['reference'], answer)['rougeL'].fmeasure:.1f}"
    assert "<h1>Title &lt;b&gt;&quot;x&quot;&lt;/b&gt;</h1>" in text


def test_without_a_base_eval_the_page_says_so() -> None:
    rows = side_by_side_rows(None, {"samples": HOSTILE})
    assert [r["base"] for r in rows] == [None] * 3
    cells = parse(render_html(rows, "t"))
    assert cells.rows[0] == ["#", "prompt", "reference", "fine-tuned", "ROUGE-L"]
    assert "eval.before_training=true" in render_html(rows, "t")


def test_no_page_for_an_eval_that_did_not_generate(tmp_path: Path) -> None:
    assert not write_side_by_side(tmp_path / "p.html", None, {"samples": []}, "t")
    assert not (tmp_path / "p.html").exists()


def test_training_writes_the_page_and_a_wandb_table(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ftl(
        "train",
        "recipe=tiny",
        "train.max_steps=2",
        "eval.before_training=true",
        "eval.generate=true",
        "eval.num_generate=3",
        "eval.max_new_tokens=6",
        "wandb.mode=offline",
        "launch.dist_timeout_s=60",
        f"run.dir={run_dir}",
    )
    evals = json.loads(RunPaths(run_dir).eval.read_text())
    header, *rows = parse(RunPaths(run_dir).side_by_side.read_text()).rows
    assert "base" in header and len(rows) == 3
    for row, base, tuned in zip(rows, evals["before"]["samples"], evals["after"]["samples"]):
        assert row[1:6:2] == [tuned["question"], base["prediction"], tuned["prediction"]]
        assert row[2] == tuned["reference"]
    run_id = (run_dir / RunPaths.WANDB_ID).read_text().strip()
    tables = [p for attempt in wandb_offline_attempts(run_dir, run_id) for p in attempt.rglob("*.table.json")]
    assert tables, "no W&B table was logged"
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["prompt", "reference", "base", "base ROUGE-L", "tuned", "tuned ROUGE-L"]
    assert [r[0] for r in table["data"]] == [s["question"] for s in evals["after"]["samples"]]
