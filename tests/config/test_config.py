"""Every shipped recipe and config option composes and validates; bad input is named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launcher.config.compose import compose, recipe_description, recipe_files
from launcher.config.errors import ConfigErrors
from launcher.config.schema import UNIONS, FtlConfig
from launcher.config.topology import global_batch, world_size
from launcher.config.validate import validate
from launcher.paths import CONF_DIR

RECIPES = sorted(recipe_files())


def load(*overrides: str):
    raw, choices, errors = compose(list(overrides))
    cfg, more = validate(raw)
    return raw, cfg, choices, errors + more


def messages(*overrides: str) -> list[str]:
    try:
        return [str(e) for e in load(*overrides)[3]]
    except ConfigErrors as e:
        return [str(x) for x in e.errors]


def test_required_recipes_ship():
    required = {
        "demo",
        "tiny",
        "llama3-8b-full-zero3",
        "llama3-70b-full-zero3-multinode",
        "mistral-7b-lora",
        "qwen2.5-7b-qlora",
    }
    assert required <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_validates(recipe):
    raw, cfg, choices, errors = load(f"recipe={recipe}")
    assert errors == []
    assert choices["recipe"] == recipe and cfg.recipe == recipe
    assert cfg.run.name == recipe
    description, command = recipe_description(recipe_files()[recipe])
    assert description, "each recipe starts with a one-line description"
    assert command.startswith(f"ftl train recipe={recipe}"), "each recipe's header has its exact command"


def test_recipe_values_win_over_base_and_overrides_win_over_recipe():
    _, cfg, _, _ = load("recipe=tiny")
    assert cfg.train.lr == 3e-3 and cfg.model.source == "random"
    _, cfg, choices, _ = load("recipe=tiny", "train.lr=1e-4", "strategy=zero3", "launch.nproc_per_node=2")
    assert cfg.train.lr == 1e-4
    assert choices["strategy"] == "zero3" and cfg.strategy.engine == "deepspeed" and cfg.strategy.zero_stage == 3


def test_hydra_add_and_delete_grammar():
    # `~key` drops a value back to the schema default; `+key=v` on an existing key is refused by Hydra.
    _, cfg, _, errors = load("recipe=tiny", "~train.lr")
    assert errors == [] and cfg.train.lr == 2e-5
    assert any("train.foo" in m for m in messages("recipe=tiny", "+train.foo=1"))


def test_multinode_recipe_arithmetic():
    _, cfg, _, _ = load("recipe=llama3-70b-full-zero3-multinode")
    assert world_size(cfg) == 32
    assert global_batch(cfg) == 1 * 4 * 32


@pytest.mark.parametrize("group", ["model", "data", "strategy", "peft", "launch"])
def test_every_group_option_composes(group):
    options = [p.stem for p in (CONF_DIR / group).glob("*.yaml")]
    assert options
    for option in options:
        extra = ["data.train_files=[x.jsonl]"] if option == "chat_files" else []
        try:
            raw, cfg, choices, errors = load("recipe=tiny", f"{group}={option}", *extra)
        except ConfigErrors as e:  # pragma: no cover - shows the errors
            pytest.fail(f"{group}={option}: {e}")
        assert choices[group] == option
        # Only cross-field complaints are acceptable here (e.g. a 70B model's seq_len), never types.
        assert not [e for e in errors if "expected" in e.message or "unknown key" in e.message], errors


@pytest.mark.parametrize("group", sorted(UNIONS))
def test_union_options_bind_with_omegaconf_typed_merge(group):
    """A second opinion: OmegaConf's own typed merge accepts every shipped option file."""
    key, variants = UNIONS[group]
    for path in (CONF_DIR / group).glob("*.yaml"):
        node = OmegaConf.load(path)
        OmegaConf.merge(OmegaConf.structured(variants[node[key]]), node)


def test_base_config_binds_with_omegaconf_typed_merge():
    base = OmegaConf.load(CONF_DIR / "config.yaml")
    del base["defaults"]
    OmegaConf.merge(OmegaConf.structured(FtlConfig), base)


# ---------------------------------------------------------------------------- bad input


def test_bad_type_names_field_and_expected_type():
    (msg,) = messages("recipe=tiny", "train.lr=abc")
    assert msg.startswith("train.lr:") and "number" in msg and "'abc'" in msg


def test_unknown_key_suggests_closest():
    (msg,) = messages("recipe=tiny", "train.lrr=1")
    assert msg.startswith("train.lrr:") and "train.lr" in msg


def test_unknown_recipe_lists_recipes():
    (msg,) = messages("recipe=nope")
    assert "nope" in msg and all(r in msg for r in RECIPES)


def test_unknown_group_option_lists_options():
    (msg,) = messages("strategy=zero4")
    assert "zero3" in msg and "fsdp" in msg


def test_every_error_reported_at_once():
    msgs = messages(
        "recipe=tiny",
        "train.lr=abc",
        "train.lrr=1",
        "train.precision=fp8",
        "train.micro_batch_size=0",
        "strategy.activation_checkpointing=maybe",
    )
    paths = {m.split(":")[0] for m in msgs}
    assert {
        "train.lr",
        "train.lrr",
        "train.precision",
        "train.micro_batch_size",
        "strategy.activation_checkpointing",
    } <= paths
    assert any("allowed: auto, fp32, bf16, fp16" in m for m in msgs)


def test_choice_and_range_messages():
    assert any("allowed: 0, 1, 2, 3" in m for m in messages("recipe=tiny", "strategy=zero2", "strategy.zero_stage=5"))
    assert any(">= 1" in m for m in messages("recipe=tiny", "train.grad_accum=0"))


@pytest.mark.parametrize(
    "overrides, path, fragment",
    [
        (["launch.nproc_per_node=2"], "strategy", "world size 2"),
        (
            ["strategy=zero3", "launch.nproc_per_node=2", "train.global_batch_size=10"],
            "train.global_batch_size",
            "4 × grad_accum 1 × data-parallel size 2 = 8",
        ),
        (
            ["strategy=zero3", "launch.nproc_per_node=2", "train.global_batch_size=16"],
            "train.global_batch_size",
            "set train.grad_accum=2",
        ),
        (["strategy=zero2", "strategy.offload_params=true"], "strategy.offload_params", "zero_stage 3"),
        (["strategy=fsdp", "strategy.hybrid_shard=true"], "strategy.hybrid_shard", "2+ nodes"),
        (
            ["strategy=fsdp", "strategy.reduce_dtype=bf16", "train.precision=fp32"],
            "strategy.reduce_dtype",
            "trains in fp32",
        ),
        (
            ["strategy=zero2", "strategy.reduce_dtype=bf16", "train.precision=auto", "train.device=cpu"],
            "strategy.reduce_dtype",
            "train.precision=auto trains in fp32",
        ),
        (["strategy=fsdp", "strategy.reduce_dtype=fp16"], "strategy.reduce_dtype", "allowed: fp32, bf16"),
        (["train.precision=fp16", "train.device=cpu"], "train.precision", "GPU"),
        (["train.seq_len=4096"], "train.seq_len", "max_position_embeddings"),
        (["data.train_files=[/nonexistent/train.jsonl]"], "data.train_files[0]", "file not found"),
        (["launch=torchrun", "launch.rdzv_endpoint=nohost.invalid:29500"], "launch.rdzv_endpoint", "does not resolve"),
        (["launch=torchrun", "launch.rdzv_endpoint=localhost"], "launch.rdzv_endpoint", "HOST:PORT"),
        (["launch=torchrun", "launch.nnodes=2", "launch.node_rank=2"], "launch.node_rank", "< launch.nnodes"),
        (["checkpoint.resume=/nonexistent"], "checkpoint.resume", "auto, never"),
        (["data.eval_files=[]"], "eval", "no eval data"),
        (["model.arch.num_kv_heads=3"], "model.arch.num_kv_heads", "does not divide"),
        (["strategy=zero3", "launch.nproc_per_node=2", "train.compile=true"], "train.compile", "ZeRO-3"),
        (
            ["strategy.activation_offloading=true", "train.device=cpu"],
            "strategy.activation_offloading",
            "train.device=cpu",
        ),
        (["train.loss=liger", "train.device=cpu"], "train.loss", "CUDA"),
        (["train.loss=fused"], "train.loss", "allowed: chunked, logits, liger"),
        (["data.privacy=hide"], "data.privacy", "allowed: warn, refuse, redact, off"),
        (["eval.judge.path=/nonexistent/judge"], "eval.judge.path", "no such directory"),
        (["eval.judge.path=/", "eval.generate=false"], "eval.judge.path", "needs eval.generate=true"),
    ],
)
def test_impossible_combinations(overrides, path, fragment):
    msgs = messages("recipe=tiny", *overrides)
    hits = [m for m in msgs if m.startswith(path + ":")]
    assert hits and fragment in hits[0], msgs


def test_demo_data_asset_paths_resolve():
    _, cfg, _, _ = load("recipe=demo")
    assert all(Path(f).is_file() for f in cfg.data.train_files + cfg.data.eval_files)
