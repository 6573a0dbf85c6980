"""What a run dir's checkpoint can continue (launcher/rundir/resume.py): the verdict as pure
arithmetic on configs, `ftl train` refusing before anything is written or launched, a finished run
doing nothing, `checkpoint.resume=never` starting over, and resuming across engines with the
weights carried over (the step-5 loss after the switch is the step-5 loss of the same run
continued on its own engine: same weights, same batch)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import TINY, TWO_RANKS, ftl, metrics, step_dir

from launcher.config.schema import (
    CheckpointConfig,
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    FtlConfig,
    LoraConfig,
    TrainConfig,
)
from launcher.rundir.resume import (
    CheckpointInfo,
    checkpoint_format,
    list_complete,
    read_checkpoint_info,
    resume_verdict,
    set_aside_earlier_run,
    total_steps,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------------------------
# the verdict, pure


def as_dict(cfg: FtlConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def base_config(**train: Any) -> FtlConfig:
    return FtlConfig(train=TrainConfig(max_steps=20, **train))


def info(cfg: FtlConfig, step: int = 10, total: int = 20, samples: int = 320, world: int = 1) -> CheckpointInfo:
    return CheckpointInfo(
        Path("/r/checkpoints") / f"step-{step}", step, world, cfg.strategy.engine, total, samples, as_dict(cfg)
    )


def test_same_config_resumes_exactly() -> None:
    cfg = base_config()
    verdict = resume_verdict(info(cfg), as_dict(cfg), 1)
    assert not verdict.refused and verdict.cross_engine is None and not verdict.finished and verdict.total_steps == 20


@pytest.mark.parametrize(
    "change, key",
    [
        ({"model": {"arch": {"hidden_size": 128}}}, "model.arch"),
        ({"data": {"packing": True}}, "data.packing"),
        ({"data": {"train_files": ["/elsewhere.jsonl"]}}, "data.train_files"),
        ({"train": {"seq_len": 512}}, "train.seq_len"),
        ({"peft": {"method": "lora"}}, "peft.method"),
    ],
)
def test_what_the_weights_or_data_position_cannot_follow_is_refused(change: dict[str, Any], key: str) -> None:
    old = base_config()
    new = as_dict(old)
    for section, values in change.items():
        for k, v in values.items():
            new[section][k] = {**new[section][k], **v} if isinstance(v, dict) else v
    verdict = resume_verdict(info(old), new, 1)
    assert verdict.refused and [e.path for e in verdict.errors] == [key]


def test_settings_that_do_not_change_weights_or_data_resume() -> None:
    old = base_config()
    new = base_config(lr=1e-3, micro_batch_size=8, grad_accum=2, warmup_steps=3)
    new.eval.max_batches = 3
    new.data.eval_files = ["/my/eval.jsonl"]
    new.launch.nproc_per_node = 2
    verdict = resume_verdict(info(old), as_dict(new), 2)
    assert not verdict.refused and verdict.cross_engine is None


def test_asset_paths_compare_equal_from_any_checkout() -> None:
    old, new = base_config(), base_config()
    old.data.train_files = ["/old/clone/launcher/assets/demo/train.jsonl"]
    new.data.train_files = ["/new/clone/launcher/assets/demo/train.jsonl"]
    assert not resume_verdict(info(old), as_dict(new), 1).refused


def test_a_run_shorter_than_the_checkpoint_is_refused_naming_the_field() -> None:
    cfg = base_config()
    verdict = resume_verdict(
        info(cfg, step=10), as_dict(base_config()) | {"train": {**as_dict(cfg)["train"], "max_steps": 4}}, 1
    )
    assert [e.path for e in verdict.errors] == ["train.max_steps"]
    assert "4 is below checkpoint step 10" in str(verdict.errors[0])


def test_run_length_by_epochs_follows_samples_world_and_batch() -> None:
    cfg = as_dict(FtlConfig(train=TrainConfig(max_steps=-1, epochs=3, micro_batch_size=2, grad_accum=1)))
    assert total_steps(cfg, 56, 1) == 84  # the demo: 56 packs, 2 per step, 3 epochs
    assert total_steps(cfg, 56, 2) == 42
    assert total_steps(cfg, 0, 1) is None  # an older checkpoint that did not record its samples


def test_finished_only_when_evaluated_or_no_eval_is_asked() -> None:
    cfg = base_config()
    assert resume_verdict(info(cfg, step=20), as_dict(cfg), 1, evaluated=True).finished
    assert not resume_verdict(
        info(cfg, step=20), as_dict(cfg), 1, evaluated=False
    ).finished  # the eval after is still to do
    cfg.eval.after_training = False
    assert resume_verdict(info(cfg, step=20), as_dict(cfg), 1).finished


def test_checkpoint_formats() -> None:
    single, ddp = base_config(), replace(base_config(), strategy=DDPStrategy())
    assert checkpoint_format(as_dict(single)) == checkpoint_format(as_dict(ddp))  # one format: no conversion
    fsdp = replace(base_config(), strategy=FSDPStrategy())
    zero2, zero3 = (replace(base_config(), strategy=DeepSpeedStrategy(zero_stage=s)) for s in (2, 3))
    verdict = resume_verdict(info(single), as_dict(fsdp), 1)
    assert not verdict.refused and verdict.cross_engine == ("single/ddp", "fsdp")
    assert resume_verdict(info(zero2), as_dict(zero3), 2).cross_engine == (
        "deepspeed ZeRO-2, precision auto",
        "deepspeed ZeRO-3, precision auto",
    )


# --------------------------------------------------------------------------------------------
# ftl train, end to end on the tiny model


def run_cmd(run_dir: Path, *more: str) -> list[str]:
    return ["train", *TINY, f"run.dir={run_dir}", "checkpoint.every_steps=2", *more]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("four") / "run"
    ftl(*run_cmd(run_dir, "train.max_steps=4"))
    return run_dir


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_finished_run_says_so_and_does_nothing(four_steps: Path) -> None:
    before = snapshot(four_steps)
    proc = ftl(*run_cmd(four_steps, "train.max_steps=4"))
    assert "is complete: step 4 of 4" in proc.stderr and "launching" not in proc.stderr
    assert "not applied" not in proc.stderr  # the same command: nothing differs
    assert snapshot(four_steps) == before


def test_a_finished_run_names_the_changes_it_did_not_apply(four_steps: Path) -> None:
    before = snapshot(four_steps)
    proc = ftl(*run_cmd(four_steps, "train.max_steps=4", "train.lr=1e-3", "train.warmup_steps=1"))
    assert "is complete: step 4 of 4" in proc.stderr and "launching" not in proc.stderr
    named = proc.stderr.split("not applied", 1)[1].split("train longer", 1)[0]
    assert "train.lr: 0.003 -> 0.001" in named and "train.warmup_steps: 2 -> 1" in named, proc.stderr
    assert len(named.strip().splitlines()) == 3, named  # the heading and the two changes, nothing else
    assert "train.max_steps=N with N > 4" in proc.stderr and f"run.dir={four_steps}-2" in proc.stderr
    assert snapshot(four_steps) == before


def test_refusals_come_before_anything_is_written(four_steps: Path) -> None:
    before = snapshot(four_steps)
    for more, needle in (
        (["train.max_steps=2"], "train.max_steps: 2 is below checkpoint step 4"),
        (["model.arch.intermediate_size=64"], "model.arch:"),
        (["peft=lora"], "peft.method: 'none' -> 'lora'"),
        (["data.packing=true"], "data.packing: False -> True"),
    ):
        proc = ftl(*run_cmd(four_steps, "train.max_steps=4", *more), check=False)
        assert proc.returncode == 2, proc.stderr
        assert (
            needle in proc.stderr
            and f"run.dir={four_steps}-2" in proc.stderr
            and "checkpoint.resume=never" in proc.stderr
        ), proc.stderr
        assert "Traceback" not in proc.stderr and "launching" not in proc.stderr
        assert snapshot(four_steps) == before
    plan = ftl("plan", *run_cmd(four_steps, "train.max_steps=2")[1:], check=False)
    assert plan.returncode == 2 and "train.max_steps: 2 is below" in plan.stderr


def test_refusal_hints_keep_the_config_dir_quoted(four_steps: Path, tmp_path: Path) -> None:
    """A pasted hint composes the same options: the --config-dir the command had stays, quoted."""
    import shlex

    conf = tmp_path / "our conf"
    (conf / "model").mkdir(parents=True)
    for command in ("train", "plan"):
        argv = [command, "--config-dir", str(conf), *run_cmd(four_steps, "train.max_steps=2")[1:]]
        proc = ftl(*argv, check=False)
        assert proc.returncode == 2, proc.stderr
        hint = next(ln for ln in proc.stderr.splitlines() if "a new run:" in ln).split("a new run:", 1)[1]
        assert f"--config-dir={conf}" in shlex.split(hint), hint


def lrs(run_dir: Path, steps: range) -> list[float]:
    """The lr each step trained with, from metrics.jsonl (step s: optimizer step s - 1 of lr_at)."""
    by_step = {r["step"]: r["lr"] for r in metrics(run_dir)}
    return [by_step[s] for s in steps]


def test_a_longer_run_follows_its_own_schedule_from_the_first_resumed_step(continued: Path) -> None:
    """train.max_steps 4 -> 6: step 5 trains at the 6-step cosine's lr, not at the floor the
    4-step schedule had reached when the checkpoint was saved."""
    from launcher.runtime.schedule import lr_at

    train = tiny(continued, max_steps=6).train
    assert lrs(continued, range(5, 7)) == pytest.approx([lr_at(s - 1, train, 6) for s in range(5, 7)], rel=1e-12)


def test_a_changed_lr_is_the_lr_trained_with_from_the_resumed_step(four_steps: Path, tmp_path: Path) -> None:
    from launcher.runtime.schedule import lr_at

    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    proc = ftl(
        *run_cmd(run_dir, "train.max_steps=6", "train.lr=1e-3", "train.schedule=linear", "eval.after_training=false")
    )
    assert "train.lr: 0.003 -> 0.001" in proc.stderr  # announced, and applied:
    train = replace(tiny(run_dir, max_steps=6).train, lr=1e-3, schedule="linear")
    assert lrs(run_dir, range(5, 7)) == pytest.approx([lr_at(s - 1, train, 6) for s in range(5, 7)], rel=1e-12)
    assert lrs(run_dir, range(1, 5)) == lrs(four_steps, range(1, 5))


def test_resume_never_moves_the_earlier_checkpoints_aside_first(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ftl(*run_cmd(run_dir, "train.max_steps=4", "eval.after_training=false"))
    proc = ftl(*run_cmd(run_dir, "train.max_steps=2", "eval.after_training=false", "checkpoint.resume=never"))
    assert (
        "the earlier run's checkpoints (step-2, step-4), metrics.jsonl" in proc.stderr
        and "moved the earlier run's checkpoints, metrics.jsonl" in proc.stderr
    )
    assert [s for s, _ in list_complete(run_dir)] == [2]
    (aside,) = run_dir.glob("earlier-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == [
        "latest",
        "step-2",
        "step-4",
    ]  # nothing deleted
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert [r["step"] for r in metrics(aside)] == [1, 2, 3, 4]  # the earlier run's metrics, whole


def test_a_run_started_without_ftl_train_starts_over_the_same_way(
    four_steps: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Your own torchrun, or a requeued job, with checkpoint.resume=never: the trainer moves the
    earlier checkpoints aside too (else the new run's first saves would be pruned in favour of them)."""
    from launcher.train.trainer import Trainer

    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    cfg = tiny(run_dir, max_steps=2)
    trainer = Trainer(replace(cfg, checkpoint=replace(cfg.checkpoint, resume="never", keep=1)))
    assert "moved the earlier run's checkpoints" in capfd.readouterr().err
    assert trainer.step == 0 and list_complete(run_dir) == []
    assert trainer.run() == "completed" and [s for s, _ in list_complete(run_dir)] == [2]


def test_setting_aside_moves_the_whole_checkpoints_dir(tmp_path: Path) -> None:
    for name in ("step-2", "step-4", ".tmp-step-6"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "COMPLETE").write_text("{}")
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    first = set_aside_earlier_run(tmp_path)
    assert first is not None and first[1] == ["checkpoints"]
    assert sorted(p.name for p in (first[0] / "checkpoints").iterdir()) == [
        ".tmp-step-6",
        "notes.txt",
        "step-2",
        "step-4",
    ]
    assert list_complete(tmp_path) == []
    (tmp_path / "checkpoints" / "step-1").mkdir(parents=True)
    second = set_aside_earlier_run(tmp_path)  # the same second: another name, nothing overwritten
    assert second is not None and second[0] != first[0] and first[0].is_dir()


def test_a_checkpoint_records_what_resume_checks(four_steps: Path) -> None:
    ckpt = read_checkpoint_info(step_dir(four_steps, 4))
    assert (ckpt.step, ckpt.total_steps, ckpt.train_samples, ckpt.engine) == (4, 4, 320, "single")
    assert ckpt.config["model"]["arch"]["hidden_size"] == 64 and ckpt.config["run"]["dir"] == str(four_steps)


# --------------------------------------------------------------------------------------------
# across engines


def tiny(run_dir: Path, max_steps: int, **sections: Any) -> FtlConfig:
    """recipe=tiny as `run_cmd` gives it, for a Trainer in this process."""
    from test_trainer_tiny import tiny_config

    cfg = tiny_config(run_dir, **sections)
    return replace(
        cfg,
        train=replace(cfg.train, max_steps=max_steps),
        checkpoint=CheckpointConfig(every_steps=2, keep=2),
        eval=replace(cfg.eval, after_training=False),
    )


def step5_loss(run_dir: Path) -> float:
    return next(r["loss"] for r in metrics(run_dir) if r["step"] == 5)


@pytest.fixture(scope="module")
def continued(four_steps: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four-step run continued to step 6 on its own engine."""
    run_dir = tmp_path_factory.mktemp("continued") / "run"
    shutil.copytree(four_steps, run_dir)
    ftl(*run_cmd(run_dir, "train.max_steps=6", "eval.after_training=false"))
    return run_dir


def test_resume_in_process_on_another_engine_keeps_weights_and_schedule(
    four_steps: Path, tmp_path: Path, continued: Path
) -> None:
    from safetensors.torch import load_file

    from launcher.runtime.schedule import lr_at
    from launcher.train.trainer import Trainer

    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    cfg = tiny(run_dir, max_steps=6, strategy=FSDPStrategy())
    trainer = Trainer(cfg)
    saved = load_file(str(step_dir(four_steps, 4) / "model.safetensors"))
    weights = trainer.engine.consolidated_state_dict()
    assert all((weights[k] == v).all() for k, v in saved.items())
    assert trainer.step == 4 and trainer.engine.lr == pytest.approx(lr_at(4, cfg.train, 6))
    assert not trainer.engine.optimizer.state  # AdamW starts fresh
    assert trainer.run() == "completed"
    assert step5_loss(run_dir) == pytest.approx(step5_loss(continued), abs=1e-6)
    assert (step_dir(run_dir, 6) / "dcp" / ".metadata").is_file()


def test_lora_resumes_on_another_engine_with_its_adapter(tmp_path: Path) -> None:
    from launcher.engines.single import SingleEngine
    from launcher.train.trainer import Trainer

    run_dir = tmp_path / "run"
    assert Trainer(tiny(run_dir, max_steps=2, peft=LoraConfig(r=4, alpha=8.0))).run() == "completed"
    trainer = Trainer(tiny(run_dir, max_steps=3, peft=LoraConfig(r=4, alpha=8.0), strategy=FSDPStrategy()))
    assert trainer.step == 2 and trainer.start is not None and trainer.start.verdict.cross_engine
    adapter = {k: v for k, v in trainer.engine.consolidated_state_dict().items() if "lora_" in k}
    saved = SingleEngine.consolidate_checkpoint(step_dir(run_dir, 2))  # a LoRA checkpoint: the adapter alone
    assert adapter and adapter.keys() == saved.keys() and all((adapter[k] == saved[k]).all() for k in saved)


def continue_on_two_ranks(four_steps: Path, run_dir: Path, strategy: str) -> Any:
    shutil.copytree(four_steps, run_dir)
    return ftl(
        *run_cmd(run_dir, "train.max_steps=6", "eval.after_training=false", f"strategy={strategy}", *TWO_RANKS),
        timeout=600,
    )


@pytest.fixture(scope="module")
def continued_on_two(four_steps: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four-step single-engine run continued on 2 ranks with ddp: the same checkpoint format, so
    an exact resume; 2 ranks draw other batches than 1, so this is the step-5 loss to compare with."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    proc = continue_on_two_ranks(four_steps, run_dir, "ddp")
    assert "resuming across engines" not in proc.stderr
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_the_readme_trap_resumes_across_engines_on_two_ranks(
    strategy: str, four_steps: Path, continued_on_two: Path, tmp_path: Path
) -> None:
    """Issue 17's first trap: `ftl train recipe=tiny`, then the same run with strategy=zero3 on 2
    ranks. It used to crash both ranks; now it continues from the single engine's weights."""
    run_dir = tmp_path / "run"
    proc = continue_on_two_ranks(four_steps, run_dir, strategy)
    assert "resuming across engines" in proc.stderr and "Restarts: the optimizer state" in proc.stderr
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert step5_loss(run_dir) == pytest.approx(step5_loss(continued_on_two), rel=1e-5)
    assert json.loads((step_dir(run_dir, 6) / "COMPLETE").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.heavy  # over a minute on the 2-core VM
def test_zero3_partitioned_at_build_takes_another_engines_weights(four_steps: Path, tmp_path: Path) -> None:
    """model.source=hf on 2 ranks: ZeRO-3 partitions every tensor as the model is built
    (strategy.zero3_init), so the weights from a single-engine checkpoint go in parameter by
    parameter through DeepSpeed's gather (DeepSpeedEngine.load_weights)."""
    model_dir = tmp_path / "model"
    ftl("export", str(four_steps), "--out", str(model_dir))
    hf = ["model.source=hf", f"model.path={model_dir}"]
    base = tmp_path / "base"
    ftl(*run_cmd(base, "train.max_steps=2", "eval.after_training=false", *hf))
    runs = {}
    for strategy in ("ddp", "zero3"):
        runs[strategy] = run_dir = tmp_path / strategy
        shutil.copytree(base, run_dir)
        proc = ftl(
            *run_cmd(
                run_dir, "train.max_steps=3", "eval.after_training=false", f"strategy={strategy}", *hf, *TWO_RANKS
            ),
            timeout=600,
        )
        assert ("resuming across engines" in proc.stderr) == (strategy == "zero3")
    losses = {s: next(r["loss"] for r in metrics(d) if r["step"] == 3) for s, d in runs.items()}
    assert losses["zero3"] == pytest.approx(losses["ddp"], rel=1e-5)
