"""LoRA and QLoRA: adapters trained under every engine (2 gloo ranks on CPU where distributed)
are saved from the gathered weights, merged exports reproduce base + adapter, QLoRA loads 4-bit
and trains on CPU (an eval in between changes nothing), and settings that cannot work are refused
before anything starts.

GPU-only paths (QLoRA under FSDP2 and ZeRO-3) are marked ``gpu`` and skip, saying why, without CUDA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ftl, metrics, need_gpus

from launcher.eval.metrics import rank_batches
from launcher.model.adapters import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, base_key, split_peft_state_dict
from launcher.train.checkpoint import checkpoints_dir

pytest.importorskip("peft")

# Hydra refuses a key given twice: each test adds what BASE leaves out (peft, steps, checkpoints).
BASE = ["recipe=tiny", "train.lr=1e-2", "eval.after_training=false", "wandb.mode=disabled", "launch.dist_timeout_s=60"]
ADAPTER = ["peft.r=4", "peft.alpha=8", "peft.dropout=0.0"]
LORA = [*BASE, "peft=lora", *ADAPTER, "train.max_steps=3"]
QLORA = [*BASE, "peft=qlora", *ADAPTER, "peft.compute_dtype=fp32"]
TWO_RANKS = ["launch.nproc_per_node=2", "train.micro_batch_size=2"]
ONE_RANK = ["train.micro_batch_size=4"]  # the same 4 sequences per step as 2 ranks × 2
ENGINES = {"single": ONE_RANK, "ddp": TWO_RANKS, "zero2": TWO_RANKS, "zero3": TWO_RANKS, "fsdp": TWO_RANKS}
ENGINE_MODULE = {"single": "single", "ddp": "ddp", "zero2": "deepspeed", "zero3": "deepspeed", "fsdp": "fsdp"}


def last_ckpt(run_dir: Path) -> Path:
    return max(checkpoints_dir(run_dir).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def saved_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(last_ckpt(run_dir) / ADAPTER_DIR / ADAPTER_WEIGHTS))


def checkpoint_lora(run_dir: Path, strategy: str) -> dict[str, torch.Tensor]:
    """The LoRA tensors of the engine's own checkpoint, read offline by its consolidator (an
    independent path: safetensors, DCP shards, ZeRO partitions), under the adapter file's keys."""
    from launcher.engines import engine_class

    full = engine_class(ENGINE_MODULE[strategy]).consolidate_checkpoint(last_ckpt(run_dir))
    _, adapter = split_peft_state_dict(full)
    return {k.replace(".default.", "."): v for k, v in adapter.items()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short LoRA run per engine; built lazily, each at most once per module."""

    class Runs(dict):  # type: ignore[type-arg]
        def __missing__(self, strategy: str) -> Path:
            run_dir = tmp_path_factory.mktemp(f"lora-{strategy}")
            ftl("train", *LORA, *ENGINES[strategy], f"strategy={strategy}", f"run.dir={run_dir}")
            self[strategy] = run_dir
            return run_dir

    return Runs()


# --------------------------------------------------------------------------------------------
# pure


def test_peft_keys_map_back_to_the_base_model() -> None:
    assert (
        base_key("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
        == "model.layers.0.self_attn.q_proj.weight"
    )
    assert base_key("base_model.model.lm_head.original_module.weight") == "lm_head.weight"
    assert base_key("base_model.model.model.norm.weight") == "model.norm.weight"
    for adapter in (
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight",
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight",
        "base_model.model.lm_head.modules_to_save.default.weight",
    ):
        assert base_key(adapter) is None
    base, adapter = split_peft_state_dict(
        {
            "base_model.model.a.base_layer.weight": torch.ones(1),
            "base_model.model.a.lora_A.default.weight": torch.zeros(1),
        }
    )
    assert list(base) == ["a.weight"] and list(adapter) == ["base_model.model.a.lora_A.default.weight"]


@pytest.mark.parametrize(
    "n, batch, world, max_batches", [(10, 4, 2, None), (9, 2, 2, None), (5, 1, 3, None), (40, 8, 2, 3), (3, 4, 2, None)]
)
def test_rank_batches_cover_each_example_once_with_equal_counts(
    n: int, batch: int, world: int, max_batches: Any
) -> None:
    shares = [rank_batches(n, batch, r, world, max_batches) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # every rank runs the same number of forward passes
    seen = sorted(i for share in shares for b in share if b is not None for i in b)
    single = [i for b in rank_batches(n, batch, 0, 1, max_batches) if b is not None for i in b]
    assert seen == single == list(range(len(single)))


def _validate(*overrides: str) -> list[str]:
    from launcher.config.compose import compose
    from launcher.config.validate import validate

    raw, _, errors = compose(["recipe=tiny", *overrides])
    _, more = validate(raw)
    return [str(e) for e in errors + more]


def test_impossible_peft_settings_are_refused_with_the_reason() -> None:
    for strategy in ("single", "ddp", "zero2", "zero3", "fsdp"):
        ranks = "launch.nproc_per_node=1" if strategy == "single" else "launch.nproc_per_node=2"
        assert _validate("peft=lora", f"strategy={strategy}", ranks) == []
        assert _validate("peft=qlora", f"strategy={strategy}", ranks, "train.device=cpu") == []
    assert any("peft.target_modules: is empty" in e for e in _validate("peft=lora", "peft.target_modules=[]"))
    assert any("use it alone" in e for e in _validate("peft=lora", "peft.target_modules=[all-linear,q_proj]"))


def test_bitsandbytes_missing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    assert any("qlora needs bitsandbytes" in e for e in _validate("peft=qlora"))
    assert _validate("peft=lora") == []


def test_an_impossible_setting_exits_2_before_launching(tmp_path: Path) -> None:
    out = ftl("train", *LORA, "peft.target_modules=[]", f"run.dir={tmp_path}", check=False)
    assert out.returncode == 2 and "peft.target_modules: is empty" in out.stderr
    assert "launching" not in out.stderr and not (tmp_path / "metrics.jsonl").exists()


def test_quant_storage_is_the_training_dtype_where_weights_are_sharded() -> None:
    from launcher.config.schema import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, QLoraConfig, SingleStrategy
    from launcher.model.adapters import resolve_quant_storage

    auto = QLoraConfig()
    assert resolve_quant_storage(auto, SingleStrategy(), torch.bfloat16) == torch.uint8
    assert resolve_quant_storage(auto, DDPStrategy(), torch.bfloat16) == torch.uint8
    assert resolve_quant_storage(auto, DeepSpeedStrategy(zero_stage=2), torch.bfloat16) == torch.uint8
    assert resolve_quant_storage(auto, FSDPStrategy(), torch.bfloat16) == torch.bfloat16
    assert resolve_quant_storage(auto, DeepSpeedStrategy(zero_stage=3), torch.bfloat16) == torch.bfloat16
    assert resolve_quant_storage(auto, DeepSpeedStrategy(zero_stage=3), None) == torch.float32
    assert resolve_quant_storage(QLoraConfig(quant_storage="uint8"), FSDPStrategy(), None) == torch.uint8


# --------------------------------------------------------------------------------------------
# LoRA under every engine


@pytest.mark.parametrize("strategy", list(ENGINES))
def test_lora_trains_and_saves_the_gathered_adapter(strategy: str, lora_runs: dict[str, Path]) -> None:
    run_dir = lora_runs[strategy]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] < rows[0]["loss"]
    adapter_dir = last_ckpt(run_dir) / ADAPTER_DIR
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    saved = saved_adapter(run_dir)
    # 2 layers × 7 linear layers (all-linear: q k v o gate up down) × (A, B); none of ZeRO-3's
    # empty placeholders or one rank's FSDP shard.
    assert len(saved) == 28 and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in saved)
    for key, tensor in saved.items():
        assert tensor.dtype == torch.float32 and tensor.numel() > 0
        assert (tensor.shape[0] if ".lora_A." in key else tensor.shape[1]) == 4, (key, tensor.shape)
    assert all(float(t.abs().max()) > 0 for k, t in saved.items() if ".lora_B." in k)  # B starts at 0: it trained
    # Equal to what the engine itself checkpointed, read back by its own offline consolidator.
    engine_copy = checkpoint_lora(run_dir, strategy)
    assert engine_copy.keys() == saved.keys()
    for key in saved:
        assert torch.equal(saved[key], engine_copy[key].float()), key


def test_every_distributed_engine_trains_the_same_adapter(lora_runs: dict[str, Path]) -> None:
    reference = saved_adapter(lora_runs["ddp"])
    for strategy in ("zero2", "zero3", "fsdp"):
        other = saved_adapter(lora_runs[strategy])
        worst = max(float((other[k] - reference[k]).abs().max()) for k in reference)
        assert worst <= 1e-4, (strategy, worst)  # Adam at lr 1e-2 amplifies float-order noise


@pytest.mark.parametrize("strategy", ["single", "zero3", "fsdp"])
def test_merged_export_equals_base_plus_adapter(strategy: str, lora_runs: dict[str, Path], tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from launcher.artifacts.export import export_checkpoint

    run_dir = lora_runs[strategy]
    if strategy == "single":  # the CLI spelling, once
        ftl("export", str(run_dir), "merge_lora=true", "--out", str(tmp_path / "merged"))
    else:
        export_checkpoint(run_dir, tmp_path / "merged", merge_lora=True, log=lambda _: None)
    export_checkpoint(run_dir, tmp_path / "adapter", log=lambda _: None)
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(
        tmp_path / "adapter" / "base"
    )  # a random base is exported beside it
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, reference = merged(ids).logits, adapted(ids).logits
        with adapted.disable_adapter():
            base = adapted(ids).logits
    assert float((logits - reference).abs().max()) <= 1e-4
    assert (
        float((logits - base).abs().max()) > 1e-2
    )  # the adapter changes the model: the comparison above means something


@pytest.mark.parametrize("strategy", ["single", "zero2", "zero3", "fsdp"])
def test_lora_checkpoint_holds_the_adapter_and_names_the_base(strategy: str, lora_runs: dict[str, Path]) -> None:
    """No frozen base weight in a LoRA checkpoint, whatever the engine: the engine's own files hold
    the adapter (and its optimizer state); the trainer state names and hashes the base."""
    from launcher.engines import engine_class

    ckpt = last_ckpt(lora_runs[strategy])
    full = engine_class(ENGINE_MODULE[strategy]).consolidate_checkpoint(ckpt)
    base, adapter = split_peft_state_dict(full)
    assert not base and len(adapter) == 28, sorted(base)[:5]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["base"]["source"] == "random" and len(state["base"]["sha256"]) == 64
    assert state["base"]["dtype"] == "float32"  # recipe=tiny trains in fp32


def test_lora_resume_on_another_base_is_refused(tmp_path: Path) -> None:
    """The same model.path holding other weights (a base re-downloaded, replaced): the adapter
    checkpointed on the first is not continued on it (exit 2, the file named); export refuses it too."""
    from helpers import tiny
    from transformers import AutoTokenizer

    from launcher.artifacts.export import export_checkpoint
    from launcher.artifacts.weights import ArtifactInputError
    from launcher.paths import asset

    tok = AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))
    base = tmp_path / "base"
    tiny(tok, "sdpa").save_pretrained(base)
    tok.save_pretrained(base)
    run_dir = tmp_path / "run"
    run = [*LORA, *ONE_RANK, "strategy=single", "checkpoint.every_steps=2", "model.source=hf", f"model.path={base}"]
    ftl("train", *run, f"run.dir={run_dir}")
    (checkpoints_dir(run_dir) / "step-3" / "COMPLETE").unlink()
    other = tiny(tok, "sdpa")
    with torch.no_grad():
        other.model.norm.weight.mul_(2)
    other.save_pretrained(base)
    out = ftl("train", *run, f"run.dir={run_dir}", check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "adapter trained on another base model" in out.stderr and "model.safetensors" in out.stderr
    assert "Traceback" not in out.stderr
    with pytest.raises(ArtifactInputError, match="another base model"):
        export_checkpoint(run_dir, tmp_path / "merged", merge_lora=True, log=lambda _: None)


@pytest.mark.slow
@pytest.mark.heavy
def test_demo_lora_checkpoint_holds_no_more_than_an_exact_resume_needs() -> None:
    """recipe=demo peft=lora (the real SmolLM2-135M, r=16 on every linear layer) after 30 steps on
    the demo data: the checkpoint, optimizer and trainer state included, is below the raw size of
    what an exact resume needs (fp32 adapter + AdamW's two moments, 12 bytes per trainable
    parameter: the moments are packed) and under 10% of the base model's weight files
    (bench/lora_checkpoint_size.py)."""
    import importlib.util

    from launcher.paths import ROOT

    spec = importlib.util.spec_from_file_location(
        "bench_lora_checkpoint_size", ROOT / "bench" / "lora_checkpoint_size.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sizes = bench.measure(quick=False)
    assert sizes["checkpoint"] < sizes["floor"], sizes
    assert sizes["checkpoint"] < 0.10 * sizes["base"], sizes
    assert sizes["before"] > 5 * sizes["checkpoint"]  # what it replaced: the whole model in every checkpoint


def test_a_lora_checkpoint_holds_its_optimizer_moments_packed(lora_runs: dict[str, Path]) -> None:
    """strategy=single: the AdamW moments of every adapter matrix of MIN_NUMEL values or more are
    packed (launcher/engines/lossless.py) into fewer bytes than raw; the resume below reads them
    back exactly."""
    from launcher.engines.lossless import MIN_NUMEL, PACKED
    from launcher.engines.single import STATE_FILE

    ckpt = checkpoints_dir(lora_runs["single"]) / "step-3"
    state = torch.load(ckpt / STATE_FILE, weights_only=True)["optimizer"]["state"]
    moments = [m[name] for m in state.values() for name in ("exp_avg", "exp_avg_sq")]
    records = [m for m in moments if isinstance(m, dict)]
    assert all(r["packed"] == PACKED for r in records)
    assert all(m.numel() < MIN_NUMEL for m in moments if isinstance(m, torch.Tensor))
    assert len(records) >= len(moments) // 2, (len(records), len(moments))
    raw = sum(4 * math.prod(r["shape"]) for r in records)
    assert sum(r["low"].numel() + r["top"].numel() for r in records) < raw


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["single", "fsdp", "zero3"])
def test_lora_resumes_exactly(strategy: str, lora_runs: dict[str, Path], tmp_path: Path) -> None:
    """A LoRA run stopped after step 2 and resumed from its checkpoint (the adapter and its optimizer
    state; the base rebuilt, not read back) ends with the uninterrupted run's adapter, bit for bit,
    on one process and on 2 FSDP or ZeRO-3 ranks."""
    run = [*LORA, *ENGINES[strategy], f"strategy={strategy}", "checkpoint.every_steps=2", f"run.dir={tmp_path}"]
    ftl("train", *run)
    final, rows = saved_adapter(tmp_path), metrics(tmp_path)
    ckpt3 = checkpoints_dir(tmp_path) / "step-3"
    (ckpt3 / "COMPLETE").unlink()
    out = ftl("train", *run)
    assert "resuming from" in out.stdout
    resumed = saved_adapter(tmp_path)
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    assert metrics(tmp_path)[-1]["loss"] == rows[-1]["loss"]
    assert all(torch.equal(final[k], v) for k, v in saved_adapter(lora_runs[strategy]).items())


# --------------------------------------------------------------------------------------------
# QLoRA


@pytest.mark.heavy  # over a minute on the 2-core VM
def test_qlora_loads_4bit_and_trains_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")

    # 256-token sequences: bitsandbytes' CPU path gets single-token inputs wrong, never these.
    # An eval after step 2 must not change steps 3-4 (bitsandbytes would repack the 4-bit weights
    # for inference in place): the resumed run below, which evaluates nothing first, checks it.
    qlora = [
        *QLORA,
        *ONE_RANK,
        "strategy=single",
        "train.max_steps=4",
        "checkpoint.every_steps=2",
        "eval.every_steps=2",
        "eval.max_batches=1",
        f"run.dir={tmp_path}",
    ]
    ftl("train", *qlora)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    assert not (
        last_ckpt(tmp_path) / "model.safetensors"
    ).exists()  # the adapter is the weights; the 4-bit base is named
    saved = saved_adapter(tmp_path)
    assert len(saved) == 28 and all(t.numel() > 0 for t in saved.values())
    # Resume from step 2: the same last two steps (the 4-bit base is rebuilt, the adapter and
    # optimizer come from the checkpoint).
    ckpt4 = checkpoints_dir(tmp_path) / "step-4"
    (ckpt4 / "COMPLETE").unlink()
    ftl("train", *qlora)
    resumed = metrics(tmp_path)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(rows[2:], resumed[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=1e-5
        )


def test_qlora_model_is_4bit_with_lora_on_every_linear_layer() -> None:
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    from launcher.config.compose import compose
    from launcher.config.validate import validated
    from launcher.train.trainer import build_model

    raw, _, _ = compose(["recipe=tiny", "peft=qlora", "peft.compute_dtype=fp32"])
    torch.manual_seed(0)
    model, _ = build_model(validated(raw), torch.device("cpu"))
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 14  # every linear layer of the 2 decoder layers; lm_head stays full precision
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.slow
@pytest.mark.heavy
def test_qlora_on_two_cpu_ranks_trains_alike_under_every_engine(tmp_path: Path) -> None:
    """The 4-bit base sharded (fsdp and ZeRO-3: fp32 storage), whole on every rank (fsdp with
    uint8 storage, ZeRO-2) or replicated (ddp): the same losses and adapters, with an eval between
    steps."""
    pytest.importorskip("bitsandbytes")
    qlora = [*QLORA, *TWO_RANKS, "train.max_steps=4", "eval.every_steps=2", "eval.max_batches=1"]
    variants = {
        "ddp": ["strategy=ddp"],
        "fsdp": ["strategy=fsdp"],
        "fsdp-uint8": ["strategy=fsdp", "peft.quant_storage=uint8"],
        "zero2": ["strategy=zero2"],
        "zero3": ["strategy=zero3"],
    }
    for name, extra in variants.items():
        ftl("train", *qlora, *extra, f"run.dir={tmp_path / name}")
    reference, ref_adapter = metrics(tmp_path / "ddp"), saved_adapter(tmp_path / "ddp")
    for name in variants:
        for a, b in zip(metrics(tmp_path / name), reference):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(
                b["grad_norm"], rel=1e-4
            ), name
        adapter = saved_adapter(tmp_path / name)
        assert max(float((adapter[k] - ref_adapter[k]).abs().max()) for k in ref_adapter) <= 1e-4, name
    local = {name: metrics(tmp_path / name)[-1]["param_bytes_local"] for name in ("ddp", "fsdp", "zero3")}
    assert local["fsdp"] < 0.6 * local["ddp"] and local["zero3"] < 0.6 * local["ddp"], (
        local
    )  # the 4-bit base is sharded too


# --------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.parametrize(
    "strategy, extra",
    [("fsdp", []), ("fsdp", ["peft.quant_storage=uint8"]), ("zero3", []), ("zero2", [])],
    ids=["fsdp-4bit-sharded-bf16", "fsdp-4bit-whole-uint8", "zero3-4bit-bf16", "zero2"],
)
def test_qlora_trains_sharded_on_two_gpus(strategy: str, extra: list[str], tmp_path: Path) -> None:
    need_gpus(2)
    pytest.importorskip("bitsandbytes")
    ftl(
        "train",
        *BASE,
        "peft=qlora",
        *ADAPTER,
        *extra,
        *TWO_RANKS,
        "train.max_steps=3",
        f"strategy={strategy}",
        "train.device=cuda",
        "train.precision=bf16",
        f"run.dir={tmp_path}",
    )
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)
    saved = saved_adapter(tmp_path)
    assert len(saved) == 28 and all(t.numel() > 0 for t in saved.values())
    assert all(float(t.abs().max()) > 0 for k, t in saved.items() if ".lora_B." in k)


@pytest.mark.gpu
def test_qlora_on_one_gpu_loads_4bit_on_the_device(tmp_path: Path) -> None:
    need_gpus(1)
    pytest.importorskip("bitsandbytes")
    ftl(
        "train",
        *BASE,
        "peft=qlora",
        *ADAPTER,
        *ONE_RANK,
        "train.max_steps=3",
        "strategy=single",
        "train.device=cuda",
        "train.precision=bf16",
        f"run.dir={tmp_path}",
    )
    assert len(saved_adapter(tmp_path)) == 28
