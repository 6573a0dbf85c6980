"""The schema's docs: every field has one, `ftl plan --explain` and the did-you-mean of an unknown key
show them, and docs/CONFIG.md is the schema's, regenerated."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

from launcher.config.compose import _schema_paths, compose
from launcher.config.docs import REGENERATE, explain, field_docs
from launcher.config.errors import ConfigErrors
from launcher.config.schema import FtlConfig, SlurmLaunch, TrainConfig
from launcher.config.validate import validate
from launcher.paths import PACKAGE_DIR

CONFIG_MD = PACKAGE_DIR.parent / "docs" / "CONFIG.md"


def doc_of(cls: type, name: str) -> str:
    return next(f.metadata["doc"] for f in fields(cls) if f.name == name)


def test_every_field_has_a_doc():
    undocumented = [d.path for d in field_docs() if not d.doc.strip()]
    assert not undocumented, f"fields with no doc (give them doc=... in launcher/config/schema.py): {undocumented}"


def test_every_key_an_override_can_set_is_documented():
    documented = {d.path for d in field_docs()}
    assert set(_schema_paths(FtlConfig)) <= documented, set(_schema_paths(FtlConfig)) - documented


def test_config_md_is_current():
    out = subprocess.run(
        [sys.executable, "-m", "launcher.config.docs"], capture_output=True, text=True, timeout=60, check=True
    )
    assert CONFIG_MD.read_text() == out.stdout, f"docs/CONFIG.md is stale: regenerate it with `{REGENERATE}`"
    assert all(f"`{d.path}`" in out.stdout for d in field_docs())


def test_explain_a_field_shows_type_default_allowed_and_doc():
    text = explain("train.lr")
    assert text.splitlines()[0] == "train.lr: float, default 2e-05, > 0"
    assert doc_of(TrainConfig, "lr") in text


def test_explain_a_group_lists_each_field():
    text = explain("train")
    assert all(f"train.{f.name}: " in text and f.metadata["doc"] in text for f in fields(TrainConfig))
    assert "model.arch.num_layers: int, default 32, >= 1" in explain("model")


def test_explain_marks_the_variant_a_field_belongs_to():
    assert explain("launch.nodes").startswith("launch.nodes (launch.backend=slurm): int, default 1, >= 1")
    assert doc_of(SlurmLaunch, "socket_ifname") in explain("launch.socket_ifname")
    assert "strategy.engine: str, default single, one of single, ddp, deepspeed, fsdp" in explain("strategy")


def test_explain_takes_a_list_item_as_written():
    assert explain("data.sources[0].weight") == explain("data.sources.weight") == explain("data.sources[].weight")


def test_explain_an_unknown_key_suggests_with_the_doc():
    with pytest.raises(ConfigErrors) as e:
        explain("train.lrr")
    assert "did you mean train.lr" in str(e.value) and doc_of(TrainConfig, "lr") in str(e.value)
    with pytest.raises(ConfigErrors, match="ftl plan --explain` lists the groups"):
        explain("nope.x")


def test_unknown_override_shows_the_suggested_keys_doc():
    _, _, errors = compose(["recipe=tiny", "train.lrr=1"])
    (msg,) = [str(e) for e in errors]
    assert msg.startswith("train.lrr: unknown key; did you mean train.lr") and doc_of(TrainConfig, "lr") in msg


def test_unknown_yaml_key_shows_the_suggested_keys_doc():
    raw, _, _ = compose(["recipe=tiny"])
    raw["train"]["warmup_step"] = 3  # as a recipe file could misspell it
    _, errors = validate(raw)
    (msg,) = [str(e) for e in errors if e.path == "train.warmup_step"]
    assert "did you mean train.warmup_steps" in msg and doc_of(TrainConfig, "warmup_steps") in msg
