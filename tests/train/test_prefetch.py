"""Batches collated ahead in a thread (launcher/train/prefetch.py): the same batches in the same
order, errors raised where the batch was wanted, and a checkpoint's data position is that of the
last batch trained on, not of the ones read ahead."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from helpers import TINY, ftl, step_dir

from launcher.train.checkpoint import TRAINER_STATE
from launcher.train.prefetch import BatchPrefetcher, pinned


def test_prefetcher_hands_over_what_produce_made_in_order() -> None:
    made = iter(range(100))
    threads = set()

    def produce() -> dict[str, torch.Tensor]:
        threads.add(threading.current_thread().name)
        return {"x": torch.tensor([next(made)])}

    batches = BatchPrefetcher(produce, depth=3, pin=False)
    assert not threads, "nothing is read before the first get (a resumed run seeks first)"
    assert [int(batches.get()["x"]) for _ in range(10)] == list(range(10))
    batches.close()
    assert threads == {"ftl-prefetch"}


def test_an_error_in_produce_is_raised_by_get() -> None:
    def produce() -> int:
        raise ValueError("bad row 7")

    batches = BatchPrefetcher(produce, depth=2, pin=False)
    with pytest.raises(ValueError, match="bad row 7"):
        batches.get()
    batches.close()


@pytest.mark.gpu
def test_batches_are_pinned_for_the_gpu_copy() -> None:
    from helpers import need_gpus

    need_gpus(1)
    batch = pinned(({"ids": torch.ones(2, 3)}, (0, 1)))
    assert batch[0]["ids"].is_pinned() and batch[1] == (0, 1)
    batches = BatchPrefetcher(lambda: {"ids": torch.ones(4)}, depth=2, pin=True)
    assert batches.get()["ids"].is_pinned()
    batches.close()


def test_a_checkpoint_records_the_batches_trained_on_not_those_read_ahead(tmp_path) -> None:
    """5 steps × micro-batch 4 × grad_accum 2: the step-5 checkpoint is at sample 40 of the epoch,
    though the prefetch thread has read further."""
    run = tmp_path / "run"
    ftl(
        "train",
        *TINY,
        "train.max_steps=6",
        "train.micro_batch_size=4",
        "train.grad_accum=2",
        "checkpoint.every_steps=5",
        "eval.after_training=false",
        f"run.dir={run}",
    )
    state = json.loads((step_dir(run, 5) / TRAINER_STATE).read_text())
    assert (state["epoch"], state["epoch_samples"]) == (0, 40)
