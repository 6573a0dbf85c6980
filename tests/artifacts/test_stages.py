"""Stages stack: `model.path=` an earlier ftl run (or a PEFT adapter dir) starts the next stage from
the earlier one's weights (a LoRA run: its base with the adapter merged in), planned with the earlier
run's architecture. Tiny model, one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY, ftl, metrics

from launcher.objectives.reference import ReferenceLogps
from launcher.rundir import RunPaths

pytest.importorskip("peft")

SFT = [*TINY, "peft=lora", "peft.r=4", "peft.alpha=8", "peft.dropout=0.0", "train.lr=1e-2", "train.max_steps=3"]
SFT += ["eval.after_training=false"]
DPO = [
    *TINY,
    "objective=dpo",
    "data=demo_preferences",
    "train.seq_len=512",
    "train.max_steps=1",
    "train.warmup_steps=0",
    "eval.after_training=false",
]


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    ftl("train", *SFT, f"run.dir={run_dir}")
    return run_dir


def reference(run_dir: Path) -> dict[str, torch.Tensor]:
    found = ReferenceLogps.load(RunPaths(run_dir).reference_logps)
    assert found is not None
    return {k: v for k, (v, _) in found.splits.items()}


@pytest.mark.heavy
def test_dpo_after_lora_sft_starts_from_the_sft_weights(sft: Path, tmp_path: Path) -> None:
    """DPO (a full fine-tune: its reference log-probs are precomputed) with model.path=<the LoRA SFT
    run> starts from base + merged SFT adapter: its reference
    log-probs (the step-0 model's, computed by the trainer) and its first loss are those of a DPO run
    started from `ftl export --merge-lora` of the SFT run, and not those of one from the base."""
    staged = tmp_path / "staged"
    plan = ftl("plan", *DPO, "model.source=hf", f"model.path={sft}", f"run.dir={staged}")
    assert "from run" in plan.stdout  # the model is named after its start: planned from the SFT run's arch
    ftl("train", *DPO, "model.source=hf", f"model.path={sft}", f"run.dir={staged}")
    merged = tmp_path / "merged"
    ftl("export", str(sft), "merge_lora=true", "--out", str(merged))
    exported = tmp_path / "exported"
    ftl("train", *DPO, "model.source=hf", f"model.path={merged}", f"run.dir={exported}")
    base = tmp_path / "base"
    ftl("train", *DPO, f"run.dir={base}")

    got, want, before = reference(staged), reference(exported), reference(base)
    assert got.keys() == want.keys() == before.keys()
    for split in got:
        assert torch.equal(got[split], want[split]), split
        assert float((got[split] - before[split]).abs().max()) > 1e-2, split  # the SFT adapter changed the model
    assert metrics(staged)[0]["loss"] == metrics(exported)[0]["loss"]
    starts = sorted(staged.glob(f"{RunPaths.START_PREFIX}*"))
    assert len(starts) == 1 and (starts[0] / "config.json").is_file()


def test_an_adapter_dir_starts_a_stage(sft: Path, tmp_path: Path) -> None:
    """A PEFT adapter directory (`ftl export` without merging writes one; a random base is exported
    beside it) starts a stage from its base with the adapter merged in: the same start as the run.
    A LoRA stage after a LoRA stage trains a new adapter on that merged model, and its checkpoints
    name the merged model as their base."""
    from launcher.rundir.resume import read_checkpoint_info

    adapter = tmp_path / "adapter"
    ftl("export", str(sft), "--out", str(adapter))
    one, two = tmp_path / "from-adapter", tmp_path / "from-run"
    lora_next = [*TINY, "peft=lora", "train.max_steps=1", "eval.after_training=false", "model.source=hf"]
    ftl("train", *lora_next, f"model.path={adapter}", f"run.dir={one}")
    ftl("train", *lora_next, f"model.path={sft}", f"run.dir={two}")
    first = metrics(one)[0]["loss"]  # LoRA's B starts at 0: step 1's loss is the start model's
    assert first == pytest.approx(metrics(two)[0]["loss"], rel=1e-6)
    assert first < metrics(sft)[0]["loss"] - 1e-3  # below the base's: the SFT adapter is in it
    start = next(two.glob(f"{RunPaths.START_PREFIX}*"))
    ckpt = max(RunPaths(two).checkpoints.glob("step-*"))
    assert read_checkpoint_info(ckpt).base["path"] == str(start)


def test_a_run_without_a_checkpoint_is_refused_before_launch(tmp_path: Path) -> None:
    from launcher.files import mark_dir

    empty = tmp_path / "empty"
    mark_dir(empty, "run")
    out = ftl("plan", *TINY, "model.source=hf", f"model.path={empty}", check=False)
    assert out.returncode == 2 and "model.path" in out.stderr and "no complete checkpoint" in out.stderr
