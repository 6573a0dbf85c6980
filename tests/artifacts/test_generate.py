"""`ftl generate` and `ftl chat` on a tiny LoRA run: streamed greedy text equals plain
transformers' generate, from a merged export, an adapter export and the run's checkpoint alike;
chat keeps the conversation across turns read from stdin."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ftl

pytest.importorskip("peft")

TRAIN = [
    "recipe=tiny",
    "peft=lora",
    "peft.r=4",
    "peft.alpha=8",
    "peft.dropout=0.0",
    "train.lr=1e-2",
    "train.max_steps=3",
    "eval.after_training=false",
    "wandb.mode=disabled",
]
PROMPT = "How do I resume a run?"
TOKENS = ["--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from launcher.artifacts.export import export_checkpoint

    root = tmp_path_factory.mktemp("gen")
    ftl("train", *TRAIN, f"run.dir={root / 'run'}")
    export_checkpoint(root / "run", root / "merged", merge_lora=True, log=lambda _: None)
    export_checkpoint(root / "run", root / "adapter", log=lambda _: None)
    return {"run": root / "run", "merged": root / "merged", "adapter": root / "adapter"}


def plain_greedy(model_dir: Path, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """What transformers alone generates: the tokenizer's chat template, greedy decoding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_streams_what_transformers_generates(exports: dict[str, Path]) -> None:
    want = plain_greedy(exports["merged"], [{"role": "user", "content": PROMPT}], 12)
    assert want.strip()
    for source in ("merged", "adapter", "run"):  # an HF dir, an adapter on its base, a checkpoint + adapter
        out = ftl("generate", str(exports[source]), PROMPT, *TOKENS)
        assert out.stdout.strip() == want.strip(), source


def test_chat_keeps_the_conversation(exports: dict[str, Path]) -> None:
    from launcher.artifacts.inference import chat_loop, load_model, stream_reply

    loaded = load_model(exports["merged"])
    lines = iter(["What is ftl?\n", "\n", "And how do I resume?\n", "/exit\n", "never read\n"])
    out = io.StringIO()
    replies = chat_loop(loaded, system="Be brief.", read_line=lambda: next(lines, None), out=out, max_new_tokens=8)
    assert replies == 2
    first = stream_reply(
        loaded,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is ftl?"}],
        max_new_tokens=8,
        out=io.StringIO(),
    )
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is ftl?"},
        {"role": "assistant", "content": first.strip()},
        {"role": "user", "content": "And how do I resume?"},
    ]
    second = stream_reply(loaded, history, max_new_tokens=8, out=io.StringIO())
    assert out.getvalue() == first + "\n" + second + "\n"


def test_chat_commands_are_never_sent_to_the_model(exports: dict[str, Path]) -> None:
    from launcher.artifacts.inference import chat_loop, load_model

    loaded = load_model(exports["merged"])
    lines = iter(["/help\n", "/nope\n", "/system Answer in one word.\n", "/exit\n"])
    out = io.StringIO()
    assert chat_loop(loaded, read_line=lambda: next(lines, None), out=out, max_new_tokens=4) == 0
    text = out.getvalue()
    assert text.startswith("commands:\n  /help") and "unknown command /nope\ncommands:" in text
    assert "(new conversation with that system message)" in text


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(exports: dict[str, Path]) -> None:
    import os
    import signal
    import threading

    from launcher.artifacts.inference import chat_loop, load_model, stream_reply

    loaded = load_model(exports["merged"])
    stopped = threading.Event()
    stopped.set()  # as if Ctrl-C came before the first token: the reply ends after it
    reply = stream_reply(
        loaded, [{"role": "user", "content": PROMPT}], max_new_tokens=12, out=io.StringIO(), stop=stopped
    )
    assert len(loaded.tokenizer(reply, add_special_tokens=False)["input_ids"]) <= 2

    class InterruptOnFirstWrite(io.StringIO):
        sent = False

        def write(self, text: str) -> int:
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the reply streams
            return super().write(text)

    out = InterruptOnFirstWrite()
    users = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a job started with `&`
    lines = iter(["What is ftl?\n", "And how do I resume?\n"])
    replies = chat_loop(loaded, read_line=lambda: next(lines, None), out=out, max_new_tokens=12)
    assert replies == 2 and "(reply stopped)" in out.getvalue()  # the chat answered the next line too
    assert signal.getsignal(signal.SIGINT) is users  # Ctrl-C outside a reply is the user's again


def test_chat_reads_turns_from_piped_stdin(exports: dict[str, Path]) -> None:
    out = ftl(
        "chat", str(exports["run"]), "--max-new-tokens", "6", stdin="What is ftl?\n/reset\nAnd how do I resume?\n"
    )
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    asked, reset, again = (
        lines.index(t) for t in ("you> What is ftl?", "(new conversation)", "you> And how do I resume?")
    )
    assert asked < lines.index("you> /reset") == reset - 1 < again  # each turn shown before its reply


def test_generate_rejects_what_is_not_a_model(tmp_path: Path) -> None:
    for path in (tmp_path / "missing", tmp_path):
        proc = ftl("generate", str(path), "hi", check=False)
        assert proc.returncode == 2 and "ftl generate:" in proc.stderr and "Traceback" not in proc.stderr


def test_adapter_export_references_its_base(exports: dict[str, Path]) -> None:
    config: dict[str, Any] = json.loads((exports["adapter"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(exports["adapter"] / "base")
    assert (exports["adapter"] / "base" / "config.json").is_file() and (
        exports["adapter"] / "adapter_model.safetensors"
    ).is_file()
