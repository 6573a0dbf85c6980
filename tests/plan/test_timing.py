"""The slow phases' arithmetic (launcher/plan/timing.py, memory.checkpoint_bytes): a checkpoint's
bytes against real checkpoints on disk, SLURM time limits, the I/O timeout."""

from __future__ import annotations

import pytest
from helpers import TINY, ftl, step_dir

from launcher.config.validate import load_run_config
from launcher.plan.memory import checkpoint_bytes
from launcher.plan.report import layout_for, workload_of
from launcher.plan.timing import MIN_IO_TIMEOUT_S, io_timeout_s, slurm_time_s
from launcher.session import load_config


@pytest.mark.parametrize(
    "limit,seconds",
    [
        ("30", 1800),
        ("30:15", 1815),
        ("04:00:00", 14400),
        ("2-00", 172800),
        ("1-02:30", 95400),
        ("1-00:00:10", 86410),
        ("x", None),
    ],
)
def test_slurm_time_limits(limit: str, seconds: int | None) -> None:
    assert slurm_time_s(limit) == seconds


def test_io_timeout_is_sized_from_the_model_or_given() -> None:
    assert io_timeout_s(load_config(["recipe=tiny"]).cfg) == MIN_IO_TIMEOUT_S
    big = load_config(["recipe=llama3-70b-full-zero3-multinode"]).cfg
    assert io_timeout_s(big) > 3 * MIN_IO_TIMEOUT_S / 2, (
        "a ~0.85 TB checkpoint converts in more than half an hour at 1 GB/s"
    )
    assert (
        io_timeout_s(load_config(["recipe=llama3-70b-full-zero3-multinode", "launch.io_gb_per_s=100"]).cfg)
        == MIN_IO_TIMEOUT_S
    )
    assert io_timeout_s(load_config(["recipe=tiny", "launch.io_timeout_s=90"]).cfg) == 90


@pytest.mark.parametrize(
    "extra", [["strategy=single"], ["strategy=single", "peft=lora", "train.precision=bf16"]], ids=["full", "lora-bf16"]
)
def test_checkpoint_bytes_match_a_real_checkpoint(extra: list[str], tmp_path) -> None:
    run = tmp_path / "run"
    ftl(
        "train",
        *TINY,
        *extra,
        "train.max_steps=3",
        "checkpoint.every_steps=0",
        "eval.after_training=false",
        f"run.dir={run}",
    )
    # RNG states and JSON files are not counted (next to a tiny LoRA checkpoint they are not small)
    counted = [f for f in step_dir(run, 3).rglob("*") if f.is_file() and f.suffix in (".pt", ".safetensors")]
    on_disk = sum(f.stat().st_size for f in counted if not f.name.startswith("rng-"))
    cfg = load_run_config(run / "config.yaml")
    planned = checkpoint_bytes(workload_of(cfg, cfg.train.precision), layout_for(cfg))
    assert 0.9 * on_disk <= planned <= on_disk, (planned, on_disk)
