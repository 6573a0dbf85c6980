"""Atomic checkpoints: only complete `step-N` dirs count, keep-K pruning, resume resolution, and a
save → load round trip of weights, optimizer, schedule and RNG through the single engine."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.config.schema import FtlConfig, TrainConfig
from launcher.engines import build_engine
from launcher.engines.single import SingleEngine
from launcher.runtime.distributed import DistInfo
from launcher.runtime.schedule import lr_at
from launcher.train.checkpoint import (
    MARKER,
    TrainerState,
    checkpoints_dir,
    find_latest,
    list_complete,
    load_checkpoint,
    prune,
    resolve_resume,
    save_checkpoint,
)

DIST = DistInfo()


def make_engine(seed: int = 0) -> SingleEngine:
    torch.manual_seed(seed)
    cfg = FtlConfig(train=TrainConfig(lr=1e-2, warmup_steps=1, precision="fp32"))
    engine = build_engine(
        cfg, torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), DIST, torch.device("cpu")
    )
    engine.setup(total_steps=10)
    assert isinstance(engine, SingleEngine)
    return engine


def train_steps(engine: SingleEngine, n: int) -> None:
    for _ in range(n):
        engine.backward(engine.model(torch.randn(3, 4)).pow(2).mean())
        engine.step()


def save(run_dir: Path, engine: SingleEngine, step: int, keep: int = 5) -> Path:
    return save_checkpoint(run_dir, TrainerState(step=step, epoch=1, epoch_samples=7), engine, DIST, keep)


def test_save_is_complete_and_leaves_no_tmp(tmp_path: Path) -> None:
    path = save(tmp_path, make_engine(), 3)
    assert path == checkpoints_dir(tmp_path) / "step-3"
    assert json.loads((path / MARKER).read_text())["step"] == 3
    assert {p.name for p in path.iterdir()} >= {
        "model.safetensors",
        "engine_state.pt",
        "trainer_state.json",
        "rng-rank0.pt",
    }
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == ["latest", "step-3"]
    assert (checkpoints_dir(tmp_path) / "latest").read_text() == "step-3\n"


def test_incomplete_checkpoints_are_ignored(tmp_path: Path) -> None:
    engine = make_engine()
    save(tmp_path, engine, 20)
    root = checkpoints_dir(tmp_path)
    (root / ".tmp-step-30").mkdir()  # a job killed while writing
    (root / ".tmp-step-30" / "model.safetensors").write_bytes(b"partial")
    (root / "step-40").mkdir()  # a dir without its marker
    (root / "notes").mkdir()
    assert find_latest(tmp_path) == root / "step-20"
    assert [step for step, _ in list_complete(tmp_path)] == [20]


def test_no_checkpoints(tmp_path: Path) -> None:
    assert find_latest(tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None


def test_keep_prunes_oldest_and_leftovers(tmp_path: Path) -> None:
    engine = make_engine()
    root = checkpoints_dir(tmp_path)
    for step in (1, 2, 3):
        save(tmp_path, engine, step, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2", "step-3"]
    (root / ".tmp-step-9").mkdir()  # a save ftl began (its SAVING marker) and never published
    (root / ".tmp-step-9" / "SAVING").write_text("{}")
    (root / ".tmp-step-10").mkdir()  # not marked as ftl's: left alone, and said
    (root / "step-8").mkdir()
    said: list[str] = []
    save(tmp_path, engine, 4, keep=2)
    prune(tmp_path, 2, warn=said.append)
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-10", "latest", "step-3", "step-4"]
    assert (root / "latest").read_text() == "step-4\n"
    assert said == [
        f"ftl: left {root / '.tmp-step-10'} alone: an unpublished save without ftl's SAVING marker (move it away)"
    ]


def test_resave_same_step_replaces_it(tmp_path: Path) -> None:
    engine = make_engine()
    save(tmp_path, engine, 5)
    train_steps(engine, 1)
    path = save(tmp_path, engine, 5)
    assert find_latest(tmp_path) == path
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == ["latest", "step-5"]


def test_resolve_resume(tmp_path: Path) -> None:
    engine = make_engine()
    for step in (2, 4):
        save(tmp_path, engine, step)
    root = checkpoints_dir(tmp_path)
    assert resolve_resume("auto", tmp_path) == root / "step-4"
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume(str(root / "step-2"), tmp_path) == root / "step-2"
    (root / "step-6").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(root / "step-6"), tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_barrier_hook_brackets_the_save(tmp_path: Path) -> None:
    calls: list[str] = []
    engine = make_engine()
    save_checkpoint(tmp_path, TrainerState(step=1), engine, DIST, keep=1, barrier=lambda: calls.append("barrier"))
    assert len(calls) == 3


def test_round_trip_restores_engine_state_and_rng(tmp_path: Path) -> None:
    engine = make_engine(seed=0)
    train_steps(engine, 3)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = save(tmp_path, engine, 3)
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    saved = {k: v.clone() for k, v in engine.model.state_dict().items()}
    torch.manual_seed(99)
    train_steps(engine, 2)
    continued = {k: v.clone() for k, v in engine.model.state_dict().items()}

    other = make_engine(seed=123)  # other initial weights, a fresh optimizer and schedule
    state = load_checkpoint(path, other, DIST)
    assert state == TrainerState(step=3, epoch=1, epoch_samples=7, world_size=1)
    assert all(torch.equal(v, saved[k]) for k, v in other.model.state_dict().items())
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws
    assert other.scheduler is not None and other.scheduler.last_epoch == 3
    assert other.lr == pytest.approx(lr_at(3, other.cfg.train, 10))
    # Adam's moments came back too: the same two steps land on the same weights, bit for bit.
    torch.manual_seed(99)
    train_steps(other, 2)
    assert all(torch.equal(v, continued[k]) for k, v in other.model.state_dict().items())


def test_a_position_saved_per_rank_reads_as_every_ranks_samples(tmp_path: Path) -> None:
    """A checkpoint written before epoch_samples: 2 ranks had read 5 samples each, 10 in all,
    whatever world size loads it."""
    engine = make_engine()
    path = save_checkpoint(tmp_path, TrainerState(step=4, epoch=0, epoch_samples=0, world_size=2), engine, DIST, keep=1)
    state = json.loads((path / "trainer_state.json").read_text())
    del state["epoch_samples"]
    (path / "trainer_state.json").write_text(json.dumps({**state, "epoch_position": 5}))
    loaded = load_checkpoint(path, engine, DistInfo(rank=0, world_size=1, local_world_size=1))
    assert (loaded.epoch, loaded.epoch_samples) == (0, 10)


@pytest.mark.usefixtures("one_thread")
def test_a_resume_across_engines_checks_the_contents_too(tmp_path: Path) -> None:
    """Another engine's offline reader loads a cross-engine resume: the hashes are checked before it does."""
    from dataclasses import replace

    from test_trainer_tiny import tiny_config

    from launcher.config.schema import FSDPStrategy
    from launcher.train.checkpoint import CheckpointError
    from launcher.train.trainer import Trainer

    cfg = tiny_config(tmp_path / "run")
    cfg = replace(cfg, train=replace(cfg.train, max_steps=1), eval=replace(cfg.eval, after_training=False))
    assert Trainer(cfg).run() == "completed"
    weights = checkpoints_dir(tmp_path / "run") / "step-1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight: the same size, the header intact, only the hash can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step-1 is damaged: model.safetensors does not hold what was saved"):
        Trainer(replace(cfg, train=replace(cfg.train, max_steps=2), strategy=FSDPStrategy()))
