"""The chat data format: masking, truncation, bad input, skip mode, eval split, padding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.config.schema import DataConfig
from launcher.data.build import build_datasets, carve_eval_split, collate
from launcher.data.chat import ChatFormat, prompt_and_reference
from launcher.data.types import IGNORE_INDEX, DataError, TokenizedDataset
from launcher.paths import asset

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer: from the converted cache when there is one, else straight from the GGUF
    file (~3 s; the model conversion itself is left to the slow tests)."""
    from transformers import AutoTokenizer

    from launcher.model import smollm2

    try:
        gguf = smollm2.gguf_path()
    except smollm2.SmolLM2NotInstalled as e:
        pytest.skip(str(e))
    converted = smollm2.cache_dir() / smollm2.CACHE_NAME
    if smollm2.is_complete(converted):
        return AutoTokenizer.from_pretrained(str(converted))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def chat(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def qa(question: str, answer: str) -> dict[str, Any]:
    return chat(("user", question), ("assistant", answer))


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def labelled_text(tokenizer: Any, example: dict[str, list[int]]) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


MULTI_TURN = chat(
    ("system", "You answer questions about ftl."),
    ("user", "How do I resume training?"),
    ("assistant", "Rerun the same command."),
    ("user", "And with a new learning rate?"),
    ("assistant", "Add train.lr=1e-4 to it."),
)


# --------------------------------------------------------------------------------------------
# masking


def test_masking_matches_segment_by_segment_encoding(tiny_tokenizer: Any) -> None:
    """Independent reference: ChatML rendered piece by piece, each piece tokenized alone (special
    tokens and the newline after the role are pre-token boundaries, so the pieces concatenate to the
    whole-text tokenization), labels on assistant content and its <|im_end|> only."""
    fmt = ChatFormat.from_config(DataConfig(), tiny_tokenizer)
    input_ids, labels = fmt.encode(fmt.parse(MULTI_TURN))

    def ids(text: str) -> list[int]:
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    want_ids: list[int] = []
    want_labels: list[int] = []
    for message in MULTI_TURN["messages"]:
        trained = message["role"] == "assistant"
        for piece, learn in [
            (f"<|im_start|>{message['role']}\n", False),
            (message["content"], trained),
            (IM_END, trained),
            ("\n", False),
        ]:
            piece_ids = ids(piece)
            want_ids += piece_ids
            want_labels += piece_ids if learn else [IGNORE_INDEX] * len(piece_ids)
    assert input_ids == want_ids
    assert labels == want_labels


def test_masking_on_tiny_tokenizer_decodes_to_assistant_turns(tiny_tokenizer: Any) -> None:
    fmt = ChatFormat.from_config(DataConfig(), tiny_tokenizer)
    input_ids, labels = fmt.encode(fmt.parse(MULTI_TURN))
    example = {"input_ids": input_ids, "labels": labels}
    assert labelled_text(tiny_tokenizer, example) == f"Rerun the same command.{IM_END}Add train.lr=1e-4 to it.{IM_END}"
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels))


def test_masking_on_smollm2_tokenizer(smollm2_tokenizer: Any) -> None:
    """SmolLM2's template inserts a default system prompt when there is none: never trained."""
    fmt = ChatFormat.from_config(DataConfig(), smollm2_tokenizer)
    for row in (MULTI_TURN, qa("What is the capital of France?", "Paris, of course. 🇫🇷 café")):
        input_ids, labels = fmt.encode(fmt.parse(row))
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert labelled_text(smollm2_tokenizer, {"input_ids": input_ids, "labels": labels}) == "".join(
            a + IM_END for a in answers
        )
        masked = smollm2_tokenizer.decode([t for t, label in zip(input_ids, labels) if label == IGNORE_INDEX])
        assert "You are a helpful AI assistant named SmolLM" in masked or row is MULTI_TURN
        assert smollm2_tokenizer.decode(input_ids) == fmt.render(fmt.parse(row), add_generation_prompt=False)


def test_opening_assistant_message_is_trained(tiny_tokenizer: Any) -> None:
    fmt = ChatFormat.from_config(DataConfig(), tiny_tokenizer)
    row = chat(("assistant", "Welcome to ftl."), ("user", "Thanks"), ("assistant", "Ask away."))
    input_ids, labels = fmt.encode(fmt.parse(row))
    assert labelled_text(tiny_tokenizer, {"input_ids": input_ids, "labels": labels}) == (
        f"Welcome to ftl.{IM_END}Ask away.{IM_END}"
    )


@pytest.mark.parametrize("empty", ["", "  \n"])
def test_empty_assistant_turn_inside_a_conversation_is_not_trained(tiny_tokenizer: Any, empty: str) -> None:
    """An empty answer between good ones: its end-of-turn token alone is no label (it would teach
    the model to answer nothing); the good answers around it still are."""
    fmt = ChatFormat.from_config(DataConfig(), tiny_tokenizer)
    row = chat(("user", "Hi"), ("assistant", empty), ("user", "How do I resume?"), ("assistant", "Rerun it."))
    input_ids, labels = fmt.encode(fmt.parse(row))
    assert labelled_text(tiny_tokenizer, {"input_ids": input_ids, "labels": labels}) == f"Rerun it.{IM_END}"


def test_all_tokens_trained_without_assistant_only_loss(tiny_tokenizer: Any) -> None:
    fmt = ChatFormat.from_config(DataConfig(assistant_only_loss=False), tiny_tokenizer)
    input_ids, labels = fmt.encode(fmt.parse(MULTI_TURN))
    assert labels == input_ids


def test_configured_chat_template_wins_and_is_kept(tiny_tokenizer: Any, tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}[{{ m['role'] }}]:\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]:\n{% endif %}"
    )
    cfg = DataConfig(train_files=[write_jsonl(tmp_path / "t.jsonl", [qa("Hi", "Hello there")])], chat_template=template)
    train, _ = build_datasets(cfg, tiny_tokenizer, seq_len=128, seed=0)
    # No end-of-turn token in this template: the turn ends at its content (the newline is the
    # template's separator).
    assert labelled_text(tiny_tokenizer, train[0]) == "Hello there"
    assert train.chat_template == template


def test_missing_chat_template_is_an_error(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))
    tokenizer.chat_template = None
    cfg = DataConfig(train_files=[write_jsonl(tmp_path / "t.jsonl", [qa("Hi", "Hello")])])
    with pytest.raises(DataError, match="no chat template"):
        build_datasets(cfg, tokenizer, seq_len=128, seed=0)


# --------------------------------------------------------------------------------------------
# truncation


def test_truncation_and_drop_counts(tiny_tokenizer: Any, tmp_path: Path) -> None:
    long_question = "Please tell me everything about checkpoints and resuming. " * 8
    rows = [
        qa("Hi", "Hello"),  # fits
        qa("Hi", "A long answer about sharded checkpoints. " * 10),  # truncated inside the answer
        qa(long_question, "Yes."),  # the answer lies past seq_len: nothing left to learn
    ]
    cfg = DataConfig(train_files=[write_jsonl(tmp_path / "t.jsonl", rows)])
    train, eval_ds = build_datasets(cfg, tiny_tokenizer, seq_len=48, seed=0)
    assert eval_ds is None
    assert train.stats["examples"] == 2
    assert train.stats["truncated"] == 2
    assert train.stats["dropped"] == 1
    assert all(len(ex["input_ids"]) == len(ex["labels"]) <= 48 for ex in train)
    assert len(train[1]["input_ids"]) == 48
    assert train.stats["tokens"] == sum(len(ex["input_ids"]) for ex in train)
    assert train.stats["trainable_tokens"] == sum(sum(lab != IGNORE_INDEX for lab in ex["labels"][1:]) for ex in train)
    kept_answers = [c[1]["content"] for c in train.conversations]
    assert kept_answers == [rows[0]["messages"][1]["content"], rows[1]["messages"][1]["content"]]


# --------------------------------------------------------------------------------------------
# bad input

GOOD_LINE = json.dumps(qa("Hi", "Hello")).encode()
BAD_ROWS: dict[str, tuple[bytes, str]] = {
    "missing messages": (json.dumps({"conversation": []}).encode(), "missing 'messages'"),
    "empty conversation": (json.dumps({"messages": []}).encode(), "empty conversation"),
    "unknown role": (json.dumps(chat(("user", "Hi"), ("bot", "Hello"))).encode(), "unknown role 'bot'"),
    "non-string content": (
        json.dumps({"messages": [{"role": "user", "content": ["Hi"]}]}).encode(),
        "content must be a string",
    ),
    "messages not a list": (json.dumps({"messages": "Hi"}).encode(), "must be a list"),
    "instruction rows read as chat": (
        json.dumps({"instruction": "Say hi", "input": "", "output": "Hi"}).encode(),
        "these look like instruction (alpaca) rows: set data.format=instruction",
    ),
    "text rows read as chat": (json.dumps({"text": "Once upon a time"}).encode(), "set data.format=completion"),
    "invalid JSON": (b'{"messages": [', "invalid JSON"),
    "non-UTF-8": (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not valid UTF-8"),
}


def write_with_bad_row(path: Path, bad: bytes) -> str:
    # good row, blank line, bad row: the bad one is on line 3
    path.write_bytes(GOOD_LINE + b"\n\n" + bad + b"\n" + GOOD_LINE + b"\n")
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_file_and_row(case: str, tiny_tokenizer: Any, tmp_path: Path) -> None:
    bad, reason = BAD_ROWS[case]
    path = write_with_bad_row(tmp_path / "train.jsonl", bad)
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(train_files=[path]), tiny_tokenizer, seq_len=128, seed=0)
    message = str(info.value)
    assert path in message and "row 3" in message and reason in message
    assert isinstance(info.value, ValueError)


def test_bad_row_in_eval_file_names_that_file(tiny_tokenizer: Any, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [qa("Hi", "Hello")])
    evals = write_with_bad_row(tmp_path / "eval.jsonl", BAD_ROWS["unknown role"][0])
    with pytest.raises(DataError, match=r"eval\.jsonl, row 3"):
        build_datasets(DataConfig(train_files=[train], eval_files=[evals]), tiny_tokenizer, seq_len=128, seed=0)


def test_missing_file_is_named(tiny_tokenizer: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "nope.jsonl")
    for on_error in ("raise", "skip"):  # a missing file is never a row to skip
        with pytest.raises(DataError, match="nope.jsonl: data file not found"):
            build_datasets(DataConfig(train_files=[path], on_error=on_error), tiny_tokenizer, seq_len=128, seed=0)


def test_template_failure_names_file_and_row(tiny_tokenizer: Any, tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
        "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows = [qa("Hi", "Hello"), chat(("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello"))]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match=r"t\.jsonl, row 2: the chat template failed.*no system turns"):
        build_datasets(DataConfig(train_files=[path], chat_template=template), tiny_tokenizer, seq_len=128, seed=0)
    cfg = DataConfig(train_files=[path], chat_template=template, on_error="skip")
    train, _ = build_datasets(cfg, tiny_tokenizer, seq_len=128, seed=0)
    assert (train.stats["examples"], train.stats["skipped"]) == (1, 1)


def test_skip_mode_counts_every_bad_row(tiny_tokenizer: Any, tmp_path: Path) -> None:
    lines = [GOOD_LINE] + [bad for bad, _ in BAD_ROWS.values()] + [GOOD_LINE]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    cfg = DataConfig(train_files=[str(path)], on_error="skip")
    train, _ = build_datasets(cfg, tiny_tokenizer, seq_len=128, seed=0)
    assert train.stats["examples"] == 2
    assert train.stats["skipped"] == len(BAD_ROWS)
    numbered = [row.split(": ", 1)[0] for row in train.stats["skipped_rows"]]  # file, row and why, in order
    assert numbered == [f"{path}, row {n}" for n in range(2, 2 + len(BAD_ROWS))]
    assert [reason in row for row, (_, reason) in zip(train.stats["skipped_rows"], BAD_ROWS.values())] == [True] * len(
        BAD_ROWS
    )
    assert len(train.conversations) == 2


def test_json_list_files(tiny_tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps([qa("Hi", "Hello"), {"messages": []}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.json, row 2: empty conversation"):
        build_datasets(DataConfig(train_files=[str(path)]), tiny_tokenizer, seq_len=128, seed=0)
    path.write_text('[\n{"messages": [}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.json, line 2: invalid JSON"):
        build_datasets(DataConfig(train_files=[str(path)]), tiny_tokenizer, seq_len=128, seed=0)


def test_a_row_that_ends_early_is_placed_at_its_end(tiny_tokenizer: Any, tmp_path: Path) -> None:
    """The column of a truncated JSONL row is where the row stops, not column 1 of a next line."""
    row = json.dumps(qa("Hi", "x" * 200))[:-2]  # the closing "}]" lost
    path = tmp_path / "train.jsonl"
    path.write_text(GOOD_LINE.decode() + "\n" + row + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(train_files=[str(path)]), tiny_tokenizer, seq_len=128, seed=0)
    assert f"row 2: invalid JSON (Expecting ',' delimiter; the text ends there at column {len(row) + 1})" in str(
        info.value
    )
    (tmp_path / "train.json").write_text("[\n" + row + "\n", encoding="utf-8")  # a .json list: line 2 too
    with pytest.raises(DataError, match=rf"train\.json, line 2: invalid JSON \(.* at column {len(row) + 1}\)"):
        build_datasets(DataConfig(train_files=[str(tmp_path / "train.json")]), tiny_tokenizer, seq_len=128, seed=0)


# --------------------------------------------------------------------------------------------
# eval split, cap, demo data


def numbered_rows(n: int) -> list[dict[str, Any]]:
    return [qa(f"Question {i}?", f"Answer {i}.") for i in range(n)]


def questions(ds: TokenizedDataset) -> list[str]:
    return [c[0]["content"] for c in ds.conversations]


def test_eval_split_is_carved_deterministically(tiny_tokenizer: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", numbered_rows(20))
    cfg = DataConfig(train_files=[path], eval_fraction=0.2)
    train_a, eval_a = build_datasets(cfg, tiny_tokenizer, seq_len=128, seed=7)
    train_b, eval_b = build_datasets(cfg, tiny_tokenizer, seq_len=128, seed=7)
    assert eval_a is not None and eval_b is not None
    assert questions(eval_a) == questions(eval_b) and questions(train_a) == questions(train_b)
    assert len(eval_a) == 4 and len(train_a) == 16
    assert sorted(questions(train_a) + questions(eval_a)) == sorted(f"Question {i}?" for i in range(20))
    others = {tuple(questions(build_datasets(cfg, tiny_tokenizer, seq_len=128, seed=s)[1])) for s in range(1, 5)}
    assert others - {tuple(questions(eval_a))}, "the seed should change which rows are held out"


def test_cap_applies_after_the_eval_split(tiny_tokenizer: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", numbered_rows(20))
    full_train, full_eval = build_datasets(DataConfig(train_files=[path], eval_fraction=0.2), tiny_tokenizer, 128, 3)
    cfg = DataConfig(train_files=[path], eval_fraction=0.2, max_train_examples=5)
    train, evals = build_datasets(cfg, tiny_tokenizer, seq_len=128, seed=3)
    assert questions(evals) == questions(full_eval)
    assert questions(train) == questions(full_train)[:5]


def test_carve_keeps_at_least_one_row_each_side() -> None:
    train, evals = carve_eval_split(list(range(3)), 0.01, seed=0)
    assert len(evals) == 1 and len(train) == 2
    with pytest.raises(DataError, match="at least 2"):
        carve_eval_split([1], 0.5, seed=0)


def test_demo_data_builds(tiny_tokenizer: Any) -> None:
    cfg = DataConfig(train_files=[asset("demo/train.jsonl")], eval_files=[asset("demo/eval.jsonl")])
    train, evals = build_datasets(cfg, tiny_tokenizer, seq_len=512, seed=0)
    assert evals is not None
    assert train.stats["examples"] == 320 and evals.stats["examples"] == 40
    assert train.stats["skipped"] == train.stats["dropped"] == 0
    prompt, reference = prompt_and_reference(evals.conversations[0])
    assert prompt[-1]["role"] == "user" and reference


# --------------------------------------------------------------------------------------------
# collate


def test_collate_right_pads_and_masks_padding_by_position() -> None:
    pad = 2  # as with SmolLM2: the pad id is also the trained end-of-turn id
    batch = [
        {"input_ids": [5, 6, 2], "labels": [-100, 6, 2]},
        {"input_ids": [7], "labels": [7]},
    ]
    out = collate(batch, pad_id=pad)
    assert out["input_ids"].tolist() == [[5, 6, 2], [7, pad, pad]]
    assert out["labels"].tolist() == [[-100, 6, 2], [7, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())
