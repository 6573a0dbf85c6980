"""No NaN trained on, saved, resumed or exported (launcher/train/finite.py): a run whose loss turns
non-finite stops at that step with exit 1 on every rank and keeps its last good checkpoint; a
checkpoint holding non-finite weights is refused by a resume (exit 2) and by `ftl export` (exit 2);
a micro-batch larger than the data is refused before the first step (exit 2)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import TINY, TWO_RANKS, ftl, metrics, step_dir

from launcher.cli import main as ftl_main
from launcher.files import file_hash

pytestmark = pytest.mark.usefixtures("one_thread")


def diverging(run_dir: Path) -> list[str]:
    """A learning rate of 1e30: step 1 is finite (its loss is taken before any update), step 2 is NaN."""
    return [
        "train",
        *TINY,
        "train.lr=1e30",
        "train.max_steps=6",
        "checkpoint.every_steps=1",
        "eval.after_training=false",
        f"run.dir={run_dir}",
    ]


@pytest.fixture(scope="module")
def diverged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("nan") / "run"
    proc = ftl(*diverging(run_dir), *TWO_RANKS, "strategy=ddp", check=False)
    assert proc.returncode == 1, proc.stderr[-4000:]
    return run_dir, proc.stderr


def test_a_nan_loss_stops_every_rank_at_that_step_with_exit_1_and_saves_nothing_of_it(
    diverged: tuple[Path, str],
) -> None:
    run_dir, err = diverged
    lines = [line for line in err.splitlines() if "training diverged" in line]
    assert lines == [
        f"ftl: training diverged at step 2 (loss nan, grad_norm nan); stopped without saving that state; the last good "
        f"checkpoint, {step_dir(run_dir, 1)}, stays the resume point. Lower train.lr or raise train.warmup_steps, "
        "or check the objective's settings (objective.beta) and the data"
    ], err[-3000:]  # once: rank 0 says it, both ranks stop
    assert "interrupted" not in err and sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest",
        "step-1",
    ]
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2] and math.isnan(metrics(run_dir)[-1]["loss"])


def plant_nan(ckpt: Path) -> str:
    """One weight of a saved checkpoint set to NaN, its marker updated to vouch for it: a checkpoint
    written before ftl checked. Returns the tensor's name."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = ckpt / "model.safetensors"
    state = load_file(str(weights))
    name = sorted(state)[len(state) // 2]
    state[name][0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    marker = json.loads((ckpt / "COMPLETE").read_text())
    marker["files"]["model.safetensors"], marker["sha256"]["model.safetensors"] = (
        weights.stat().st_size,
        file_hash(weights),
    )
    (ckpt / "COMPLETE").write_text(json.dumps(marker))
    assert not bool(torch.isfinite(load_file(str(weights))[name]).all())
    return name


def test_a_checkpoint_with_non_finite_weights_is_refused_by_resume_and_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    ftl(*diverging(run_dir), "train.lr=3e-3", "train.max_steps=1")
    ckpt = step_dir(run_dir, 1)
    name = plant_nan(ckpt)
    proc = ftl(*diverging(run_dir), "train.lr=3e-3", "train.max_steps=2", check=False)
    assert proc.returncode == 2 and f"checkpoint {ckpt} holds non-finite weights (" in proc.stderr, proc.stderr[-3000:]
    assert not step_dir(run_dir, 2).exists()
    code = ftl_main(["export", str(ckpt), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"checkpoint {ckpt} holds non-finite weights (NaN or inf, first in {name})" in err, err
    assert not (tmp_path / "out").exists()


def test_a_micro_batch_larger_than_the_data_is_refused_before_the_first_step(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from test_trainer_tiny import tiny_config

    from launcher.train.entry import train

    cfg = tiny_config(tmp_path / "run")
    cfg = replace(cfg, train=replace(cfg.train, micro_batch_size=1000))
    assert train(cfg) == 2
    err = capfd.readouterr().err
    assert (
        "train.micro_batch_size: 1000 is larger than the training data: 320 examples give each of 1 rank(s) 320; allowed: 1 to 320"
        in err
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_absurd_dpo_beta_stops_at_its_first_non_finite_step_with_exit_1(tmp_path: Path) -> None:
    """objective.beta=1e308 (issue 34): β times a log-ratio overflows; the run stops at step 1, the
    step its gradient norm turns NaN (the loss itself is log 2 there), instead of training on."""
    run_dir = tmp_path / "run"
    proc = ftl(
        "train",
        *TINY,
        "objective=dpo",
        "data=demo_preferences",
        "objective.beta=1e308",
        "train.seq_len=512",
        "train.max_steps=4",
        "checkpoint.every_steps=1",
        "eval.after_training=false",
        "eval.retain.enabled=false",
        f"run.dir={run_dir}",
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "ftl: training diverged at step 1 (grad_norm nan); stopped without saving that state; no checkpoint" in (
        proc.stderr
    ), proc.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    assert [r["step"] for r in metrics(run_dir)] == [1] and math.isnan(metrics(run_dir)[0]["grad_norm"])
