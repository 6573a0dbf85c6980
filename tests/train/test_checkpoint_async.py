"""Async checkpoints and their publication (launcher.train.checkpoint.Checkpointer): training goes
on while a save is written, a save is published only once written, a failed write (a full disk
included) fails the run naming the step and leaves the previous checkpoint the resume point; and,
with real processes, a kill during a background write, and a resume on another data-parallel size
that reads each sample exactly once."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import TINY, ftl, ftl_env, metrics, need_gpus, step_dir, worker_pid
from test_checkpoint import make_engine, train_steps

from launcher.config.schema import FSDPStrategy, FtlConfig, TrainConfig
from launcher.engines import build_engine, engine_class
from launcher.engines.base import Engine
from launcher.engines.traits import engine_traits, strategy_named
from launcher.paths import ROOT
from launcher.runtime.distributed import DistInfo
from launcher.train import checkpoint
from launcher.train.checkpoint import (
    MARKER,
    Checkpointer,
    CheckpointWriteError,
    TrainerState,
    checkpoints_dir,
    find_latest,
    resume_checkpoint,
    save_checkpoint,
)
from launcher.train.telemetry import JsonlSink

DIST = DistInfo()
NO_BARRIER = {"barrier": lambda: None}


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp", "zero2"])
def test_the_engines_that_stage_are_those_whose_traits_say_so(strategy: str) -> None:
    """The trainer asks engine_traits, the plan too; the engine's save_staged must agree."""
    traits = engine_traits(strategy_named(strategy))
    staged = engine_class(traits.engine).save_staged is not Engine.save_staged
    assert traits.async_checkpoint == staged == (strategy != "zero2")


@pytest.fixture
def held_publication(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Rank 0's publication (the hashes for the marker) waits until the event is set: a slow disk."""
    release = threading.Event()
    hashes = checkpoint.file_hashes

    def slow(paths: list[Path]) -> list[str]:
        assert release.wait(60)
        return hashes(paths)

    monkeypatch.setattr(checkpoint, "file_hashes", slow)
    yield release
    release.set()


def fsdp_engine(seed: int = 0) -> Engine:
    """strategy=fsdp in one process (no process group): DCP's async save, as on N ranks."""
    torch.manual_seed(seed)
    cfg = FtlConfig(strategy=FSDPStrategy(), train=TrainConfig(lr=1e-2, warmup_steps=1, precision="fp32"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    engine = build_engine(cfg, model, DIST, torch.device("cpu"))
    engine.setup(total_steps=10)
    return engine


@pytest.mark.parametrize("build", [make_engine, fsdp_engine], ids=["single", "fsdp"])
def test_training_goes_on_while_a_save_is_written_and_the_save_holds_the_staged_state(
    tmp_path: Path, held_publication: threading.Event, build: Callable[..., Engine]
) -> None:
    engine = build()
    saver = Checkpointer(tmp_path, engine, DIST, keep=2, background=True, **NO_BARRIER)
    staged = {k: v.clone() for k, v in engine.model.state_dict().items()}
    final = saver.save(TrainerState(step=1))
    root = checkpoints_dir(tmp_path)
    assert (root / ".tmp-step-1").is_dir() and not final.exists(), "returned before the write was published"
    assert json.loads((root / ".tmp-step-1" / "SAVING").read_text())["step"] == 1
    train_steps(engine, 2)  # the weights change while the save is in flight
    assert not final.exists() and find_latest(tmp_path) is None
    held_publication.set()
    saver.wait()
    assert find_latest(tmp_path) == final and (root / "latest").read_text() == "step-1\n"
    assert not (final / "SAVING").exists() and not (root / ".tmp-step-1").exists()
    other = build(seed=5)
    path, state = resume_checkpoint("auto", tmp_path, other, DIST, pytest.fail)
    assert path == final and state.step == 1
    assert all(torch.equal(v, staged[k]) for k, v in other.model.state_dict().items()), "saved what was staged"


def test_the_next_save_waits_for_the_one_in_flight(tmp_path: Path, held_publication: threading.Event) -> None:
    engine = make_engine()
    saver = Checkpointer(tmp_path, engine, DIST, keep=5, background=True, **NO_BARRIER)
    saver.save(TrainerState(step=1))
    second = threading.Thread(target=saver.save, args=(TrainerState(step=2),))
    second.start()
    time.sleep(0.5)
    assert second.is_alive() and not (checkpoints_dir(tmp_path) / ".tmp-step-2").exists(), "two saves in flight"
    held_publication.set()
    second.join(30)
    saver.wait()
    assert [
        p.name for p in (checkpoints_dir(tmp_path) / n for n in ("step-1", "step-2")) if (p / MARKER).is_file()
    ] == [
        "step-1",
        "step-2",
    ]


def enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("background", [True, False])
def test_a_full_disk_fails_at_the_wait_naming_the_step_and_the_previous_checkpoint_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    engine = make_engine()
    saver = Checkpointer(tmp_path, engine, DIST, keep=2, background=background, **NO_BARRIER)
    saver.save(TrainerState(step=2))
    saver.wait()
    monkeypatch.setattr("launcher.engines.single.save_file", enospc)  # the weights file hits a full disk
    with pytest.raises(CheckpointWriteError) as caught:
        saver.save(TrainerState(step=4))
        assert background, "a synchronous save fails at once"
        saver.wait()  # a background write's failure shows at the next wait
    root = checkpoints_dir(tmp_path)
    message = str(caught.value)
    assert f"checkpoint step 4 was not saved in {root}: no space left on device" in message
    assert f"removed the unpublished {root / '.tmp-step-4'} (ftl wrote it)" in message
    assert f"the resume point stays {root / 'step-2'}" in message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2"]
    assert (root / "latest").read_text() == "step-2\n"
    saver.wait()  # reported once: the run is leaving


@pytest.mark.gpu
def test_a_gpu_engine_stages_into_host_memory_that_training_cannot_change(tmp_path: Path) -> None:
    """single on CUDA: the weights staged (pinned host buffers) are what the background write saves."""
    from safetensors.torch import load_file

    need_gpus(1)
    cfg = FtlConfig(train=TrainConfig(lr=1e-2, warmup_steps=1, precision="fp32"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    engine = build_engine(cfg, model, DIST, torch.device("cuda"))
    engine.setup(total_steps=10)
    staged = {k: v.cpu() for k, v in engine.model.state_dict().items()}
    write = engine.save_staged(tmp_path)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(1)
    write()
    saved = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in staged.items())


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs the right to mount: skipped, visibly, where there is none)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> None:
    with pytest.raises(OSError) as caught:
        with open(disk / "filler", "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * (1 << 16))
    assert caught.value.errno == errno.ENOSPC


def test_a_real_full_disk_publishes_nothing_and_keeps_the_previous_checkpoint(small_disk: Path) -> None:
    engine = make_engine()
    save_checkpoint(small_disk, TrainerState(step=1), engine, DIST, keep=2, **NO_BARRIER)
    fill(small_disk)
    with pytest.raises(CheckpointWriteError, match="checkpoint step 2 was not saved in .*: no space left on device"):
        save_checkpoint(small_disk, TrainerState(step=2), engine, DIST, keep=2, **NO_BARRIER)
    root = checkpoints_dir(small_disk)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1"]
    path, state = resume_checkpoint("auto", small_disk, make_engine(), DIST, pytest.fail)
    assert state.step == 1 and path == root / "step-1"


def test_a_run_whose_disk_fills_exits_1_naming_the_checkpoint_dir_and_keeps_the_previous_one(small_disk: Path) -> None:
    """The run dir on a 4 MiB disk: a few checkpoints fit (torch's writer fails mid-file on the next,
    with "unexpected pos", no errno), the run exits 1 naming the step and the dir, and the previous
    checkpoint is the resume point."""
    run_dir = small_disk / "run"
    args = [*TINY, "train.max_steps=10", "checkpoint.every_steps=2", "checkpoint.keep=5", "eval.after_training=false"]
    proc = ftl("train", *args, "eval.retain.enabled=false", f"run.dir={run_dir}", check=False)
    root = checkpoints_dir(run_dir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = re.search(
        rf"ftl: checkpoint step (\d+) was not saved in {re.escape(str(root))}: no space left on device", proc.stderr
    )
    assert failed is not None and int(failed[1]) > 2, proc.stderr[-3000:]
    last = int(failed[1]) - 2
    assert f"the resume point stays {root / f'step-{last}'}" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in root.iterdir()) == sorted(["latest", *(f"step-{k}" for k in range(2, last + 1, 2))])
    assert (root / "latest").read_text() == f"step-{last}\n"
    curve = run_dir / "loss_curve.png"
    assert not curve.exists() or curve.stat().st_size > 0


def test_a_retain_set_too_large_for_the_disk_exits_1_naming_its_file(small_disk: Path) -> None:
    """The base's side of the retain set (the top-k next-token distributions of every retain row,
    some MB for the tiny model) is written before step 1: a full disk there is said, not a traceback."""
    run_dir = small_disk / "run"
    proc = ftl("train", *TINY, "train.max_steps=2", f"run.dir={run_dir}", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (
        f"ftl: {run_dir / 'retain_base.pt'} (the base's side of the retain set) was not written: no space left on device"
        in proc.stderr
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (run_dir / "checkpoints").exists()


def test_torchs_write_error_on_a_full_disk_is_named_so(small_disk: Path, tmp_path: Path) -> None:
    """torch.save reports a full disk as a RuntimeError without the errno: the full filesystem says it."""
    fill(small_disk)
    with pytest.raises(Exception) as caught:
        torch.save(torch.zeros(1 << 16), small_disk / "x.pt")
    assert checkpoint.disk_full(caught.value, small_disk / "x.pt")
    assert not checkpoint.disk_full(RuntimeError(str(caught.value)), tmp_path)
    inner, outer = OSError(errno.ENOSPC, "No space left on device"), RuntimeError("CheckpointException ranks:{0}")
    outer.__cause__ = inner  # DCP wraps each rank's error
    assert checkpoint.disk_full(outer, tmp_path)


def test_the_loss_curve_on_a_full_disk_is_not_left_empty(small_disk: Path, capsys: pytest.CaptureFixture) -> None:
    sink = JsonlSink(small_disk / "metrics.jsonl", 0, small_disk / "loss_curve.png")
    for step in (1, 2, 3):
        sink.log_step(step, {"loss": 3.0 - step / 10})
    fill(small_disk)
    sink.close(0)
    assert not (small_disk / "loss_curve.png").exists()
    assert [p.name for p in small_disk.iterdir() if p.name.endswith(".tmp")] == []
    assert f"ftl: {small_disk / 'loss_curve.png'} not written" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# real processes: a sitecustomize in the child processes holds rank 0's publication, or records
# the samples each rank trains on

HOOKS = textwrap.dedent("""
    import importlib.abc, importlib.util, json, os, sys, time

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in ("launcher.files", "launcher.train.trainer"):
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    def patch(module):
        if module.__name__ == "launcher.files" and os.environ.get("HOLD_SAVE_OF"):
            hashes = module.file_hashes

            def slow(paths):  # rank 0 publishing: a very slow disk for this step's save
                if any(".tmp-step-" + os.environ["HOLD_SAVE_OF"] in p.parts for p in paths):
                    time.sleep(600)
                return hashes(paths)

            module.file_hashes = slow
        if module.__name__ == "launcher.train.trainer" and os.environ.get("RECORD_IDS"):
            take = module.Trainer.next_batch

            def next_batch(self):
                batch = take(self)
                out = os.path.join(os.environ["RECORD_IDS"], f"rank{self.dist.rank}-{os.getpid()}.jsonl")
                with open(out, "a") as f:
                    f.write(json.dumps({"epoch": self.data_position[0], "ids": batch["index"].tolist()}) + "\\n")
                return batch

            module.Trainer.next_batch = next_batch

    sys.meta_path.insert(0, Hook())
""")


def hooked_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOKS)
    return ftl_env(PYTHONPATH=os.pathsep.join([str(hooks), str(ROOT)]), **extra)


@pytest.mark.heavy  # over a minute on the 2-core VM
@pytest.mark.usefixtures("one_thread")
def test_a_rank_killed_during_a_background_write_resumes_from_the_previous_checkpoint(tmp_path: Path) -> None:
    """fsdp on 2 gloo ranks, DCP's async save: step 4's save is held in rank 0's publication while
    training goes on (steps 5 and 6: the step-6 save waits for it); SIGKILL rank 1. Nothing of step 4 is published, step 2 stays the resume point
    (checkpoints/latest says so), and the same command resumes from it and finishes."""
    run_dir = tmp_path / "run"
    args = [
        "train",
        *TINY,
        "launch.nproc_per_node=2",
        "strategy=fsdp",
        "train.max_steps=6",
        "checkpoint.every_steps=2",
        "eval.after_training=false",
        f"run.dir={run_dir}",
    ]
    log = tmp_path / "job.log"
    with open(log, "wb") as out:
        job = subprocess.Popen(
            [sys.executable, "-m", "launcher", *args],
            cwd=ROOT,
            env=hooked_env(tmp_path, HOLD_SAVE_OF="4"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:  # until it has trained on past the held save
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").is_file() or not any(r["step"] >= 6 for r in metrics(run_dir)):
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        os.kill(worker_pid(run_dir / "config.yaml", rank=1), signal.SIGKILL)
        code = job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert code != 0
    root = checkpoints_dir(run_dir)
    assert (root / ".tmp-step-4").is_dir() and not step_dir(run_dir, 4).exists()
    assert find_latest(run_dir) == step_dir(run_dir, 2) and (root / "latest").read_text() == "step-2\n"
    resumed = ftl(*args, timeout=240)
    out = resumed.stdout + resumed.stderr
    assert ".tmp-step-4 in" in out and "a save never published" in out and "resuming from step-2" in out
    assert "removed" in out and ".tmp-step-4, a save that was never published" in out
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 7))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-4", "step-6"]


def consumed(ids_dir: Path) -> list[tuple[int, int]]:
    """(epoch, sample id) of every micro-batch every rank trained on, in all runs."""
    out = []
    for file in ids_dir.glob("*.jsonl"):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            out += [(row["epoch"], i) for i in row["ids"]]
    return out


@pytest.mark.usefixtures("one_thread")
def test_a_resume_on_another_data_parallel_size_reads_each_sample_once(tmp_path: Path) -> None:
    """39 samples (odd), one epoch over three runs of ddp: 2 ranks read 24, 1 rank 3 more (27: a
    global position 2 ranks do not divide), 2 ranks the last 12. Every sample of the epoch is
    trained on exactly once (a per-rank position rescaled would read sample 26 twice and skip one)."""
    ids = tmp_path / "ids"
    ids.mkdir()
    env = hooked_env(tmp_path, RECORD_IDS=str(ids))
    common = [
        "train",
        *TINY,
        "strategy=ddp",
        "data.max_train_examples=39",
        "eval.after_training=false",
        f"run.dir={tmp_path / 'run'}",
    ]
    for ranks, batch, steps in ((2, 4, 3), (1, 3, 4), (2, 3, 6)):  # 2 × 4 × 3 = 24, + 3, + 2 × 3 × 2 = 39
        ftl(
            *common,
            f"launch.nproc_per_node={ranks}",
            f"train.micro_batch_size={batch}",
            f"train.max_steps={steps}",
            env=env,
        )
    seen = consumed(ids)
    assert {epoch for epoch, _ in seen} == {0}
    assert sorted(i for _, i in seen) == list(range(39)), "a sample skipped or read twice"
