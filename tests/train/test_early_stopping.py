"""Early stopping on the eval loss (train.early_stopping), the best checkpoint it keeps, the summary
of the best step and the train/eval gap, `ftl export --best`, and a resume that counts on exactly."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import ftl
from safetensors.torch import load_file
from test_trainer_tiny import tiny_config, write_run_config

from launcher.config.schema import CheckpointConfig, EarlyStoppingConfig, FtlConfig
from launcher.rundir import RunPaths
from launcher.train.checkpoint import TRAINER_STATE, checkpoints_dir, list_complete
from launcher.train.early_stop import EarlyStopping, train_eval_gap
from launcher.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

PATIENCE = 3


def overfitting_config(run_dir: Path, patience: int = PATIENCE) -> FtlConfig:
    """8 training conversations at a high learning rate for 200 steps: the held-out loss is lowest
    near step 25 and climbs from there, long before step 200."""
    cfg = tiny_config(run_dir)
    return replace(
        cfg,
        data=replace(cfg.data, max_train_examples=8),
        train=replace(cfg.train, max_steps=200, early_stopping=EarlyStoppingConfig(patience=patience)),
        checkpoint=CheckpointConfig(every_steps=0, keep=1),
        eval=replace(cfg.eval, every_steps=5, max_batches=1),
    )


def test_a_new_best_must_beat_the_best_by_min_delta() -> None:
    watch = EarlyStopping(EarlyStoppingConfig(patience=2, min_delta=0.1))
    assert watch.observe(5, {"loss": 3.0}) and watch.best_step == 5
    assert not watch.observe(10, {"loss": 2.95}) and not watch.stop  # lower, but by less than min_delta
    assert watch.observe(15, {"loss": 2.8}) and watch.evals_since_best == 0
    assert not watch.observe(20, {"loss": 2.8}) and not watch.observe(25, {"loss": 2.9})
    assert watch.stop and watch.best_step == 15
    again = EarlyStopping(EarlyStoppingConfig(patience=2, min_delta=0.1))
    again.restore(json.loads(json.dumps(watch.state())))  # as a checkpoint's trainer state reads it back
    assert again.state() == watch.state() and again.stop


def test_off_by_default_it_tracks_the_best_but_never_stops() -> None:
    watch = EarlyStopping(EarlyStoppingConfig())
    for step, loss in enumerate([3.0, 4.0, 5.0, 6.0, 7.0], start=1):
        watch.observe(step, {"loss": loss})
    assert not watch.on and not watch.stop and watch.best_step == 1 and watch.evals_since_best == 4


def test_the_gap_is_eval_loss_minus_the_mean_train_loss_since_the_last_eval() -> None:
    assert train_eval_gap({"loss": 3.0}, [1.0, 2.0]) == {"train_loss": 1.5, "gap": 1.5}
    assert train_eval_gap({"loss": 3.0}, []) == {}


def test_early_stopping_needs_periodic_eval_exit_2() -> None:
    proc = ftl("plan", "recipe=tiny", "train.early_stopping.patience=2", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "train.early_stopping.patience" in proc.stderr and "eval.every_steps" in proc.stderr


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trainer]:
    run_dir = tmp_path_factory.mktemp("early")
    cfg = overfitting_config(run_dir)
    trainer = Trainer(cfg)
    assert trainer.run() == "completed"
    write_run_config(cfg, RunPaths(run_dir).config)  # as `ftl train` writes it: ftl export reads it
    return run_dir, trainer


def test_a_run_trained_past_its_best_stops_early_and_keeps_the_best(stopped_run: tuple[Path, Trainer]) -> None:
    run_dir, trainer = stopped_run
    evals = json.loads((run_dir / "eval.json").read_text())
    periodic = {v["step"]: v["loss"] for k, v in evals.items() if k.startswith("step_")}
    best = min(periodic, key=lambda s: periodic[s])
    assert trainer.step < 200 and trainer.step == max(periodic) == best + PATIENCE * 5  # 3 evals without improvement
    assert evals["best"]["step"] == best and evals["best"]["loss"] == periodic[best]
    assert evals["best"]["gap"] == pytest.approx(evals["best"]["loss"] - evals["best"]["train_loss"])
    assert evals["after"]["step"] == trainer.step  # the last periodic eval, not run twice
    # keep=1 prunes every checkpoint but the newest, except the best
    assert [step for step, _ in list_complete(run_dir)] == [best, trainer.step]
    state = json.loads((checkpoints_dir(run_dir) / f"step-{trainer.step}" / TRAINER_STATE).read_text())
    assert state["stopped_early"] and state["early_stopping"]["best"]["step"] == best


def test_export_best_exports_the_best_steps_weights(stopped_run: tuple[Path, Trainer], tmp_path: Path) -> None:
    run_dir, trainer = stopped_run
    best = trainer.watch.best_step
    proc = ftl("export", str(run_dir), "--out", str(tmp_path / "default"), timeout=180)
    assert f"the best checkpoint, step {best} of {trainer.step}" in proc.stdout
    exported = load_file(str(tmp_path / "default" / "model.safetensors"))
    saved = load_file(str(checkpoints_dir(run_dir) / f"step-{best}" / "model.safetensors"))
    last = load_file(str(checkpoints_dir(run_dir) / f"step-{trainer.step}" / "model.safetensors"))
    for name, tensor in exported.items():
        assert (tensor == saved[name]).all(), name
    assert any(not (exported[n] == last[n]).all() for n in exported)  # not the last step's weights
    latest = ftl("export", str(run_dir), "--latest", "--out", str(tmp_path / "latest"), timeout=180)
    assert f"step {trainer.step}" in latest.stdout
    exported = load_file(str(tmp_path / "latest" / "model.safetensors"))
    assert all((exported[n] == last[n]).all() for n in exported)


def test_best_takes_a_run_dir(stopped_run: tuple[Path, Trainer]) -> None:
    from launcher.artifacts.export import choose_checkpoint
    from launcher.artifacts.weights import ArtifactInputError

    run_dir, trainer = stopped_run
    last = checkpoints_dir(run_dir) / f"step-{trainer.step}"
    with pytest.raises(ArtifactInputError, match="--best takes a run dir"):
        choose_checkpoint(last, True)
    assert choose_checkpoint(last, None) == last  # a checkpoint dir is exported as given


def test_a_resumed_run_keeps_its_patience_count_and_best(stopped_run: tuple[Path, Trainer], tmp_path: Path) -> None:
    _, reference = stopped_run
    best = reference.watch.best_step
    interrupt_at = best + 2 * 5 + 1  # two evals past the best: the counter is at 2

    def terminate(trainer: Trainer) -> None:
        if trainer.step == interrupt_at:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = overfitting_config(tmp_path)
    assert Trainer(cfg, step_hooks=[terminate]).run() == "stopped"
    resumed = Trainer(cfg)
    assert resumed.step == interrupt_at + 1
    assert resumed.watch.train_losses  # the steps between the last eval and the checkpoint, for the next gap
    assert resumed.watch.evals_since_best == 2 and resumed.watch.best == pytest.approx(reference.watch.best)
    assert resumed.run() == "completed"
    assert resumed.step == reference.step  # stops at the same eval as the run never interrupted
    assert resumed.watch.evals_since_best == reference.watch.evals_since_best == PATIENCE
    assert resumed.watch.best == pytest.approx(reference.watch.best)
    assert resumed.watch.last == pytest.approx(reference.watch.last)
    again = Trainer(cfg)  # stopped early: resuming again has nothing to do
    assert again.start is not None and again.start.verdict.finished and again.run() == "completed"
    assert again.step == reference.step
