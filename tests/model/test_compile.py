"""launcher/model/compile.py: compiled decoder layers train the numbers of eager ones, compile once
into one graph for every layer and every pack length, and leave evaluation eager."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from launcher.data.types import IGNORE_INDEX
from launcher.model.compile import compile_decoder_layers, decoder_layers, eager
from launcher.model.loss import next_token_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def packed_batch(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """One row of examples end to end, positions restarting at each (as ftl's packing makes them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (1, sum(lengths)), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[torch.rand(ids.shape, generator=g) < 0.3] = IGNORE_INDEX
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def loss_and_grads(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = next_token_loss(model, {k: batch[k] for k in ("input_ids", "position_ids")}, batch["labels"])
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def test_compiled_layers_train_the_numbers_of_eager_ones_and_compile_once() -> None:
    from helpers import tiny
    from torch._dynamo.utils import counters
    from transformers import AutoTokenizer

    from launcher.paths import asset

    tok = AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))
    reference, model = tiny(tok, "sdpa_varlen").train(), tiny(tok, "sdpa_varlen").train()
    torch._dynamo.reset()
    counters.clear()
    assert compile_decoder_layers(model) == len(decoder_layers(model)) == 2
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in reference.named_parameters()]  # compiled in place: checkpoints keep their keys
    graphs = None
    for seed, lengths in enumerate([[30, 50, 20], [7, 61, 33, 12], [90, 11]]):  # every batch a new length and split
        batch = packed_batch(lengths, seed)
        want, want_grads = loss_and_grads(reference, batch)
        got, got_grads = loss_and_grads(model, batch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs == 1, "the layers were compiled, into one graph: the packed attention is an operator in it"
    # both layers and all three lengths ran the graph compiled for the first batch, unbroken
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    with eager(), torch.no_grad():  # evaluation: the same numbers, nothing compiled
        batch = packed_batch([40, 40], 9)
        want = next_token_loss(reference, {"input_ids": batch["input_ids"]}, batch["labels"])
        got = next_token_loss(model, {"input_ids": batch["input_ids"]}, batch["labels"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_lora_model_compiles_and_trains_the_same_numbers() -> None:
    from helpers import tiny
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from launcher.paths import asset

    tok = AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    reference = get_peft_model(tiny(tok, "sdpa_varlen"), lora).train()
    model = get_peft_model(tiny(tok, "sdpa_varlen"), lora).train()
    model.load_state_dict(reference.state_dict())
    torch._dynamo.reset()
    assert compile_decoder_layers(model) == 2
    batch = packed_batch([25, 40, 31], 3)
    want, want_grads = loss_and_grads(reference, batch)
    got, got_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    trained = [(g, w) for g, w, p in zip(got_grads, want_grads, model.parameters()) if p.requires_grad]
    assert trained
    for g, w in trained:
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_the_first_step_note_counts_the_compiler_set_up_before_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """With an empty inductor cache the ISA probe runs while the model loads, before the first
    step's clock: the note after a compiled first step says how long that took, measured."""
    import time

    from helpers import tiny
    from transformers import AutoTokenizer

    from launcher.model import compile as compile_mod
    from launcher.model import isa_probe
    from launcher.paths import asset

    monkeypatch.setattr(isa_probe, "reuse_isa_probe", lambda: time.sleep(0.3))  # a probe that takes 0.3 s
    compile_mod.compile_decoder_layers(
        tiny(AutoTokenizer.from_pretrained(asset("tiny-tokenizer")), "sdpa"), torch.device("cpu")
    )
    note = compile_mod.first_step_note(1, 12.34)
    assert note.startswith("ftl: step 1 took 12.3 s, compiling the decoder layers included (train.compile)")
    setup = float(note.rsplit("setting up the compiler ", 1)[1].split(" s")[0])
    assert 0.3 <= setup < 5, note


def cfg_of(*overrides: str) -> Any:
    from launcher.config.compose import compose
    from launcher.config.validate import validate

    raw, _, errors = compose(list(overrides))
    cfg, more = validate(raw)
    assert not errors + more, errors + more
    return cfg


@pytest.mark.parametrize(
    "overrides, device, on, why",
    [
        ((), "cuda", True, "on CUDA"),
        ((), "cpu", False, "off on cpu"),
        (("strategy=zero3",), "cuda", False, "frees each layer's gathered weights"),
        (("peft=qlora",), "cuda", False, "QLoRA stays eager until a GPU run proves it"),
        (("peft=qlora", "train.compile=true"), "cuda", True, "unproven with QLoRA"),
        (("peft=lora",), "cuda", True, "on CUDA"),
        (("train.compile=false",), "cuda", False, "train.compile=false"),
    ],
)
def test_compile_null_is_on_for_cuda_except_zero3_and_qlora(
    overrides: tuple[str, ...], device: str, on: bool, why: str
) -> None:
    from launcher.config.topology import compile_choice

    cfg = cfg_of("recipe=tiny", "train.compile=null", *overrides)
    got, text = compile_choice(cfg, device)
    assert got is on and text.startswith("on" if on else "off") and why in text, text
