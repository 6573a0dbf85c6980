"""`ftl export`: any engine's checkpoint → a Hugging Face ``save_pretrained`` directory.

Offline and on CPU: no process group, no GPU. The engine that wrote the checkpoint (its
``COMPLETE`` marker says which; the run's config otherwise) turns its files into one full state
dict through its module's ``consolidate_checkpoint(ckpt_dir)`` — safetensors for single/ddp,
every rank's DCP shards for fsdp, ZeRO partitions for deepspeed. The model is built on the meta
device from the run's config.yaml (no weights are initialised or read twice), takes the tensors
by assignment, and is written as size-sharded safetensors with the tokenizer and its chat
template: plain ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads it.

LoRA/QLoRA runs (every checkpoint holds ``adapter/``, gathered from all ranks):

* ``merge_lora``: the adapter merged into the base weights (PEFT's ``merge_and_unload``), written
  as the plain Hugging Face directory above. LoRA merges into the base weights the checkpoint
  holds; QLoRA into the full-precision base rebuilt from the run's model config (the 4-bit
  weights it trained against are an approximation of those).
* otherwise: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and the
  tokenizer, with ``base_model_name_or_path`` naming the base: ``model.path`` (and ``revision``)
  for ``model.source=hf``; for ``smollm2`` the converted directory in ftl's cache
  (``$FTL_CACHE/smollm2-135m-instruct``, which ``ftl train`` creates); for ``random`` (a base that
  exists nowhere else) the base itself, exported into ``OUT/base``.
  ``peft.AutoPeftModelForCausalLM.from_pretrained(out)`` loads it.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from launcher.train.checkpoint import MARKER, find_latest, is_complete
from launcher.launch.base import CONFIG_NAME

EXPORT_DIR = "export"
DTYPES = ("auto", "fp32", "bf16", "fp16")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


class ExportInputError(ValueError):
    """The arguments do not name something exportable (exit 2)."""


@dataclass(frozen=True)
class ExportSource:
    run_dir: Path
    ckpt_dir: Path
    config_path: Path
    engine: str
    step: int


# --------------------------------------------------------------------------------------------
# pure: what to export


def parse_size(text: str) -> int:
    """'2GB' → 2_000_000_000, '500MiB' → 524_288_000, '1024' → 1024 bytes."""
    match = _SIZE.match(str(text))
    if not match or int(match.group(1)) == 0:
        raise ExportInputError(f"--max-shard-size {text!r}: expected a positive size such as 2GB, 500MB or 4GiB")
    return int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]


def engine_from_marker(name: str) -> str:
    """The marker holds the engine's ``name`` ("fsdp") or its class name ("FSDPEngine")."""
    name = name.strip().lower()
    return name[: -len("engine")] if name.endswith("engine") and name != "engine" else name


def resolve_source(path: Path, config: Optional[Path] = None) -> ExportSource:
    """A run dir (its latest complete checkpoint) or one complete ``step-N`` checkpoint dir."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ExportInputError(f"{path}: no such directory (give a run dir or a checkpoint dir)")
    if is_complete(path):
        ckpt, run_dir = path, path.parent.parent
    elif (path / CONFIG_NAME).is_file():
        run_dir = path
        latest = find_latest(run_dir)
        if latest is None:
            raise ExportInputError(f"{run_dir} is a run dir with no complete checkpoint under checkpoints/ (train first)")
        ckpt = latest
    elif path.name.startswith(".tmp-") or (path.name.startswith("step-") and not (path / MARKER).is_file()):
        raise ExportInputError(f"{path} is an incomplete checkpoint (no {MARKER} marker): a save that did not finish")
    else:
        raise ExportInputError(f"{path} is neither a run dir (with {CONFIG_NAME}) nor a checkpoint dir (step-N with a {MARKER} marker)")
    config_path = Path(config).expanduser().resolve() if config else run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise ExportInputError(f"cannot find the run's config: {config_path} does not exist (pass --config RUN_DIR/{CONFIG_NAME})")
    marker = json.loads((ckpt / MARKER).read_text() or "{}")
    engine = engine_from_marker(str(marker.get("engine", "")))
    return ExportSource(run_dir, ckpt, config_path, engine, int(marker.get("step", ckpt.name.split("-")[-1])))


def default_out(source: ExportSource) -> Path:
    return source.run_dir / EXPORT_DIR / source.ckpt_dir.name


# --------------------------------------------------------------------------------------------
# the work


def consolidator(engine: str) -> Callable[[Path], dict[str, Any]]:
    """``launcher.engines.<engine>.consolidate_checkpoint``: each engine reads its own format."""
    try:
        module = importlib.import_module(f"launcher.engines.{engine}")
    except ModuleNotFoundError as e:
        raise RuntimeError(f"no engine module launcher.engines.{engine} to read this checkpoint ({e})") from e
    fn = getattr(module, "consolidate_checkpoint", None)
    if fn is None:
        raise RuntimeError(f"launcher.engines.{engine} has no consolidate_checkpoint(ckpt_dir): cannot export its checkpoints")
    return fn


def export_checkpoint(
    path: Path,
    out: Optional[Path] = None,
    *,
    max_shard_size: str = "2GB",
    dtype: str = "auto",
    overwrite: bool = False,
    config: Optional[Path] = None,
    merge_lora: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    shard_bytes = parse_size(max_shard_size)
    if dtype not in DTYPES:
        raise ExportInputError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    source = resolve_source(path, config)
    out = Path(out).expanduser().resolve() if out else default_out(source)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportInputError(f"{out} exists and is not empty (pass --overwrite or another --out)")

    cfg = load_export_config(source.config_path)
    engine = source.engine or cfg.strategy.engine
    peft = cfg.peft.method
    log(f"ftl export: {source.ckpt_dir} (engine {engine}, step {source.step}{f', peft {peft}' if peft != 'none' else ''})")
    if merge_lora and peft == "none":
        log("ftl export: merge_lora ignored: this run trained every weight (peft.method=none)")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if peft != "none" and not merge_lora:
        base = export_adapter(source, cfg, engine, tmp, final_dir=out, max_shard_size=shard_bytes)
        _replace(tmp, out)
        log(f"ftl export: wrote the {peft} adapter to {out} (base: {base}); load it with "
            f"peft.AutoPeftModelForCausalLM.from_pretrained({str(out)!r})")  # fmt: skip
        return out
    if peft == "none":
        state_dict = consolidator(engine)(source.ckpt_dir)
        model, tokenizer = build_hf_model(cfg, state_dict, dtype)
        del state_dict
    else:
        model, tokenizer = merged_peft_model(source.ckpt_dir, dtype)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard_bytes)
    tokenizer.save_pretrained(tmp)
    _replace(tmp, out)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"ftl export: wrote {out} ({n_params / 1e6:.2f}M params, {model.dtype}); load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")  # fmt: skip
    return out


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def merged_peft_model(ckpt_dir: Path, dtype: str) -> tuple[Any, Any]:
    """A LoRA/QLoRA checkpoint's adapter merged into its full-precision base, in ``dtype``."""
    import torch

    from launcher.artifacts.inference import load_checkpoint_model

    model, tokenizer, _, _ = load_checkpoint_model(ckpt_dir, quantized=False)
    model = model.merge_and_unload()
    target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    model.to(target)
    model.eval()
    return model, tokenizer


def export_adapter(source: ExportSource, cfg: Any, engine: str, tmp: Path, *, final_dir: Path, max_shard_size: int) -> str:
    """The checkpoint's ``adapter/`` and the run's tokenizer into ``tmp`` (renamed to ``final_dir``
    afterwards), ``base_model_name_or_path`` pointing at the base. Returns that reference."""
    from launcher.model.adapters import ADAPTER_CONFIG, ADAPTER_DIR, set_adapter_base, split_peft_state_dict

    adapter_dir = source.ckpt_dir / ADAPTER_DIR
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ExportInputError(f"{source.ckpt_dir} has no {ADAPTER_DIR}/{ADAPTER_CONFIG}: written before ftl saved adapters?")
    shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True)
    _, tokenizer, _ = hf_config_and_tokenizer(cfg.model)
    _set_chat_template(tokenizer, cfg)
    tokenizer.save_pretrained(tmp)
    revision = None
    if cfg.model.source == "hf":
        path = Path(cfg.model.path).expanduser()
        base, revision = (str(path.resolve()) if path.is_dir() else cfg.model.path), cfg.model.revision
    elif cfg.model.source == "smollm2":
        from launcher.model.smollm2 import smollm2_dir

        base = str(smollm2_dir())
    else:  # random: the base exists only in this run
        if cfg.peft.method == "qlora":
            from launcher.artifacts.inference import build_base_from_config

            model, _ = build_base_from_config(cfg, quantized=False)
        else:
            base_sd, _ = split_peft_state_dict(consolidator(engine)(source.ckpt_dir))
            model, _ = build_hf_model(cfg, base_sd, "fp32")
        model.save_pretrained(tmp / "base", safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp / "base")
        base = str(final_dir / "base")
    set_adapter_base(tmp, base, revision)
    return base


def load_export_config(path: Path) -> Any:
    """The run's config, checked only where export reads it: training data that has moved since
    (or a cluster path on another machine) must not stop an export."""
    from omegaconf import OmegaConf

    from launcher.config.validate import validate

    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ExportInputError(f"{path} is not a config mapping")
    cfg, errors = validate(raw)
    relevant = [str(e) for e in errors if e.path.split(".")[0] in ("model", "peft", "strategy") or e.path == "data.chat_template"]
    if relevant:
        raise ExportInputError(f"{path}: " + "; ".join(relevant))
    return cfg


def build_hf_model(cfg: Any, state_dict: dict[str, Any], dtype: str) -> tuple[Any, Any]:
    """The run's model architecture on the meta device, given ``state_dict``'s tensors by
    assignment; and its tokenizer, with the chat template the run trained with."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.model.loading import ensure_pad_token

    config, tokenizer, source_dir = hf_config_and_tokenizer(cfg.model)
    _set_chat_template(tokenizer, cfg)
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


def _set_chat_template(tokenizer: Any, cfg: Any) -> None:
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
        path, revision = model_cfg.path, model_cfg.revision
    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=model_cfg.trust_remote_code)
    separate = bool(model_cfg.tokenizer) and model_cfg.tokenizer != path
    tokenizer = load_tokenizer(
        model_cfg.tokenizer or path, revision=None if separate else revision, trust_remote_code=model_cfg.trust_remote_code
    )
    return config, tokenizer, path


def _source_generation_config(path: str, default: Any) -> Any:
    """The base model's generation defaults (eos ids, sampling), when it ships them."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return default
