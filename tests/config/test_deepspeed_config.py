"""The DeepSpeed JSON generated from the ftl config (pure: no torch, no deepspeed): stages, offload,
batch arithmetic, precision, `strategy.extra` contradictions and merging, and `ftl plan` printing it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from launcher.config.compose import compose
from launcher.config.deepspeed_config import build_deepspeed_config, deepspeed_config_errors
from launcher.config.errors import ConfigErrors
from launcher.config.schema import DeepSpeedStrategy, FtlConfig, LocalLaunch, SingleStrategy, SlurmLaunch, TrainConfig
from launcher.config.topology import planned_device_type, resolve_precision
from launcher.config.validate import validate


def make_cfg(
    stage: int = 3, extra: dict[str, Any] | None = None, nproc: int = 2, reduce_dtype: str = "fp32", **train: Any
) -> FtlConfig:
    train = {"micro_batch_size": 2, "grad_accum": 1, "precision": "fp32", "device": "cpu", **train}
    offload = stage == 3 and bool(train.pop("offload", False))
    strategy = DeepSpeedStrategy(
        zero_stage=stage,
        offload_optimizer=offload,
        offload_params=offload,
        extra=extra or {},
        reduce_dtype=reduce_dtype,
    )
    return FtlConfig(strategy=strategy, train=TrainConfig(**train), launch=LocalLaunch(nproc_per_node=nproc))


def errors_of(cfg: FtlConfig) -> list[str]:
    return [str(e) for e in deepspeed_config_errors(cfg)]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_stage(stage):
    ds = build_deepspeed_config(make_cfg(stage), world_size=2)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"] == {"device": "none"} and zero["offload_param"] == {"device": "none"}
    assert ("stage3_prefetch_bucket_size" in zero) == (stage == 3)
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is False  # ftl exports from the shards
    assert "optimizer" not in ds and "scheduler" not in ds  # ftl passes its own objects
    json.dumps(ds)  # plain JSON


def test_bucket_sizes_follow_the_hidden_size():
    cfg = make_cfg(3)
    cfg.model.arch.hidden_size = 4096
    zero = build_deepspeed_config(cfg, 8)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096 * 4096
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    assert zero["stage3_param_persistence_threshold"] == 40960


def test_offload_to_cpu_with_pinned_buffers():
    zero = build_deepspeed_config(make_cfg(3, offload=True), 2)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}


@pytest.mark.parametrize("micro, accum, world", [(1, 1, 1), (2, 3, 4), (4, 8, 16)])
def test_batch_arithmetic(micro, accum, world):
    ds = build_deepspeed_config(make_cfg(2, micro_batch_size=micro, grad_accum=accum), world)
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == micro * accum * world


def test_clipping():
    assert build_deepspeed_config(make_cfg(3, grad_clip=0.5), 2)["gradient_clipping"] == 0.5
    assert build_deepspeed_config(make_cfg(3, grad_clip=0.0), 2)["gradient_clipping"] == 0.0


@pytest.mark.parametrize(
    "precision, bf16, fp16", [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)]
)
def test_precision_flags(precision, bf16, fp16):
    ds = build_deepspeed_config(make_cfg(3, device="cuda"), 2, precision=precision)
    assert ds["bf16"]["enabled"] is bf16 and ds["fp16"]["enabled"] is fp16
    assert ("loss_scale" in ds["fp16"]) == fp16  # dynamic loss scaling only for fp16


def test_auto_precision_resolves_for_the_planned_device():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    cfg = make_cfg(3, precision="auto", device="cpu")
    assert planned_device_type(cfg) == "cpu" and build_deepspeed_config(cfg, 2)["bf16"]["enabled"] is False
    cfg = make_cfg(3, precision="auto", device="auto")
    cfg.launch = SlurmLaunch(gpus_per_node=8)
    assert planned_device_type(cfg) == "cuda" and build_deepspeed_config(cfg, 8)["bf16"]["enabled"] is True


# --------------------------------------------------------------------------------------------
# strategy.extra


def test_contradictions_name_both_fields():
    cfg = make_cfg(3, extra={"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2}})
    errs = errors_of(cfg)
    assert len(errs) == 2
    assert any(
        e.startswith("strategy.extra.zero_optimization.stage: 2 contradicts strategy.zero_stage=3") for e in errs
    )
    assert any(
        e.startswith("strategy.extra.train_micro_batch_size_per_gpu: 3 contradicts train.micro_batch_size=2")
        for e in errs
    )
    with pytest.raises(ConfigErrors) as info:
        build_deepspeed_config(cfg, 2)
    assert len(info.value.errors) == 2


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"train_batch_size": 16}, "train.micro_batch_size=2 × train.grad_accum=1 × world size 2 = 4"),
        ({"gradient_accumulation_steps": 4}, "train.grad_accum=1"),
        ({"gradient_clipping": 0.0}, "train.grad_clip=1"),
        ({"bf16": {"enabled": True}}, "train.precision=fp32"),
        ({"bf16": True}, "replaces the section holding bf16.enabled=false"),
        ({"bfloat16": {"enabled": True}}, "train.precision=fp32"),  # DeepSpeed's older spelling
        ({"train_batch_size": {"x": 1}}, "nests under train_batch_size=4"),
        ({"fp16": {"enabled": 1}}, "train.precision=fp32"),  # 1 is not a boolean
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "strategy.offload_optimizer=false"),
        ({"zero_optimization": {"offload_param": {"device": "nvme"}}}, "strategy.offload_params=false"),
        ({"optimizer": {"type": "Adam"}}, "ftl passes its own AdamW"),
        ({"scheduler": {"type": "WarmupLR"}}, "ftl passes its own LR schedule"),
    ],
)
def test_each_derived_value_is_guarded(extra, needle):
    errs = errors_of(make_cfg(3, extra=extra))
    assert len(errs) == 1 and needle in errs[0], errs
    assert errs[0].startswith("strategy.extra.")


def test_repeating_a_derived_value_or_auto_is_fine():
    extra = {
        "train_micro_batch_size_per_gpu": 2,
        "train_batch_size": "auto",
        "gradient_clipping": 1,
        "zero_optimization": {"stage": 3, "offload_param": {"device": "none"}},
        "bf16": {"enabled": "auto"},
    }
    cfg = make_cfg(3, extra=extra)
    assert errors_of(cfg) == []
    ds = build_deepspeed_config(cfg, 2)
    assert ds["train_batch_size"] == 4 and ds["bf16"] == {"enabled": False}


def test_keys_ftl_does_not_derive_are_merged():
    extra = {
        "wall_clock_breakdown": True,
        "zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 123, "stage3_prefetch_bucket_size": "auto"},
        "zero_allow_untested_optimizer": True,
        "comms_logger": {"enabled": True},
    }
    cfg = make_cfg(3, extra=extra)
    h = cfg.model.arch.hidden_size
    ds = build_deepspeed_config(cfg, 2)
    zero = ds["zero_optimization"]
    assert ds["wall_clock_breakdown"] is True and ds["comms_logger"] == {"enabled": True}
    assert zero["overlap_comm"] is True
    assert zero["reduce_bucket_size"] == 123  # ftl's default, overridden
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * h * h)  # "auto": ftl's default stays
    assert zero["stage"] == 3 and zero["offload_optimizer"] == {"device": "none"}


def test_extra_is_not_mutated():
    extra = {"zero_optimization": {"overlap_comm": True}}
    build_deepspeed_config(make_cfg(3, extra=extra), 2)
    assert extra == {"zero_optimization": {"overlap_comm": True}}


def test_stage0_refuses_mixed_precision():
    errs = errors_of(make_cfg(0, precision="bf16"))
    assert len(errs) == 1 and errs[0].startswith("strategy.zero_stage: 0 with train.precision=bf16")
    assert errors_of(make_cfg(0)) == [] and errors_of(make_cfg(1, precision="bf16")) == []


def test_other_engines_have_no_deepspeed_errors():
    cfg = FtlConfig(strategy=SingleStrategy())
    assert deepspeed_config_errors(cfg) == []
    with pytest.raises(ValueError, match="engine deepspeed only"):
        build_deepspeed_config(cfg, 1)


def test_world_size_comes_from_the_launch():
    cfg = make_cfg(3, extra={"train_batch_size": 8}, nproc=4)  # 2 × 1 × 4
    assert errors_of(cfg) == []
    cfg.launch.nproc_per_node = 2
    assert errors_of(cfg) and "world size 2 = 4" in errors_of(cfg)[0]


# --------------------------------------------------------------------------------------------
# the shipped strategies and `ftl plan`


@pytest.mark.parametrize(
    "strategy, stage, offload",
    [("zero1", 1, False), ("zero2", 2, False), ("zero3", 3, False), ("zero3_offload", 3, True)],
)
def test_shipped_strategies_build(strategy, stage, offload):
    raw, _, errors = compose(["recipe=tiny", f"strategy={strategy}", "launch.nproc_per_node=2"])
    cfg, more = validate(raw)
    assert errors + more == []
    ds = build_deepspeed_config(cfg, 2)
    assert ds["zero_optimization"]["stage"] == stage
    assert (ds["zero_optimization"]["offload_param"]["device"] == "cpu") == offload
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 2


def test_plan_prints_the_generated_json_without_importing_deepspeed():
    code = (
        "import sys; from launcher.cli import main; rc = main(['plan', 'recipe=tiny', 'strategy=zero3', "
        "'launch.nproc_per_node=2', 'train.grad_accum=3']); "
        "print('HEAVY', [m for m in ('torch', 'deepspeed') if m in sys.modules]); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    body = out.stdout.split("--- DeepSpeed config")[1].split("\n", 1)[1].split("\n---")[0]
    ds = json.loads(body)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_accumulation_steps"] == 3


@pytest.mark.parametrize(
    "stage,precision", [(0, "fp32"), (1, "fp32"), (3, "fp32"), (1, "bf16"), (2, "bf16"), (3, "bf16")]
)
def test_bf16_gradients_are_reduced_in_the_chosen_dtype_and_accumulated_in_fp32(stage, precision):
    """As FSDP2 (reduce_dtype=fp32) and the autocast engines (fp32 gradients) do: reduction in
    strategy.reduce_dtype (fp32 by default) from stage 1, fp32 accumulation of the gradient
    partition from stage 2 (stage 1 would switch DeepSpeed to its BF16_Optimizer). Nothing to say
    in fp32, where both are fp32 already."""
    ds = build_deepspeed_config(make_cfg(stage, precision=precision), world_size=2, precision=precision)
    bf16 = precision == "bf16"
    assert ds.get("communication_data_type") == ("fp32" if bf16 and stage >= 1 else None)
    assert ds.get("data_types") == ({"grad_accum_dtype": "fp32"} if bf16 and stage >= 2 else None)
    if bf16:
        halved = build_deepspeed_config(make_cfg(stage, reduce_dtype="bf16", precision=precision), 2, precision)
        assert halved["communication_data_type"] == "bf16", "strategy.reduce_dtype=bf16: half the bytes on the wire"
        assert halved.get("data_types") == ds.get("data_types"), "accumulation stays fp32"
        errors = errors_of(make_cfg(stage, extra={"communication_data_type": "bf16"}, precision=precision))
        assert errors and "strategy.reduce_dtype=fp32" in errors[0], "one field decides; extra may not contradict it"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_overlaps_gradient_communication_with_backward(stage):
    """overlap_comm is set for stages 1-2 too (DeepSpeed 0.19 defaults it on for stage 3 only);
    strategy.extra may still turn it off."""
    ds = build_deepspeed_config(make_cfg(stage, precision="bf16"), world_size=2, precision="bf16")
    assert ds["zero_optimization"].get("overlap_comm", stage == 3) is True
    off = build_deepspeed_config(make_cfg(stage, extra={"zero_optimization": {"overlap_comm": False}}), world_size=2)
    assert off["zero_optimization"]["overlap_comm"] is False
