"""`ftl export` writes a model card: README.md with YAML front matter naming the base model, the
data files with their sha256, the recipe and overrides, the metrics at the step and the ftl
version; no secret and no local path of the run in it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from helpers import TINY, ftl

import launcher
from launcher.paths import asset

SECRET = "hf_cardsecret0123456789"


def front_matter(card: Path) -> dict:
    text = card.read_text()
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    assert body.strip().startswith("# ")
    return yaml.safe_load(head)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_export_carries_a_model_card(peft: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ftl(
        "train",
        *TINY,
        f"peft={peft}",
        "train.max_steps=2",
        "eval.max_batches=1",
        f"+launch.env.HF_TOKEN={SECRET}",
        f"run.dir={run_dir}",
    )
    out = tmp_path / "export"
    ftl("export", str(run_dir), "--out", str(out))
    card = out / "README.md"
    text = card.read_text()
    assert SECRET not in text and str(tmp_path) not in text
    meta = front_matter(card)
    assert meta["library_name"] == ("peft" if peft == "lora" else "transformers")
    assert "ftl" in meta["tags"] and meta["base_model"].startswith("random llama")
    info = meta["ftl"]
    assert info["version"] == launcher.__version__ and info["step"] == 2 and info["checkpoint"] == "step-2"
    assert info["recipe"] == "tiny" and "train.max_steps=2" in info["overrides"]
    assert all(SECRET not in o for o in info["overrides"])
    train_file = Path(asset("demo/train.jsonl"))
    want = {"file": "train.jsonl", "sha256": hashlib.sha256(train_file.read_bytes()).hexdigest()}
    assert any(d.get("file") == want["file"] and d["sha256"] == want["sha256"] for d in info["data"]), info["data"]
    assert isinstance(info["metrics"]["train"]["loss"], float)
    assert "perplexity" in str(info["metrics"]["eval_after"]) or info["metrics"]["eval_after"]
    if peft == "lora":
        assert len(info["base_model"]["sha256"]) == 64  # the base its checkpoints recorded
