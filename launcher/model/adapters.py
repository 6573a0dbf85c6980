"""LoRA and QLoRA (``peft.method``): adapters on the model a run fine-tunes, their files, merging.

* :func:`apply_peft` wraps the loaded model in a PEFT ``PeftModel`` (LoRA on ``peft.target_modules``,
  ``all-linear`` being every linear layer but the output head) before any engine wraps or shards
  it, so DDP, FSDP2 and ZeRO see the adapter parameters as ordinary trainable parameters and the
  frozen base as frozen ones.
* QLoRA loads the base in 4 bit (:func:`quantization_config`, bitsandbytes NF4/FP4) and prepares
  it for k-bit training first. The packed 4-bit weights are stored in ``uint8`` unless the engine
  shards every parameter (FSDP2, ZeRO-3), which only shards floating-point tensors: there they are
  stored in the dtype the engine trains in (``bnb_4bit_quant_storage``), so no cast touches their
  bits. With ``peft.quant_storage=uint8`` the FSDP engine leaves them whole on every rank.
* Every checkpoint of a PEFT run holds ``adapter/`` in PEFT's ``save_pretrained`` format
  (``adapter_config.json`` + ``adapter_model.safetensors``), written on rank 0 from the *gathered*
  values of the trainable parameters (:meth:`launcher.engines.base.Engine.trainable_state_dict`):
  never from a rank's ZeRO-3 placeholders or FSDP shards, the trap that leaves 40-byte adapters.
* A PEFT run's checkpoints hold the adapter, the optimizer and the trainer state, never the frozen
  base (14 GB per checkpoint for a 7B LoRA): the engines save the trainable parameters only, and
  the trainer state records which base they trained on (:func:`base_record`: its source, the dtype it
  was loaded in, and the sha256 of its config and weight files). A resume on another base is refused
  (:func:`base_mismatch`); export and evaluation rebuild the base from the run's model config.
* :func:`split_peft_state_dict` turns a PEFT model's full state dict (what an engine checkpoint
  holds) into the base model's own keys and the adapter's, for export and evaluation.

peft and bitsandbytes are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "uint8": torch.uint8}

# Keys of a PeftModel's state dict → the base model's: the wrapper prefix, LoRA's `base_layer` and
# modules_to_save's `original_module` go; the adapter's own tensors are told apart by these parts.
_PREFIX = "base_model.model."
_ADAPTER_PART = re.compile(r"\.(lora_[A-Za-z_]+|modules_to_save)\.")
_WRAPPER_PART = re.compile(r"\.(base_layer|original_module)(?=\.)")


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a PEFT wrapper, without importing peft when nothing has."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


# --------------------------------------------------------------------------------------------
# building


def resolve_quant_storage(peft_cfg: Any, strategy: Any, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype the packed 4-bit weights are stored in: ``peft.quant_storage``, or for ``auto``
    uint8, except under FSDP and ZeRO-3 (which shard floating-point tensors only), where it is the
    dtype the engine trains in, so the 4-bit weights are sharded like every other parameter."""
    choice = getattr(peft_cfg, "quant_storage", "auto")
    if choice != "auto":
        return DTYPES[choice]
    from launcher.engines.traits import engine_traits

    if engine_traits(strategy).shards_params:
        return compute_dtype or torch.float32
    return torch.uint8


def quantization_config(peft_cfg: Any, strategy: Any, compute_dtype: Optional[torch.dtype]) -> Any:
    """transformers' BitsAndBytesConfig for ``peft.method=qlora``; None for the other methods."""
    if peft_cfg.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=peft_cfg.quant_type,
        bnb_4bit_use_double_quant=peft_cfg.double_quant,
        bnb_4bit_compute_dtype=DTYPES[peft_cfg.compute_dtype],
        bnb_4bit_quant_storage=resolve_quant_storage(peft_cfg, strategy, compute_dtype),
    )


def keep_4bit_layout(model: Any) -> None:
    """bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel the first time the
    layer runs in eval mode without gradients (an eval during training). The weights then no
    longer train correctly (measured: the next step's gradients change), and under FSDP/ZeRO-3 the
    repacked tensor is a gathered copy. A model being trained keeps its training layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes.nn.Linear4bit
            module.support_avx512bf16_for_cpu = False


def build_lora_config(peft_cfg: Any, base_model_name_or_path: Optional[str] = None) -> Any:
    from peft import LoraConfig, TaskType

    targets = list(peft_cfg.target_modules)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        # peft takes "all-linear" as a string, module names as a list
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=list(peft_cfg.modules_to_save) or None,
        base_model_name_or_path=base_model_name_or_path,
    )


def apply_peft(model: Any, peft_cfg: Any) -> Any:
    """``model`` with LoRA adapters (a PeftModel); ``model`` itself for ``peft.method=none``.

    The adapters' initial values come from the current torch RNG: every rank seeded alike builds
    the same ones (FSDP2 does not broadcast them)."""
    if peft_cfg.method == "none":
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if peft_cfg.method == "qlora":
        # Freezes the base and keeps norms and embeddings in fp32. Activation checkpointing is the
        # engine's (strategy.activation_checkpointing, non-reentrant: frozen inputs need no grads).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_layout(model)
    name_or_path = getattr(model, "name_or_path", None) or None
    peft_model = get_peft_model(model, build_lora_config(peft_cfg, name_or_path))
    # Whatever trains keeps fp32 weights over a base loaded in bf16/fp16 (PEFT upcasts the LoRA
    # matrices itself, not the copies modules_to_save makes), as every engine expects; ZeRO-3's
    # partitioned parameters (ds_id) are DeepSpeed's to cast, with its own fp32 master copy.
    for p in peft_model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32 and not hasattr(p, "ds_id"):
            p.data = p.data.float()
    return peft_model


# --------------------------------------------------------------------------------------------
# files


def write_adapter(peft_model: Any, tensors: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """``out_dir`` as PEFT's ``save_pretrained`` writes it, from ``tensors``: full (gathered) values
    keyed as the PeftModel's own parameters (the engine's ``trainable_state_dict``). Rank 0 only."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter = get_peft_model_state_dict(peft_model, state_dict=tensors, adapter_name=ADAPTER_NAME)
    empty = [k for k, v in adapter.items() if v.numel() == 0]
    if not adapter or empty:
        raise RuntimeError(
            f"refusing to write an adapter with {'no tensors' if not adapter else f'empty tensors {empty[:3]}'}: "
            "the engine did not gather the trainable parameters"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    config = peft_model.peft_config[ADAPTER_NAME]
    inference_mode = config.inference_mode
    config.inference_mode = True  # as PeftModel.save_pretrained writes it: loads for inference by default
    try:
        config.save_pretrained(str(out_dir))
    finally:
        config.inference_mode = inference_mode
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in adapter.items()},
        str(out_dir / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    return out_dir


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no {ADAPTER_CONFIG}")
    return json.loads(path.read_text())


def set_adapter_base(adapter_dir: Path, base: Optional[str], revision: Optional[str] = None) -> None:
    """Point ``adapter_config.json``'s ``base_model_name_or_path`` (what PEFT's
    ``AutoPeftModelForCausalLM`` loads) at ``base``."""
    config = read_adapter_config(adapter_dir)
    config["base_model_name_or_path"] = base
    config["revision"] = revision
    (Path(adapter_dir) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS), device="cpu")


def adapter_parameters(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """An adapter file's tensors keyed as the PeftModel's own parameters: PEFT's file drops the
    adapter's name (``lora_A.weight``), the model has it (``lora_A.default.weight``)."""
    return {
        _ADAPTER_PART.sub(lambda m: f".{m.group(1)}.{ADAPTER_NAME}.", key): value
        for key, value in load_adapter_weights(adapter_dir).items()
    }


# --------------------------------------------------------------------------------------------
# the base an adapter trained on: named and hashed, not copied

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def base_record(cfg: Any, dtype: torch.dtype) -> dict[str, Any]:
    """What identifies the frozen base of a PEFT run, for its checkpoints: ``model.source``, path
    and revision, the dtype the trainer loaded it in (export rebuilds it so), and ``sha256``, a
    digest of the base's content: its config.json and weight files (each file's sha256; a Hugging
    Face cache's blobs are named by theirs, so a hub model is not read again), or for
    ``model.source=random`` the architecture, seed and tokenizer it is built from."""
    m = cfg.model
    record: dict[str, Any] = {
        "source": m.source,
        "path": m.path,
        "revision": m.revision,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if m.source == "random":
        what = {"arch": asdict(m.arch), "seed": cfg.train.seed, "tokenizer": _dir_hashes(Path(m.tokenizer))}
    else:
        directory = _base_dir(m)
        files = _dir_hashes(directory) if directory is not None else {}
        what = {"files": files} if files else {"hub": m.path, "revision": m.revision}  # not on this machine
        record["files"] = files
    record["sha256"] = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    return record


def base_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> Optional[str]:
    """Why a checkpoint whose trainer state recorded ``saved`` cannot continue on ``current`` (two
    :func:`base_record`), or None. A checkpoint that recorded none (older ftl, a full fine-tune) passes."""
    if not saved.get("sha256") or saved["sha256"] == current.get("sha256"):
        return None
    changed = sorted(
        name
        for name in set(saved.get("files") or {}) | set(current.get("files") or {})
        if (saved.get("files") or {}).get(name) != (current.get("files") or {}).get(name)
    )
    detail = f" (files that differ: {', '.join(changed[:5])})" if changed else ""
    return (
        f"the checkpoint's adapter trained on another base model: it recorded {_describe(saved)} with sha256 "
        f"{saved['sha256'][:12]}, this run loads {_describe(current)} with sha256 {current.get('sha256', '')[:12]}"
        f"{detail}. An adapter continues only on the base it was trained on: point model.* at that base, or "
        "start a new run (a new run.name)"
    )


def _describe(record: dict[str, Any]) -> str:
    where = record.get("path") or ""
    return f"model.source={record.get('source')}" + (f" model.path={where}" if where else "")


def _base_dir(model_cfg: Any) -> Optional[Path]:
    """The directory the base's files are in: a local model.path, the SmolLM2 conversion, or a
    hub id's snapshot in the local Hugging Face cache (None when not there)."""
    if model_cfg.source == "smollm2":
        from launcher.model.smollm2 import smollm2_dir

        return smollm2_dir()
    local = Path(model_cfg.path).expanduser()
    if not model_cfg.path or local.is_dir():
        return local if model_cfg.path else None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_cfg.path, revision=model_cfg.revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (or not a hub id): named, not hashed
        return None


def _dir_hashes(directory: Path) -> dict[str, str]:
    """sha256 of the config and weight files directly in ``directory`` (a tokenizer dir: all its files)."""
    from launcher.files import file_hashes

    files = sorted(p for p in directory.iterdir() if p.is_file())
    weights = [p for p in files if p.name == "config.json" or p.name.endswith(_WEIGHT_SUFFIXES)]
    chosen = weights or files
    known = {p.name: p.resolve().name for p in chosen if p.is_symlink() and _SHA256.match(p.resolve().name)}
    rest = [p for p in chosen if p.name not in known]
    return {**known, **dict(zip((p.name for p in rest), file_hashes(rest)))}


# --------------------------------------------------------------------------------------------
# a PeftModel's state dict ↔ the base model's


def base_key(peft_key: str) -> Optional[str]:
    """The base model's key for one key of a PeftModel's state dict; None for an adapter tensor.

    >>> base_key("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    >>> base_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    True
    """
    if _ADAPTER_PART.search(peft_key):
        return None
    key = peft_key[len(_PREFIX) :] if peft_key.startswith(_PREFIX) else peft_key
    return _WRAPPER_PART.sub("", key)


def split_peft_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base model's weights under its own keys, the adapter's tensors under the PeftModel's keys)."""
    base: dict[str, torch.Tensor] = {}
    adapter: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        plain = base_key(key)
        if plain is None:
            adapter[key] = value
        else:
            base[plain] = value
    return base, adapter


def attach_adapter(base_model: Any, adapter_dir: Path) -> Any:
    """A PeftModel of ``base_model`` with the adapter in ``adapter_dir`` (for inference)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
