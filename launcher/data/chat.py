"""The ``chat`` data format: rows ``{"messages": [{"role": ..., "content": ...}, ...]}``, or
ShareGPT's ``{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]}``.

A conversation is rendered with the tokenizer's chat template (or ``data.chat_template``) exactly
as it will be rendered at inference, then tokenized once. With ``assistant_only_loss`` only the
assistant turns are trained: their content and the end-of-turn token that follows it (so the
model learns to stop), never the system/user text nor the role headers.

Finding those tokens works for any template that renders a conversation append-only: the
assistant turn ``i`` starts where ``messages[:i]`` rendered *with* the generation prompt ends, and
stops where ``messages[:i+1]`` ends, less trailing whitespace (the newline after ``<|im_end|>``
is the template's separator, not something the model has to produce). Character spans map to
tokens through the fast tokenizer's offsets, so the token ids are those of one tokenization of
the whole text — the same ids the model sees at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from launcher.config.schema import DataConfig
from launcher.data.rows import IGNORE_INDEX, DataError, RowError
from launcher.data.templates import TEMPLATES, resolve_template

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}
Message = dict[str, str]


def parse_conversation(row: Any) -> list[Message]:
    """Validate one row; return its messages as plain ``{"role", "content"}`` dicts."""
    if not isinstance(row, dict):
        raise RowError(f"expected an object with a 'messages' list, got {type(row).__name__}")
    if "messages" in row:
        key, role_key, content_key, roles = "messages", "role", "content", {r: r for r in ROLES}
    elif "conversations" in row:  # ShareGPT
        key, role_key, content_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise RowError(
            f"missing 'messages' (or ShareGPT 'conversations'; keys: {', '.join(sorted(map(str, row))) or 'none'})"
            + format_hint(row)
        )
    messages = row[key]
    if not isinstance(messages, list):
        raise RowError(f"'{key}' must be a list, got {type(messages).__name__}")
    if not messages:
        raise RowError(f"empty conversation: '{key}' has no messages")
    return [_parse_message(m, i, role_key, content_key, roles) for i, m in enumerate(messages, start=1)]


def format_hint(row: dict[str, Any]) -> str:
    """Rows of another format read as chat: say which ``data.format`` they look like."""
    if "instruction" in row and "output" in row:
        return "; these look like instruction (alpaca) rows: set data.format=instruction"
    if "text" in row:
        return "; these look like raw text rows: set data.format=completion (data.text_field names the field)"
    if "prompt" in row and ("completion" in row or "response" in row):
        return "; prompt/completion rows: convert them to chat messages, or set data.format=completion with the text in one field"
    return ""


def _parse_message(message: Any, index: int, role_key: str, content_key: str, roles: dict[str, str]) -> Message:
    if not isinstance(message, dict):
        raise RowError(
            f"message {index} must be an object with '{role_key}' and '{content_key}', got {type(message).__name__}"
        )
    role = message.get(role_key)
    if role not in roles:
        raise RowError(f"message {index} has unknown role {role!r}; expected one of {', '.join(roles)}")
    content = message.get(content_key)
    if not isinstance(content, str):
        raise RowError(f"message {index} ({role}) {content_key} must be a string, got {type(content).__name__}")
    return {"role": roles[role], "content": content}


@dataclass
class ChatFormat:
    tokenizer: Any
    chat_template: str
    assistant_only_loss: bool

    @classmethod
    def from_config(cls, data_cfg: DataConfig, tokenizer: Any) -> "ChatFormat":
        template: Optional[str] = resolve_template(data_cfg.chat_template, tokenizer)
        if not template:
            raise DataError(
                "the tokenizer has no chat template and data.chat_template is not set: give a Jinja "
                f"chat template or a named one ({', '.join(TEMPLATES)}) in data.chat_template"
            )
        return cls.with_template(tokenizer, template, data_cfg.assistant_only_loss)

    @classmethod
    def with_template(cls, tokenizer: Any, template: str, assistant_only_loss: bool) -> "ChatFormat":
        if assistant_only_loss and not getattr(tokenizer, "is_fast", False):
            raise DataError(
                f"data.assistant_only_loss needs a fast tokenizer (character offsets); "
                f"{type(tokenizer).__name__} is not one. Set data.assistant_only_loss=false."
            )
        return cls(tokenizer, template, assistant_only_loss)

    def parse(self, row: Any) -> list[Message]:
        return parse_conversation(row)

    def is_empty(self, messages: list[Message]) -> bool:
        """Nothing to learn: every answer (assistant turn) is empty, or, with none, every turn."""
        answers = [m for m in messages if m["role"] == "assistant"]
        return not any(m["content"].strip() for m in answers or messages)

    def encode(self, messages: list[Message], *, from_turn: int = 0) -> tuple[list[int], list[int]]:
        """Token ids and labels; with ``from_turn`` only assistant messages from that index on are
        labelled (a preference pair's completion, not the assistant turns of its prompt)."""
        text = self.render(messages, add_generation_prompt=False)
        if not self.assistant_only_loss and not from_turn:
            ids = self._tokenize(text)["input_ids"]
            return ids, list(ids)
        spans = self.assistant_spans(messages, text, from_turn=from_turn)
        encoding = self._tokenize(text, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        labels = [
            token if _overlaps(offsets, spans) else IGNORE_INDEX
            for token, offsets in zip(ids, encoding["offset_mapping"])
        ]
        return ids, labels

    def render(self, messages: list[Message], *, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as e:  # jinja2's TemplateError, or raise_exception() inside the template
            raise RowError(f"the chat template failed on this conversation: {e}") from None

    def assistant_spans(self, messages: list[Message], text: str, *, from_turn: int = 0) -> list[tuple[int, int]]:
        """Character spans of ``text`` (the whole conversation rendered) to train on. An empty
        assistant turn has none: its end-of-turn token alone would teach the model to answer nothing."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < from_turn or not message["content"].strip():
                continue
            end = len(self._rendered_prefix(messages[: i + 1], text, add_generation_prompt=False, turn=i + 1))
            start = self._turn_start(messages, i, text, end)
            end = start + len(text[start:end].rstrip())
            if end > start:
                spans.append((start, end))
        return spans

    def _turn_start(self, messages: list[Message], i: int, text: str, end: int) -> int:
        if i > 0:
            return len(self._rendered_prefix(messages[:i], text, add_generation_prompt=True, turn=i + 1))
        # Nothing precedes an opening assistant message, and templates refuse to render an empty
        # conversation: find its content instead (stripped: some templates trim it).
        content = messages[0]["content"].strip()
        start = text.find(content, 0, end) if content else end
        if start < 0:
            raise RowError("cannot locate assistant message 1 in the rendered conversation")
        return start

    def _rendered_prefix(self, messages: list[Message], text: str, *, add_generation_prompt: bool, turn: int) -> str:
        prefix = self.render(messages, add_generation_prompt=add_generation_prompt)
        if not text.startswith(prefix):
            raise RowError(
                f"cannot locate assistant message {turn}: the chat template does not render the "
                f"conversation up to it as a prefix of the whole conversation (e.g. it treats the "
                f"last message specially); set data.assistant_only_loss=false or use another template"
            )
        return prefix

    def _tokenize(self, text: str, **kwargs: Any) -> dict[str, Any]:
        # The rendered template already holds every special token the model expects (BOS included,
        # where the template writes one); letting the tokenizer add its own would double them.
        return self.tokenizer(text, add_special_tokens=False, **kwargs)


def _overlaps(offsets: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    start, end = offsets
    return any(start < span_end and end > span_start for span_start, span_end in spans)


def prompt_and_reference(messages: list[Message]) -> tuple[list[Message], str]:
    """Split a conversation for generation: everything before its last assistant message, and that
    message's content. Raises ValueError when there is no assistant message."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return messages[:i], messages[i]["content"]
    raise ValueError("the conversation has no assistant message to compare against")
