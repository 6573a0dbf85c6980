"""Bind a composed config to the typed schema and check it, reporting every error at once.

`validate(raw)` returns (config, errors): types, choices and ranges field by field, unknown keys
with the closest valid names, then the cross-field checks (topology, batch arithmetic, impossible
combinations). Pure Python: no torch, so `ftl plan` stays instant on a login node.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
import socket
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union

from launcher.config.deepspeed_config import deepspeed_config_errors
from launcher.config.docs import doc_lines
from launcher.config.errors import ConfigError, ConfigErrors
from launcher.config.local_paths import is_hub
from launcher.config.schema import UNIONS, DeepSpeedStrategy, EvalConfig, FSDPStrategy, FtlConfig, ModelConfig
from launcher.config.topology import (
    global_batch,
    gpus_per_node,
    nodes,
    planned_device_type,
    resolve_precision,
    world_size,
)
from launcher.engines.traits import engine_traits
from launcher.files import CHECKPOINT_MARKER, checkpoint_problem
from launcher.paths import cache_dir
from launcher.plan.memory import peft_adapts_experts
from launcher.plan.scale import PEAK_BF16_FLOPS, peak_for_name, waste_problems
from launcher.plan.timing import signal_lead_problems
from launcher.shell import has_control_chars

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}


# --------------------------------------------------------------------------------------------
# binding: field types, choices, ranges, unknown keys


def _bind(cls: type, data: Any, path: str, errors: list[ConfigError]) -> Any:
    if not isinstance(data, dict):
        errors.append(ConfigError(path, f"expected a mapping, got {data!r}"))
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
            near = [_join(path, c) for c in close]
            hint = (
                f"did you mean {', '.join(near)}?{doc_lines(near[:1])}" if close else f"valid keys: {', '.join(names)}"
            )
            errors.append(ConfigError(_join(path, key), f"unknown key; {hint}"))
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        sub = _join(path, f.name)
        value = data[f.name]
        if path == "" and f.name in UNIONS:
            kwargs[f.name] = _bind_union(f.name, value, errors)
            continue
        words = f.metadata.get("words", ())
        if words and isinstance(value, str):  # a number field that also takes a word (every_steps=auto)
            if value in words:
                kwargs[f.name] = value
            else:
                errors.append(ConfigError(sub, f"got {value!r}; expected an integer or {' or '.join(words)}"))
            continue
        before = len(errors)
        coerced = _coerce(hints[f.name], value, sub, errors)
        if len(errors) == before:
            _check_meta(f.metadata, coerced, sub, errors)
            kwargs[f.name] = coerced
        elif is_dataclass(coerced) or isinstance(coerced, (list, dict)):
            kwargs[f.name] = (
                coerced  # a section or list binds field by field: one bad field keeps its default, not the whole node
            )
    return cls(**kwargs)


def _bind_union(group: str, data: Any, errors: list[ConfigError]) -> Any:
    key, variants = UNIONS[group]
    tag = data.get(key) if isinstance(data, dict) else None
    if tag not in variants:
        errors.append(ConfigError(f"{group}.{key}", f"got {tag!r}; allowed: {', '.join(variants)}"))
        return next(iter(variants.values()))()
    return _bind(variants[tag], data, group, errors)


def _coerce(tp: Any, value: Any, path: str, errors: list[ConfigError]) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, path, errors)
    if value == "???":
        errors.append(ConfigError(path, "is required; set it on the command line, e.g. " + f"{path}=..."))
        return None
    if is_dataclass(tp):
        return _bind(tp, value, path, errors)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            errors.append(ConfigError(path, f"expected a list, got {value!r}"))
            return []
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(ConfigError(path, f"expected a mapping, got {value!r}"))
            return {}
        _, item = typing.get_args(tp)
        return {str(k): _coerce(item, v, f"{path}.{k}", errors) for k, v in value.items()}
    ok, out = _scalar(tp, value)
    if not ok:
        errors.append(ConfigError(path, f"expected {_TYPE_NAMES.get(tp, tp)}, got {value!r} ({type(value).__name__})"))
    elif tp is float and not math.isfinite(out):  # nan passes every range check (comparisons with it are false)
        errors.append(ConfigError(path, f"got {value!r}; expected a finite number"))
    elif tp is str and "\0" in out:
        errors.append(ConfigError(path, f"got {value!r}; NUL cannot be passed to a process or a file name"))
    elif tp is str and has_control_chars(out) and not path.startswith(_TEXT_FIELDS):
        errors.append(ConfigError(path, f"got {value!r}; newlines and other control characters are not allowed here"))
    return out


# Fields that hold text rather than a name, path or word, where a newline may belong (a template,
# an environment value); launch=slurm refuses them in launch.env, which its script holds.
_TEXT_FIELDS = ("data.chat_template", "description", "launch.env.")


def _scalar(tp: type, value: Any) -> tuple[bool, Any]:
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _check_meta(meta: Any, value: Any, path: str, errors: list[ConfigError]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        errors.append(ConfigError(path, f"got {value!r}; allowed: {', '.join(map(str, choices))}{hint}"))
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        errors.append(ConfigError(path, f"got {value!r}; must be {'>' if meta.get('lo_open') else '>='} {lo}"))
    if hi is not None and value > hi:
        errors.append(ConfigError(path, f"got {value!r}; must be <= {hi}"))


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# --------------------------------------------------------------------------------------------
# cross-field checks


@dataclass(frozen=True)
class _Cross(ConfigError):
    """A cross-field error, with the other sections its check read (see :func:`validate`)."""

    reads: tuple[str, ...] = ()
    alone: bool = False  # a check of this one field's value against the world (a file exists): reads no sibling


def _x(path: str, message: str, *reads: str) -> ConfigError:
    return _Cross(path, message, reads)


def _own(path: str, message: str) -> ConfigError:
    return _Cross(path, message, (), True)


def _cross_checks(cfg: FtlConfig) -> list[ConfigError]:
    errs: list[ConfigError] = []
    t, s, m = cfg.train, cfg.strategy, cfg.model
    world = world_size(cfg)

    traits = engine_traits(s)
    if traits.one_process and world > 1:
        errs.append(
            _x(
                "strategy",
                f"'{traits.engine}' runs one process but launch gives world size {world}; "
                "use strategy=ddp, zero1, zero2, zero3 or fsdp, or launch.nproc_per_node=1",
                "launch",
            )
        )
    if isinstance(s, DeepSpeedStrategy):
        if s.offload_params and s.zero_stage != 3:
            errs.append(
                ConfigError(
                    "strategy.offload_params", f"needs zero_stage 3 (got {s.zero_stage}); use strategy=zero3_offload"
                )
            )
        if s.offload_optimizer and s.zero_stage == 0:
            errs.append(ConfigError("strategy.offload_optimizer", "needs zero_stage 1, 2 or 3"))
        errs += [_x(e.path, e.message, "strategy", "train", "launch") for e in deepspeed_config_errors(cfg)]
    if isinstance(s, (DeepSpeedStrategy, FSDPStrategy)) and s.reduce_dtype == "bf16":
        precision = resolve_precision(t.precision, planned_device_type(cfg))
        if precision != "bf16":
            errs.append(
                _x(
                    "strategy.reduce_dtype",
                    f"bf16 reduces the gradients of bf16 training, but train.precision={t.precision} "
                    f"trains in {precision}; use train.precision=bf16 or strategy.reduce_dtype=fp32",
                    "train.precision",
                )
            )
    if isinstance(s, FSDPStrategy) and s.hybrid_shard and nodes(cfg) < 2:
        errs.append(
            _x("strategy.hybrid_shard", "shards within a node and replicates across nodes: needs 2+ nodes", "launch")
        )
    if t.precision == "fp16" and not traits.fp16:
        errs.append(
            _x(
                "train.precision",
                f"fp16 is not supported with engine {traits.engine} (no loss scaler); use bf16",
                "strategy",
            )
        )
    if t.precision == "fp16" and t.device == "cpu":
        errs.append(ConfigError("train.precision", "fp16 needs a GPU (train.device=cpu); use bf16 or fp32"))
    if t.max_steps == 0:
        errs.append(ConfigError("train.max_steps", "got 0; use a positive number of steps, or -1 to run train.epochs"))
    errs += _speed_checks(cfg)
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        errs.append(ConfigError("train.betas", f"got {t.betas}; expected two numbers in [0, 1)"))
    if t.global_batch_size is not None and t.global_batch_size != global_batch(cfg):
        need, rem = divmod(t.global_batch_size, t.micro_batch_size * world)
        hint = f"; set train.grad_accum={need}" if need and not rem else ""
        errs.append(
            _x(
                "train.global_batch_size",
                f"{t.global_batch_size} != micro_batch_size {t.micro_batch_size} "
                f"× grad_accum {t.grad_accum} × data-parallel size {world} = {global_batch(cfg)}{hint}",
                "launch",
                "strategy",
            )
        )
    if t.seq_len > m.arch.max_position_embeddings:
        errs.append(
            _x(
                "train.seq_len",
                f"{t.seq_len} > model.arch.max_position_embeddings {m.arch.max_position_embeddings}",
                "model.arch",
            )
        )

    errs += _arch_checks(m)
    if m.source == "hf" and not m.path:
        errs.append(ConfigError("model.path", "model.source=hf needs a Hugging Face directory or hub id"))
    elif m.source == "hf":
        errs += _model_dir_errors("model.path", m.path, None if _earlier_stage(m.path) else "config.json")
    if m.source == "random" and not (m.tokenizer and Path(m.tokenizer).is_dir()):
        errs.append(
            ConfigError("model.tokenizer", f"model.source=random needs a tokenizer directory; got {m.tokenizer!r}")
        )
    elif m.tokenizer:
        errs += _model_dir_errors("model.tokenizer", m.tokenizer, None)

    errs += _data_checks(cfg)
    errs += _launch_checks(cfg)

    errs += [_x(f, m, "checkpoint", "launch", "train", "model", "strategy", "peft") for f, m in waste_problems(cfg)]
    errs += _resume_errors(cfg.checkpoint.resume)
    errs += _cache_errors(cfg)
    errs += _peft_checks(cfg)
    errs += _objective_checks(cfg)
    errs += _watchdog_checks(cfg)
    name = cfg.run.name
    if not name or "/" in name or name in (".", "..") or has_control_chars(name):
        errs.append(
            _own(
                "run.name",
                f"got {name!r}; use a non-empty name, not . or .., without '/', newlines or other control characters",
            )
        )
    return errs


def _speed_checks(cfg: FtlConfig) -> list[ConfigError]:
    """Options that need a GPU, or a package, to mean anything."""
    t, s = cfg.train, cfg.strategy
    errs = []
    if t.compile and not engine_traits(s).compiles_layers:
        errs.append(
            _x(
                "train.compile",
                f"compiled layers do not work with {engine_traits(s).title}: it frees each layer's gathered "
                "weights after forward, which the compiled backward still reads; use train.compile=false (or null), "
                "or strategy=fsdp, zero2",
                "strategy",
            )
        )
    if s.activation_offloading and t.device == "cpu":
        errs.append(
            _x(
                "strategy.activation_offloading",
                "moves activations from GPU memory to host memory, but train.device=cpu "
                "keeps them in host memory already; leave it false on CPU",
                "train.device",
            )
        )
    if t.loss == "liger":
        if t.device == "cpu":
            errs.append(
                _x(
                    "train.loss",
                    "liger runs Triton kernels on a CUDA GPU, but train.device=cpu; use train.loss=chunked",
                    "train.device",
                )
            )
        if importlib.util.find_spec("liger_kernel") is None:
            errs.append(
                ConfigError(
                    "train.loss",
                    "liger needs the liger-kernel package (pip install 'ftl[liger]'); or use train.loss=chunked",
                )
            )
    return errs


RANDOM_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
)  # what model.source=random builds (launcher.model.loading.arch_to_hf_config)
SOFTCAP_MODEL_TYPES = ("gemma2",)  # attention logit softcapping: transformers refuses sdpa for them


def _arch_checks(m: ModelConfig) -> list[ConfigError]:
    errs: list[ConfigError] = []
    a = m.arch
    if a.head_dim is None and a.hidden_size % a.num_heads:
        errs.append(
            ConfigError(
                "model.arch.num_heads",
                f"{a.num_heads} does not divide hidden_size {a.hidden_size}; "
                "set model.arch.head_dim if the model's heads are not hidden_size / num_heads wide",
            )
        )
    if a.num_heads % a.num_kv_heads:
        errs.append(ConfigError("model.arch.num_kv_heads", f"{a.num_kv_heads} does not divide num_heads {a.num_heads}"))
    if a.num_experts and not 1 <= a.num_experts_per_tok <= a.num_experts:
        errs.append(
            ConfigError(
                "model.arch.num_experts_per_tok",
                f"got {a.num_experts_per_tok}; must be 1 to num_experts ({a.num_experts})",
            )
        )
    if a.dense_layers and not all(0 <= i < a.num_layers for i in a.dense_layers):
        errs.append(
            ConfigError("model.arch.dense_layers", f"got {a.dense_layers}; layer indices are 0 to {a.num_layers - 1}")
        )
    if m.source == "random" and a.model_type not in RANDOM_MODEL_TYPES:
        errs.append(
            ConfigError(
                "model.arch.model_type",
                f"model.source=random builds {', '.join(RANDOM_MODEL_TYPES)}, not {a.model_type!r}; "
                "load a Hugging Face directory of it with model.source=hf model.path=DIR",
            )
        )
    if a.model_type in SOFTCAP_MODEL_TYPES and m.attn_implementation in ("sdpa", "sdpa_varlen"):
        errs.append(
            ConfigError(
                "model.attn_implementation",
                f"{m.attn_implementation!r} cannot cap attention logits, which "
                f"{a.model_type} does (attn_logit_softcapping); use model.attn_implementation=eager "
                "(or flash_attention_2 on a GPU)",
            )
        )
    return errs


def _earlier_stage(path: str) -> bool:
    """An ftl run or a PEFT adapter, the start of a next stage (its problems were reported at composition)."""
    from launcher.config.stage import StageError, earlier_stage

    try:
        return earlier_stage(path) is not None
    except StageError:
        return True


def _model_dir_errors(key: str, path: str, needs: Optional[str]) -> list[ConfigError]:
    """A model or tokenizer given as a local path (absolute, ./, ~, or existing) must be a
    directory (holding ``needs``); anything else is a hub id, checked when it is downloaded."""
    p = Path(path).expanduser()
    local = path.startswith(("/", "./", "../", "~")) or p.exists()
    if not local:
        return []
    if not p.exists():
        return [_own(key, f"{path}: no such directory (a local model directory, or a hub id such as ORG/NAME)")]
    if not p.is_dir():
        return [_own(key, f"{path} is a file; expected a Hugging Face model directory")]
    if needs and not (p / needs).is_file():
        return [_own(key, f"{path} holds no {needs}: not a Hugging Face model directory")]
    return []


def _resume_errors(resume: str) -> list[ConfigError]:
    """checkpoint.resume: auto, never, or one complete checkpoint (a step-N dir with its marker)."""
    if resume in ("auto", "never"):
        return []
    p = Path(resume).expanduser()
    allowed = "allowed: auto, never, or a checkpoint directory RUN_DIR/checkpoints/step-N"
    if not p.is_dir():
        return [_own("checkpoint.resume", f"{resume!r} is not a directory; {allowed}")]
    if not re.fullmatch(r"step-\d+", p.name) or not (p / CHECKPOINT_MARKER).is_file():
        return [
            _own(
                "checkpoint.resume",
                f"{resume!r} is not a complete checkpoint (a step-N dir with a {CHECKPOINT_MARKER} marker); {allowed}",
            )
        ]
    problem = checkpoint_problem(p)
    return (
        [_own("checkpoint.resume", f"{resume!r} is damaged: {problem}; resume from another checkpoint")]
        if problem
        else []
    )


def _cache_errors(cfg: FtlConfig) -> list[ConfigError]:
    """ftl's cache ($FTL_CACHE) must be writable when the run writes into it (tokenized data, the
    converted SmolLM2 weights)."""
    if not (cfg.data.cache or cfg.model.source == "smollm2"):
        return []
    cache = cache_dir()
    existing = next((p for p in (cache, *cache.parents) if p.exists()), None)
    key = "data.cache" if cfg.data.cache else "model.source"
    if existing is None or not existing.is_dir():
        return [_own(key, f"ftl's cache {cache} (FTL_CACHE) cannot be created: {existing} is not a directory")]
    if not os.access(existing, os.W_OK | os.X_OK):
        hint = "; set FTL_CACHE to a writable directory" + (", or data.cache=false" if cfg.data.cache else "")
        return [_own(key, f"ftl's cache {cache} (FTL_CACHE) is not writable ({existing}){hint}")]
    return []


def _peft_checks(cfg: FtlConfig) -> list[ConfigError]:
    """LoRA/QLoRA settings that cannot work, refused before anything starts. (QLoRA itself trains
    under every engine: measured on 2 CPU ranks, ddp, fsdp and ZeRO-2/3 give the same numbers.)"""
    errs: list[ConfigError] = []
    p = cfg.peft
    if p.method == "none":
        return errs
    if not p.target_modules:
        errs.append(
            ConfigError(
                "peft.target_modules", "is empty; name the modules to adapt, e.g. [q_proj, v_proj], or [all-linear]"
            )
        )
    elif "all-linear" in p.target_modules and len(p.target_modules) > 1:
        errs.append(
            ConfigError(
                "peft.target_modules",
                f"got {p.target_modules}; all-linear already takes every linear layer: use it alone",
            )
        )
    half = {"gate_proj", "up_proj"} & set(p.target_modules)
    fused_experts = cfg.model.arch.model_type == "qwen2_moe" and cfg.model.arch.num_experts
    if len(half) == 1 and fused_experts and peft_adapts_experts("qwen2_moe"):
        (named,) = half
        other = ({"gate_proj", "up_proj"} - half).pop()
        errs.append(
            ConfigError(
                "peft.target_modules",
                f"got {p.target_modules}: qwen2_moe's experts hold gate_proj and up_proj as one "
                f"fused tensor, which peft adapts only when both are named; add {other}, or drop {named}",
            )
        )
    if p.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        errs.append(
            ConfigError("peft.method", "qlora needs bitsandbytes, which is not installed: pip install 'ftl[qlora]'")
        )
    return errs


def _objective_checks(cfg: FtlConfig) -> list[ConfigError]:
    """Preference objectives train on preference pairs, and SFT on anything else."""
    errs: list[ConfigError] = []
    o, d = cfg.objective, cfg.data
    formats = {d.format, *(s.format or d.format for s in d.sources)}
    if o.method == "sft" and "preference" in formats:
        errs.append(
            ConfigError(
                "objective",
                "preference pairs (data.format=preference) train with objective=dpo or objective=simpo, not sft",
            )
        )
    if o.method != "sft" and formats != {"preference"}:
        other = ", ".join(sorted(f for f in formats if f != "preference"))
        errs.append(
            ConfigError(
                "data.format",
                f"objective={o.method} needs preference pairs ({{prompt, chosen, rejected}} "
                f"rows, data.format=preference); got {other}",
            )
        )
    if o.method == "dpo" and o.reference == "adapters_off" and cfg.peft.method == "none":
        errs.append(
            ConfigError(
                "objective.reference",
                "adapters_off needs LoRA or QLoRA (peft=lora|qlora); a full fine-tune uses reference=precomputed",
            )
        )
    return errs


def _watchdog_checks(cfg: FtlConfig) -> list[ConfigError]:
    """A step limit at or above the collective timeout catches nothing: the hung rank's peers fail on
    the timeout first, and their stacks are never dumped."""
    w, timeout = cfg.train.watchdog, cfg.launch.dist_timeout_s
    if w.enabled and w.floor_s is not None and w.floor_s >= timeout:
        return [
            _x(
                "train.watchdog.floor_s",
                f"{w.floor_s:g} is not below launch.dist_timeout_s={timeout}: the peers of a hung rank would fail on "
                f"the collective timeout before the watchdog dumps their stacks; allowed: below {timeout} (or null)",
                "launch",
            )
        ]
    return []


def _data_checks(cfg: FtlConfig) -> list[ConfigError]:
    errs: list[ConfigError] = []
    d, e = cfg.data, cfg.eval
    if not d.train_files and not any(s.split == "train" for s in d.sources):
        errs.append(
            ConfigError(
                "data.train_files",
                "is empty; give one or more files, e.g. data.train_files=[train.jsonl], "
                "or training sources in data.sources",
            )
        )
    for key in ("train_files", "eval_files"):
        for i, f in enumerate(getattr(d, key)):
            problem = _data_path_problem(f)
            if problem:
                errs.append(_own(f"data.{key}[{i}]", problem))
    for i, s in enumerate(d.sources):
        hub = is_hub(s.path)
        if not s.path or s.path == "hub:":
            errs.append(ConfigError(f"data.sources[{i}].path", "is required: a file, a folder, or hub:ORG/NAME"))
        elif not hub and _data_path_problem(s.path):
            errs.append(_own(f"data.sources[{i}].path", str(_data_path_problem(s.path))))
        if s.hub_args and not hub:
            errs.append(
                ConfigError(f"data.sources[{i}].hub_args", f"only applies to hub:ORG/NAME sources, not {s.path!r}")
            )
    if e.judge.path is not None:
        if not os.path.isdir(os.path.expanduser(e.judge.path)):
            errs.append(ConfigError("eval.judge.path", f"got {e.judge.path!r}: no such directory (a local model dir)"))
        if not e.generate:
            errs.append(ConfigError("eval.judge.path", "judges generated answers: needs eval.generate=true"))
    has_eval = bool(d.eval_files) or any(s.split == "eval" for s in d.sources)
    wants_eval = e.before_training or e.after_training or e.every_steps > 0
    patience = cfg.train.early_stopping.patience
    if patience > 0 and e.every_steps == 0:
        errs.append(
            _x(
                "train.early_stopping.patience",
                f"{patience} counts periodic evals, but eval.every_steps is 0 (no eval during training); "
                "set eval.every_steps=N (N > 0) or train.early_stopping.patience=0",
                "eval",
            )
        )
    if wants_eval and not has_eval and d.eval_fraction == 0:
        errs.append(
            _x(
                "eval",
                "evaluation is on but there is no eval data; set data.eval_files, an eval "
                "source in data.sources or data.eval_fraction, or eval.after_training=false",
                "data",
            )
        )
    return errs + _retain_checks(e)


def _retain_checks(e: EvalConfig) -> list[ConfigError]:
    """A limit on forgetting is checked at evaluations only: one that no evaluation would apply is refused."""
    errs: list[ConfigError] = []
    r = e.retain
    if r.path is not None:
        problem = _data_path_problem(r.path)
        if problem:
            errs.append(_own("eval.retain.path", problem))
    limits = [f"eval.retain.{k}" for k in ("max_kl", "max_loss_increase") if getattr(r, k) is not None]
    if r.action == "stop" and not limits:
        errs.append(
            ConfigError(
                "eval.retain.action", "stop needs a limit: set eval.retain.max_kl or eval.retain.max_loss_increase"
            )
        )
    for field in limits:
        if not r.enabled:
            errs.append(
                ConfigError(field, "is never checked with eval.retain.enabled=false; enable it or unset the limit")
            )
        elif not (e.before_training or e.after_training or e.every_steps > 0):
            errs.append(
                ConfigError(
                    field,
                    "is never checked: no evaluation runs; set eval.every_steps=N (checked every N steps) "
                    "or eval.after_training=true",
                )
            )
    return errs


DATA_SUFFIXES = (
    ".jsonl",
    ".json",
    ".parquet",
    ".csv",
)  # launcher.data.sources.LOCAL_SUFFIXES (that module imports torch)


def _data_path_problem(path: str) -> Optional[str]:
    """What training would find wrong with a local data file or folder, found now."""
    p = Path(path)
    if not p.exists():
        return f"file not found: {path}"
    if p.is_dir():
        found = next((f for f in p.rglob("*") if f.suffix in DATA_SUFFIXES and f.is_file()), None)
        return None if found else f"{path}: folder holds no data files ({', '.join(DATA_SUFFIXES)})"
    from launcher.safe_read import UnreadableFile, open_regular

    try:
        with open_regular(p) as f:  # stat first: a FIFO or a device is refused, never opened
            empty = not f.read(1)
    except UnreadableFile as e:
        return str(e)
    except OSError as e:
        return f"{path} cannot be read: {e.strerror}"
    return f"{path} is empty" if empty else None


_ENDPOINT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[^:\s]+):(?P<port>\d{1,5})$")
_SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
_SIGNAL = re.compile(r"^(B:)?[A-Z0-9]+@\d+$")


def _launch_checks(cfg: FtlConfig) -> list[ConfigError]:
    errs: list[ConfigError] = []
    launch = cfg.launch
    if launch.backend == "torchrun":
        if launch.node_rank >= launch.nnodes:
            errs.append(ConfigError("launch.node_rank", f"{launch.node_rank} must be < launch.nnodes {launch.nnodes}"))
        match = _ENDPOINT.match(launch.rdzv_endpoint)
        if not match or not 0 < int(match["port"]) < 65536:
            errs.append(ConfigError("launch.rdzv_endpoint", f"got {launch.rdzv_endpoint!r}; expected HOST:PORT"))
        elif not _resolves(match["host"].strip("[]")):
            errs.append(
                ConfigError("launch.rdzv_endpoint", f"host {match['host']!r} does not resolve from this machine")
            )
    if launch.backend == "slurm":
        for f in fields(launch):
            value = getattr(launch, f.name)
            items = (
                value
                if isinstance(value, list)
                else [*value.keys(), *value.values()]
                if isinstance(value, dict)
                else [value]
            )
            bad = [v for v in items if isinstance(v, str) and has_control_chars(v)]
            if bad:
                errs.append(
                    ConfigError(
                        f"launch.{f.name}",
                        f"got {bad[0]!r}: a value in the sbatch script must not contain "
                        "newlines or other control characters",
                    )
                )
        if launch.python is not None and not launch.python.strip():
            errs.append(
                ConfigError(
                    "launch.python", f"got {launch.python!r}; name the interpreter every node runs, or leave it null"
                )
            )
        if not _SLURM_TIME.match(launch.time):
            errs.append(
                ConfigError("launch.time", f"got {launch.time!r}; expected SLURM's format, e.g. 04:00:00 or 2-00:00:00")
            )
        if launch.signal is not None and not _SIGNAL.match(launch.signal):
            errs.append(ConfigError("launch.signal", f"got {launch.signal!r}; expected SIG@SECONDS, e.g. USR1@120"))
        errs += _slurm_gpu_checks(cfg)
        if 32768 <= launch.rdzv_port <= 60999:
            errs.append(
                ConfigError(
                    "launch.rdzv_port",
                    f"{launch.rdzv_port} is in Linux's ephemeral port range 32768-60999, "
                    "where an outgoing connection may already hold it; use a port below 32768, or 0 (one per job)",
                )
            )
        errs += [ConfigError(field, message) for field, message in signal_lead_problems(cfg)]
    if peak_for_name(launch.cluster.gpu) is None:
        known = ", ".join(k for k, _ in PEAK_BF16_FLOPS)
        errs.append(
            ConfigError(
                "launch.cluster.gpu", f"got {launch.cluster.gpu!r}; no dense bf16 peak is known for it: one of {known}"
            )
        )
    for k in launch.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            errs.append(ConfigError(f"launch.env.{k}", "is not a valid environment variable name"))
    return errs


def _slurm_gpu_checks(cfg: FtlConfig) -> list[ConfigError]:
    """The GPUs a SLURM job asks for against the device it trains on: one rank per GPU."""
    launch, device, gpus = cfg.launch, cfg.train.device, gpus_per_node(cfg)
    errs = []
    if device == "cuda" and gpus == 0:
        errs.append(
            ConfigError(
                "launch.gpus_per_node",
                "0 but train.device=cuda: the job would get no GPU; leave it unset "
                "(one per rank) or ask for them, e.g. launch.gpus_per_node=8",
            )
        )
    if device == "cpu" and gpus > 0:
        errs.append(
            ConfigError(
                "launch.gpus_per_node",
                f"{gpus} but train.device=cpu: the job would hold GPUs it never uses; "
                "use train.device=cuda, or launch.gpus_per_node=0",
            )
        )
    if launch.gpus_per_node and launch.nproc_per_node not in (1, launch.gpus_per_node):
        errs.append(
            ConfigError(
                "launch.nproc_per_node",
                f"{launch.nproc_per_node} but launch.gpus_per_node={launch.gpus_per_node}: "
                "a GPU job runs one rank per GPU; set only one of them",
            )
        )
    return errs


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except (socket.gaierror, UnicodeError):
        return False


# --------------------------------------------------------------------------------------------


def validate(raw: dict[str, Any]) -> tuple[FtlConfig, list[ConfigError]]:
    """Every error in a composed config at once; the config is only meaningful when errors is empty.

    A field that fails to bind keeps its default, so a cross-field check reading it would judge a
    value the user never gave: such checks are dropped. A check reads the section of the field it
    names, plus the sections it lists (:class:`_Cross`), and a bad field taints its own section
    (``train.lr`` taints ``train``; ``model.arch.num_heads`` taints ``model.arch``)."""
    errors: list[ConfigError] = []
    cfg = _bind(FtlConfig, raw, "", errors)
    failed = [e.path for e in errors if not e.message.startswith("unknown key")]  # an unknown key changes no value
    for e in _cross_checks(cfg):
        if getattr(e, "alone", False):
            tainted = any(_overlaps(e.path, b) for b in failed)
        else:
            tainted = any(_overlaps(r, _section(b)) for r in [e.path, *getattr(e, "reads", ())] for b in failed)
        if not tainted:
            errors.append(ConfigError(e.path, e.message))
    return cfg, errors


def _section(path: str) -> str:
    """The node a field belongs to: `train.lr` -> `train`, `data.sources[1].path` -> `data.sources[1]`."""
    return path.rsplit(".", 1)[0] if "." in path else path


def _overlaps(a: str, b: str) -> bool:
    """Whether one of two config paths is, or lies inside, the other."""
    return a == b or a.startswith((b + ".", b + "[")) or b.startswith((a + ".", a + "["))


def validated(raw: dict[str, Any]) -> FtlConfig:
    cfg, errors = validate(raw)
    if errors:
        raise ConfigErrors(errors)
    return cfg


def load_run_config(path: str | os.PathLike[str]) -> FtlConfig:
    """The resolved config.yaml a launcher wrote into a run dir, bound and checked again."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(raw, dict)
    return validated(raw)


__all__ = ["validate", "validated", "load_run_config"]
