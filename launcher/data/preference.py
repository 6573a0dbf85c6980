"""The ``preference`` data format: rows ``{"prompt", "chosen", "rejected"}`` for DPO and SimPO.

Two shapes, as TRL and the Hugging Face hub write them:

* conversational: ``prompt`` a list of messages (or ``messages``: the conversation so far), and
  ``chosen`` / ``rejected`` each a list of assistant messages (or one string, taken as one
  assistant message). Rendered with the chat template like ``chat`` rows; only the completion's
  assistant turns are labelled, never an assistant turn inside the prompt.
* plain text: ``prompt``, ``chosen`` and ``rejected`` all strings. The prompt is tokenized with the
  tokenizer's own special tokens, the completion without and ended with eos; the completion is labelled.

A pair encodes to one example holding both sequences back to back, chosen first, with ``lengths``
[len(chosen), len(rejected)]: positions restart for each, so no token attends across them (as in a
pack), and a pair is never split when pairs are packed together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from launcher.config.schema import DataConfig
from launcher.data.chat import ChatFormat, Message, parse_conversation
from launcher.data.rows import IGNORE_INDEX, RowError
from launcher.data.templates import resolve_template

KEYS = ("chosen", "rejected")


@dataclass
class Pair:
    prompt: Any  # list[Message] (conversational) or str (plain)
    chosen: Any
    rejected: Any

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class PreferenceFormat:
    tokenizer: Any
    chat: Optional[ChatFormat]  # None without a chat template: plain-text rows only
    chat_template: Optional[str]

    @classmethod
    def from_config(cls, data_cfg: DataConfig, tokenizer: Any) -> "PreferenceFormat":
        template = resolve_template(data_cfg.chat_template, tokenizer)
        chat = ChatFormat.with_template(tokenizer, template, assistant_only_loss=True) if template else None
        return cls(tokenizer, chat, template)

    def parse(self, row: Any) -> Pair:
        if not isinstance(row, dict):
            raise RowError(f"expected an object with 'prompt', 'chosen' and 'rejected', got {type(row).__name__}")
        missing = [k for k in ("prompt", *KEYS) if k not in row and not (k == "prompt" and "messages" in row)]
        if missing:
            hint = (
                " (this looks like a chat row: use data.format=chat)"
                if "messages" in row and missing == list(KEYS)
                else ""
            )
            raise RowError(
                f"missing {', '.join(repr(k) for k in missing)} (keys: {', '.join(sorted(map(str, row))) or 'none'}){hint}"
            )
        prompt = row["prompt"] if "prompt" in row else row["messages"]
        if isinstance(prompt, str) and all(isinstance(row[k], str) for k in KEYS):
            for key in ("prompt", *KEYS):
                if not row[key].strip():
                    raise RowError(f"empty {key!r}")
            return Pair(prompt, row["chosen"], row["rejected"])
        if self.chat is None:
            raise RowError(
                "a conversational preference row needs a chat template: the tokenizer has none and "
                "data.chat_template is not set"
            )
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
        if messages[-1]["role"] == "assistant":
            raise RowError(
                "the prompt ends with an assistant message: the completion to prefer goes in 'chosen'/'rejected'"
            )
        return Pair(messages, *(_completion(row[k], k) for k in KEYS))

    def encode_pair(self, pair: Pair) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
        """(ids, labels) of the chosen sequence and of the rejected one."""
        return self._encode(pair, pair.chosen), self._encode(pair, pair.rejected)

    def _encode(self, pair: Pair, completion: Any) -> tuple[list[int], list[int]]:
        if pair.conversational:
            assert self.chat is not None
            return self.chat.encode([*pair.prompt, *completion], from_turn=len(pair.prompt))
        prompt = list(self.tokenizer(pair.prompt, add_special_tokens=True)["input_ids"])
        answer = list(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
        if self.tokenizer.eos_token_id is not None:
            answer.append(self.tokenizer.eos_token_id)
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer

    def conversation(self, pair: Pair) -> list[Message]:
        """What evaluation generates from: the prompt, with the chosen answer as the reference."""
        if not pair.conversational:
            return [{"role": "user", "content": pair.prompt}, {"role": "assistant", "content": pair.chosen}]
        return [*pair.prompt, *pair.chosen]


def _messages(value: Any, key: str) -> list[Message]:
    if not isinstance(value, list):
        raise RowError(f"{key!r} must be a list of messages or a string, got {type(value).__name__}")
    try:
        return parse_conversation({"messages": value})
    except RowError as e:
        raise RowError(f"{key!r}: {e}") from None


def _completion(value: Any, key: str) -> list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"empty {key!r}")
        return [{"role": "assistant", "content": value}]
    messages = _messages(value, key)
    if any(m["role"] != "assistant" for m in messages):
        raise RowError(f"{key!r} must hold assistant messages only (the prompt goes in 'prompt')")
    return messages
