"""The decoder families ftl trains, and their architecture numbers read from a Hugging Face
``config.json``. Pure Python, JSON only: `ftl plan` reads a model directory with it on a login node.

transformers implements each family with its own layout (checked to the parameter against
instantiated models with transformers 5.24, ``tests/model/test_families.py``):

* head_dim is hidden_size / num_heads unless config.json says otherwise; a missing key takes the
  config class's default, which is 128 for qwen3 and 256 for gemma2/3 (``FAMILY_DEFAULTS``).
* biases: qwen2 always has q/k/v biases; qwen2_moe has them with ``qkv_bias`` (default true); llama,
  qwen3, gemma, olmo2 and granite have q/k/v/o biases with ``attention_bias``, llama and granite
  MLP biases with ``mlp_bias``.
* norms: qwen3 and gemma3 normalise q and k per head (head_dim weights each); olmo2 over the whole
  projection; gemma2/3 have four norms per layer, the others two.
* phi3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``.
* experts: mixtral has ``num_local_experts`` experts of ``intermediate_size``; qwen2_moe has
  ``num_experts`` of ``moe_intermediate_size`` plus a shared expert and its one-output gate, and
  dense MLPs in ``mlp_only_layers`` and the layers ``decoder_sparse_step`` skips. transformers 5
  keeps each layer's experts as fused 3-D parameters and the router as a bare [experts, hidden]
  parameter (not ``nn.Linear``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from launcher.config.local_paths import is_local_path
from launcher.config.schema import MODEL_TYPES, ArchConfig


@dataclass(frozen=True)
class Layout:
    """What a family's decoder layer holds beyond the Llama layout."""

    qkv_bias: str = ""  # "always", or the config key that turns q/k/v biases on
    o_bias: bool = False  # the o_proj bias follows the same key (attention_bias)
    mlp_bias: bool = False  # config key mlp_bias exists
    qk_norm: str = ""  # "head": one head_dim weight each for q and k; "proj": over the whole projection
    norms_per_layer: int = 2
    fused: bool = False  # phi3: qkv_proj and gate_up_proj
    moe: str = ""  # "mixtral" | "qwen2_moe"
    logits_post: str = ""  # the config key of what transforms the head's output into the logits (softcap, scale)


LAYOUTS: dict[str, Layout] = {
    "llama": Layout(qkv_bias="attention_bias", o_bias=True, mlp_bias=True),
    "granite": Layout(qkv_bias="attention_bias", o_bias=True, mlp_bias=True, logits_post="logits_scaling"),
    "mistral": Layout(),
    "mixtral": Layout(moe="mixtral"),
    "qwen2": Layout(qkv_bias="always"),
    "qwen2_moe": Layout(qkv_bias="qkv_bias", moe="qwen2_moe"),
    "qwen3": Layout(qkv_bias="attention_bias", o_bias=True, qk_norm="head"),
    "gemma2": Layout(qkv_bias="attention_bias", o_bias=True, norms_per_layer=4, logits_post="final_logit_softcapping"),
    "gemma3_text": Layout(
        qkv_bias="attention_bias", o_bias=True, norms_per_layer=4, qk_norm="head", logits_post="final_logit_softcapping"
    ),
    "phi3": Layout(fused=True),
    "olmo2": Layout(qkv_bias="attention_bias", o_bias=True, qk_norm="proj"),
}
assert set(LAYOUTS) == set(MODEL_TYPES)

# transformers' config-class defaults for keys a config.json may leave out (head_dim absent and not
# listed: hidden_size // num_attention_heads; num_key_value_heads absent: num_attention_heads).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
    },
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
    },
    "qwen3": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
    },
    "gemma2": {
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
    },
    "gemma3_text": {
        "vocab_size": 262208,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
    },
    "phi3": {
        "vocab_size": 32064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    },
    "qwen2_moe": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "qkv_bias": True,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "mixtral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "olmo2": {
        "vocab_size": 50304,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    },
    "granite": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
    },
}

# Arch fields that decide the shapes of the weights: a value here that differs from the weights'
# config.json is an error. The others (context length, rope base, norm epsilon, experts per token)
# may be overridden, and the override is applied when the model loads.
SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "tie_embeddings",
    "attention_bias",
    "mlp_bias",
    "num_experts",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "dense_layers",
)
TUNABLE_FIELDS = ("max_position_embeddings", "rope_theta", "rms_norm_eps", "num_experts_per_tok")


class UnsupportedModel(ValueError):
    """A config.json ftl cannot train: its message says why and what ftl does train; ``problems``
    lists each thing wrong with it (one key each), for a report of them all."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        super().__init__("; ".join(problems))


# The config.json values ftl computes with, checked before any arithmetic: (lowest, highest)
# allowed, the highest that of the model.arch field it fills (schema.py). The bounds are far beyond
# any released model (405B Llama: 126 layers, hidden 16384; the largest vocabularies ~262k;
# context lengths of 10M), so only nonsense is refused.
_ARCH_HI = {f.name: f.metadata.get("hi") for f in fields(ArchConfig)}
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, _ARCH_HI["vocab_size"]),
    "hidden_size": (1, _ARCH_HI["hidden_size"]),
    "intermediate_size": (1, _ARCH_HI["intermediate_size"]),
    "num_hidden_layers": (1, _ARCH_HI["num_layers"]),
    "num_attention_heads": (1, _ARCH_HI["num_heads"]),
    "num_key_value_heads": (1, _ARCH_HI["num_kv_heads"]),
    "head_dim": (1, _ARCH_HI["head_dim"]),
    "max_position_embeddings": (1, _ARCH_HI["max_position_embeddings"]),
    "num_experts": (0, _ARCH_HI["num_experts"]),
    "num_local_experts": (1, _ARCH_HI["num_experts"]),
    "num_experts_per_tok": (1, _ARCH_HI["num_experts_per_tok"]),
    "moe_intermediate_size": (1, _ARCH_HI["moe_intermediate_size"]),
    "shared_expert_intermediate_size": (0, _ARCH_HI["shared_expert_intermediate_size"]),
    "decoder_sparse_step": (1, _ARCH_HI["num_layers"]),
}
FLOAT_BOUNDS: dict[str, tuple[float, float]] = {"rope_theta": (0.0, 1e12), "rms_norm_eps": (0.0, 1.0)}  # exclusive
BOOL_KEYS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "qkv_bias")


def layout(model_type: str) -> Layout:
    return LAYOUTS[model_type]


# The chunked loss (launcher/model/loss.py) runs the output layer over this many logits at a time
# at most. CPU: 2**24 fp32 logits, 64 MB (341 positions of SmolLM2's 49k vocabulary, 130 of Llama
# 3's 128k), tuned on the project's CPUs. CUDA: 2**27, 512 MB (1,046 positions of 128k, 2,730 of
# 49k): each chunk reads and writes the head's fp32 weight gradient once ([vocab, hidden], 2 GB
# for Llama 3 8B), so few large chunks keep that traffic to ~34 GB per 8k-token micro-batch where
# 130-row chunks made ~0.4 TB of it.
LOGITS_PER_CHUNK = {"cpu": 2**24, "cuda": 2**27}


def loss_chunk_rows(vocab_size: int, device_type: str = "cpu") -> int:
    """Labelled positions per chunk of the chunked loss on ``device_type`` (cuda, else the CPU's):
    :data:`LOGITS_PER_CHUNK` logits at most, at least 64 rows."""
    budget = LOGITS_PER_CHUNK["cuda" if device_type == "cuda" else "cpu"]
    return max(64, budget // max(1, vocab_size))


def plain_head(model_type: Optional[str], config: Any = None) -> bool:
    """Whether the family's logits are its output layer's output unchanged (no softcap or scale
    after it, or the config switches it off), so the loss may be computed inside that layer
    (:mod:`launcher.model.loss`). Unknown families: no."""
    if model_type not in LAYOUTS:
        return False
    key = LAYOUTS[model_type].logits_post
    return not key or (config is not None and getattr(config, key, None) in (None, 1, 1.0))


def head_dim(arch: ArchConfig) -> int:
    return arch.head_dim or arch.hidden_size // arch.num_heads


def expert_width(arch: ArchConfig) -> int:
    return arch.moe_intermediate_size or arch.intermediate_size


def moe_layer_flags(arch: ArchConfig) -> list[bool]:
    """Per decoder layer: whether its MLP is a sparse mixture of experts."""
    if not arch.num_experts:
        return [False] * arch.num_layers
    dense = set(arch.dense_layers)
    return [i not in dense for i in range(arch.num_layers)]


# --------------------------------------------------------------------------------------------
# config.json → ArchConfig fields


def _text_part(config: dict[str, Any]) -> dict[str, Any]:
    model_type = config.get("model_type")
    if model_type == "gemma3" and "text_config" in config:
        raise UnsupportedModel(
            "model_type 'gemma3' is multimodal Gemma 3 (a vision tower and a language model); ftl trains "
            "text decoders: use a text-only checkpoint (model_type gemma3_text, e.g. google/gemma-3-1b-it)"
        )
    if not isinstance(model_type, str) or model_type not in LAYOUTS:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not a decoder family ftl trains; supported: {', '.join(MODEL_TYPES)}"
        )
    return config


def _get(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is not None:
        return config[key]
    return FAMILY_DEFAULTS[config["model_type"]].get(key)


def _rope_theta(config: dict[str, Any]) -> Any:
    """transformers 5 writes ``rope_parameters`` (per layer type for gemma3: the full-attention
    layers' base is the one reported); hub files from transformers 4 have ``rope_theta``."""
    rp = config.get("rope_parameters") or {}
    if isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict):
        rp = rp["full_attention"]
    theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return theta or config.get("rope_theta") or FAMILY_DEFAULTS[config["model_type"]]["rope_theta"]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def config_problems(cfg: dict[str, Any]) -> list[str]:
    """Every value of a (supported) config.json that ftl would compute with and that is of the
    wrong type or out of range, each as "key: got V; allowed: ..."; the cross-key rules (heads
    divide the width, kv heads divide heads) once the keys themselves are sound."""
    out: list[str] = []
    for key, (low, high) in INT_BOUNDS.items():
        value = _get(cfg, key)
        if value is None:
            continue
        if type(value) is not int or not low <= value <= high:
            out.append(f"{key}: got {_shown(value)}; allowed: an integer from {low} to {high}")
    values = {**{k: _get(cfg, k) for k in FLOAT_BOUNDS}, "rope_theta": _rope_theta(cfg)}
    for key, (low, high) in FLOAT_BOUNDS.items():
        value = values[key]
        if type(value) not in (int, float) or not (math.isfinite(value) and low < value < high):
            out.append(f"{key}: got {_shown(value)}; allowed: a finite number above {low:g} and below {high:g}")
    for key in BOOL_KEYS:
        if cfg.get(key) is not None and type(cfg[key]) is not bool:
            out.append(f"{key}: got {_shown(cfg[key])}; allowed: true or false")
    only = _get(cfg, "mlp_only_layers")
    if only is not None and not (isinstance(only, list) and all(type(i) is int and 0 <= i < 1 << 10 for i in only)):
        out.append(f"mlp_only_layers: got {_shown(only)}; allowed: a list of layer indices")
    if out:
        return out
    heads, hidden, kv = _get(cfg, "num_attention_heads"), _get(cfg, "hidden_size"), _get(cfg, "num_key_value_heads")
    if not _get(cfg, "head_dim") and hidden % heads:
        out.append(f"hidden_size: {hidden} is not a multiple of num_attention_heads {heads} (and there is no head_dim)")
    if kv and heads % kv:
        out.append(f"num_key_value_heads: {kv} does not divide num_attention_heads {heads}")
    return out


def arch_from_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """ArchConfig fields from a config.json dict (transformers 4 or 5 keys). Raises UnsupportedModel,
    listing every bad value, before computing with any of them."""
    cfg = _text_part(config)
    problems = config_problems(cfg)
    if problems:
        raise UnsupportedModel(*problems)
    mt = cfg["model_type"]
    lay = LAYOUTS[mt]
    heads = _get(cfg, "num_attention_heads")
    hidden = _get(cfg, "hidden_size")
    layers = _get(cfg, "num_hidden_layers")
    arch: dict[str, Any] = {
        "model_type": mt,
        "vocab_size": _get(cfg, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": _get(cfg, "intermediate_size"),
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": _get(cfg, "num_key_value_heads") or heads,
        "head_dim": _get(cfg, "head_dim") or hidden // heads,
        "max_position_embeddings": _get(cfg, "max_position_embeddings"),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", FAMILY_DEFAULTS[mt].get("tie_word_embeddings", False))),
        "rope_theta": float(_rope_theta(cfg)),
        "rms_norm_eps": float(_get(cfg, "rms_norm_eps")),
        "attention_bias": lay.qkv_bias == "always" or bool(lay.qkv_bias and _get(cfg, lay.qkv_bias)),
        "mlp_bias": lay.mlp_bias and bool(_get(cfg, "mlp_bias")),
        "num_experts": 0,
        "num_experts_per_tok": 0,
        "moe_intermediate_size": None,
        "shared_expert_intermediate_size": 0,
        "dense_layers": [],
    }
    if lay.moe == "mixtral":  # num_local_experts in config.json; transformers 5 aliases num_experts to it
        arch["num_experts"] = (
            cfg.get("num_local_experts") or cfg.get("num_experts") or FAMILY_DEFAULTS[mt]["num_local_experts"]
        )
        arch["num_experts_per_tok"] = _get(cfg, "num_experts_per_tok")
    elif lay.moe == "qwen2_moe":
        experts, step = _get(cfg, "num_experts"), _get(cfg, "decoder_sparse_step")
        only = set(_get(cfg, "mlp_only_layers") or [])
        arch["num_experts"] = experts
        arch["num_experts_per_tok"] = _get(cfg, "num_experts_per_tok")
        arch["moe_intermediate_size"] = _get(cfg, "moe_intermediate_size")
        arch["shared_expert_intermediate_size"] = _get(cfg, "shared_expert_intermediate_size")
        arch["dense_layers"] = [i for i in range(layers) if i in only or not experts or (i + 1) % step]
    return arch


def arch_fields(arch: ArchConfig) -> dict[str, Any]:
    """The arch as a dict of its fields (what arch_from_hf_config returns)."""
    return {f.name: getattr(arch, f.name) for f in fields(arch)}


def arch_differences(given: dict[str, Any], weights: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """(the shape fields where ``given`` and the weights' config disagree, each as "field: given vs
    weights"; the tunable fields ``given`` changes, field -> value). Fields absent from ``given``
    are not compared; head_dim null means hidden_size / num_heads."""
    given = dict(given)
    if "head_dim" in given and given["head_dim"] is None:
        given["head_dim"] = given.get("hidden_size", weights["hidden_size"]) // given.get(
            "num_heads", weights["num_heads"]
        )
    shapes = [
        f"{k}: {given[k]!r} vs {weights[k]!r}"
        for k in SHAPE_FIELDS
        if k in given and _norm(k, given[k]) != _norm(k, weights[k])
    ]
    tuned = {k: given[k] for k in TUNABLE_FIELDS if k in given and given[k] != weights[k]}
    return shapes, tuned


def _norm(key: str, value: Any) -> Any:
    return sorted(value) if key == "dense_layers" else value


# --------------------------------------------------------------------------------------------
# finding a config.json


def read_hf_config(path: str, revision: Optional[str] = None) -> tuple[Optional[dict[str, Any]], str]:
    """(config.json of ``path``, where it was read) — or (None, why not): ``path`` is a local
    directory or a hub id, looked up in the local Hugging Face cache only (no network)."""
    local = Path(path).expanduser()
    if local.is_dir():
        file = local / "config.json"
        if not file.exists():
            return None, f"{local} has no config.json"
        return _load_json(file), str(file)
    if is_local_path(path):
        return None, f"{path}: no such directory"
    file = _cached_hub_file(path, "config.json", revision)
    if file is None:
        return None, f"hub id {path!r} is not in the local Hugging Face cache"
    return _load_json(Path(file)), file


def _load_json(file: Path) -> dict[str, Any]:
    from launcher.safe_read import UnreadableFile, load_json

    try:
        data = load_json(file)
    except UnreadableFile as e:
        raise UnsupportedModel(str(e)) from None
    if not isinstance(data, dict):
        raise UnsupportedModel(f"{file}: expected a JSON object")
    return data


def _cached_hub_file(repo_id: str, filename: str, revision: Optional[str]) -> Optional[str]:
    try:
        from huggingface_hub import constants
    except ImportError:  # transformers brings huggingface_hub; without it there is no cache to read
        return None
    # The repo's folder in the cache first (huggingface_hub's own cache dir and documented layout,
    # models--ORG--NAME): when it is absent, as for most recipes' big models, nothing is cached and
    # the lookup is skipped, with the quarter second its imports (an HTTP client) cost `ftl plan`.
    if not (Path(constants.HF_HUB_CACHE) / constants.REPO_ID_SEPARATOR.join(["models", *repo_id.split("/")])).is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except HFValidationError:  # not a valid repo id: nothing cached under it
        return None
    return found if isinstance(found, str) else None


def has_tokenizer(directory: Path) -> bool:
    """Whether a model directory carries a tokenizer transformers can load."""
    return any(
        (directory / name).is_file()
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    )


def name_from_path(path: str) -> str:
    """A model's name from its directory or hub id: the last component."""
    return Path(path.rstrip("/")).name or path
