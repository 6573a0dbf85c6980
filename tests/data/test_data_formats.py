"""The instruction and completion formats, ShareGPT rows, file types and folders, hub sources (offline,
through a stand-in loader), mixing by weight, truncation policy, named templates, and bad input."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from launcher.config.schema import DataConfig, DataSource
from launcher.data.build import build_datasets
from launcher.data.templates import ALPACA
from launcher.data.types import IGNORE_INDEX, DataError
from launcher.paths import asset

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))


@pytest.fixture()
def plain_tok(tok: Any) -> Any:
    """The tiny tokenizer without a chat template, as a base model's often is."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))
    t.chat_template = None
    return t


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def build(tok: Any, tmp_path: Path, rows: list[Any], seq_len: int = 256, **cfg: Any) -> Any:
    train, _ = build_datasets(DataConfig(train_files=[write_jsonl(tmp_path / "t.jsonl", rows)], **cfg), tok, seq_len, 0)
    return train


ALPACA_ROWS = [
    {"instruction": "Name the launcher.", "input": "", "output": "It is ftl."},
    {"instruction": "Summarise this.", "input": "ftl trains models on many GPUs.", "output": "ftl trains LLMs."},
]


# --------------------------------------------------------------------------------------------
# masking: -100 exactly on the tokens that are not the answer


def test_instruction_masking_with_the_tokenizer_template(tok: Any, tmp_path: Path) -> None:
    """Reference: the tokenizer's ChatML rendered piece by piece (special tokens and the newline
    after the role are pre-token boundaries, so the pieces tokenize as the whole does)."""
    train = build(tok, tmp_path, ALPACA_ROWS, format="instruction")
    for row, example in zip(ALPACA_ROWS, train):
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        want_ids: list[int] = []
        want_labels: list[int] = []
        for piece, learn in [
            ("<|im_start|>user\n", False),
            (prompt, False),
            (IM_END, False),
            ("\n", False),
            ("<|im_start|>assistant\n", False),
            (row["output"], True),
            (IM_END, True),
            ("\n", False),
        ]:
            want_ids += ids(tok, piece)
            want_labels += ids(tok, piece) if learn else [IGNORE_INDEX] * len(ids(tok, piece))
        assert example["input_ids"] == want_ids
        assert example["labels"] == want_labels


def test_instruction_falls_back_to_alpaca_without_a_template(plain_tok: Any, tmp_path: Path) -> None:
    train = build(plain_tok, tmp_path, ALPACA_ROWS, format="instruction")
    assert train.chat_template == ALPACA
    text = plain_tok.decode(train[1]["input_ids"])
    assert text.startswith("### Instruction:\nSummarise this.\n\nftl trains models on many GPUs.\n\n### Response:\n")
    for row, example in zip(ALPACA_ROWS, train):
        trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
        masked = [t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX]
        assert plain_tok.decode(trained) == row["output"] + IM_END  # the answer and the eos that ends it
        assert "### Response:" in plain_tok.decode(masked) and row["output"] not in plain_tok.decode(masked)
        assert all(label in (IGNORE_INDEX, t) for t, label in zip(example["input_ids"], example["labels"]))


def test_instruction_is_generated_like_chat_at_eval(tok: Any, tmp_path: Path) -> None:
    from launcher.data.chat import prompt_and_reference

    train = build(tok, tmp_path, ALPACA_ROWS, format="instruction")
    prompt, reference = prompt_and_reference(train.conversations[0])
    assert prompt == [{"role": "user", "content": "Name the launcher."}] and reference == "It is ftl."


def test_completion_trains_every_token(tok: Any, tmp_path: Path) -> None:
    rows = [{"text": "ftl is a launcher."}, {"body": "Checkpoints are atomic.", "text": "Resume is exact."}]
    train = build(tok, tmp_path, rows, format="completion")
    for row, example in zip(rows, train):
        assert example["labels"] == example["input_ids"]
        assert example["input_ids"] == ids(tok, row["text"]) + [tok.eos_token_id]
    assert train.conversations == [[], []]  # nothing to generate: evaluation is perplexity only
    other = build(tok, tmp_path, rows[1:], format="completion", text_field="body")
    assert other[0]["input_ids"] == ids(tok, "Checkpoints are atomic.") + [tok.eos_token_id]


def test_sharegpt_rows_are_chat_rows(tok: Any, tmp_path: Path) -> None:
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What is ftl?"},
            {"from": "gpt", "value": "A launcher."},
        ]
    }
    messages = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is ftl?"},
            {"role": "assistant", "content": "A launcher."},
        ]
    }
    a, b = build(tok, tmp_path, [sharegpt, messages])
    assert a == b
    assert (
        tok.decode([t for t, label in zip(a["input_ids"], a["labels"]) if label != IGNORE_INDEX])
        == "A launcher." + IM_END
    )


def test_named_template_and_misspelt_name(plain_tok: Any, tok: Any, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    with_name = build(plain_tok, tmp_path, rows, chat_template="chatml")
    assert with_name[0] == build(tok, tmp_path, rows)[0]  # the tiny tokenizer's own template is ChatML
    with pytest.raises(DataError, match="neither Jinja nor a named template"):
        build(tok, tmp_path, rows, chat_template="chatlm")


# --------------------------------------------------------------------------------------------
# file types, folders, hub


def test_every_file_type_and_a_folder_give_the_same_examples(tok: Any, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    reference = build(tok, tmp_path, ALPACA_ROWS, format="instruction").examples
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(ALPACA_ROWS[:1]))
    pq.write_table(pa.Table.from_pylist(ALPACA_ROWS[1:]), folder / "b.parquet")
    with open(tmp_path / "all.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ALPACA_ROWS)
    (folder / ".hidden.jsonl").write_text("not data\n")
    for path in (str(folder), str(tmp_path / "all.csv")):
        train, _ = build_datasets(DataConfig(format="instruction", train_files=[path]), tok, 256, 0)
        assert list(train.examples) == list(reference), path


def test_hub_source_goes_through_load_dataset(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The online path, offline: a stand-in for datasets.load_dataset returning an in-memory split."""
    import datasets

    from launcher.data import sources

    calls: list[tuple[str, dict[str, str]]] = []

    def fake_load_dataset(name: str, **kwargs: str) -> Any:
        calls.append((name, kwargs))
        if name == "org/missing":
            raise FileNotFoundError("no such dataset on the hub")
        return datasets.Dataset.from_list(ALPACA_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(sources, "_HUB_LOADED", {})
    cfg = DataConfig(format="instruction", sources=[DataSource(path="hub:org/alpaca", hub_args={"revision": "abc"})])
    train, _ = build_datasets(cfg, tok, 256, 0)
    assert len(train) == 2 and calls == [("org/alpaca", {"split": "train", "revision": "abc"})]
    assert sources.hub_fingerprint("hub:org/alpaca", {"revision": "abc"})
    with pytest.raises(DataError, match="hub:org/missing: cannot load the hub dataset"):
        build_datasets(replace(cfg, sources=[DataSource(path="hub:org/missing")]), tok, 256, 0)


# --------------------------------------------------------------------------------------------
# mixing, truncation


def numbered(n: int, prefix: str) -> list[dict[str, str]]:
    return [{"instruction": f"{prefix} question {i}?", "output": f"{prefix} answer {i}."} for i in range(n)]


def test_sources_mix_by_weight(tok: Any, tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", numbered(4, "A"))
    b = write_jsonl(tmp_path / "b.jsonl", numbered(6, "B"))
    chat = write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}],
    )
    cfg = DataConfig(
        format="instruction",
        sources=[
            DataSource(path=a, weight=2.0),
            DataSource(path=b, weight=0.5),
            DataSource(path=chat, format="chat"),
            DataSource(path=chat, format="chat", split="eval"),
        ],
    )
    train, evals = build_datasets(cfg, tok, 256, seed=1)
    users = [c[0]["content"] for c in train.conversations]
    assert sorted(u for u in users if u.startswith("A")) == sorted(
        f"A question {i}?" for i in range(4) for _ in range(2)
    )
    picked_b = [u for u in users if u.startswith("B")]
    assert len(picked_b) == 3 and len(set(picked_b)) == 3
    assert users.count("Hi") == 1 and evals is not None and len(evals) == 1
    assert train.stats["examples"] == len(train) == 12
    assert train.stats["tokens"] == sum(len(e["input_ids"]) for e in train)
    again, _ = build_datasets(cfg, tok, 256, seed=1)
    assert [c[0]["content"] for c in again.conversations] == users  # the seeded half is the same half


def test_truncation_drop_leaves_long_examples_out(tok: Any, tmp_path: Path) -> None:
    rows = [{"text": "short"}, {"text": "a much longer document about checkpoints " * 10}]
    clipped = build(tok, tmp_path, rows, seq_len=32, format="completion")
    assert (clipped.stats["examples"], clipped.stats["truncated"], clipped.stats["dropped"]) == (2, 1, 0)
    dropped = build(tok, tmp_path, rows, seq_len=32, format="completion", truncation="drop")
    assert (dropped.stats["examples"], dropped.stats["truncated"], dropped.stats["dropped"]) == (1, 0, 1)


# --------------------------------------------------------------------------------------------
# bad input: file and row named, or skipped and counted

BAD: dict[str, tuple[str, Any, str]] = {
    "instruction missing output": ("instruction", {"instruction": "Hi"}, "missing 'output'"),
    "instruction empty": ("instruction", {"instruction": " ", "output": "x"}, "empty 'instruction'"),
    "instruction non-string input": (
        "instruction",
        {"instruction": "Hi", "input": 3, "output": "x"},
        "'input' must be a string",
    ),
    "completion missing text": ("completion", {"content": "x"}, "missing 'text'"),
    "completion empty text": ("completion", {"text": ""}, "empty 'text'"),
    "sharegpt empty": ("chat", {"conversations": []}, "empty conversation"),
    "sharegpt unknown role": ("chat", {"conversations": [{"from": "bot", "value": "x"}]}, "unknown role 'bot'"),
    "sharegpt missing value": ("chat", {"conversations": [{"from": "human"}]}, "value must be a string"),
}
GOOD = {
    "instruction": {"instruction": "Hi", "output": "Hello"},
    "completion": {"text": "Hello"},
    "chat": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows_name_file_and_row_or_are_skipped(case: str, tok: Any, tmp_path: Path) -> None:
    fmt, bad, reason = BAD[case]
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD[fmt], GOOD[fmt], bad, GOOD[fmt]])
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(format=fmt, train_files=[path]), tok, 256, 0)
    assert f"{path}, row 3" in str(info.value) and reason in str(info.value)
    train, _ = build_datasets(DataConfig(format=fmt, train_files=[path], on_error="skip"), tok, 256, 0)
    assert (train.stats["examples"], train.stats["skipped"]) == (3, 1)


def test_csv_row_with_bad_utf8_is_named_and_skippable(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b'text\nfine\n"caf\xe9"\nalso fine\n')
    with pytest.raises(DataError, match=r"t\.csv, row 3: not valid UTF-8"):
        build_datasets(DataConfig(format="completion", train_files=[str(path)]), tok, 64, 0)
    train, _ = build_datasets(DataConfig(format="completion", train_files=[str(path)], on_error="skip"), tok, 64, 0)
    assert (train.stats["examples"], train.stats["skipped"]) == (2, 1)


def test_missing_sources_are_named(tok: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, reason in (
        (str(tmp_path / "nope.parquet"), "nope.parquet: data file not found"),
        (str(empty), "folder holds no data files"),
    ):
        with pytest.raises(DataError, match=reason):
            build_datasets(DataConfig(sources=[DataSource(path=path)], on_error="skip"), tok, 64, 0)


def test_validate_reports_sources() -> None:
    from launcher.config.compose import compose
    from launcher.config.validate import validate

    def errors(*overrides: str) -> dict[str, str]:
        raw, _, found = compose(
            ["recipe=tiny", "data.train_files=[]", "data.eval_files=[]", "eval.after_training=false", *overrides]
        )
        return {e.path: e.message for e in found + validate(raw)[1]}

    messages = errors("data.sources=[{path: /nonexistent/x.jsonl}, {path: hub:org/ds}, {path: hub:}]")
    assert "file not found" in messages["data.sources[0].path"]
    assert "data.sources[1].path" not in messages  # hub ids are not files
    assert "is required" in messages["data.sources[2].path"]
    assert "data.train_files" not in messages  # the sources are training data
    assert "must be > 0" in errors("data.sources=[{path: hub:org/ds, weight: 0}]")["data.sources[0].weight"]
    assert "data.train_files" in errors()


# --------------------------------------------------------------------------------------------
# rows that teach nothing are no examples, and are counted


def test_preference_pairs_with_chosen_identical_to_rejected_are_dropped_and_counted(tok: Any, tmp_path: Path) -> None:
    good = {"prompt": "Name the launcher.", "chosen": "It is ftl.", "rejected": "I do not know."}
    same = {"prompt": "Name the launcher.", "chosen": "It is ftl.", "rejected": "It is ftl."}
    same_chat = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Hello."}],
    }
    train = build(tok, tmp_path, [good, same, good, same_chat], format="preference")
    assert len(train) == 2 and train.stats["examples"] == 2 and train.stats["identical"] == 2
    with pytest.raises(DataError, match="every preference pair has chosen identical to rejected"):
        build(tok, tmp_path, [same, same_chat], format="preference")


def test_conversations_whose_answers_are_empty_are_not_counted_as_examples(tok: Any, tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    empty_answer = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}
    all_empty = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}
    train = build(tok, tmp_path, [good, empty_answer, all_empty, good])
    assert len(train) == 2 and train.stats["examples"] == 2 and train.stats["empty"] == 2
    no_mask = build(
        tok, tmp_path, [good, all_empty], assistant_only_loss=False
    )  # every token trains: still nothing in it
    assert len(no_mask) == 1 and no_mask.stats["empty"] == 1
