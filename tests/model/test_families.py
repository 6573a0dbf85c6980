"""Model families: a Hugging Face directory of each decoder family ftl supports is read (config.json
only), planned with an exact parameter count, trained with packing and ``sdpa_varlen``, exported and
loaded back in plain transformers; real-shaped configs are counted against transformers' own
models; families ftl cannot train are refused with a clear error.

The matrix runs in this one process on tiny random models (hidden 64, 2 layers, vocab 512 = the
bundled tiny tokenizer), a few optimizer steps each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import metrics, need_gpus

from launcher.config.errors import ConfigErrors
from launcher.config.schema import ArchConfig
from launcher.model.families import LAYOUTS, arch_from_hf_config
from launcher.paths import ROOT, asset
from launcher.plan.memory import lora_param_count, param_counts

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "vocab_size": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# Each family's own features at tiny size: sliding windows of 8 tokens (the demo's packed examples
# are longer, so windows cut in), head_dim other than hidden/heads, softcapping, experts.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "tie_word_embeddings": False},
    "mistral": {"model_type": "mistral", "sliding_window": 8},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True, "head_dim": 32},
    "gemma2": {
        "model_type": "gemma2",
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "sliding_window": 8,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "gemma3_text": {
        "model_type": "gemma3_text",
        "head_dim": 32,
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "final_logit_softcapping": 30.0,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {"model_type": "phi3", "sliding_window": None},
    "qwen2_moe": {
        "model_type": "qwen2_moe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
    },
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8},
    "olmo2": {"model_type": "olmo2"},
    "granite": {
        "model_type": "granite",
        "tie_word_embeddings": True,
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.0625,
        "logits_scaling": 8.0,
    },
}
ATTENTION = {"gemma2": "eager"}  # attention logit softcapping: sdpa cannot (see test_gemma2_needs_eager)


def test_every_supported_family_is_in_the_matrix() -> None:
    assert sorted(FAMILIES) == sorted(LAYOUTS)


def hf_dir(family: str, root: Path) -> Path:
    """A tiny random model of ``family`` saved as a Hugging Face directory (weights + config.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = root / family
    if not (out / "config.json").is_file():
        spec = {**TINY, **FAMILIES[family]}
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
        model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-models")


def overrides_for(family: str, model_dir: Path, run_dir: Path) -> list[str]:
    return [
        "recipe=tiny",
        "model.source=hf",
        f"model.path={model_dir}",
        f"model.tokenizer={asset('tiny-tokenizer')}",
        f"model.attn_implementation={ATTENTION.get(family, 'sdpa_varlen')}",
        "data.packing=true",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.seq_len=128",
        "checkpoint.every_steps=0",
        "eval.after_training=false",
        "wandb.mode=disabled",
        f"run.dir={run_dir}",
    ]


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def packed_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One row of three examples end to end, positions restarting at each (longer than the window)."""
    g = torch.Generator().manual_seed(1)
    lengths = [11, 17, 9]
    ids = torch.randint(3, vocab, (1, sum(lengths)), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, positions, lengths


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_packed_exports_and_reloads(family: str, models: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from launcher.artifacts.export import export_checkpoint
    from launcher.model.loading import load_model_and_tokenizer
    from launcher.rundir.write import write_run_dir
    from launcher.session import prepare_run
    from launcher.train.trainer import Trainer

    model_dir = hf_dir(family, models)
    run = prepare_run(overrides_for(family, model_dir, tmp_path / "run"))
    arch = run.cfg.model.arch
    # the architecture came from config.json, the name from the path
    assert arch.model_type == FAMILIES[family]["model_type"] and (
        arch.hidden_size,
        arch.num_layers,
        arch.vocab_size,
    ) == (64, 2, 512)
    assert run.cfg.model.name == family
    initial = AutoModelForCausalLM.from_pretrained(model_dir)
    # the planner's count is the instantiated model's, to the parameter (the issue asks for 1%)
    assert param_counts(arch).total == numel(initial), family

    write_run_dir(run.raw, run.plan, run.config_path, ["train"])
    assert Trainer(run.cfg).run() == "completed"
    losses = [row["loss"] for row in metrics(run.run_dir)]
    assert len(losses) == 4 and all(x == x for x in losses) and losses[-1] < losses[0], losses

    out = export_checkpoint(run.run_dir, tmp_path / "export", log=lambda _: None)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, its default attention
    assert type(reloaded) is type(initial) and numel(reloaded) == numel(initial)
    trained = dict(reloaded.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in initial.named_parameters()), (
        "the export holds the initial weights"
    )

    # ftl's packed attention over the exported weights = plain transformers on each example alone
    ftl_model, _ = load_model_and_tokenizer(replace(run.cfg.model, path=str(out), tokenizer=str(out)))
    ids, positions, lengths = packed_batch(arch.vocab_size)
    with torch.no_grad():
        packed = ftl_model.eval()(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([reloaded(input_ids=part, use_cache=False).logits[0] for part in ids.split(lengths, dim=1)])
    assert torch.allclose(packed, alone, atol=1e-5), (family, float((packed - alone).abs().max()))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_count_is_what_peft_trains(family: str, models: Path) -> None:
    """The planner's LoRA count (all-linear and named targets) against peft on the real model:
    fused projections (phi3) and experts (mixtral; qwen2_moe from peft 0.22: by the unfused names too) included."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = hf_dir(family, models)
    arch = ArchConfig(**arch_from_hf_config(json.loads((model_dir / "config.json").read_text())))
    named = [["gate_proj", "up_proj", "gate"]] if family == "qwen2_moe" else []  # peft 0.22: experts, router
    for targets in (["all-linear"], ["o_proj", "down_proj"], *named):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(model_dir),
            LoraConfig(r=4, target_modules="all-linear" if targets == ["all-linear"] else targets),
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert lora_param_count(arch, 4, targets) == trainable, (family, targets)


def test_half_of_qwen2_moes_fused_expert_pair_is_refused_before_peft_would(models: Path, tmp_path: Path) -> None:
    """peft 0.22 maps qwen2_moe's unfused names onto its fused experts and refuses gate_proj
    without up_proj at load time; ftl's validate() refuses it first, with the fix."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from launcher.config.errors import ConfigErrors
    from launcher.plan.memory import peft_adapts_experts
    from launcher.session import prepare_run

    if not peft_adapts_experts("qwen2_moe"):
        pytest.skip("peft < 0.22 leaves qwen2_moe's experts alone")
    model_dir = hf_dir("qwen2_moe", models)
    with pytest.raises(ValueError, match="gate_proj without also targeting up_proj"):
        get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules=["gate_proj"]))
    base = [*overrides_for("qwen2_moe", model_dir, tmp_path / "run"), "peft=lora"]
    with pytest.raises(ConfigErrors) as refused:
        prepare_run([*base, "peft.target_modules=[gate_proj,o_proj]"])
    assert "add up_proj, or drop gate_proj" in str(refused.value)
    prepare_run([*base, "peft.target_modules=[gate_proj,up_proj]"])  # the pair is fine


# --------------------------------------------------------------------------------------------
# counting real-shaped models (meta device: no memory), and both config.json dialects

# config.json numbers of published checkpoints (from their model cards' config files)
REAL: dict[str, dict[str, Any]] = {
    "Llama-3-8B": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "Mistral-Nemo-12B": {
        "model_type": "mistral",
        "vocab_size": 131072,
        "hidden_size": 5120,
        "intermediate_size": 14336,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "sliding_window": None,
        "max_position_embeddings": 1024000,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-5,
    },
    "Qwen2.5-0.5B": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "Qwen3-0.6B": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "gemma-2-2b": {
        "model_type": "gemma2",
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "max_position_embeddings": 8192,
    },
    "gemma-3-1b": {
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 512,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "max_position_embeddings": 32768,
    },
    "Phi-3-mini-4k": {
        "model_type": "phi3",
        "vocab_size": 32064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "sliding_window": 2047,
        "pad_token_id": 32000,
    },
    "Qwen1.5-MoE-A2.7B": {
        "model_type": "qwen2_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "decoder_sparse_step": 1,
        "max_position_embeddings": 8192,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    "Mixtral-8x7B": {
        "model_type": "mixtral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-5,
    },
    "OLMo-2-7B": {
        "model_type": "olmo2",
        "vocab_size": 100352,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rope_theta": 500000.0,
        "pad_token_id": 100277,
    },
    "granite-3.0-2b": {
        "model_type": "granite",
        "vocab_size": 49155,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "pad_token_id": 0,
    },
}
# published totals (model cards) where a card gives an exact one: a check on the check
PUBLISHED = {
    "Llama-3-8B": 8_030_261_248,
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen3-0.6B": 596_049_920,
    "Mixtral-8x7B": 46_702_792_704,
}


def transformers5_dict(config: dict[str, Any]) -> dict[str, Any]:
    """What transformers 5 writes to config.json for the same model (rope_parameters, aliases)."""
    from transformers import AutoConfig

    spec = dict(config)
    return AutoConfig.for_model(spec.pop("model_type"), **spec).to_dict()


@pytest.mark.parametrize("name", sorted(REAL))
def test_param_count_is_exact_on_real_shapes(name: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(REAL[name])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    arch = ArchConfig(**arch_from_hf_config(REAL[name]))
    counts = param_counts(arch)
    assert counts.total == numel(model), name
    assert name not in PUBLISHED or counts.total == PUBLISHED[name]
    if arch.num_experts:  # one token passes the router, top-k experts (and the shared one), not all
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and "shared" not in n)
        assert (
            counts.active == counts.total - experts * (arch.num_experts - arch.num_experts_per_tok) // arch.num_experts
        )
    else:
        assert counts.active == counts.total
    # the same model written by transformers 5 (rope_parameters, num_local_experts as num_experts) reads the same
    assert arch_from_hf_config(transformers5_dict(REAL[name])) == arch_from_hf_config(REAL[name])


# --------------------------------------------------------------------------------------------
# what ftl refuses, and how


def compose_errors(*overrides: str) -> str:
    from launcher.session import load_config

    with pytest.raises(ConfigErrors) as info:
        load_config(list(overrides))
    return str(info.value)


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "config, needle",
    [
        (
            {"model_type": "gpt2", "n_embd": 64},
            "model_type 'gpt2' is not a decoder family ftl trains; supported: llama, mistral",
        ),
        ({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}, "multimodal Gemma 3"),
        ({"model_type": "my_remote_code_model"}, "model_type 'my_remote_code_model' is not a decoder family"),
    ],
)
def test_unsupported_families_are_refused_by_name(config: dict[str, Any], needle: str, tmp_path: Path) -> None:
    model_dir = write_config(tmp_path / "m", config)
    message = compose_errors("recipe=tiny", "model.source=hf", f"model.path={model_dir}")
    assert "model.path" in message and needle in message and str(model_dir) in message


def test_gemma2_needs_eager(models: Path) -> None:
    message = compose_errors(
        "recipe=tiny",
        "model.source=hf",
        f"model.path={hf_dir('gemma2', models)}",
        f"model.tokenizer={asset('tiny-tokenizer')}",
    )
    assert (
        "model.attn_implementation: 'sdpa_varlen' cannot cap attention logits" in message
        and "model.attn_implementation=eager" in message
    )


def test_explicit_arch_overrides_win_and_shape_contradictions_are_errors(models: Path) -> None:
    from launcher.session import load_config

    model_dir = hf_dir("qwen3", models)
    base = ["recipe=tiny", "model.source=hf", f"model.path={model_dir}", f"model.tokenizer={asset('tiny-tokenizer')}"]
    arch = load_config([*base, "model.arch.rope_theta=50000", "model.arch.max_position_embeddings=512"]).cfg.model.arch
    assert (arch.rope_theta, arch.max_position_embeddings, arch.head_dim) == (50000.0, 512, 32)
    message = compose_errors(*base, "model.arch.num_layers=4", "model.arch.head_dim=16")
    assert (
        "model.arch: overrides contradict the weights" in message
        and "num_layers: 4 vs 2" in message
        and "head_dim: 16 vs 32" in message
    )
    # ... and when the weights change under a written config, loading says so, naming both
    from launcher.model.loading import load_model_and_tokenizer

    cfg = load_config(base).cfg
    with pytest.raises(ValueError, match=r"model.arch does not match the weights in .*hidden_size: 128 vs 64"):
        load_model_and_tokenizer(replace(cfg.model, arch=replace(cfg.model.arch, hidden_size=128)))
    # a tunable number is applied to the model, and said so
    model, _ = load_model_and_tokenizer(replace(cfg.model, arch=replace(cfg.model.arch, max_position_embeddings=512)))
    assert model.config.max_position_embeddings == 512


def test_a_path_without_config_json_needs_the_arch_given(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    message = compose_errors("recipe=tiny", "model.source=hf", f"model.path={tmp_path / 'empty'}")
    assert f"cannot read the architecture of '{tmp_path / 'empty'}': {tmp_path / 'empty'} has no config.json" in message
    message = compose_errors("recipe=tiny", "model.source=hf", "model.path=some-org/not-downloaded")
    assert "'some-org/not-downloaded' is not in the local Hugging Face cache" in message
    # a model group that describes its hub id plans without the weights, as before
    from launcher.session import load_config

    assert load_config(["recipe=llama3-8b-full-zero3"]).cfg.model.arch.num_layers == 32


def test_a_model_dir_without_tokenizer_says_so(models: Path) -> None:
    message = compose_errors("recipe=tiny", "model.source=hf", f"model.path={hf_dir('llama', models)}")
    assert "model.tokenizer" in message and "holds no tokenizer" in message


def test_plan_reads_a_model_dir_without_torch(models: Path, tmp_path: Path) -> None:
    model_dir = hf_dir("mixtral", models)
    code = (
        "import sys; from launcher.cli import main; rc = main(sys.argv[1:]); "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(rc or (3 if heavy else 0))"
    )
    argv = [
        "plan",
        "recipe=tiny",
        "model.source=hf",
        f"model.path={model_dir}",
        f"model.tokenizer={asset('tiny-tokenizer')}",
        f"run.dir={tmp_path}",
    ]
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "HEAVY []" in out.stdout
    total = param_counts(ArchConfig(**arch_from_hf_config(json.loads((model_dir / "config.json").read_text())))).total
    assert f"mixtral [hf: {model_dir}] mixtral, {total / 1e3:.3g}K params" in out.stdout


def test_random_source_builds_only_the_llama_layout() -> None:
    message = compose_errors("recipe=tiny", "model.arch.model_type=qwen3")
    assert "model.arch.model_type: model.source=random builds llama, mistral, qwen2, not 'qwen3'" in message


def test_a_hub_id_in_the_local_cache_is_read(models: Path, tmp_path: Path) -> None:
    """A hub id whose config.json is in the local Hugging Face cache plans with its numbers (no network)."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-qwen3" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((hf_dir("qwen3", models) / "config.json").read_text())
    (tmp_path / "hub" / "models--acme--tiny-qwen3" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-qwen3" / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    argv = [
        "plan",
        "recipe=tiny",
        "model.source=hf",
        "model.path=acme/tiny-qwen3",
        f"model.tokenizer={asset('tiny-tokenizer')}",
        f"run.dir={tmp_path / 'r'}",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "launcher", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "tiny-qwen3 [hf: acme/tiny-qwen3] qwen3, 132K params" in out.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(ATTENTION)))
def test_family_packed_flash_kernel_on_gpu(family: str, models: Path) -> None:
    """On a GPU in bf16 a packed batch is one flash varlen call: per family (windows, gemma3's
    alternating layers and query_pre_attn_scalar, head_dim 32) it must agree with plain sdpa on each
    example alone as closely as bf16 sdpa itself does."""
    from transformers import AutoModelForCausalLM

    from launcher.model import attention

    need_gpus(1)
    attention.register()
    model_dir = hf_dir(family, models)
    varlen = (
        AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention.NAME, dtype=torch.bfloat16)
        .cuda()
        .eval()
    )
    plain16 = (
        AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.bfloat16).cuda().eval()
    )
    plain32 = (
        AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).cuda().eval()
    )
    ids, positions, lengths = packed_batch(512)
    ids, positions = ids.cuda(), positions.cuda()
    probe = torch.zeros(1, 4, 8, 32, device="cuda", dtype=torch.bfloat16)
    if not attention.one_kernel(probe, 0.0):
        pytest.skip(f"{torch.cuda.get_device_name()}: no flash varlen kernel (PyTorch {torch.__version__})")
    with torch.no_grad():
        packed = varlen(input_ids=ids, position_ids=positions, use_cache=False).logits[0].float()
        parts = ids.split(lengths, dim=1)
        ref = torch.cat([plain32(input_ids=p, use_cache=False).logits[0] for p in parts])
        bf16 = torch.cat([plain16(input_ids=p, use_cache=False).logits[0].float() for p in parts])
    noise = float((bf16 - ref).abs().max())
    assert float((packed - ref).abs().max()) <= 2 * noise + 1e-3, (family, float((packed - ref).abs().max()), noise)
