#!/usr/bin/env python3
"""Build the tiny byte-level BPE tokenizer in ``launcher/assets/tiny-tokenizer/``.

The tokenizer (vocab 512) is trained with the ``tokenizers`` library on the
text of ``launcher/assets/demo/train.jsonl``.  It is byte-level, so any UTF-8
text encodes and decodes losslessly, and it has the ChatML special tokens
``<|endoftext|>`` (id 0), ``<|im_start|>`` (id 1) and ``<|im_end|>`` (id 2).
Tests pair it with a tiny randomly initialised Llama so they run fast and
offline.

Run:  python launcher/assets/build_tiny_tokenizer.py
The output is deterministic and committed; this script only needs
``tokenizers`` (``transformers`` is used for an optional check at the end).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = Path(__file__).resolve().parent
TRAIN_FILE = HERE / "demo" / "train.jsonl"
OUT_DIR = HERE / "tiny-tokenizer"

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as used by SmolLM2 (without its default system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus() -> list[str]:
    """One string per message of the demo training set, plus role names."""
    texts: list[str] = []
    with TRAIN_FILE.open(encoding="utf-8") as f:
        for line in f:
            for message in json.loads(line)["messages"]:
                texts.append(message["role"] + "\n" + message["content"])
    return texts


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() <= VOCAB_SIZE, tok.get_vocab_size()
    return tok


def tokenizer_config() -> dict:
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 2048,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def special_tokens_map() -> dict:
    return {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check(out_dir: Path) -> None:
    """Load with transformers (if installed) and check the essentials."""
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is optional here
        print("transformers not installed; skipped load check")
        return
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    assert len(tok) <= VOCAB_SIZE, len(tok)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    messages = [
        {"role": "user", "content": "How do I resume training?"},
        {"role": "assistant", "content": "Rerun the same command."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>user\nHow do I resume training?<|im_end|>\n"
        "<|im_start|>assistant\nRerun the same command.<|im_end|>\n"
    ), text
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n"), prompt
    for sample in ["café ✓ — naïve 日本語 🚀", "ftl train recipe=demo train.lr=1e-4", text]:
        ids = tok(sample, add_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == sample, (sample, tok.decode(ids))
    print(f"ok: len(tok)={len(tok)}")


def main() -> int:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tok = build()
    tok.save(str(OUT_DIR / "tokenizer.json"), pretty=False)
    write_json(OUT_DIR / "tokenizer_config.json", tokenizer_config())
    write_json(OUT_DIR / "special_tokens_map.json", special_tokens_map())
    print(f"wrote {OUT_DIR} (vocab {tok.get_vocab_size()})")
    check(OUT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
