"""sdpa_varlen (launcher/model/attention.py): the same attention as transformers' own, per packed example."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import need_gpus, tiny

from launcher.model import attention
from launcher.paths import asset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))


def test_segments_are_read_from_position_restarts() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert attention.segment_bounds(pos) == [[(0, 3), (3, 5), (5, 9)], [(0, 9)]]


def test_a_forward_reads_the_segments_from_the_noted_host_copy(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer notes the collator's position_ids beside the device copy made from them: the
    forward's one look at the restarts reads the host tensor, never the one the layers receive
    (on CUDA that read would be a device→host copy and a wait, once per micro-batch)."""
    model = tiny(tok, attention.NAME).train()
    host = packed_positions()
    on_device = host.clone()  # what .to("cuda") would make: another tensor, same values
    read: list[torch.Tensor] = []
    bounds = attention.segment_bounds
    monkeypatch.setattr(attention, "segment_bounds", lambda p: read.append(p) or bounds(p))
    attention.note_host_copy(on_device, host)
    ids = torch.randint(3, 512, (2, 96), generator=torch.Generator().manual_seed(7))
    model(input_ids=ids, position_ids=on_device, use_cache=False).logits.sum().backward()
    assert len(read) == 1 and read[0].data_ptr() == host.data_ptr(), "one look, at the host copy"
    other = host.clone()
    model(input_ids=ids, position_ids=other, use_cache=False)
    assert len(read) == 2 and read[1].data_ptr() == other.data_ptr(), "a tensor nobody noted: read where it is"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_packed_rows_equal_each_example_run_alone(tok: Any, device: str) -> None:
    """Logits of a packed batch (on CPU: short examples on the math kernel, one long example on the
    flash kernel; padding at the end of a row) equal each example's logits computed on its own."""
    if device == "cuda":
        need_gpus(1)
    model = tiny(tok, attention.NAME).to(device)
    lengths = [[7, 300, 5], [40, 40, 200]]  # 300 >= MATH_BELOW: the long example takes the flash kernel
    assert max(max(r) for r in lengths) >= attention.MATH_BELOW > min(min(r) for r in lengths)
    width = 320
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (2, width), generator=g)
    pos = torch.zeros(2, width, dtype=torch.long)
    for b, row in enumerate(lengths):
        at = 0
        for n in [*row, width - sum(row)]:
            pos[b, at : at + n] = torch.arange(n)
            at += n
    ids, pos = ids.to(device), pos.to(device)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        for b, row in enumerate(lengths):
            at = 0
            for n in row:
                alone = model(input_ids=ids[b : b + 1, at : at + n]).logits[0]
                tol = 1e-5 if device == "cpu" else 1e-4  # GPU kernels reduce in another order
                torch.testing.assert_close(packed[b, at : at + n], alone, rtol=tol, atol=tol)
                at += n


def test_gradients_equal_transformers_sdpa_with_its_block_mask(tok: Any) -> None:
    varlen, sdpa = tiny(tok, attention.NAME), tiny(tok, "sdpa")
    ids = torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(2))
    pos = torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)]).repeat(2, 1)
    for model in (varlen, sdpa):
        model.train()
        model(input_ids=ids, position_ids=pos, use_cache=False).logits.pow(2).mean().backward()
    for (name, a), b in zip(varlen.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padded_batches_and_generation_match_sdpa(tok: Any) -> None:
    varlen, sdpa = tiny(tok, attention.NAME), tiny(tok, "sdpa")
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as batched generation has it
    with torch.no_grad():
        torch.testing.assert_close(
            varlen(input_ids=ids, attention_mask=mask).logits, sdpa(input_ids=ids, attention_mask=mask).logits
        )
        kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
        assert torch.equal(varlen.generate(ids, **kwargs), sdpa.generate(ids, **kwargs))


def test_sliding_window_is_kept_inside_a_long_example(tok: Any) -> None:
    """Mistral-style sliding window: an example longer than the window attends to the last
    ``window`` tokens only, as transformers' eager implementation does."""
    varlen, eager = (tiny(tok, attn, model_type="mistral", sliding_window=8) for attn in (attention.NAME, "eager"))
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(4))
    pos = torch.cat([torch.arange(30), torch.arange(10)])[None]
    with torch.no_grad():
        want = torch.cat([eager(input_ids=ids[:, :30]).logits, eager(input_ids=ids[:, 30:]).logits], dim=1)
        torch.testing.assert_close(
            varlen(input_ids=ids, position_ids=pos, use_cache=False).logits, want, rtol=1e-5, atol=1e-5
        )
        no_window = tiny(tok, attention.NAME, model_type="mistral", sliding_window=None)
        assert not torch.allclose(no_window(input_ids=ids[:, :30]).logits, want[:, :30], atol=1e-3), (
            "the window must matter here"
        )


def test_math_and_flash_kernels_agree_at_the_switch_length() -> None:
    """The kernel choice by length is a speed choice only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, attention.MATH_BELOW, 16, generator=g) for h in (4, 2, 2))
    fast = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with sdpa_kernel(SDPBackend.MATH):
        math = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(fast, math, rtol=1e-5, atol=1e-5)


def test_a_saved_model_names_no_ftl_attention(tok: Any, tmp_path: Any) -> None:
    """Exports load in plain transformers: the attention implementation is not serialised."""
    tiny(tok, attention.NAME).save_pretrained(tmp_path)
    assert attention.NAME not in (tmp_path / "config.json").read_text()


def reference_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: Any,
    window_size: tuple[int, int],
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn``'s documented contract, written plainly (its flash
    kernel has no CPU implementation): [T, heads, d] tokens, sequences at ``cu`` offsets, window
    (left, 0) = each token sees itself and ``left`` tokens before it, (-1, 0) = causal."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    assert window_size[1] == 0 and enable_gqa == (q.shape[1] != k.shape[1]), "GQA only when asked for"
    outs = []
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        n = end - start
        distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        allowed = (distance >= 0) & ((distance <= window_size[0]) if window_size[0] >= 0 else True)
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(
            F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa)[
                0
            ].transpose(0, 1)
        )
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_short_examples_on_cpu_equal_sdpa_one_by_one(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU path for short examples (fp32 copies of the batch, three ops per example) gives
    SDPA's outputs and gradients, with grouped key/value heads, several rows, and a long example
    (>= MATH_BELOW) among the short ones, which still goes to SDPA; both paths run fp32 math."""
    g = torch.Generator().manual_seed(11)
    width = 2 * attention.MATH_BELOW
    lengths = [37, 1, 120, width - 158, attention.MATH_BELOW + 4, 90, width - attention.MATH_BELOW - 94]  # two rows
    q0, k0, v0, grad = (torch.randn(2, h, width, 16, generator=g).to(dtype) for h in (6, 2, 2, 6))
    shorts = []
    short = attention.short_causal
    monkeypatch.setattr(attention, "short_causal", lambda q, *a: shorts.append(q.shape[1]) or short(q, *a))

    def run(f: Any, **kw: Any) -> list[torch.Tensor]:
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = f(q, k, v, lengths, scale=0.3, dropout=0.0, window=None, **kw)
        out.backward(grad.transpose(0, 1).reshape(out.shape))
        return [out, q.grad, k.grad, v.grad]

    want, got = run(attention.sdpa_per_example), run(attention.per_example)
    assert sorted(shorts) == sorted(n for n in lengths if n < attention.MATH_BELOW), (
        "every short example took the short path"
    )
    # bf16: rounding order; fp64: kept in fp64 (an fp32 detour would miss this by ~1e-7)
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, msg=name, rtol=1.6 * tol, atol=tol)


def test_short_examples_keep_fp32_math_under_autocast() -> None:
    """Training calls the attention under bf16 autocast, which would run the short path's matmuls
    and softmax in bf16 (casting every example's fp32 operands): it computes exactly what it does
    without autocast (fp32 math, as SDPA's math kernel), and stays within bf16 rounding of SDPA's
    own result under autocast (the output is cast back to bf16)."""
    g = torch.Generator().manual_seed(5)
    lengths = [40, 87, 1, 64, 63, 1]  # two rows of 128
    q0, k0, v0, grad = (torch.randn(2, h, 128, 16, generator=g).to(torch.bfloat16) for h in (6, 2, 2, 6))

    def run(f: Any, autocast: bool) -> list[torch.Tensor]:
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = f(q, k, v, lengths, scale=0.25, dropout=0.0, window=None)
        out.backward(grad.transpose(0, 1).reshape(out.shape))
        return [out, q.grad, k.grad, v.grad]

    plain, autocast = run(attention.per_example, False), run(attention.per_example, True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), autocast, plain):
        assert torch.equal(a, b), f"{name}: autocast changed the short path's math"
    for name, a, b in zip(("out", "dq", "dk", "dv"), autocast, run(attention.sdpa_per_example, True)):
        torch.testing.assert_close(a, b, msg=name, rtol=1.6e-2, atol=1e-2)


def test_dropout_windows_and_gpus_keep_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """The short path is causal attention without dropout: dropout, or a sliding window shorter
    than the example, go to SDPA (a window at least as long as the example changes nothing)."""
    calls: list[int] = []
    monkeypatch.setattr(attention, "short_causal", lambda q, *a: calls.append(q.shape[1]) or q)
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    attention.per_example(q, k, v, [10, 20], scale=None, dropout=0.1, window=None)
    attention.per_example(q, k, v, [10, 20], scale=None, dropout=0.0, window=15)
    assert calls == [10], "only the example within the window"
    attention.per_example(q, k, v, [10, 20], scale=None, dropout=0.0, window=None)
    assert calls == [10, 10, 20]


@pytest.mark.parametrize("native_gqa", [True, False])
@pytest.mark.parametrize("window", [None, 6, 500])
def test_the_one_kernel_layout_equals_the_per_example_loop(window: Any, native_gqa: bool) -> None:
    """packed_flash's reshaping, offsets and window mapping (what the CUDA path feeds the flash
    kernel) give the loop's result when the kernel keeps varlen_attn's contract."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, h, 24, 8, generator=g) for h in (4, 2, 2))
    pos = torch.cat([torch.arange(10), torch.arange(3), torch.arange(11), torch.arange(24)]).view(2, 24)
    loop, _ = attention.varlen_attention_forward(
        torch.nn.Module(), q, k, v, None, scaling=0.3, position_ids=pos, sliding_window=window
    )
    lengths = [e - s for row in attention.segment_bounds(pos) for s, e in row]
    one = attention.packed_flash(
        q, k, v, lengths, scale=0.3, window=window, kernel=reference_varlen, native_gqa=native_gqa
    )
    torch.testing.assert_close(one, loop, rtol=1e-5, atol=1e-5)
    assert not attention.one_kernel(q, 0.0) and not attention.one_kernel(q.bfloat16(), 0.0), "no flash varlen on CPU"


@pytest.mark.parametrize(
    "capability,cudnn,gqa,window,want",
    [
        ((8, 0), False, True, True, True),
        ((8, 9), False, False, False, True),
        ((9, 0), False, True, False, True),
        ((10, 0), False, True, True, True),
        ((10, 3), False, False, False, True),
        ((12, 0), False, True, False, True),
        ((10, 0), True, False, False, True),
        ((10, 0), True, True, False, False),
        ((9, 0), True, False, True, False),
        ((7, 5), False, False, False, False),
        ((11, 0), False, False, False, False),
    ],
)
def test_blackwell_takes_the_one_kernel_path_unless_cudnn_would_refuse_it(
    capability: Any, cudnn: bool, gqa: bool, window: bool, want: bool
) -> None:
    """Blackwell (10.x, 12.x) joins Ampere, Ada and Hopper; where this PyTorch routes the device to
    cuDNN, grouped-query attention and windows (which cuDNN refuses) stay on the loop; Turing never."""
    assert attention.varlen_capable(capability, cudnn, gqa=gqa, window=window) is want


@pytest.mark.parametrize("per_call", [False, True])
def test_cudnn_routing_is_read_from_this_torch(per_call: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch that sends the device to cuDNN for every call makes GQA and windows take the loop;
    one that chooses per call (and falls back to flash) does not."""
    if attention.varlen_attn is None:
        pytest.skip(f"torch {torch.__version__} has no varlen_attn")
    varlen = torch.nn.attention.varlen
    monkeypatch.setattr(varlen, "_should_use_cudnn", lambda index: True, raising=False)
    if per_call:
        monkeypatch.setattr(varlen, "_select_backend", lambda *a, **kw: 0, raising=False)
    else:
        monkeypatch.delattr(varlen, "_select_backend", raising=False)
    assert attention.routes_to_cudnn(0) is not per_call


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_cuda_packed_batch_is_one_flash_call_equal_to_the_loop(
    tok: Any, model_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA in bf16 the packed batch goes to torch's flash varlen kernel (one call per layer);
    logits and gradients equal the per-example SDPA loop's to bf16 rounding (Mistral: with a window)."""
    need_gpus(1)
    assert attention.varlen_attn is not None, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    extra = {"sliding_window": 16} if model_type == "mistral" else {}
    model = tiny(tok, attention.NAME, model_type=model_type, **extra).to("cuda", torch.bfloat16).train()
    ids = torch.randint(3, 512, (2, 96), generator=torch.Generator().manual_seed(7)).cuda()
    pos = (
        torch.cat([torch.arange(40), torch.arange(9), torch.arange(47), torch.arange(70), torch.arange(26)])
        .view(2, 96)
        .cuda()
    )

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        logits.float().pow(2).mean().backward()
        return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}

    calls = []
    monkeypatch.setattr(
        attention, "varlen_attn", lambda *a, **kw: calls.append(1) or torch.nn.attention.varlen.varlen_attn(*a, **kw)
    )
    one_logits, one_grads = run()
    assert len(calls) == 2, "one flash call per layer"
    monkeypatch.setattr(attention, "varlen_attn", None)
    loop_logits, loop_grads = run()
    torch.testing.assert_close(one_logits, loop_logits, rtol=2e-2, atol=2e-2)
    for name, grad in one_grads.items():
        torch.testing.assert_close(grad, loop_grads[name], rtol=5e-2, atol=5e-3, msg=name)


def packed_positions(device: str = "cpu") -> torch.Tensor:
    return (
        torch.cat([torch.arange(40), torch.arange(9), torch.arange(47), torch.arange(70), torch.arange(26)])
        .view(2, 96)
        .to(device)
    )


def test_autocast_over_fp32_weights_gives_the_kernel_half_precision_queries(
    tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The single/ddp/LoRA path: fp32 weights under autocast. RoPE hands sdpa_varlen fp32 queries
    and keys (and a bf16 value); the packed path casts them to the autocast dtype, the one the
    flash varlen kernel takes (one_kernel refuses fp32), as SDPA itself would cast them."""
    model = tiny(tok, attention.NAME).train()
    arrived: list[tuple[torch.dtype, ...]] = []
    attended: list[torch.dtype] = []
    cast, attend = attention.autocast_inputs, attention.per_example
    monkeypatch.setattr(attention, "autocast_inputs", lambda *t: arrived.append(tuple(x.dtype for x in t)) or cast(*t))
    monkeypatch.setattr(attention, "per_example", lambda q, *a, **kw: attended.append(q.dtype) or attend(q, *a, **kw))
    ids = torch.randint(3, 512, (2, 96), generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, position_ids=packed_positions(), use_cache=False)
    assert arrived == [(torch.float32, torch.float32, torch.bfloat16)] * 2, "what RoPE hands over, per layer"
    assert attended == [torch.bfloat16] * 2, "every layer's per-example attention got bf16 queries"
    q = torch.randn(1, 4, 8, 16)
    assert attention.autocast_inputs(q)[0].dtype == torch.float32, "no autocast: left alone"


def test_segments_are_found_once_per_forward_and_recompute(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer, and activation checkpointing's recompute of every layer in backward, gets the
    same position_ids: the position restarts are read (a device→host copy on GPU) once per batch,
    not once per attention call; a new batch is read anew."""
    model = tiny(tok, attention.NAME).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reads = []
    bounds = attention.segment_bounds
    monkeypatch.setattr(attention, "segment_bounds", lambda pos: reads.append(1) or bounds(pos))
    attention.take_calls()
    ids = torch.randint(3, 512, (2, 96), generator=torch.Generator().manual_seed(8))
    for batch in range(2):
        model(input_ids=ids, position_ids=packed_positions(), use_cache=False).logits.float().pow(2).mean().backward()
        assert len(reads) == batch + 1
    assert attention.take_calls() == {"loop": 8}, (
        "2 batches × 2 layers × (forward + recompute), all packed, on the loop"
    )
    assert attention.attention_paths(torch.device("cpu")) == {}, "no metric on CPU"


@pytest.mark.gpu
def test_cuda_fp32_weights_under_autocast_take_the_one_call_path(tok: Any) -> None:
    """What strategy=single/ddp and LoRA run: fp32 master weights, bf16 autocast. Every packed
    attention call is one flash varlen call (the trainer's attn_varlen_flash metric is 1.0)."""
    need_gpus(1)
    assert attention.varlen_attn is not None, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    model = tiny(tok, attention.NAME).to("cuda").train()
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.randint(3, 512, (2, 96), generator=torch.Generator().manual_seed(7)).cuda()
    attention.take_calls()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids, position_ids=packed_positions("cuda"), use_cache=False).logits
    logits.float().pow(2).mean().backward()
    assert attention.take_calls() == {"flash": 2}
