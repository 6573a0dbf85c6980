"""The ``instruction`` data format: alpaca rows ``{"instruction", "input", "output"}``.

A row becomes a two-message conversation (user: the instruction, then a blank line and the input
when there is one; assistant: the output) rendered through the chat template like ``chat`` rows:
the tokenizer's template, or ``data.chat_template``, or, when there is neither, the named
``alpaca`` template (``### Instruction:`` / ``### Response:``). So an instruction-tuned model is
trained in the layout it will be prompted with, a base model gets alpaca's, and evaluation
generates answers for these rows exactly as for chat rows. With ``assistant_only_loss`` only the
output (and the eos after it) is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.config.schema import DataConfig
from launcher.data.chat import ChatFormat, Message
from launcher.data.rows import RowError
from launcher.data.templates import resolve_template


@dataclass
class InstructionFormat:
    chat: ChatFormat

    @classmethod
    def from_config(cls, data_cfg: DataConfig, tokenizer: Any) -> "InstructionFormat":
        template = resolve_template(data_cfg.chat_template, tokenizer, fallback="alpaca")
        assert template is not None  # the fallback always resolves
        return cls(ChatFormat.with_template(tokenizer, template, data_cfg.assistant_only_loss))

    @property
    def chat_template(self) -> str:
        return self.chat.chat_template

    def parse(self, row: Any) -> list[Message]:
        return parse_instruction(row)

    def encode(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        return self.chat.encode(messages)


def parse_instruction(row: Any) -> list[Message]:
    """Validate one row; return it as a user and an assistant message."""
    if not isinstance(row, dict):
        raise RowError(f"expected an object with 'instruction' and 'output', got {type(row).__name__}")
    missing = [k for k in ("instruction", "output") if k not in row]
    if missing:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(f"missing {' and '.join(repr(k) for k in missing)} (keys: {keys})")
    instruction, output, extra = row["instruction"], row["output"], row.get("input")
    for name, value in (("instruction", instruction), ("output", output), ("input", extra)):
        if value is not None and not isinstance(value, str):
            raise RowError(f"'{name}' must be a string, got {type(value).__name__}")
    if not instruction or not instruction.strip():
        raise RowError("empty 'instruction'")
    if output is None:
        raise RowError("'output' is null")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
