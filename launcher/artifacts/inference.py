"""A fine-tuned model back in memory, for `ftl eval`, `ftl generate` and `ftl chat`; streaming
generation with a chat template.

What :func:`load_model` accepts (:func:`model_kind` tells them apart):

* ``hf``: a Hugging Face directory (``ftl export`` output, merged or full fine-tune; any
  ``save_pretrained`` directory);
* ``adapter``: a PEFT adapter directory (``ftl export`` without ``merge_lora``, or a checkpoint's
  ``adapter/``): its base is ``adapter_config.json``'s ``base_model_name_or_path``;
* ``checkpoint``: a run dir (its latest checkpoint) or a ``checkpoints/step-N`` dir of any engine.
  Full fine-tunes: the engine's consolidated weights. LoRA: the base weights the checkpoint holds,
  plus its ``adapter/``. QLoRA: the base rebuilt from the run's model config (4-bit, as trained,
  unless ``quantized=False``), plus its ``adapter/``.

PEFT models stay unmerged (``merge=True`` merges them): their base is then one
``disable_adapter()`` away, which is what ``ftl eval --baseline`` compares against.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TextIO

import torch

from launcher.artifacts.weights import ArtifactInputError, load_checkpoint_model
from launcher.model.adapters import ADAPTER_CONFIG, attach_adapter, is_peft_model, read_adapter_config


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    kind: str  # hf | adapter | checkpoint
    description: str
    cfg: Any = None  # the run's config (checkpoint sources)
    chat_template: Optional[str] = None  # the template to render prompts with (the tokenizer's, or the run's)

    def base(self) -> contextlib.AbstractContextManager[Any]:
        """Context in which ``model`` is its base model: PEFT adapters disabled."""
        if is_peft_model(self.model):
            return self.model.disable_adapter()
        raise ArtifactInputError(
            f"{self.description} has no adapter to switch off: give the base model with --baseline PATH"
        )


def model_kind(path: Path) -> str:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactInputError(f"{path}: no such directory (give an export, a run dir or a checkpoint dir)")
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "hf"
    return "checkpoint"


def load_model(
    path: Path | str, *, device: torch.device | str = "cpu", merge: bool = False, quantized: bool = True
) -> LoadedModel:
    path = Path(path).expanduser().resolve()
    kind = model_kind(path)
    cfg = None
    if kind == "hf":
        model, tokenizer = _load_hf_dir(str(path), device)
        description = f"{path} (Hugging Face directory)"
    elif kind == "adapter":
        model, tokenizer = load_adapter_dir(path, device)
        description = f"{path} (adapter on {read_adapter_config(path).get('base_model_name_or_path')})"
    else:
        model, tokenizer, cfg, description = load_checkpoint_model(path, device=device, quantized=quantized)
    if merge and is_peft_model(model):
        model = model.merge_and_unload()
    model.eval()
    template = tokenizer.chat_template
    if template is None and cfg is not None and cfg.data.chat_template:
        from launcher.data.templates import resolve_template

        template = resolve_template(cfg.data.chat_template, tokenizer)
    return LoadedModel(model, tokenizer, kind, description, cfg, template)


def _load_hf_dir(path: str, device: torch.device | str, revision: Optional[str] = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from launcher.config.local_paths import hub_or_local
    from launcher.model.loading import ensure_pad_token, load_tokenizer

    path = hub_or_local(path)  # an adapter's base written as a path that is not here: named, not sent to a hub
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=torch.float32).to(device)
    tokenizer = load_tokenizer(path, revision=revision)
    ensure_pad_token(tokenizer)
    return model, tokenizer


def load_adapter_dir(adapter_dir: Path, device: torch.device | str) -> tuple[Any, Any]:
    config = read_adapter_config(adapter_dir)
    base = config.get("base_model_name_or_path")
    if not base:
        raise ArtifactInputError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    model, tokenizer = _load_hf_dir(base, device, revision=config.get("revision"))
    if any((Path(adapter_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from launcher.model.loading import ensure_pad_token, load_tokenizer

        tokenizer = load_tokenizer(str(adapter_dir))  # the one the run trained with (chat template included)
        ensure_pad_token(tokenizer)
    return attach_adapter(model, adapter_dir).to(device), tokenizer


# --------------------------------------------------------------------------------------------
# generation


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]], chat_template: Optional[str] = None) -> list[int]:
    from launcher.eval.metrics import render_prompt

    if chat_template is None and tokenizer.chat_template is None:
        raise ArtifactInputError(
            "the tokenizer has no chat template (set data.chat_template in the run, or export with one)"
        )
    return render_prompt(tokenizer, messages, chat_template)


def stream_reply(
    loaded: LoadedModel,
    messages: list[dict[str, str]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    out: TextIO = sys.stdout,
    stop: Optional[threading.Event] = None,
) -> str:
    """Generate the assistant's next message for ``messages``, writing tokens to ``out`` as they
    come (transformers' TextStreamer); returns the whole reply (what was generated when ``stop``
    was set: the reply ends at the next token). temperature 0: greedy."""
    from transformers import StoppingCriteriaList

    from launcher.eval.metrics import stop_token_ids

    model, tokenizer = loaded.model, loaded.tokenizer
    ids = prompt_ids(tokenizer, messages, loaded.chat_template)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    streamer = text_streamer(tokenizer, out)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_token_ids(model, tokenizer),
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]) if stop is not None else None,
            **sampling,
        )
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)


def text_streamer(tokenizer: Any, out: TextIO) -> Any:
    """transformers' TextStreamer (decodes whole words as they complete), writing to ``out``."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class _StopWhenSet:
    """A transformers stopping criterion: stop every sequence once ``event`` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def ctrl_c_stops(event: threading.Event) -> Iterator[threading.Event]:
    """While a reply streams, Ctrl-C (SIGINT) sets ``event`` instead of interrupting the program."""
    previous = None
    if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
        previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


CHAT_HELP = """commands:
  /help          this list
  /reset         start a new conversation (keeps --system)
  /system TEXT   start a new conversation with this system message
  /exit          end the chat (also /quit, or Ctrl-D)
Ctrl-C while a reply streams stops that reply."""


def chat_loop(
    loaded: LoadedModel,
    *,
    system: Optional[str] = None,
    read_line: Callable[[], Optional[str]],
    out: TextIO = sys.stdout,
    prompt: Callable[[], None] = lambda: None,
    **generation: Any,
) -> int:
    """Read user turns until end of input (or /exit); stream each reply; keep the conversation.
    Lines starting with ``/`` are commands (:data:`CHAT_HELP`), never sent to the model; Ctrl-C
    during a reply stops that reply only. Returns the number of replies."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    replies = 0
    while True:
        prompt()
        line = read_line()
        if line is None or line.strip() in ("/exit", "/quit"):
            return replies
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command == "/reset":
                history = history[:1] if system else []
                out.write("(new conversation)\n")
            elif command == "/system" and argument.strip():
                system = argument.strip()
                history = [{"role": "system", "content": system}]
                out.write("(new conversation with that system message)\n")
            else:
                out.write(("" if command == "/help" else f"unknown command {command}\n") + CHAT_HELP + "\n")
            out.flush()
            continue
        history.append({"role": "user", "content": text})
        with ctrl_c_stops(threading.Event()) as stopped:
            reply = stream_reply(loaded, history, out=out, stop=stopped, **generation)
        if stopped.is_set():
            out.write("\n(reply stopped)\n")
            out.flush()
        history.append({"role": "assistant", "content": reply.strip()})
        replies += 1
