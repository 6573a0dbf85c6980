"""launcher/model/loss.py: the output layer run only at labelled positions, with its logits whole
or in chunks, gives the full-logits loss and gradients."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import launcher.model.loss as loss_module
from launcher.data.types import IGNORE_INDEX
from launcher.model.loss import (
    ChunkShape,
    chunked_head_loss,
    chunked_token_logps,
    count_label_tokens,
    fused_head_ok,
    label_positions,
    logits_at_labels,
    next_token_logps,
    next_token_loss,
    output_layer,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model() -> Any:
    from helpers import tiny
    from transformers import AutoTokenizer

    from launcher.paths import asset

    return tiny(AutoTokenizer.from_pretrained(asset("tiny-tokenizer")), "sdpa_varlen")


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (3, 40), generator=g)
    labels = ids.clone()
    labels[torch.rand(3, 40, generator=g) < 0.5] = IGNORE_INDEX  # about half the positions unlabelled
    labels[2] = IGNORE_INDEX  # and a row with no label at all
    return {"input_ids": ids, "labels": labels}


def full_logits_loss(model: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        b["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@pytest.mark.parametrize(
    "impl, rows, block",
    [
        ("logits", None, None),
        ("chunked", None, None),
        ("chunked", 1, None),
        ("chunked", 7, None),
        ("chunked", 1000, None),
        ("chunked", 7, 100),
        ("chunked-cuda", None, None),
        ("chunked-cuda", 7, None),
    ],
)
def test_loss_and_gradients_equal_the_full_logits_loss(
    model: Any, impl: str, rows: Any, block: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    if impl == "chunked-cuda":  # the CUDA chunking (large chunks, one fp32 weight-gradient matmul each) run here
        monkeypatch.setattr(loss_module, "chunked_head_loss", functools.partial(chunked_head_loss, shape="cuda"))
        impl = "chunked"
    if rows is not None:  # the tiny vocabulary fits one chunk by default: force several (or one row each)
        monkeypatch.setattr(loss_module, "chunk_rows", lambda vocab, device_type="cpu": rows)
    if (
        block is not None
    ):  # and one block of the head's weight gradient: force several, the last one short (512 = 5 × 100 + 12)
        monkeypatch.setattr(loss_module, "WEIGHT_GRAD_BLOCK", block)
    b = batch()
    model.train()
    want = full_logits_loss(model, b)
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = next_token_loss(model, {"input_ids": b["input_ids"]}, b["labels"], impl=impl)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    for p, w in zip(
        model.parameters(), want_grads
    ):  # to 1e-5 of each gradient's largest entry (summation order differs)
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


def test_chunked_loss_never_makes_the_full_logits(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The largest float tensor the chunked head makes is one chunk of logits: F.linear is called
    on at most `rows` positions at a time."""
    rows, shapes = 5, []
    real_linear = torch.nn.functional.linear

    def spy(x: torch.Tensor, w: torch.Tensor, b: Any = None) -> torch.Tensor:
        out = real_linear(x, w, b)
        if w.shape[0] == 512:  # the head (vocabulary 512)
            shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(loss_module, "chunk_rows", lambda vocab, device_type="cpu": rows)
    monkeypatch.setattr(loss_module.F, "linear", spy)
    b = batch()
    next_token_loss(model, {"input_ids": b["input_ids"]}, b["labels"]).backward()
    n = count_label_tokens(b["labels"])
    assert len(shapes) == -(-n // rows) and all(s[0] <= rows and s[1] == 512 for s in shapes)


class MatmulShapes:
    """The output shapes of every matmul run within the block."""

    def __enter__(self) -> list[tuple[int, ...]]:
        from torch.utils._python_dispatch import TorchDispatchMode

        shapes: list[tuple[int, ...]] = []

        class Spy(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
                    shapes.append(tuple(out.shape))
                return out

        self.mode = Spy()
        self.mode.__enter__()
        return shapes

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)


def test_the_head_weight_gradient_is_never_one_whole_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU each chunk's weight-gradient product is made WEIGHT_GRAD_BLOCK vocabulary rows at a
    time, so under bf16 autocast no [vocab, hidden] product (nor its fp32 upcast on CPU) exists beside
    the fp32 accumulator: every matmul the chunked head runs has at most max(block, rows) rows."""
    vocab, hidden, rows, block = 512, 16, 7, 100
    monkeypatch.setattr(loss_module, "WEIGHT_GRAD_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(30, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (30,), generator=g)
    with MatmulShapes() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        chunked_head_loss(h, w, None, targets, rows=rows)
    weight_grads = [s for s in seen if s[1] == hidden and s[0] > rows]
    assert weight_grads and all(s[0] <= block for s in weight_grads), seen
    assert len(weight_grads) == -(-30 // rows) * -(-vocab // block)  # every chunk, every block


def test_cuda_chunks_are_thousands_of_rows_with_one_fp32_head_gradient_matmul_each() -> None:
    """The CUDA shape run here (fp32): chunks sized from 2**27 logits (1,046 rows of Llama 3's
    128k vocabulary; the CPU's stay 130), and each chunk adds its whole [vocab, hidden] weight
    gradient into the fp32 accumulator in one matmul (addmm_), not in vocabulary blocks."""
    assert ChunkShape.of("cuda", 128_256).rows == 1046 and ChunkShape.of("cpu", 128_256).rows == 130
    vocab, hidden, rows = 512, 16, 7
    g = torch.Generator().manual_seed(0)
    h = torch.randn(30, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (30,), generator=g)
    with MatmulShapes() as seen:
        got = chunked_head_loss(h, w, None, targets, rows=rows, shape="cuda")
    assert [s for s in seen if s == (vocab, hidden)] == [(vocab, hidden)] * -(-30 // rows), seen  # one per chunk
    want = F.cross_entropy(h @ w.t(), targets, reduction="sum")
    torch.testing.assert_close(got, want)
    for g_got, g_want in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", ["cpu", "cuda"])
def test_chunked_loss_under_bf16_autocast_matches_the_logits_path_to_bf16_rounding(
    model: Any, shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loss_module, "chunked_head_loss", functools.partial(chunked_head_loss, shape=shape))
    monkeypatch.setattr(loss_module, "chunk_rows", lambda vocab, device_type="cpu": 16)
    monkeypatch.setattr(loss_module, "WEIGHT_GRAD_BLOCK", 100)  # bf16 blocks added into the fp32 weight gradient
    b, results = batch(), {}
    for impl in ("logits", "chunked"):
        model.zero_grad()
        loss = next_token_loss(
            model,
            {"input_ids": b["input_ids"]},
            b["labels"],
            impl=impl,
            autocast=torch.autocast("cpu", dtype=torch.bfloat16),
        )
        loss.backward()
        assert loss.dtype == torch.float32
        results[impl] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["chunked"][0], results["logits"][0], rtol=1e-3, atol=1e-3)
    for got, want in zip(results["chunked"][1], results["logits"][1]):
        assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max()) + 1e-6  # bf16 has 8 bits of mantissa


def test_chunked_head_with_a_bias_a_frozen_weight_and_no_grad() -> None:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(13, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    bias = torch.randn(11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (13,), generator=g)
    want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), targets, reduction="sum")
    want_grads = torch.autograd.grad(want, (hidden, weight, bias))
    got = chunked_head_loss(hidden, weight, bias, targets, rows=4)
    for g_got, g_want in zip(torch.autograd.grad(got * 3.0, (hidden, weight, bias)), want_grads):  # backward scales
        torch.testing.assert_close(g_got, 3.0 * g_want, rtol=1e-5, atol=1e-6)
    frozen = weight.detach()  # LoRA: the head is frozen, no [vocab, hidden] gradient is made
    got = chunked_head_loss(hidden, frozen, None, targets, rows=4)
    (g_hidden,) = torch.autograd.grad(got, (hidden,))
    torch.testing.assert_close(
        g_hidden,
        torch.autograd.grad(torch.nn.functional.cross_entropy(hidden @ frozen.t(), targets, reduction="sum"), hidden)[
            0
        ],
    )
    with torch.no_grad():
        loss = chunked_head_loss(hidden, weight, bias, targets, rows=4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want.detach())


@pytest.mark.parametrize("shape", ["cpu", "cuda"])
def test_chunked_token_logps_and_their_gradients_equal_the_logits_path(shape: str) -> None:
    """Per-position log-probs, weighted in backward by what the loss makes of each (a preference
    loss weighs each sequence differently): values and gradients equal log_softmax's, with a bias,
    a frozen weight and without gradients."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(13, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    bias = torch.randn(11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (13,), generator=g)
    upstream = torch.randn(13, generator=g)
    want = -F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="none")
    got = chunked_token_logps(hidden, weight, bias, targets, rows=4, shape=shape)
    torch.testing.assert_close(got, want)
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, weight, bias))
    for g_got, g_want in zip(torch.autograd.grad((got * upstream).sum(), (hidden, weight, bias)), want_grads):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
    frozen = weight.detach()
    (g_hidden,) = torch.autograd.grad(
        (chunked_token_logps(hidden, frozen, None, targets, rows=4, shape=shape) * upstream).sum(), (hidden,)
    )
    want_frozen = -F.cross_entropy(hidden @ frozen.t(), targets, reduction="none")
    torch.testing.assert_close(g_hidden, torch.autograd.grad((want_frozen * upstream).sum(), hidden)[0])
    with torch.no_grad():
        loss = chunked_token_logps(hidden, weight, bias, targets, rows=4, shape=shape)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want.detach())


def test_next_token_logps_chunked_equal_the_logits_path(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_module, "chunk_rows", lambda vocab, device_type="cpu": 7)
    b = batch()
    upstream = torch.randn(count_label_tokens(b["labels"]), generator=torch.Generator().manual_seed(3))
    results = {}
    for chunked in (False, True):
        monkeypatch.setattr(loss_module, "fused_head_ok", lambda m, chunked=chunked: chunked)
        model.zero_grad()
        logps = next_token_logps(model, {"input_ids": b["input_ids"]}, b["labels"])
        (logps * upstream).sum().backward()
        results[chunked] = (logps.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0])
    for got, want in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_label_positions_select_what_the_mask_did_and_the_loss_needs_no_data_dependent_op() -> None:
    """With the positions made beforehand (the trainer makes them on the host with the batch), the
    loss runs no operator whose output size depends on the data (on a GPU: a host sync)."""
    from helpers import tiny
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoTokenizer

    from launcher.paths import asset

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.data_dependent = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            bool_index = func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1]
            )
            self.data_dependent += (
                func in (torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default) or bool_index
            )
            return func(*args, **(kwargs or {}))

    model = tiny(AutoTokenizer.from_pretrained(asset("tiny-tokenizer")), "sdpa")  # padded batches: no split of packs
    b = batch()
    keep = b["labels"][:, 1:] != IGNORE_INDEX
    positions = label_positions(b["labels"])
    hidden = torch.randn(3, 40, 5)
    torch.testing.assert_close(hidden.flatten(0, 1)[positions], hidden[:, :-1][keep])
    for impl in ("chunked", "logits"):
        with Ops() as given:
            next_token_loss(
                model, {"input_ids": b["input_ids"]}, b["labels"], impl=impl, positions=positions
            ).backward()
        with Ops() as made:
            next_token_loss(model, {"input_ids": b["input_ids"]}, b["labels"], impl=impl).backward()
        assert given.data_dependent == 0 and made.data_dependent == 1, (impl, given.data_dependent, made.data_dependent)


def test_families_that_transform_their_logits_keep_the_logits_path() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM

    small = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    gemma = Gemma2ForCausalLM(Gemma2Config(**small, head_dim=8, final_logit_softcapping=30.0))
    granite = GraniteForCausalLM(GraniteConfig(**small, logits_scaling=8.0))
    assert not fused_head_ok(gemma) and not fused_head_ok(granite)
    assert fused_head_ok(GraniteForCausalLM(GraniteConfig(**small, logits_scaling=1.0)))
    ids = torch.randint(0, 64, (2, 12))
    labels = ids.clone()
    for m in (gemma, granite):  # still the right loss, through the logits
        with torch.no_grad():
            logits = m(input_ids=ids).logits
            want = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), reduction="sum"
            )
            torch.testing.assert_close(next_token_loss(m, {"input_ids": ids}, labels), want)


def test_a_lora_adapted_head_keeps_the_logits_path(model: Any) -> None:
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert not fused_head_ok(peft)
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            next_token_loss(peft, {"input_ids": b["input_ids"]}, b["labels"]), full_logits_loss(peft, b)
        )


@pytest.mark.gpu
def test_liger_fused_loss_equals_the_logits_loss_on_cuda() -> None:
    from helpers import need_gpus

    need_gpus(1)
    pytest.importorskip("liger_kernel", reason="train.loss=liger needs pip install 'ftl[liger]'")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4
        )
    ).cuda()
    ids = torch.randint(0, 32000, (2, 128), device="cuda")
    labels = ids.clone()
    labels[:, :30] = IGNORE_INDEX
    results = {}
    for impl in ("logits", "chunked", "liger"):
        model.zero_grad()
        loss = next_token_loss(model, {"input_ids": ids}, labels, impl=impl)
        loss.backward()
        results[impl] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    for impl in ("chunked", "liger"):
        torch.testing.assert_close(results[impl][0], results["logits"][0], rtol=1e-5, atol=1e-4)
        for got, want in zip(results[impl][1], results["logits"][1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_liger_and_the_cuda_chunked_loss_match_fp32_under_bf16_autocast() -> None:
    """As the trainer runs them (fp32 weights, bf16 autocast), 8,192 positions of a 32k vocabulary:
    the CUDA-shaped chunked loss (2 chunks, each adding its head gradient into fp32 in one addmm)
    and liger (its head gradient accumulated in fp32: accum_dtype) give the fp32 loss to 1e-3
    relative and the head's and the hidden states' gradients to 1e-2 of their largest entry (bf16
    keeps 8 bits of mantissa), and each other's to the same bounds."""
    from helpers import need_gpus

    need_gpus(1)
    pytest.importorskip("liger_kernel", reason="train.loss=liger needs pip install 'ftl[liger]'")
    from launcher.model.loss import liger_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    n, hidden_size, vocab = 8192, 1024, 32000
    h = torch.randn(n, hidden_size, device="cuda", generator=g).requires_grad_()
    w = (0.05 * torch.randn(vocab, hidden_size, device="cuda", generator=g)).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    assert ChunkShape.of("cuda", vocab).rows == 4194  # two chunks
    want = F.cross_entropy(h @ w.t(), targets, reduction="sum")
    results = {"fp32": (want.detach(), *torch.autograd.grad(want, (h, w)))}
    for name, fn in (("chunked", chunked_head_loss), ("liger", liger_loss)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, None, targets)
        assert loss.dtype == torch.float32
        results[name] = (loss.detach(), *torch.autograd.grad(loss, (h, w)))
    for got, ref in (("chunked", "fp32"), ("liger", "fp32"), ("liger", "chunked")):
        (loss, grad_h, grad_w), (want_loss, want_h, want_w) = results[got], results[ref]
        torch.testing.assert_close(loss, want_loss, rtol=1e-3, atol=0)
        for a, b in ((grad_h, want_h), (grad_w, want_w)):
            assert a.dtype == torch.float32 and float((a - b).abs().max()) <= 1e-2 * float(b.abs().max()), (got, ref)


def test_the_head_sees_only_labelled_positions_and_is_unhooked_after(model: Any) -> None:
    b = batch()
    n = count_label_tokens(b["labels"])
    assert 0 < n < b["labels"][:, 1:].numel() // 2 + 20
    with torch.no_grad(), logits_at_labels(model, b["labels"]) as targets:
        logits = model(input_ids=b["input_ids"], use_cache=False).logits
    assert logits.shape == (n, 512) and targets.shape == (n,)
    assert torch.equal(targets, b["labels"][:, 1:][b["labels"][:, 1:] != IGNORE_INDEX])
    with torch.no_grad():
        assert model(input_ids=b["input_ids"], use_cache=False).logits.shape == (3, 40, 512)


def test_the_head_is_found_through_wrappers(model: Any) -> None:
    from peft import LoraConfig, get_peft_model

    class Wrapper(torch.nn.Module):  # what DDP and DeepSpeed's engine look like from outside
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, **kwargs: Any) -> Any:
            return self.module(**kwargs)

    head = model.lm_head
    assert output_layer(Wrapper(model)) is head
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert output_layer(Wrapper(peft)) is head
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            next_token_loss(Wrapper(peft), {"input_ids": b["input_ids"]}, b["labels"]), full_logits_loss(peft, b)
        )


def test_a_model_without_an_output_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="get_output_embeddings"):
        output_layer(torch.nn.Linear(2, 2))
