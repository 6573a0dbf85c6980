"""Local paths resolved once, at composition: a run trained from one directory with relative model
and data paths is evaluated and generated from another; a local model path that is not there is an
error naming it, never a hub lookup."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from helpers import TINY, ftl, ftl_env

from launcher.config.local_paths import MissingLocalPath, hub_or_local, is_local_path, resolve_local_paths
from launcher.paths import asset


def test_hub_ids_stay_and_local_paths_are_told_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exports" / "sft").mkdir(parents=True)
    assert not is_local_path("meta-llama/Meta-Llama-3-8B") and not is_local_path("gpt2")
    assert hub_or_local("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"
    assert hub_or_local("exports/sft") == str(tmp_path / "exports" / "sft")
    for missing in ("exports/dpo", "./model", "runs/a/export", "~/nope-ftl-model"):
        assert is_local_path(missing)
        with pytest.raises(MissingLocalPath, match="no such directory"):
            hub_or_local(missing)


def test_composed_config_holds_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.config.compose import compose

    monkeypatch.chdir(tmp_path)
    raw, _, _ = compose(
        [
            *TINY,
            "data.train_files=[train.jsonl]",
            "data.eval_files=[../elsewhere/eval.jsonl]",
            "+data.sources=[{path: hub:org/set}, {path: more/x.jsonl}]",
            "checkpoint.resume=old/checkpoints/step-5",
            "run.dir=runs/mine",
            "model.tokenizer=tok",  # a hub id: no such folder here
        ]
    )
    assert raw["data"]["train_files"] == [str(tmp_path / "train.jsonl")]
    assert raw["data"]["eval_files"] == [f"{tmp_path}/../elsewhere/eval.jsonl"]  # '..' left to the system
    assert [s["path"] for s in raw["data"]["sources"]] == ["hub:org/set", str(tmp_path / "more" / "x.jsonl")]
    assert raw["checkpoint"]["resume"] == str(tmp_path / "old" / "checkpoints" / "step-5")
    assert raw["run"]["dir"] == str(tmp_path / "runs" / "mine")
    assert raw["model"]["tokenizer"] == "tok"


def test_hf_home_written_as_a_variable_stays() -> None:
    raw = {"launch": {"hf_home": "$SCRATCH/hf"}, "model": {"path": "org/name"}}
    resolve_local_paths(raw)
    assert raw == {"launch": {"hf_home": "$SCRATCH/hf"}, "model": {"path": "org/name"}}


@pytest.fixture
def hub_listener() -> Iterator[tuple[str, list[str]]]:
    """A local stand-in for the hub (HF_ENDPOINT): records every connection made to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    seen: list[str] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            seen.append(conn.recv(200).decode(errors="replace"))
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", seen
    server.close()


def hub_env(endpoint: str) -> dict[str, str]:
    env = ftl_env(HF_ENDPOINT=endpoint)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    return env


def test_missing_relative_model_path_is_named_without_a_hub_lookup(
    tmp_path: Path, hub_listener: tuple[str, list[str]]
) -> None:
    endpoint, seen = hub_listener
    (tmp_path / "exports").mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()  # an adapter whose base was written relative to another directory
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "exports/sft"}))
    start = time.monotonic()
    proc = ftl("generate", str(adapter), "hi", cwd=tmp_path, env=hub_env(endpoint), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert str(tmp_path / "exports" / "sft") in proc.stderr and "never looked up on the hub" in proc.stderr
    plan = ftl(
        "plan", *TINY, "model.source=hf", "model.path=exports/dpo", cwd=tmp_path, env=hub_env(endpoint), check=False
    )
    assert plan.returncode == 2 and "exports/dpo: no such directory" in plan.stderr, plan.stderr
    assert time.monotonic() - start < 60  # both: no 25 s network timeout in either
    assert seen == []


def test_run_with_relative_paths_is_evaluated_and_generated_from_elsewhere(tmp_path: Path) -> None:
    """The reported case: a LoRA run on a local model given as a relative path (as a DPO run on an
    SFT export is), with relative data and run dir; then `ftl eval` and `ftl generate` from another
    directory."""
    from launcher.model.loading import load_model_and_tokenizer
    from launcher.session import load_config

    home, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (home / "exports" / "sft").mkdir(parents=True)
    elsewhere.mkdir()
    model, tokenizer = load_model_and_tokenizer(load_config(["recipe=tiny"]).cfg.model)
    model.save_pretrained(home / "exports" / "sft")
    tokenizer.save_pretrained(home / "exports" / "sft")
    (home / "data").mkdir()
    shutil.copy(asset("demo/train.jsonl"), home / "data" / "train.jsonl")
    shutil.copy(asset("demo/eval.jsonl"), home / "data" / "eval.jsonl")
    ftl(
        "train",
        *TINY,
        "model.source=hf",
        "model.path=exports/sft",
        "peft=lora",
        "peft.r=4",
        "data.train_files=[data/train.jsonl]",
        "data.eval_files=[data/eval.jsonl]",
        "train.max_steps=2",
        "checkpoint.every_steps=2",
        "eval.after_training=false",
        "run.dir=runs/dpo",
        cwd=home,
    )
    run = home / "runs" / "dpo"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["path"] == str(home / "exports" / "sft")
    assert config["data"]["train_files"] == [str(home / "data" / "train.jsonl")]
    adapter_configs = list((run / "checkpoints").glob("step-*/adapter/adapter_config.json"))
    assert adapter_configs
    for file in adapter_configs:
        assert json.loads(file.read_text())["base_model_name_or_path"] == str(home / "exports" / "sft")
    relative_run = os.path.relpath(run, elsewhere)
    env = hub_env("http://127.0.0.1:9")  # nothing listens: a hub lookup would fail the command
    ftl("eval", relative_run, "eval.max_batches=1", "eval.generate=false", cwd=elsewhere, env=env)
    assert list((run / "eval").glob("step-*/eval.json"))
    ftl("generate", relative_run, "hi", "--max-new-tokens", "4", cwd=elsewhere, env=env)  # exit 0, or it fails
