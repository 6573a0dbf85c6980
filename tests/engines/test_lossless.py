"""Lossless packing of a LoRA run's optimizer state (launcher/engines/lossless.py): bit for bit back,
readable with weights_only, smaller than raw on real AdamW moments, and what a LoRA checkpoint of
strategy=single holds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from launcher.engines.lossless import MIN_NUMEL, PACKED, pack_state, pack_tensor, unpack_state, unpack_tensor


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as bytes: NaN payloads and the sign of zero count."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_every_float_comes_back_bit_for_bit(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(64, 80, generator=g) * torch.logspace(-8, 2, 80)).to(dtype)
    flat = t.view(-1)
    flat[:6] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0], dtype=dtype)
    if dtype in (torch.float32, torch.float64):  # a NaN with a payload of its own
        bits = flat.view(torch.int32 if dtype == torch.float32 else torch.int64)
        bits[6] = 0x7FC00123 if dtype == torch.float32 else 0x7FF8000000000123
    record = pack_tensor(t)
    assert record["packed"] == PACKED
    assert same_bits(unpack_tensor(record), t)


def test_a_non_contiguous_tensor_comes_back_with_its_values_and_shape() -> None:
    t = torch.randn(40, 30).t()
    assert not t.is_contiguous()
    back = unpack_tensor(pack_tensor(t))
    assert back.shape == t.shape and torch.equal(back, t)


def test_a_state_dict_round_trips_through_a_weights_only_load(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(4, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    packed = pack_state(state)
    records = [v for s in packed["state"].values() for v in s.values() if isinstance(v, dict)]
    # the 64x32 weight's two moments are packed; the small bias moments and step counts are not
    assert len(records) == 2 and all(r["packed"] == PACKED for r in records)
    assert all(isinstance(s["step"], torch.Tensor) for s in packed["state"].values())
    torch.save(packed, tmp_path / "state.pt")
    back = unpack_state(torch.load(tmp_path / "state.pt", weights_only=True))
    assert back["param_groups"] == state["param_groups"]
    for key, moments in state["state"].items():
        assert set(back["state"][key]) == set(moments)
        assert all(same_bits(back["state"][key][name], value) for name, value in moments.items())
    assert all(same_bits(v, state["state"][0][k]) for k, v in opt.state_dict()["state"][0].items())  # untouched


def test_an_unpacked_state_passes_through_unchanged() -> None:
    """A checkpoint written before packing (or by a full fine-tune) loads as it was."""
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(MIN_NUMEL)}}, "param_groups": [{"lr": 1}]}
    back = unpack_state(state)
    assert back["param_groups"] == [{"lr": 1}]
    assert back["state"][0]["exp_avg"] is state["state"][0]["exp_avg"]


def test_adamw_moments_pack_smaller_than_raw() -> None:
    """The top byte (sign, high exponent) of real moments is a few bits; the others stay raw."""
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        model(torch.randn(8, 256)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for name in ("exp_avg", "exp_avg_sq"):
        record = pack_tensor(opt.state[model.weight][name])
        size = record["low"].numel() + record["top"].numel()
        assert record["top_compressed"] == 1
        assert size < 0.9 * 4 * model.weight.numel(), (name, size)


def test_a_truncated_top_plane_is_an_error_not_wrong_values() -> None:
    record = pack_tensor(torch.randn(1000))
    record["low"] = record["low"][:-1]
    with pytest.raises(ValueError, match="999 rows"):
        unpack_tensor(record)
    record = pack_tensor(torch.randn(1000))
    record["shape"] = [1001]
    with pytest.raises(ValueError, match="shape"):
        unpack_tensor(record)
