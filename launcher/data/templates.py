"""Named chat templates, for tokenizers that ship none.

``data.chat_template`` is either Jinja text or one of these names. Both render append-only (a
conversation's prefix renders as a prefix of the whole), which assistant-only masking relies on,
and both end an assistant turn with the tokenizer's eos token, so the model learns to stop where
generation stops.
"""

from __future__ import annotations

from typing import Any, Optional

from launcher.data.rows import DataError

# The format of Qwen, SmolLM2 and many others. Best with a tokenizer that has <|im_start|> and
# <|im_end|> as special tokens; with others they are spelled out in ordinary tokens.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Alpaca's prompt layout, without its fixed preamble (a system message takes that place).
# User turns are the instruction (format=instruction appends the input to it).
ALPACA = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + message['content'] }}{{ eos_token }}{{ '\\n\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

TEMPLATES: dict[str, str] = {"chatml": CHATML, "alpaca": ALPACA}


def resolve_template(configured: Optional[str], tokenizer: Any, fallback: Optional[str] = None) -> Optional[str]:
    """The Jinja text to render with: ``data.chat_template`` (a name or Jinja), else the tokenizer's,
    else the named ``fallback``; None when there is none of these."""
    if configured:
        if configured in TEMPLATES:
            return TEMPLATES[configured]
        if "{" not in configured:  # not Jinja: a misspelt name
            raise DataError(
                f"data.chat_template={configured!r} is neither Jinja nor a named template ({', '.join(TEMPLATES)})"
            )
        return configured
    return getattr(tokenizer, "chat_template", None) or (TEMPLATES[fallback] if fallback else None)
