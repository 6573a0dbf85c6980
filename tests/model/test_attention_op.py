"""launcher/model/attention_op.py: packed attention as one operator (what compiled layers call) has the
per-example loop's output and gradients, passes PyTorch's operator checks, and stays out of eager code."""

from __future__ import annotations

import pytest
import torch

from launcher.model import attention, attention_op

pytestmark = pytest.mark.usefixtures("one_thread")


def qkv(
    lengths: list[int], rows: int, heads: int, kv_heads: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    """q, k, v [rows, heads, L, d] (leaves with gradients) and position_ids for ``lengths`` packed ``rows`` to a row."""
    width = sum(lengths) // rows
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(rows, h, width, 16, generator=g, dtype=dtype).requires_grad_() for h in (heads, kv_heads, kv_heads)
    )
    positions = torch.cat([torch.arange(n) for n in lengths]).view(rows, width)
    return q, k, v, positions


@pytest.mark.parametrize(
    ("lengths", "rows", "heads", "kv_heads", "dtype"),
    [
        ([30, 50, 20], 1, 6, 2, torch.float64),  # short examples only (the fp32-math path), GQA
        ([300, 20, 280], 1, 6, 2, torch.float64),  # two over MATH_BELOW: SDPA's flash kernel and its backward
        ([30, 50, 20, 60, 40], 2, 4, 4, torch.float32),  # two rows, no GQA
        ([300, 20, 280, 100, 500], 2, 6, 3, torch.bfloat16),  # as training runs it: half precision in, fp32 math
    ],
)
def test_output_and_gradients_equal_the_per_example_loop(
    lengths: list[int], rows: int, heads: int, kv_heads: int, dtype: torch.dtype
) -> None:
    q, k, v, positions = qkv(lengths, rows, heads, kv_heads, dtype, seed=len(lengths))
    width, scale = positions.shape[1], 0.3
    want = attention.sdpa_per_example(q, k, v, lengths, scale=scale, dropout=0.0, window=None)[0]
    want = want.reshape(heads, rows, width, 16).permute(1, 2, 0, 3)  # [rows, L, heads, d], the op's layout
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    got, saved, probs, lse = attention_op.packed_attention(q, k, v, positions, scale)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for g, w in zip(got_grads, want_grads):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    assert lse.shape == (heads, rows * width) and lse.dtype == torch.promote_types(dtype, torch.float32)


def test_the_operator_passes_torch_library_opcheck() -> None:
    """PyTorch's own checks: the fake (shape-only) version matches the real one, the registered
    backward is what autograd runs, schema and aliasing are as declared."""
    q, k, v, positions = qkv([15, 25, 300, 20], 2, 4, 2, torch.float32, seed=3)
    torch.library.opcheck(attention_op.packed_attention, (q, k, v, positions, 0.25))


def test_eager_callers_run_the_loop_not_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a compiled layer (evaluation, an uncompiled model) the registered function is the
    eager loop, whether or not compiled layers exist in the process."""
    called = []
    monkeypatch.setattr(attention_op, "varlen_attention_forward", lambda *a, **k: called.append(1) or ("loop", None))
    q, k, v, positions = qkv([30, 50], 1, 4, 2, torch.float32, seed=1)
    assert attention_op.compiled_forward(torch.nn.Module(), q, k, v, None, position_ids=positions) == ("loop", None)
    assert called == [1]


@pytest.mark.parametrize("extra", [{"sliding_window": 8}, {"dropout": 0.0, "softcap": None, "position_bias": None}])
def test_under_compile_only_a_plain_packed_forward_is_the_operator(
    extra: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While dynamo traces: a sliding window leaves the graph (the eager loop, one break); a plain
    packed forward is the operator, unbroken. Both give the loop's numbers."""
    from torch._dynamo.utils import counters

    q, k, v, positions = qkv([20, 12], 1, 4, 2, torch.float32, seed=5)
    q, k, v = (t.detach() for t in (q, k, v))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention_op.compiled_forward(
            torch.nn.Module(), q, k, v, None, scaling=0.25, position_ids=positions, **extra
        )[0]

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):  # as compile_decoder_layers sets it
        got = torch.compile(attend, backend="eager", fullgraph=False)(q, k, v)
    want = attention.varlen_attention_forward(
        torch.nn.Module(), q, k, v, None, scaling=0.25, position_ids=positions, **extra
    )[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert bool(counters["graph_break"]) == ("sliding_window" in extra), dict(counters["graph_break"])


def test_the_math_stays_fp32_when_called_under_bf16_autocast() -> None:
    """Autocast is off inside the operator, as in the eager loop: called eagerly under bf16
    autocast, its fp32 matmuls give the fp32 result, not a bf16-rounded one (v1's did)."""
    q, k, v, positions = qkv([30, 50, 20], 1, 4, 2, torch.float32, seed=11)
    want = attention_op.packed_attention(q, k, v, positions, 0.25)[0]
    want_grads = torch.autograd.grad(want, (q, k, v), torch.ones_like(want))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention_op.packed_attention(q, k, v, positions, 0.25)[0]
        got_grads = torch.autograd.grad(got, (q, k, v), torch.ones_like(got))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_mixed_dtypes_take_the_operator_only_once_autocast_unifies_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """RoPE over an fp32 residual stream leaves q and k in fp32 while v is bf16. Under autocast
    :func:`compiled_forward` casts them to one dtype and the operator runs; outside autocast
    :func:`fits` refuses them and the forward is the eager loop, never the operator with mixed
    inputs. Device, dropout and window refusals too."""
    q, k, v, positions = qkv([20, 12], 1, 4, 2, torch.float32, seed=9)
    q, k, v = (t.detach() for t in (q, k, v))
    mixed = (q, k, v.bfloat16())
    assert attention_op.fits(q, k, v, 0.0, None) and not attention_op.fits(*mixed, 0.0, None)
    assert not attention_op.fits(q.to("meta"), k.to("meta"), v.to("meta"), 0.0, None)
    assert not attention_op.fits(q, k, v, 0.1, None) and not attention_op.fits(q, k, v, 0.0, 8)

    taken = []
    real = attention_op.packed_attention
    monkeypatch.setattr(attention_op, "packed_attention", lambda *a: taken.append({t.dtype for t in a[:3]}) or real(*a))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as inside a traced layer, run eagerly

    def attend(*qkv_):
        return attention_op.compiled_forward(torch.nn.Module(), *qkv_, None, scaling=0.25, position_ids=positions)[0]

    got = attend(*mixed)
    assert taken == []  # the eager loop: no operator with mixed inputs
    want = attention.varlen_attention_forward(
        torch.nn.Module(), q, k, v.bfloat16().float(), None, scaling=0.25, position_ids=positions
    )[0]
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attend(*mixed)
    assert taken == [{torch.bfloat16}]
