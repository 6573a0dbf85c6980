"""The planner's frozen base of LoRA/QLoRA against the model the trainer really builds: its
parameters' dtypes and bytes, counted on the instantiated model (launcher.train.trainer.build_model)."""

from __future__ import annotations

import pytest
import torch

from launcher.plan.memory import frozen_base_bytes, lora_param_count
from launcher.plan.report import layout_for, workload_of
from launcher.session import load_config
from launcher.train.trainer import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def built(*overrides: str) -> tuple[object, object]:
    cfg = load_config(["recipe=tiny", *overrides]).cfg
    torch.manual_seed(0)
    model, _ = build_model(cfg, CPU)
    return cfg, model


def frozen_and_trainable(model: torch.nn.Module) -> tuple[dict[torch.dtype, int], dict[torch.dtype, int]]:
    frozen: dict[torch.dtype, int] = {}
    trainable: dict[torch.dtype, int] = {}
    for p in model.parameters():
        side = trainable if p.requires_grad else frozen
        side[p.dtype] = side.get(p.dtype, 0) + p.numel() * p.element_size()
    return frozen, trainable


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_lora_base_is_loaded_in_the_compute_dtype_the_planner_charges(precision: str, dtype: torch.dtype) -> None:
    cfg, model = built("peft=lora", "peft.r=4", f"train.precision={precision}", "peft.modules_to_save=[lm_head]")
    frozen, trainable = frozen_and_trainable(model)
    assert set(frozen) == {dtype}, frozen
    assert set(trainable) == {torch.float32}, "adapters and modules_to_save copies train in fp32"
    w, lay = workload_of(cfg, precision), layout_for(cfg)
    assert sum(frozen.values()) == frozen_base_bytes(w, lay)[0]
    assert trainable[torch.float32] == 4 * lora_param_count(cfg.model.arch, 4, cfg.peft.target_modules, ["lm_head"])


def test_qlora_base_is_4_bit_linears_and_fp32_elsewhere_as_planned() -> None:
    pytest.importorskip("bitsandbytes")
    cfg, model = built("peft=qlora", "peft.r=4", "train.precision=bf16")
    frozen, _ = frozen_and_trainable(model)
    assert set(frozen) == {torch.uint8, torch.float32}, frozen
    w, lay = workload_of(cfg, "bf16"), layout_for(cfg)
    planned, text = frozen_base_bytes(w, lay)
    assert "+ 4 B ×" in text, "embeddings, head and norms in fp32"
    # The parameters hold the packed 4-bit weights (0.5 B each) and the fp32 rest; the planner
    # adds the quantization constants (absmax per block), kept beside the parameters.
    assert sum(frozen.values()) <= planned <= 1.04 * sum(frozen.values())
