"""The DeepSpeed JSON, generated from the resolved ftl config: one source of truth.

Pure Python (no torch, no deepspeed): ``ftl plan`` prints it on a login node and
:mod:`launcher.config.validate` calls :func:`deepspeed_config_errors` before anything starts. It
lives with the config, not in :mod:`launcher.engines`, whose package imports torch; the engine
that uses it is :mod:`launcher.engines.deepspeed`.

The JSON is built in three layers:

* **derived** values follow from ftl fields (batch sizes and accumulation from ``train.*``,
  clipping, precision, ZeRO stage, offload). ``strategy.extra`` may repeat one (or say ``"auto"``)
  but a different value is an error naming both fields, never a silent winner.
* **defaults** are ftl's tuning choices that no ftl field decides (bucket sizes scaled to the
  hidden size, pinned offload buffers, no 16-bit gather at save, fp32 gradient reduction and
  accumulation in bf16: :func:`gradient_dtypes`; ZeRO-1/2's overlap_comm). ``strategy.extra`` overrides them.
* every other key of ``strategy.extra`` is merged in as given.

Optimizer and LR schedule are not in the JSON: the engine hands DeepSpeed ftl's own AdamW and
LambdaLR objects (DeepSpeedCPUAdam in AdamW mode when the optimizer is offloaded), so every engine
trains with the same numbers. ``extra.optimizer``/``extra.scheduler`` are therefore rejected.

``train.precision=auto`` is resolved for the device the run will use: bf16 on CUDA (the engine
falls back to fp32 at run time on a GPU without bf16), fp32 on CPU, where bf16 is emulated and slow.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Optional

from launcher.config.errors import ConfigError, ConfigErrors
from launcher.config.schema import DeepSpeedStrategy
from launcher.config.topology import PRECISIONS, planned_device_type, resolve_precision, world_size

if TYPE_CHECKING:
    from launcher.config.schema import FtlConfig

# Older spellings DeepSpeed still reads for a key ftl derives.
ALIASES = {"bfloat16.enabled": "bf16.enabled"}
# ftl passes its own optimizer and schedule objects to deepspeed.initialize.
OWNED_SECTIONS = {
    "optimizer": "ftl passes its own AdamW built from train.lr, train.betas and train.weight_decay",
    "scheduler": "ftl passes its own LR schedule built from train.schedule, train.warmup_steps and train.min_lr_ratio",
}


def _derived(cfg: FtlConfig, world_size: int, precision: str) -> dict[str, tuple[Any, str]]:
    """Dotted key -> (value, the ftl field(s) it comes from)."""
    t, s = cfg.train, cfg.strategy
    batch = t.micro_batch_size * t.grad_accum * world_size
    offload_opt = "cpu" if s.offload_optimizer else "none"
    offload_par = "cpu" if s.offload_params else "none"
    precision_src = f"train.precision={t.precision}" + (f" (resolved to {precision})" if t.precision == "auto" else "")
    return {
        "train_batch_size": (
            batch,
            f"train.micro_batch_size={t.micro_batch_size} × train.grad_accum={t.grad_accum} "
            f"× world size {world_size} = {batch}",
        ),
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, f"train.micro_batch_size={t.micro_batch_size}"),
        "gradient_accumulation_steps": (t.grad_accum, f"train.grad_accum={t.grad_accum}"),
        "gradient_clipping": (float(t.grad_clip), f"train.grad_clip={t.grad_clip:g}"),
        "bf16.enabled": (precision == "bf16", precision_src),
        "fp16.enabled": (precision == "fp16", precision_src),
        "zero_optimization.stage": (s.zero_stage, f"strategy.zero_stage={s.zero_stage}"),
        "zero_optimization.offload_optimizer.device": (
            offload_opt,
            f"strategy.offload_optimizer={str(s.offload_optimizer).lower()}",
        ),
        "zero_optimization.offload_param.device": (
            offload_par,
            f"strategy.offload_params={str(s.offload_params).lower()}",
        ),
        **(
            {"communication_data_type": (s.reduce_dtype, f"strategy.reduce_dtype={s.reduce_dtype}")}
            if reduces_in(s, precision)
            else {}
        ),
    }


def reduces_in(s: DeepSpeedStrategy, precision: str) -> bool:
    """Whether ``strategy.reduce_dtype`` sets DeepSpeed's gradient communication dtype: in bf16
    with ZeRO (stage 0 is refused in bf16, and fp32 training reduces fp32)."""
    return precision == "bf16" and s.zero_stage >= 1


def _defaults(cfg: FtlConfig, precision: str) -> dict[str, Any]:
    """ftl's tuning choices; strategy.extra may override any of them."""
    s, h = cfg.strategy, cfg.model.arch.hidden_size
    zero: dict[str, Any] = {"contiguous_gradients": True, "reduce_bucket_size": h * h}
    if s.zero_stage in (1, 2):
        # DeepSpeed 0.19 defaults overlap_comm to true for stage 3 only (ZeroConfig's
        # overlap_comm_valid): without it stages 1-2 reduce each gradient bucket on the compute
        # stream, and backward waits for the wire. Its cost: the reduction buffers (a few buckets).
        zero["overlap_comm"] = True
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"pin_memory": True}
    if s.offload_params:
        zero["offload_param"] = {"pin_memory": True}
    if s.zero_stage == 3:
        # The sizes Hugging Face's integration derives from the hidden size; bigger buckets buy
        # little and cost memory. ftl exports from the sharded checkpoint, so nothing is
        # gathered into 16-bit weights at save time.
        zero.update(
            stage3_prefetch_bucket_size=int(0.9 * h * h),
            stage3_param_persistence_threshold=10 * h,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    out: dict[str, Any] = {"zero_optimization": zero}
    if reduces_in(s, precision):
        out.update(gradient_dtypes(s.zero_stage))
    if precision == "fp16":
        out["fp16"] = {
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return out


def gradient_dtypes(stage: int) -> dict[str, Any]:
    """In bf16, gradients accumulated (from stage 2) in fp32 and reduced in ``strategy.reduce_dtype``
    (a derived key; default fp32), as FSDP2's ``reduce_dtype=fp32`` and the autocast engines' fp32
    gradients do, so every engine trains the same numbers. DeepSpeed's defaults are bf16 for both:
    measured on 2 CPU ranks (tiny Llama, grad_accum 4), the first step's gradient norm of ZeRO-2/3
    then differs from FSDP's by 1.5e-5 (relative), against 1e-7 in fp32.

    Stage 1 keeps bf16 accumulation: with fp32 DeepSpeed 0.19.8 runs stage 1 through its
    BF16_Optimizer, which reported a wrong gradient norm for the first step (0.31 and 0.88 where
    every other engine reports 0.732) in the same measurement."""
    return {"data_types": {"grad_accum_dtype": "fp32"}} if stage >= 2 else {}


def _contradictions(derived: dict[str, tuple[Any, str]], extra: dict[str, Any]) -> list[ConfigError]:
    errors = [
        ConfigError(f"strategy.extra.{key}", f"{why}; set the ftl fields instead of this key")
        for key, why in OWNED_SECTIONS.items()
        if key in extra
    ]
    for given, value in _flatten(extra).items():
        key = ALIASES.get(given, given)
        above = [d for d in derived if key.startswith(d + ".")]
        if above:  # a section where ftl sets a value (extra.train_batch_size.x)
            want, source = derived[above[0]]
            errors.append(
                ConfigError(
                    f"strategy.extra.{given}", f"nests under {above[0]}={_show(want)} from {source}; remove the key"
                )
            )
        elif key in derived:
            want, source = derived[key]
            if value != "auto" and not _same(value, want):
                errors.append(
                    ConfigError(
                        f"strategy.extra.{given}",
                        f"{_show(value)} contradicts {source} "
                        f"(ftl sets {key}={_show(want)} from it); remove the key or change the ftl field",
                    )
                )
        elif not isinstance(value, dict):
            # A scalar where ftl needs a section (extra.bf16=true) hides a derived value below it.
            below = [d for d in derived if d.startswith(key + ".")]
            if below:
                want, source = derived[below[0]]
                errors.append(
                    ConfigError(
                        f"strategy.extra.{given}",
                        f"{_show(value)} replaces the section holding "
                        f"{below[0]}={_show(want)} from {source}; give a mapping or remove the key",
                    )
                )
    return errors


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # 1 is not true here, whatever Python says
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of base with over's keys deep-merged in (over wins on leaves). ``"auto"`` (as in
    Hugging Face's DeepSpeed configs) means "ftl decides": it never replaces a value and is dropped."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _world_size(cfg: FtlConfig) -> int:

    return world_size(cfg)


def deepspeed_config_errors(cfg: FtlConfig, world_size: Optional[int] = None) -> list[ConfigError]:
    """Every ``strategy.extra`` key that contradicts a value ftl derives (empty for other engines).
    For :func:`launcher.config.validate.validate`: exit 2 before anything starts."""
    if not isinstance(cfg.strategy, DeepSpeedStrategy):
        return []
    world = _world_size(cfg) if world_size is None else world_size
    precision = resolve_precision(cfg.train.precision, planned_device_type(cfg))
    errors = _contradictions(_derived(cfg, world, precision), dict(cfg.strategy.extra))
    if cfg.strategy.zero_stage == 0 and precision != "fp32":
        # Stage 0 in bf16/fp16 runs DeepSpeed's FP16_UnfusedOptimizer. Measured on deepspeed 0.19.8
        # (tiny Llama, 2 ranks): the loss after one step is 1.5e-3 off (relative), where stages 1-3
        # and ddp in bf16 agree to 1e-5; its updates are not AdamW's.
        errors.append(
            ConfigError(
                "strategy.zero_stage",
                f"0 with train.precision={cfg.train.precision} ({precision}) "
                "trains different numbers from AdamW in DeepSpeed; use zero_stage 1-3, strategy=ddp, "
                "or train.precision=fp32",
            )
        )
    return errors


def build_deepspeed_config(cfg: FtlConfig, world_size: int, precision: Optional[str] = None) -> dict[str, Any]:
    """The DeepSpeed config dict for ``deepspeed.initialize(config=...)``.

    ``precision`` is fp32, bf16 or fp16 as resolved on the real device (the engine passes it);
    None resolves ``train.precision`` for :func:`planned_device_type`. Raises ConfigErrors when
    ``strategy.extra`` contradicts a derived value.
    """
    if not isinstance(cfg.strategy, DeepSpeedStrategy):
        raise ValueError(
            f"strategy.engine={cfg.strategy.engine!r}: a DeepSpeed config is built for engine deepspeed only"
        )
    if precision is None:
        precision = resolve_precision(cfg.train.precision, planned_device_type(cfg))
    elif precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    derived = _derived(cfg, world_size, precision)
    extra = dict(cfg.strategy.extra)
    errors = _contradictions(derived, extra)
    if cfg.strategy.reduce_dtype != "fp32" and not reduces_in(
        cfg.strategy, precision
    ):  # e.g. auto found no bf16 on this GPU
        errors.append(
            ConfigError(
                "strategy.reduce_dtype",
                f"{cfg.strategy.reduce_dtype} needs bf16 training with ZeRO stage 1-3; "
                f"this run trains in {precision} at stage {cfg.strategy.zero_stage}",
            )
        )
    if errors:
        raise ConfigErrors(errors)
    config: dict[str, Any] = {}
    for key, (value, _) in derived.items():  # derived keys first: what a reader checks
        _set(config, key, value)
    config = _merge(config, _merge(_defaults(cfg, precision), extra))
    for key, (value, _) in derived.items():  # "auto" and equal repeats resolve to ftl's value
        _set(config, key, value)
    return config


__all__ = ["build_deepspeed_config", "deepspeed_config_errors"]
