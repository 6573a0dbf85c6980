"""End to end on CPU with the tiny random Llama (fp32): train, checkpoint, get killed, resume
exactly; metrics, loss curve, W&B offline with no secret leaked, signals, the per-rank entry."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import metrics, wandb_offline_attempts
from safetensors.torch import load_file

from launcher.config.schema import (
    ArchConfig,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    FtlConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    WandbConfig,
)
from launcher.paths import ROOT, asset
from launcher.rundir import RunPaths
from launcher.train.checkpoint import MARKER, checkpoints_dir, list_complete
from launcher.train.telemetry import STEP_FIELDS
from launcher.train.trainer import Trainer

FAKE_KEY = "f4ke0api0key0" + "x" * 27  # 40 characters, like a real W&B key


def tiny_config(run_dir: Path, **sections: Any) -> FtlConfig:
    """recipes/tiny.yaml composed by hand (conf/model/tiny-llama + conf/data/demo + the recipe)."""
    cfg = FtlConfig(
        model=ModelConfig(
            name="tiny-llama",
            source="random",
            tokenizer=asset("tiny-tokenizer"),
            arch=ArchConfig(
                vocab_size=512,
                hidden_size=64,
                intermediate_size=128,
                num_layers=2,
                num_heads=4,
                num_kv_heads=2,
                max_position_embeddings=1024,
            ),
        ),
        data=DataConfig(train_files=[asset("demo/train.jsonl")], eval_files=[asset("demo/eval.jsonl")]),
        train=TrainConfig(lr=3e-3, warmup_steps=2, max_steps=20, micro_batch_size=4, seq_len=256, precision="fp32"),
        checkpoint=CheckpointConfig(every_steps=10, keep=2),
        eval=EvalConfig(batch_size=8, max_batches=2, generate=False),
        wandb=WandbConfig(mode="disabled"),
        run=RunConfig(name="tiny", dir=str(run_dir)),
        recipe="tiny",
    )
    return replace(cfg, **sections)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoints_dir(run_dir) / "step-20" / "model.safetensors"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    assert Trainer(tiny_config(run_dir)).run() == "completed"
    return run_dir


def test_loss_falls_and_artifacts_exist(reference_run: Path) -> None:
    rows = metrics(reference_run)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(set(STEP_FIELDS) <= set(r) for r in rows)
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 for r in rows)
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert (reference_run / "loss_curve.png").stat().st_size > 1000
    assert [step for step, _ in list_complete(reference_run)] == [10, 20]
    evals = json.loads((reference_run / "eval.json").read_text())
    assert evals["after"]["step"] == 20 and evals["after"]["perplexity"] > 1


def test_grad_accum_matches_a_bigger_batch(tmp_path: Path) -> None:
    """Loss normalised by the window's label tokens: 2 micro-batches of 2 step like one batch of 4."""
    weights = []
    for name, micro, accum in (("big", 4, 1), ("accum", 2, 2)):
        train = replace(tiny_config(tmp_path).train, max_steps=3, micro_batch_size=micro, grad_accum=accum)
        cfg = tiny_config(
            tmp_path / name,
            train=train,
            checkpoint=CheckpointConfig(every_steps=0),
            eval=EvalConfig(after_training=False),
        )
        trainer = Trainer(cfg)
        trainer.run()
        weights.append(trainer.engine.consolidated_state_dict())
    assert max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0]) < 1e-5


KILL_DRIVER = """
import os, pickle, signal, sys
from launcher.train.trainer import Trainer

def kill_after_12(trainer):
    if trainer.step == 12:
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: like the OOM killer

with open(sys.argv[1], "rb") as f:
    cfg = pickle.load(f)
Trainer(cfg, step_hooks=[kill_after_12]).run()
"""


def test_killed_run_resumes_exactly_with_same_wandb_run(
    reference_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    # The secret is in the environment and in launch.env; neither may reach a file in the run dir.
    cfg = tiny_config(run_dir, wandb=WandbConfig(mode="offline", project="ftl-test"))
    cfg = replace(cfg, launch=replace(cfg.launch, env={"WANDB_API_KEY": FAKE_KEY}))
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    env = {**os.environ, "WANDB_API_KEY": FAKE_KEY, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DRIVER, str(tmp_path / "cfg.pkl")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [step for step, _ in list_complete(run_dir)] == [10]
    assert max(r["step"] for r in metrics(run_dir)) == 12

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = Trainer(cfg)
    assert trainer.step == 10 and trainer.resumed_from == checkpoints_dir(run_dir) / "step-10"
    assert trainer.run() == "completed"

    reference, resumed = final_weights(reference_run), final_weights(run_dir)
    assert resumed.keys() == reference.keys()
    worst = max(float((resumed[k] - reference[k]).abs().max()) for k in reference)
    assert worst <= 1e-6, worst
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 21))  # the killed attempt's 11-12 replaced
    assert [r["loss"] for r in metrics(run_dir)] == pytest.approx([r["loss"] for r in metrics(reference_run)], abs=1e-5)

    run_id = RunPaths(run_dir).wandb_id.read_text().strip()
    assert len(wandb_offline_attempts(run_dir, run_id)) == 2
    leaks = [p for p in run_dir.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == []


def test_sigterm_finishes_the_step_saves_and_stops(tmp_path: Path) -> None:
    def terminate_at_5(trainer: Trainer) -> None:
        if trainer.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    assert Trainer(tiny_config(tmp_path), step_hooks=[terminate_at_5]).run() == "stopped"
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored
    assert [step for step, _ in list_complete(tmp_path)] == [6]  # the step in flight completes first
    assert json.loads((checkpoints_dir(tmp_path) / "step-6" / MARKER).read_text())["step"] == 6
    assert not (tmp_path / "eval.json").exists()  # no after-training eval on a stop


def write_run_config(cfg: FtlConfig, path: Path) -> Path:
    from dataclasses import asdict

    from omegaconf import OmegaConf

    path.write_text(OmegaConf.to_yaml(OmegaConf.create(asdict(cfg))))
    return path


def test_train_entry_runs_a_config_file(tmp_path: Path) -> None:
    from launcher.train.entry import main

    cfg = tiny_config(
        tmp_path,
        train=replace(tiny_config(tmp_path).train, max_steps=3),
        checkpoint=CheckpointConfig(every_steps=0),
        eval=EvalConfig(after_training=False),
    )
    assert main(["--config", str(write_run_config(cfg, tmp_path / "config.yaml"))]) == 0
    assert [step for step, _ in list_complete(tmp_path)] == [3]


def test_train_entry_exits_2_on_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.train.entry import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    cfg = tiny_config(tmp_path, data=DataConfig(train_files=[str(bad)]), eval=EvalConfig(after_training=False))
    assert main(["--config", str(write_run_config(cfg, tmp_path / "config.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "data error" in err and "bad.jsonl, row 2" in err, err


def test_skipped_rows_are_named_and_listed_in_the_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """data.on_error=skip: the count, the first rows with file and reason on stderr; every one in
    the run dir's skipped_rows.txt."""
    good = Path(asset("demo/train.jsonl")).read_text().splitlines()[:16]
    bad = ["{not json", '{"messages": []}', '{"messages": [{"role": "bot", "content": "x"}]}', '{"text": "t"}']
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(good[:8] + bad + good[8:]) + "\n")
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        run_dir,
        data=DataConfig(train_files=[str(data)], on_error="skip"),
        train=replace(tiny_config(run_dir).train, max_steps=1),
        eval=EvalConfig(after_training=False),
    )
    assert Trainer(cfg).run() == "completed"
    err = capsys.readouterr().err
    listed = RunPaths(run_dir).skipped_rows.read_text().splitlines()
    assert [line.split(": ", 1)[0] for line in listed] == [f"{data}, row {n}" for n in (9, 10, 11, 12)]
    assert "invalid JSON" in listed[0] and "empty conversation" in listed[1] and "unknown role 'bot'" in listed[2]
    note = next(line for line in err.splitlines() if "data.on_error=skip skipped" in line)
    assert "skipped 4 row(s)" in note and f"{data}, row 9: invalid JSON" in note and "and 1 more" in note
    assert f"all in {RunPaths(run_dir).skipped_rows}" in note
