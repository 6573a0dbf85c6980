"""What each engine is, as facts: read by code that must not import torch (validation, `ftl plan`,
the memory model) or must not care which engine runs (QLoRA storage). The one place that maps a
strategy to engine facts; nothing else compares engine names. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.config.schema import DeepSpeedStrategy, FSDPStrategy, StrategyBase


@dataclass(frozen=True)
class EngineTraits:
    engine: str  # single | ddp | deepspeed | fsdp: the Engine class's ``name``
    row: str  # the strategy's row in the planner's table: single, ddp, zero0-3, zero3_offload, fsdp
    title: str  # how `ftl plan` names it
    one_process: bool  # runs in a single process only
    shards_params: bool  # each rank holds a shard of the parameters (ZeRO-3, FSDP)
    shards_grads: bool  # each rank keeps a shard of the gradients (ZeRO-2/3, FSDP)
    shards_optimizer: bool  # each rank keeps a shard of the optimizer states (ZeRO-1/2/3, FSDP)
    autocasts_fp32_weights: bool  # keeps fp32 weights and autocasts the forward (else casts the module)
    fp16: bool  # can train with train.precision=fp16 (a loss scaler)
    reducer_buckets: bool = False  # keeps a bucket copy of every gradient for the all-reduce (DDP)
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    # train.compile: ZeRO-3 frees each layer's gathered weights after forward, which compiled
    # layers saved for backward (measured: backward fails on the freed size-0 tensors)
    compiles_layers: bool = True
    # checkpoint.async_save: the engine stages its state in host memory and writes it in the
    # background (torch.distributed.checkpoint's async save, or a host copy); DeepSpeed saves
    # synchronously (its decoupled checkpoint engine writes through DeepNVMe's async I/O ops)
    async_checkpoint: bool = True


# Checkpoint formats: engines in one family read each other's checkpoints as their own (single
# and ddp write the same replica files); across families a resume converts the weights.
CHECKPOINT_FAMILIES = {"single": "replica", "ddp": "replica", "fsdp": "fsdp", "deepspeed": "deepspeed"}
FAMILY_TITLES = {"replica": "single/ddp", "fsdp": "fsdp", "deepspeed": "deepspeed"}
# A DeepSpeed checkpoint is its own only for the same ZeRO stage, offloading and precision.
STAGE_BOUND_FAMILIES = ("deepspeed",)


def checkpoint_family(engine: object) -> str:
    """The checkpoint format family of an engine name (unknown names are their own family)."""
    return CHECKPOINT_FAMILIES.get(str(engine), str(engine))


def engine_traits(strategy: StrategyBase) -> EngineTraits:
    if isinstance(strategy, DeepSpeedStrategy):
        s = strategy.zero_stage
        row = "zero3_offload" if (s == 3 and strategy.offload_params and strategy.offload_optimizer) else f"zero{s}"
        if strategy.offload_optimizer and row != "zero3_offload":
            row += "+offload_opt"
        if strategy.offload_params and not strategy.offload_optimizer:
            row += "+offload_params"
        title = f"deepspeed ZeRO-{s}"
        offloaded = [
            k for k, v in (("optimizer", strategy.offload_optimizer), ("params", strategy.offload_params)) if v
        ]
        if offloaded:
            title += f" + offload ({', '.join(offloaded)})"
        return EngineTraits(
            "deepspeed",
            row,
            title,
            one_process=False,
            shards_params=s >= 3,
            shards_grads=s >= 2,
            shards_optimizer=s >= 1,
            autocasts_fp32_weights=False,
            fp16=True,
            zero_stage=s,
            offload_optimizer=strategy.offload_optimizer,
            offload_params=strategy.offload_params,
            compiles_layers=s < 3,
            async_checkpoint=False,
        )
    if isinstance(strategy, FSDPStrategy):
        return EngineTraits(
            "fsdp",
            "fsdp",
            "fsdp",
            one_process=False,
            shards_params=True,
            shards_grads=True,
            shards_optimizer=True,
            autocasts_fp32_weights=True,
            fp16=False,
        )
    engine = strategy.engine  # single or ddp: a full replica per rank
    return EngineTraits(
        engine,
        engine,
        engine,
        one_process=engine == "single",
        shards_params=False,
        shards_grads=False,
        shards_optimizer=False,
        autocasts_fp32_weights=True,
        fp16=True,
        reducer_buckets=engine == "ddp",
    )


def strategy_named(name: str) -> StrategyBase:
    """The strategy of a conf/strategy option (single, ddp, zero0-3, zero3_offload, fsdp), for the
    planner's table of alternatives."""
    from launcher.config.schema import DDPStrategy, SingleStrategy

    if name == "single":
        return SingleStrategy()
    if name == "ddp":
        return DDPStrategy()
    if name == "fsdp":
        return FSDPStrategy()
    if name == "zero3_offload":
        return DeepSpeedStrategy(zero_stage=3, offload_optimizer=True, offload_params=True)
    if name.startswith("zero") and name[4:].isdigit():
        return DeepSpeedStrategy(zero_stage=int(name[4:]))
    raise ValueError(f"unknown strategy {name!r}")
