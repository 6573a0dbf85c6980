"""``train.compile``: regional compilation, each decoder layer's forward compiled by
``torch.compile`` (inductor: C++ on CPU, Triton on CUDA), as torchtitan does, not the whole model.

All layers of a model run the same code on parameters of the same shapes, so dynamo compiles
that code once and every layer reuses it (its guards hold parameters as inputs, not constants):
the compile time is one layer's, whatever the depth. Shapes are marked dynamic from the start
(``dynamic=True``): packs are padded to their batch's longest row and eval batches vary, and a
shape-specialised graph would be compiled again for each new length.

Only ``forward`` is compiled, not the module's call: the hooks around it (FSDP2's all-gather and
reshard, ZeRO-3's parameter fetch on the layer) stay eager, so compiling happens before the
engine shards the model and sharding changes nothing compiled. ``sdpa_varlen`` splits each packed
row into its examples, a Python loop whose trip count changes every batch: on CPU a compiled layer
calls it as one operator with its own backward (:mod:`launcher.model.attention_op`), so each layer
is one graph; on a GPU, and for sliding windows or dropout, it runs eagerly between two graphs
(``torch.compiler.disable``).
Evaluation and generation run eagerly (:func:`eager`): a KV-cache decode step is a different
program, and compiling it too would cost more than it saves over a few hundred tokens.

The first optimizer step pays the compile (its ``tokens_per_s`` shows it; the trainer prints it);
inductor keeps compiled kernels in its on-disk cache, so a rerun of the same model and shapes
compiles in a few seconds, and on CPU ftl keeps there the verdict of inductor's per-process ISA
probe (:mod:`launcher.model.isa_probe`), ~2 s of every later compiled run's first step.

Whether a run compiles (:func:`launcher.config.topology.compile_choice`) is decided without torch, so that ``ftl plan``
shows it: torch is imported by the functions that compile.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch
    from torch import nn


# Seconds the last compile_decoder_layers call took: wrapping is instant, but a first compile in a
# process imports dynamo and inductor, and with an empty inductor cache runs its ISA probe (~7 s
# on the project's 2-core machine, docs/BENCHMARKS.md), before the first step's clock starts.
_setup_s = 0.0


# Why null does not compile a QLoRA model: bitsandbytes wraps each 4-bit weight in a new tensor
# subclass and sets it on its module in every forward, inside what dynamo would trace, and under
# FSDP2 it counts on that weight sharing storage with the all-gather buffer. Neither has run
# compiled on a GPU yet (project issue 29); train.compile=true tries it.
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (to compile, to shard one by one): the classes a HF model names in
    ``_no_split_modules``; else the items of every ModuleList."""
    from torch import nn

    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    return layers


def compile_decoder_layers(model: nn.Module, device: Optional[torch.device] = None) -> int:
    """Compile each decoder layer's forward in place (state-dict keys unchanged); returns how many.
    For a CPU ``device``, inductor's vector-ISA probe is reused from an earlier run on this machine
    (:mod:`launcher.model.isa_probe`)."""
    global _setup_s
    import torch

    from launcher.model import attention, attention_op
    from launcher.model.isa_probe import reuse_isa_probe

    start = time.perf_counter()
    if device is not None and device.type == "cpu":
        reuse_isa_probe()
    attention.register(attention_op.compiled_forward)
    # The attention operator saves its probabilities in a tensor whose size depends on each batch's
    # split (an unbacked size): without this, dynamo breaks the graph before it.
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
    _setup_s = time.perf_counter() - start
    return len(layers)


def first_step_note(step: int, seconds: float) -> str:
    """What the trainer says after a compiled run's first step: its time, the compile in it, and
    the compiler's set-up before it (:func:`compile_decoder_layers`, while the model loaded)."""
    return (
        f"ftl: step {step} took {seconds:.1f} s, compiling the decoder layers included (train.compile), "
        f"and setting up the compiler {_setup_s:.1f} s before it"
    )


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Compiled code runs eagerly within the block (evaluation, generation)."""
    import torch

    with torch.compiler.set_stance("force_eager"):
        yield
