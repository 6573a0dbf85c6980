"""Recipes train on the demo data (``data: demo``); a user who gives their own training data on the
command line gets evaluated on it too, never on the demo's held-out set, and never trains on the
demo rows by accident.

With ``data=demo`` (every shipped recipe's choice) and an override of ``data.train_files`` or of
``data.sources`` (its training sources), and no override of ``data.eval_files``:

* the demo's eval file is dropped and ``data.eval_fraction``, unless given, becomes 0.05 (as in
  ``data=chat_files``): a seeded 5% of the user's rows is held out;
* with ``data.sources`` alone, the demo's training file is dropped too.

Whatever the user names explicitly stays as they wrote it, and each change comes with a note.
Pure Python: runs on the composed dict before validation.
"""

from __future__ import annotations

from typing import Any

DEMO_GROUP = "demo"
EVAL_FRACTION = 0.05  # conf/data/chat_files.yaml's


def _override_keys(overrides: list[str]) -> set[str]:
    keys = set()
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~").strip()
        keys.add(key.split("[", 1)[0])
    return keys


def follow_user_data(raw: dict[str, Any], choices: dict[str, str], overrides: list[str]) -> list[str]:
    """Adjust ``raw`` in place (see the module docstring); returns the notes for the user."""
    if choices.get("data") != DEMO_GROUP:
        return []
    keys = _override_keys(overrides)
    if "data" in keys:  # data=demo named on the command line: the user asked for the demo's set as is
        return []
    data = raw.get("data")
    if not isinstance(data, dict):
        return []
    own_files = "data.train_files" in keys
    own_sources = "data.sources" in keys and any(
        isinstance(s, dict) and s.get("split", "train") == "train" for s in data.get("sources") or []
    )
    if not (own_files or own_sources):
        return []
    notes = []
    if own_sources and not own_files and data.get("train_files"):
        notes.append(
            f"data: training on data.sources only (the demo's data.train_files {data['train_files']} dropped; "
            "name them in data.train_files to mix them in)"
        )
        data["train_files"] = []
    if "data.eval_files" not in keys:
        own_eval = any(isinstance(s, dict) and s.get("split") == "eval" for s in data.get("sources") or [])
        data["eval_files"] = []
        if not own_eval and "data.eval_fraction" in keys:  # which the demo's eval file would override unsaid
            notes.append("data: evaluating on the data.eval_fraction of your training rows, not on the demo's eval set")
        elif not own_eval:
            data["eval_fraction"] = EVAL_FRACTION
            notes.append(
                f"data: evaluating on a held-out {EVAL_FRACTION:.0%} of your training rows, not on the demo's eval set "
                "(set data.eval_files=[...] for your own held-out file)"
            )
    return notes
