"""strategy.activation_offloading: the saved activations wait in host memory (CUDA only), chosen
tensor by tensor. On CPU the offloader runs its decisions and copies with a CPU "host", so what
is offloaded, what is skipped, the prefetch order and the gradients are checked here; the streams
and the memory saved need a GPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import TINY, ftl

from launcher.data.types import IGNORE_INDEX
from launcher.model.loss import next_token_loss
from launcher.train.offload import ActivationOffloader, Offloaded, build_offloader

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_cpu_rank_refuses_activation_offloading_before_training(tmp_path) -> None:
    """train.device=auto passes validation on a machine without a GPU; the rank, which knows its
    device, refuses: exit 2, no step trained."""
    out = ftl("train", *TINY, "strategy.activation_offloading=true", f"run.dir={tmp_path / 'run'}", check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "strategy.activation_offloading: needs a CUDA GPU" in out.stdout + out.stderr
    assert (
        not (tmp_path / "run" / "metrics.jsonl").exists()
        or not (tmp_path / "run" / "metrics.jsonl").read_text().strip()
    )


def llama(layers: int = 4, hidden: int = 64, vocab: int = 256, device: str = "cpu") -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(device)


def batch(vocab: int, rows: int, width: int, device: str = "cpu") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    ids = torch.randint(0, vocab, (rows, width), generator=torch.Generator().manual_seed(1)).to(device)
    labels = ids.clone()
    labels[:, : width // 8] = IGNORE_INDEX
    return {"input_ids": ids}, labels


def loss_and_grads(
    model: Any, context: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with context:
        loss = next_token_loss(model, inputs, labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_parameters_their_views_and_small_tensors_are_never_offloaded() -> None:
    model = llama()
    offloader = ActivationOffloader(model, min_bytes=4096)
    with offloader:
        weight = model.model.layers[0].mlp.up_proj.weight
        assert offloader.decide(weight) == "parameter"
        assert offloader.decide(weight.t()) == "parameter", "a matmul saves a transposed view of its weight"
        assert offloader.decide(weight.detach()) == "parameter", "the same storage"
        assert offloader.decide(torch.ones(1023)) == "small", "4092 bytes < min_bytes"
        assert offloader.decide(torch.ones(1024)) == "offload", "before the first decoder layer: the embeddings' output"
        offloader.layer = 3
        assert offloader.decide(torch.ones(1024)) == "last", "the last layer (keep_last=1) stays on the device"
        offloader.layer = 2
        assert offloader.decide(torch.ones(64, 64).t()) == "offload", "a transposed activation (SDPA's q, k, v)"
        assert offloader.decide(torch.ones(64, 64).to_sparse()) == "kept", "not strided: as it is"


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_offloaded_forward_gives_the_same_loss_and_gradients_and_skips_what_it_should(checkpointing: bool) -> None:
    """4 layers: layers 0-2 offload what they save above min_bytes; the last layer, the final norm,
    the head and the loss keep theirs; no parameter is ever copied; gradients are bit-identical.
    With activation checkpointing what is offloaded is each layer's saved input."""
    from launcher.engines.common import apply_activation_checkpointing

    model = llama()
    if checkpointing:
        apply_activation_checkpointing(model)
    inputs, labels = batch(256, 2, 64)
    plain_loss, plain_grads = loss_and_grads(model, build_offloader(model, False), inputs, labels)
    offloader = ActivationOffloader(model, min_bytes=4096)
    copied: list[tuple[int, torch.Tensor]] = []
    pack = offloader.pack

    def spy(t: torch.Tensor) -> Any:
        out = pack(t)
        if isinstance(out, Offloaded):
            copied.append((out.layer, t))
        return out

    offloader.pack = spy  # type: ignore[method-assign]
    loss, grads = loss_and_grads(model, offloader, inputs, labels)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert copied and not any(t.untyped_storage().data_ptr() in params for _, t in copied)
    assert all(t.numel() * t.element_size() >= 4096 for _, t in copied)
    layers = {layer for layer, _ in copied}
    assert layers <= {-1, 0, 1, 2}, "nothing from the last layer or after it"
    d = offloader.decisions
    if checkpointing:  # one saved input per checkpointed layer
        assert layers == {0, 1, 2} and d["offload"] == 3, d
    else:
        assert {0, 1, 2} <= layers and d["parameter"] and d["small"], d
    assert d["offload"] and d["last"], d


def test_backward_finds_each_layer_already_on_its_way_back() -> None:
    """When backward unpacks a tensor of layer i, every offloaded tensor of layer i was already
    being brought back: the last offloaded layer when the forward ended, each earlier one when
    backward reached the layer after it."""
    model = llama()
    inputs, labels = batch(256, 2, 64)

    class Checked(ActivationOffloader):
        late: list[int] = []
        seen: set[int] = set()

        def unpack(self, packed: Any) -> torch.Tensor:
            if isinstance(packed, Offloaded) and id(packed) not in self.seen:
                self.seen.add(id(packed))
                if packed.back is None:
                    self.late.append(packed.layer)
            return super().unpack(packed)

    offloader = Checked(model, min_bytes=4096)
    for _ in range(2):  # a second micro-batch through the same offloader
        loss_and_grads(model, offloader, inputs, labels)
    assert offloader.decisions["offload"] > 0
    assert offloader.late == [], f"fetched on demand, not prefetched: layers {offloader.late}"


@pytest.mark.gpu
def test_offloaded_activations_train_the_same_numbers_in_less_gpu_memory() -> None:
    from helpers import need_gpus

    need_gpus(1)
    model = llama(layers=8, hidden=512, vocab=1024, device="cuda")
    inputs, labels = batch(1024, 4, 1024, device="cuda")
    results = {}
    for offload in (False, True):
        context = build_offloader(model, offload)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss, grads = loss_and_grads(model, context, inputs, labels)
        torch.cuda.synchronize()
        results[offload] = (loss, grads, torch.cuda.max_memory_allocated() - before)
    torch.testing.assert_close(results[True][0], results[False][0])  # GPU kernels need not repeat bit for bit
    for got, want in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(got, want)
    assert results[True][2] < 0.6 * results[False][2], (
        f"peak {results[True][2] / 2**20:.0f} MiB vs {results[False][2] / 2**20:.0f} MiB"
    )
