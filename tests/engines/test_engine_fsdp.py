"""FSDP2's gradient reduction dtype (strategy.reduce_dtype) as the engine applies it, in one gloo
process (a world of 1: the same fully_shard calls as N ranks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from launcher.engines.fsdp import apply_fully_shard, reduce_dtype
from launcher.runtime.distributed import DistInfo


def test_reduce_dtype_is_fp32_unless_bf16_is_asked_over_bf16_compute() -> None:
    assert reduce_dtype("fp32", torch.bfloat16) == torch.float32
    assert reduce_dtype("bf16", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="strategy.reduce_dtype=bf16 needs bf16 training"):
        reduce_dtype("bf16", None)


@pytest.mark.parametrize("name,want", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_every_sharded_module_reduces_in_the_chosen_dtype(name: str, want: torch.dtype, tmp_path) -> None:
    from torch.distributed.fsdp import FSDPModule

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        model._no_split_modules = []
        apply_fully_shard(
            model, DistInfo(), torch.device("cpu"), True, False, torch.bfloat16, reduce_dtype(name, torch.bfloat16)
        )
        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
        assert sharded and all(m._get_fsdp_state()._mp_policy.reduce_dtype == want for m in sharded)
    finally:
        torch.distributed.destroy_process_group()
