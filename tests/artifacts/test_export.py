"""`ftl export` in one process: what counts as a run or checkpoint dir, sizes, engine names, and a
single-engine checkpoint of a tied-embedding model exported in bf16 and read back by transformers.
(fsdp and the CLI end to end: tests/test_engines_distributed.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.artifacts.export import export_checkpoint, parse_size
from launcher.artifacts.weights import ArtifactInputError, resolve_source
from launcher.rundir.resume import engine_name
from launcher.train.checkpoint import MARKER, TrainerState, save_checkpoint


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("100kb") == 100_000
    assert parse_size("1024") == 1024
    for bad in ("", "0GB", "2XB", "-1GB", "1.5GB"):
        with pytest.raises(ArtifactInputError, match="max-shard-size"):
            parse_size(bad)


def test_engine_name() -> None:
    assert [engine_name(n) for n in ("FSDPEngine", "DDPEngine", "SingleEngine", "DeepSpeedEngine", "fsdp")] == [
        "fsdp",
        "ddp",
        "single",
        "deepspeed",
        "fsdp",
    ]


def test_resolve_source_says_what_is_wrong(tmp_path: Path) -> None:
    def error(path: Path) -> str:
        with pytest.raises(ArtifactInputError) as e:
            resolve_source(path)
        return str(e.value)

    assert "no such directory" in error(tmp_path / "missing")
    assert "neither a run dir" in error(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints" / "step-3").mkdir(parents=True)
    (run / "checkpoints" / ".tmp-step-4").mkdir()
    assert "incomplete checkpoint" in error(run / "checkpoints" / "step-3")
    assert "incomplete checkpoint" in error(run / "checkpoints" / ".tmp-step-4")
    (run / "config.yaml").write_text("{}\n")
    assert "no complete checkpoint" in error(run)
    (run / "checkpoints" / "step-3" / MARKER).write_text(
        json.dumps({"step": 3, "world_size": 2, "engine": "FSDPEngine"})
    )
    assert "trainer_state.json does not read back" in error(run), "a checkpoint is checked before it is trusted"
    (run / "checkpoints" / "step-3" / "trainer_state.json").write_text(json.dumps({"step": 3}))
    source = resolve_source(run)
    assert (source.ckpt_dir.name, source.engine, source.step) == ("step-3", "fsdp", 3)
    moved = tmp_path / "elsewhere" / "step-3"
    moved.parent.mkdir()
    (run / "checkpoints" / "step-3").rename(moved)
    assert "--config" in error(moved)
    assert resolve_source(moved, config=run / "config.yaml").config_path == run / "config.yaml"


def test_single_checkpoint_with_tied_embeddings_exports_in_bf16(tmp_path: Path) -> None:
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.config.compose import compose
    from launcher.config.validate import validated
    from launcher.engines.single import SingleEngine
    from launcher.model.loading import load_model_and_tokenizer
    from launcher.runtime.distributed import DistInfo

    run = tmp_path / "run"
    raw, _, errors = compose(["recipe=tiny", "model.arch.tie_embeddings=true", f"run.dir={run}"])
    assert not errors
    cfg = validated(raw)
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(cfg.model)
    engine = SingleEngine(cfg, model, DistInfo(), torch.device("cpu"))
    engine.setup(10)
    save_checkpoint(run, TrainerState(step=1), engine, DistInfo(), keep=2, barrier=lambda: None)

    out = export_checkpoint(run, tmp_path / "hf", max_shard_size="100KB", dtype="bf16", log=lambda _: None)
    with pytest.raises(ArtifactInputError, match="exists"):
        export_checkpoint(run, out, log=lambda _: None)
    export_checkpoint(run, out, overwrite=True, dtype="bf16", max_shard_size="100KB", log=lambda _: None)

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert AutoTokenizer.from_pretrained(out).chat_template
    trained = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name].to(torch.bfloat16)), name
