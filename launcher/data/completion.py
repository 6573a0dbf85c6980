"""The ``completion`` data format: raw text in one field (``data.text_field``, default ``text``),
for continued pre-training or plain language modelling. Every token is trained.

The text is tokenized with the tokenizer's own special tokens (BOS where the model expects one)
and ends with eos, so packed documents are separated the way the model saw documents before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from launcher.config.schema import DataConfig
from launcher.data.rows import RowError


@dataclass
class CompletionFormat:
    tokenizer: Any
    text_field: str
    chat_template: Optional[str] = None  # raw text is rendered with no template

    @classmethod
    def from_config(cls, data_cfg: DataConfig, tokenizer: Any) -> "CompletionFormat":
        return cls(tokenizer, data_cfg.text_field)

    def parse(self, row: Any) -> str:
        return parse_text(row, self.text_field)

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids, list(ids)

    def conversation(self, text: str) -> list[dict[str, str]]:
        """No assistant turn to generate: evaluation computes perplexity only."""
        return []


def parse_text(row: Any, text_field: str) -> str:
    """Validate one row; return the text in its ``text_field``."""
    if not isinstance(row, dict):
        raise RowError(f"expected an object with a '{text_field}' field, got {type(row).__name__}")
    if text_field not in row:
        raise RowError(f"missing '{text_field}' (keys: {', '.join(sorted(map(str, row))) or 'none'})")
    text = row[text_field]
    if not isinstance(text, str):
        raise RowError(f"'{text_field}' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise RowError(f"empty '{text_field}'")
    return text
