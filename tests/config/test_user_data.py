"""A recipe's eval data follows the user's own training data (launcher/config/user_data.py): given
data.train_files or data.sources on the command line, never the demo's eval set, never demo rows
mixed in, and a note saying so; whatever the user names explicitly stays."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from launcher.paths import asset
from launcher.session import load_config


@pytest.fixture
def mine(tmp_path: Path) -> str:
    path = tmp_path / "mine.jsonl"
    shutil.copy(asset("demo/train.jsonl"), path)
    return str(path)


def test_own_train_files_are_evaluated_on_a_held_out_part_of_them(mine: str) -> None:
    loaded = load_config(["recipe=tiny", f"data.train_files=[{mine}]"])
    assert (
        loaded.cfg.data.train_files == [mine]
        and loaded.cfg.data.eval_files == []
        and loaded.cfg.data.eval_fraction == 0.05
    )
    assert any("held-out 5% of your training rows" in n for n in loaded.notes)


def test_own_train_files_with_an_eval_fraction_are_evaluated_on_that_part_not_on_the_demo(mine: str) -> None:
    """data.eval_fraction is ignored while eval files exist: the demo's kept would override it unsaid."""
    loaded = load_config(["recipe=tiny", f"data.train_files=[{mine}]", "data.eval_fraction=0.1"])
    assert loaded.cfg.data.eval_files == [] and loaded.cfg.data.eval_fraction == 0.1
    assert any("data.eval_fraction of your training rows" in n for n in loaded.notes), loaded.notes


def test_own_sources_replace_the_demo_rows(mine: str) -> None:
    loaded = load_config(["recipe=tiny", f"data.sources=[{{path: {mine}, weight: 1}}]"])
    assert loaded.cfg.data.train_files == [] and loaded.cfg.data.eval_files == []
    assert any("data.sources only" in n for n in loaded.notes)


def test_what_the_user_names_stays(mine: str) -> None:
    explicit = load_config(
        ["recipe=tiny", f"data.train_files=[{mine}]", f"data.eval_files=[{asset('demo/eval.jsonl')}]"]
    )
    assert explicit.cfg.data.eval_files == [asset("demo/eval.jsonl")] and explicit.cfg.data.eval_fraction == 0.0
    group = load_config(["recipe=tiny", "data=chat_files", f"data.train_files=[{mine}]"])
    assert group.cfg.data.eval_files == [] and group.cfg.data.eval_fraction == 0.05 and not group.notes
    demo = load_config(["recipe=tiny"])
    assert demo.cfg.data.eval_files == [asset("demo/eval.jsonl")] and not demo.notes


def test_chat_files_without_files_names_what_to_give() -> None:
    from launcher.config.errors import ConfigErrors

    with pytest.raises(ConfigErrors, match=r"data.train_files: is empty; give one or more files"):
        load_config(["recipe=tiny", "data=chat_files"])
