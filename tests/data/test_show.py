"""`ftl preprocess --show N`: the first N training examples decoded, the tokens the loss trains on
marked ([[...]] in a pipe), so a user sees what the chat template put around their conversations."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import TINY, ftl

from launcher.data.show import GREEN, marked_text, sequences
from launcher.data.types import IGNORE_INDEX
from launcher.paths import asset


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))


def token_by_token(tok: Any, ids: list[int], labels: list[int]) -> str:
    """The marking built independently: every token decoded alone, each trained one bracketed."""
    text = "".join(
        f"[[{tok.decode([i])}]]" if label != IGNORE_INDEX else tok.decode([i]) for i, label in zip(ids, labels)
    )
    return text.replace("]][[", "")


def test_plain_output_marks_exactly_the_label_tokens(tok: Any) -> None:
    from launcher.data.cache import prepare
    from launcher.session import load_config

    out = ftl("preprocess", *TINY, "--show", "3")
    assert "between [[ and ]]" in out.stdout and "\x1b[" not in out.stdout  # a pipe: plain text
    cfg = load_config(TINY).cfg
    examples = list(prepare(cfg.data, tok, cfg.train.seq_len, cfg.train.seed).train.examples)[:3]
    shown = out.stdout.split("--- example ")[1:]
    assert len(shown) == 3
    for number, (text, example) in enumerate(zip(shown, examples), start=1):
        header, body = text.split("\n", 1)
        ids, labels = example["input_ids"], example["labels"]
        trained = sum(label != IGNORE_INDEX for label in labels)
        assert 0 < trained < len(ids)  # the prompt is context, the answer trained
        assert header == f"{number}: {len(ids)} tokens, {trained} trained ---"
        assert body.rstrip("\n") == token_by_token(tok, ids, labels).rstrip("\n")
        assert "<|im_start|>user" in body and "[[<|im_start|>" not in body  # the template's markers, untrained


def test_packs_and_pairs_split_into_their_sequences_and_color_on_a_terminal(tok: Any) -> None:
    ids = tok("Hi there. Bye now.", add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX, *ids[1:]]
    pack = {"input_ids": ids + ids, "labels": labels + labels, "position_ids": [*range(len(ids))] * 2}
    assert list(sequences(pack)) == [(ids, labels), (ids, labels)]
    pair = {"input_ids": ids + ids[:2], "labels": labels + labels[:2], "lengths": [len(ids), 2]}
    assert list(sequences(pair)) == [(ids, labels), (ids[:2], labels[:2])]
    colored = marked_text(tok, ids, labels, GREEN)
    assert colored == tok.decode(ids[:1]) + GREEN[0] + tok.decode(ids[1:]) + GREEN[1]
    hostile = tok("a\x1b[2Jb", add_special_tokens=False)["input_ids"]
    escaped = marked_text(tok, hostile, [IGNORE_INDEX] * len(hostile))
    assert "\x1b" not in escaped  # data never drives the terminal


def test_show_takes_a_count() -> None:
    bad = ftl("preprocess", *TINY, "--show", "-1", check=False)
    assert bad.returncode == 2 and "expected a number of examples" in bad.stderr
