"""MFU arithmetic (launcher/train/mfu.py) on models as the trainer builds them: no FLOPs for the
input embedding, 6 per trainable and 4 per frozen weight and token, the output layer per labelled
token only, QLoRA's 4-bit weights at their real size, and GPU names matched as whole words."""

from __future__ import annotations

import pytest
import torch

from launcher.model.loss import output_layer
from launcher.plan.memory import lora_param_count, param_counts
from launcher.session import load_config
from launcher.train.mfu import ModelFlops, model_flops, model_flops_utilization, peak_for_name
from launcher.train.trainer import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA B200", 2.25e15),
        ("NVIDIA GB200", 2.5e15),
        ("NVIDIA H800", 989e12),
        ("NVIDIA H800 PCIe", 756e12),
        ("NVIDIA A10", None),
        ("NVIDIA GH200 480GB", None),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_gpu_names_match_whole_words(name: str, peak: float | None) -> None:
    assert peak_for_name(name) == peak


def flops_of(*overrides: str) -> tuple[ModelFlops, object]:
    cfg = load_config(["recipe=tiny", *overrides]).cfg
    torch.manual_seed(0)
    model, _ = build_model(cfg, CPU)
    return model_flops(model, output_layer(model)), cfg


def test_full_fine_tune_counts_every_matmul_weight_but_the_embedding() -> None:
    flops, cfg = flops_of()
    pc = param_counts(cfg.model.arch)
    assert flops.body == 6 * pc.linear, "q, k, v, o, gate, up, down of every layer; no embedding, no norms"
    assert flops.head == 6 * pc.head
    # The head runs only where a label is predicted: 100 tokens of which 40 are labelled.
    assert flops.step(100, 40) == 6 * pc.linear * 100 + 6 * pc.head * 40
    assert model_flops_utilization(1e12, 1, CPU) is None, "no peak for a CPU"


def test_lora_frozen_weights_cost_4_flops_and_adapters_6() -> None:
    flops, cfg = flops_of("peft=lora", "peft.r=4")
    pc = param_counts(cfg.model.arch)
    adapters = lora_param_count(cfg.model.arch, 4, cfg.peft.target_modules)
    assert flops.body == 4 * pc.linear + 6 * adapters, "frozen: forward + input gradient; adapters: + weight gradient"
    assert flops.head == 4 * pc.head


def test_qlora_counts_the_real_size_of_4_bit_weights() -> None:
    pytest.importorskip("bitsandbytes")
    flops, cfg = flops_of("peft=qlora", "peft.r=4", "peft.compute_dtype=fp32")
    pc = param_counts(cfg.model.arch)
    assert flops.body == 4 * pc.linear + 6 * lora_param_count(cfg.model.arch, 4, cfg.peft.target_modules)
