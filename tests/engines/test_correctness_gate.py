"""The correctness gate: every engine trains the same model on the same data to the same numbers.

One process with micro_batch_size 8 against 2 gloo ranks with 4 each (the same 8 sequences per
step), fp32, same seed: the first 5 losses of single, ddp, zero1, zero2, zero3 and fsdp agree to a
relative 1e-4, and so do DDP's, FSDP2's and ZeRO-2's with compiled decoder layers (``train.compile``:
compiled before sharding, their hooks left eager). This holds because the loss is normalised by the label tokens of the whole step on
all ranks, not per rank.
"""

from __future__ import annotations

import re

import pytest
from helpers import TINY, ftl, metrics

STEPS = 5
COMMON = [
    *TINY,
    f"train.max_steps={STEPS}",
    "train.precision=fp32",
    "checkpoint.save_final=false",
    "eval.after_training=false",
    "train.warmup_steps=1",
]
ENGINES = {
    "ddp": ["strategy=ddp"],
    "zero1": ["strategy=zero1"],
    "zero2": ["strategy=zero2"],
    "zero3": ["strategy=zero3"],
    "fsdp": ["strategy=fsdp"],
    "ddp+compile": ["strategy=ddp", "train.compile=true"],
    "fsdp+compile": ["strategy=fsdp", "train.compile=true"],
    "zero2+compile": ["strategy=zero2", "train.compile=true"],
}


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory) -> list[float]:
    run = tmp_path_factory.mktemp("gate") / "single"
    ftl("train", *COMMON, "strategy=single", "train.micro_batch_size=8", f"run.dir={run}")
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == STEPS
    return losses


@pytest.mark.parametrize(
    "engine",
    [pytest.param(e, marks=pytest.mark.heavy) if e == "fsdp+compile" else e for e in sorted(ENGINES)],  # 60-120 s
)
def test_first_losses_match_single_process(engine, single_losses, tmp_path):
    run = tmp_path / engine
    out = ftl(
        "train", *COMMON, *ENGINES[engine], "launch.nproc_per_node=2", "train.micro_batch_size=4", f"run.dir={run}"
    )
    note = re.search(
        r"ftl: step 1 took [0-9.]+ s, compiling the decoder layers included \(train.compile\), "
        r"and setting up the compiler [0-9.]+ s before it",
        out.stdout + out.stderr,
    )
    assert bool(note) == engine.endswith("+compile"), "the first-step note is printed for compiled layers only"
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == STEPS
    for step, (got, want) in enumerate(zip(losses, single_losses), start=1):
        assert abs(got - want) <= 1e-4 * abs(want), f"{engine} step {step}: loss {got} vs single {want}"
    assert losses[-1] < losses[0], "the loss falls"
