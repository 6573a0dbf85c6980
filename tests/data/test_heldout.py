"""The held-out set's warnings (answers shared with training, too few rows) and the demo's held-out
set, whose answers training never shows."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import ftl

from launcher.config.schema import DataConfig
from launcher.data.heldout import held_out_notes
from launcher.paths import asset


def chat_rows(path: Path, pairs: list[tuple[str, str]]) -> str:
    path.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in pairs
        )
    )
    return str(path)


def assistant_answers(path: str) -> set[str]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return {m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"}


def test_the_demo_held_out_answers_are_not_in_training() -> None:
    train, held_out = asset("demo/train.jsonl"), asset("demo/eval.jsonl")
    assert len(Path(held_out).read_text().splitlines()) == 40
    assert assistant_answers(held_out).isdisjoint(assistant_answers(train))
    assert held_out_notes(DataConfig(train_files=[train], eval_files=[held_out])) == []
    # the paraphrase set is the other kind: new questions, answers taught word for word
    paraphrases = asset("demo/eval_paraphrase.jsonl")
    assert assistant_answers(paraphrases) <= assistant_answers(train)


def test_shared_answers_are_counted_after_whitespace_normalisation(tmp_path: Path) -> None:
    rows = [(f"question {i}?", f"Answer number {i}.") for i in range(30)]
    train = chat_rows(tmp_path / "train.jsonl", rows)
    held = [("new a?", "Answer  number\n3. "), ("new b?", "Answer number 4."), ("new c?", "Something new.")]
    held += [(f"other {i}?", f"A fresh answer {i}.") for i in range(22)]
    notes = held_out_notes(DataConfig(train_files=[train], eval_files=[chat_rows(tmp_path / "eval.jsonl", held)]))
    assert len(notes) == 1 and "2 of 25 held-out rows (8%)" in notes[0] and "recall" in notes[0]


def test_a_small_held_out_set_is_warned_about(tmp_path: Path) -> None:
    train = chat_rows(tmp_path / "train.jsonl", [(f"q {i}?", f"a {i}.") for i in range(100)])
    held = chat_rows(tmp_path / "eval.jsonl", [(f"new {i}?", f"new answer {i}.") for i in range(5)])
    (note,) = held_out_notes(DataConfig(train_files=[train], eval_files=[held]))
    assert "the held-out set has 5 rows" in note and "hold out 20 or more" in note
    enough = chat_rows(tmp_path / "eval20.jsonl", [(f"new {i}?", f"new answer {i}.") for i in range(20)])
    assert held_out_notes(DataConfig(train_files=[train], eval_files=[enough])) == []


def test_two_pairs_carved_from_thirty_are_warned_about_in_ftl_plan(tmp_path: Path) -> None:
    """Issue 35: a held-out set of 2 pairs (5% of 30) got no warning."""
    pairs = Path(asset("demo/preferences/train.jsonl")).read_text().splitlines()[:30]
    (tmp_path / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    cfg = DataConfig(format="preference", train_files=[str(tmp_path / "pairs.jsonl")], eval_fraction=0.05)
    (note,) = held_out_notes(cfg)
    assert "the held-out set has 2 pairs (0.05 of 30)" in note
    plan = ftl(
        "plan",
        "recipe=demo-dpo",
        f"data.train_files=[{tmp_path / 'pairs.jsonl'}]",
        "data.eval_files=[]",
        "data.eval_fraction=0.05",
        timeout=120,
    )
    assert "the held-out set has 2 pairs (0.05 of 30)" in plan.stdout
