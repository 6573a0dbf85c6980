"""A run's checkpoint read back as Hugging Face weights, offline and on CPU (no process group, no GPU).

:func:`resolve_source` finds the checkpoint (a run dir's latest complete one, or a ``step-N`` dir)
and the engine that wrote it (its ``COMPLETE`` marker says which). That engine's
``consolidate_checkpoint`` turns its files into one full state dict: safetensors for single/ddp,
every rank's DCP shards for fsdp, ZeRO partitions for deepspeed. :func:`build_hf_model` builds the
run's architecture on the meta device and gives it those tensors by assignment (nothing is
initialised or read twice), with the tokenizer and the chat template the run trained with.
`ftl export`, `ftl eval`, `ftl generate` and `ftl chat` all read checkpoints through here.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from launcher.model.adapters import ADAPTER_CONFIG, ADAPTER_DIR, attach_adapter
from launcher.rundir import RunPaths
from launcher.rundir.resume import engine_name
from launcher.train.checkpoint import MARKER, is_complete, list_complete, verify
from launcher.train.finite import first_nonfinite


class ArtifactInputError(ValueError):
    """A path names nothing usable: no such directory, not a run, checkpoint or model directory, an
    incomplete save, or a run config that does not fit (exit 2)."""


@dataclass(frozen=True)
class CheckpointSource:
    run_dir: Path
    ckpt_dir: Path
    config_path: Path
    engine: str
    step: int


def resolve_source(path: Path, config: Optional[Path] = None) -> CheckpointSource:
    """A run dir (its latest complete checkpoint) or one complete ``step-N`` checkpoint dir."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ArtifactInputError(f"{path}: no such directory (give a run dir or a checkpoint dir)")
    if is_complete(path):
        ckpt, run_dir = path, path.parent.parent
        problem = verify(ckpt)
        if problem:
            raise ArtifactInputError(
                f"checkpoint {ckpt} is damaged: {problem}; use an earlier one (RUN_DIR/checkpoints/step-N)"
            )
    elif RunPaths(path).config.is_file():
        run_dir = path
        complete = list_complete(run_dir)
        if not complete:
            raise ArtifactInputError(
                f"{run_dir} is a run dir with no complete checkpoint under checkpoints/ (train first)"
            )
        ckpt, problems = None, []
        for _, candidate in reversed(complete):  # the newest sound one; a damaged one is named
            problem = verify(candidate)
            if problem is None:
                ckpt = candidate
                break
            problems.append(f"{candidate.name}: {problem}")
            if candidate != complete[0][1]:
                print(f"ftl: checkpoint {candidate} is damaged ({problem}); using the one before it", file=sys.stderr)
        if ckpt is None:
            raise ArtifactInputError(
                f"{run_dir}: every checkpoint under checkpoints/ is damaged ({'; '.join(problems)})"
            )
    elif path.name.startswith(".tmp-") or (path.name.startswith("step-") and not (path / MARKER).is_file()):
        raise ArtifactInputError(f"{path} is an incomplete checkpoint (no {MARKER} marker): a save that did not finish")
    else:
        raise ArtifactInputError(
            f"{path} is neither a run dir (with {RunPaths.CONFIG}) nor a checkpoint dir (step-N with a {MARKER} marker)"
        )
    config_path = Path(config).expanduser().resolve() if config else RunPaths(run_dir).config
    if not config_path.is_file():
        raise ArtifactInputError(
            f"cannot find the run's config: {config_path} does not exist (pass --config RUN_DIR/{RunPaths.CONFIG})"
        )
    marker = json.loads((ckpt / MARKER).read_text() or "{}")
    engine = engine_name(str(marker.get("engine", "")))
    return CheckpointSource(run_dir, ckpt, config_path, engine, int(marker.get("step", ckpt.name.split("-")[-1])))


def read_checkpoint(source: CheckpointSource, engine: str) -> dict[str, Any]:
    """The checkpoint's full weights on CPU, read by the engine that wrote it (the marker's
    ``engine``, else the run's ``strategy.engine``)."""
    from launcher.engines import engine_class

    try:
        cls = engine_class(engine)
    except ValueError as e:
        raise ArtifactInputError(f"{source.ckpt_dir}: {e}") from None
    return cls.consolidate_checkpoint(source.ckpt_dir)


def refuse_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]], ckpt_dir: Path) -> None:
    """A checkpoint whose weights hold a NaN or an infinity is no model (training stops before
    saving one; this is the backstop for one that diverged before ftl checked)."""
    name = first_nonfinite(tensors)
    if name is not None:
        raise ArtifactInputError(
            f"checkpoint {ckpt_dir} holds non-finite weights (NaN or inf, first in {name}): nothing exported; "
            "export an earlier one (RUN_DIR/checkpoints/step-N)"
        )


def load_checkpoint_config(path: Path) -> Any:
    """The run's config, checked only where export reads it: training data that has moved since
    (or a cluster path on another machine) must not stop an export."""
    from omegaconf import OmegaConf

    from launcher.config.validate import validate

    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ArtifactInputError(f"{path} is not a config mapping")
    cfg, errors = validate(raw)
    relevant = [
        str(e)
        for e in errors
        if e.path.split(".")[0] in ("model", "peft", "strategy") or e.path == "data.chat_template"
    ]
    if relevant:
        raise ArtifactInputError(f"{path}: " + "; ".join(relevant))
    return cfg


def build_hf_model(cfg: Any, state_dict: dict[str, Any], dtype: str) -> tuple[Any, Any]:
    """The run's model architecture on the meta device, given ``state_dict``'s tensors by
    assignment; and its tokenizer, with the chat template the run trained with."""
    from transformers import AutoModelForCausalLM

    from launcher.model.loading import ensure_pad_token

    config, tokenizer, source_dir = hf_config_and_tokenizer(cfg.model)
    set_chat_template(tokenizer, cfg)
    ensure_pad_token(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id

    stored = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    # auto: as stored (engines keep fp32 master weights); a mix of dtypes becomes fp32.
    target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    target = target or (next(iter(stored)) if len(stored) == 1 else torch.float32)
    state_dict = {k: v.to(target) if v.is_floating_point() else v for k, v in state_dict.items()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=target, trust_remote_code=cfg.model.trust_remote_code)
    # A tied head is one parameter under two names, and a checkpoint may hold either name.
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for names in aliases.values():
        present = next((n for n in names if n in state_dict), None)
        for name in names if present else []:
            state_dict.setdefault(name, state_dict[present])
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"the checkpoint does not match {type(model).__name__} built from the run's config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
        )
    if source_dir is not None:
        model.generation_config = _source_generation_config(source_dir, model.generation_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def set_chat_template(tokenizer: Any, cfg: Any) -> None:
    """The run's data.chat_template (Jinja or a name) where the tokenizer has none."""
    if tokenizer.chat_template is None and cfg.data.chat_template:
        from launcher.data.templates import resolve_template

        tokenizer.chat_template = resolve_template(cfg.data.chat_template, tokenizer)


def hf_config_and_tokenizer(model_cfg: Any) -> tuple[Any, Any, Optional[str]]:
    """The HF config and tokenizer of ``model.source``, with no weights read, and the directory
    or hub id they came from (None for a random model)."""
    from transformers import AutoConfig

    from launcher.model.loading import arch_to_hf_config, ensure_pad_token, load_tokenizer

    if model_cfg.source == "random":
        tokenizer = load_tokenizer(model_cfg.tokenizer, trust_remote_code=model_cfg.trust_remote_code)
        ensure_pad_token(tokenizer)
        return arch_to_hf_config(model_cfg.arch, tokenizer), tokenizer, None
    if model_cfg.source == "smollm2":
        from launcher.model.smollm2 import smollm2_dir

        path, revision = str(smollm2_dir()), None
    else:
        from launcher.config.local_paths import hub_or_local

        path, revision = hub_or_local(model_cfg.path, "model.path"), model_cfg.revision
    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=model_cfg.trust_remote_code)
    separate = bool(model_cfg.tokenizer) and model_cfg.tokenizer != path
    tokenizer = load_tokenizer(
        model_cfg.tokenizer or path,
        revision=None if separate else revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    return config, tokenizer, path


def _source_generation_config(path: str, default: Any) -> Any:
    """The base model's generation defaults (eos ids, sampling), when it ships them."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return default


def load_checkpoint_model(
    path: Path, *, device: torch.device | str = "cpu", quantized: bool = True
) -> tuple[Any, Any, Any, str]:
    """(model, tokenizer, run config, description) of a run dir or checkpoint dir."""
    source = resolve_source(path)
    cfg = load_checkpoint_config(source.config_path)
    engine = source.engine or cfg.strategy.engine
    description = f"{source.ckpt_dir} (engine {engine}, step {source.step}, peft {cfg.peft.method})"
    if cfg.peft.method != "none":
        model, tokenizer = peft_base(source, cfg, device=device, quantized=quantized)
    else:
        state = read_checkpoint(source, engine)
        model, tokenizer = build_hf_model(cfg, state, "fp32")  # a full fine-tune's fp32 master weights
        materialize_buffers(model)
        del state
    if cfg.peft.method != "none":
        adapter_dir = source.ckpt_dir / ADAPTER_DIR
        if not (adapter_dir / ADAPTER_CONFIG).is_file():
            raise ArtifactInputError(
                f"{source.ckpt_dir} is a checkpoint of a {cfg.peft.method} run without {ADAPTER_DIR}/"
            )
        model = attach_adapter(model, adapter_dir)
    return model.to(device), tokenizer, cfg, description


def materialize_buffers(model: Any) -> Any:
    """A model built on the meta device and given its weights by assignment (``ftl export``'s
    way) still has meta non-persistent buffers: the rotary embeddings' frequencies, which no
    checkpoint holds. Rebuild those modules from their config, off the meta device."""
    for module in model.modules():
        meta = [name for name, buffer in module.named_buffers(recurse=False) if buffer.is_meta]
        if not meta:
            continue
        if "RotaryEmbedding" not in type(module).__name__ or not hasattr(module, "config"):
            raise RuntimeError(f"{type(module).__name__} has buffers {meta} that no checkpoint holds")
        fresh = type(module)(config=module.config)
        for name in meta:
            setattr(module, name, getattr(fresh, name))
    return model


def peft_base(
    source: CheckpointSource, cfg: Any, *, device: torch.device | str = "cpu", quantized: bool = False
) -> tuple[Any, Any]:
    """The frozen base a LoRA/QLoRA checkpoint trained on (its checkpoints hold the adapter, not the
    base), rebuilt from the run's model config: in the dtype the trainer loaded it in (LoRA), or
    4-bit as QLoRA trained it when ``quantized`` (else full precision). Refused when the base's
    files no longer hash to what the checkpoint recorded: the adapter would be evaluated or merged
    on another model."""
    from launcher.model.adapters import base_mismatch, base_record
    from launcher.rundir.resume import read_checkpoint_info

    recorded = read_checkpoint_info(source.ckpt_dir).base
    named = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = torch.float32 if cfg.peft.method == "qlora" else named.get(str(recorded.get("dtype")), torch.float32)
    problem = base_mismatch(recorded, base_record(cfg, dtype)) if recorded else None
    if problem:
        raise ArtifactInputError(f"{source.ckpt_dir}: {problem}")
    return build_base_from_config(cfg, device=device, quantized=quantized, dtype=dtype)


def build_base_from_config(
    cfg: Any, *, device: torch.device | str = "cpu", quantized: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """The base a run started from, rebuilt from its model config in ``dtype`` (4-bit as QLoRA
    trained it when ``quantized``). A ``model.source=random`` base comes out as it did in training:
    the trainer builds it right after seeding every RNG with ``train.seed``, and so does this."""
    import numpy as np

    from launcher.config.schema import SingleStrategy
    from launcher.model.adapters import quantization_config
    from launcher.model.loading import load_model_and_tokenizer

    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    quantization = quantization_config(cfg.peft, SingleStrategy(), None) if quantized else None
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=dtype, quantization=quantization, device=device)
    if tokenizer.chat_template is None and cfg.data.chat_template:
        from launcher.data.templates import resolve_template

        tokenizer.chat_template = resolve_template(cfg.data.chat_template, tokenizer)
    return model, tokenizer
