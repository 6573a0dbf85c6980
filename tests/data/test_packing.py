"""Packing: the cross-contamination gate (packed loss and gradients equal the unpacked ones with the
tiny random Llama, fp32), the bin packer, the batch layouts, and resuming mid-epoch on every rank."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from launcher.config.schema import ArchConfig, DataConfig
from launcher.data.build import build_datasets, collate
from launcher.data.packing import (
    collate_packed,
    flattens_packs,
    model_inputs,
    pack_dataset,
    pack_examples,
    pack_lengths,
    packing_efficiency,
)
from launcher.data.types import IGNORE_INDEX
from launcher.model.loss import count_label_tokens, next_token_loss
from launcher.paths import asset
from launcher.runtime.distributed import DistInfo
from launcher.train.trainer import DataOrder

SEQ_LEN = 256


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))


@pytest.fixture(scope="module")
def examples(tok: Any) -> list[dict[str, list[int]]]:
    """40 demo conversations, assistant-only labels: several packs of several examples each."""
    train, _ = build_datasets(
        DataConfig(train_files=[asset("demo/train.jsonl")], max_train_examples=40), tok, SEQ_LEN, 0
    )
    return list(train.examples)


def tiny_llama(tok: Any, attn: str) -> Any:
    """conf/model/tiny-llama.yaml's architecture, randomly initialised."""
    from transformers import AutoModelForCausalLM

    from launcher.model import attention
    from launcher.model.loading import arch_to_hf_config

    attention.register()

    arch = ArchConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(arch_to_hf_config(arch, tok), attn_implementation=attn, dtype=torch.float32)


def loss_and_grads(model: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int, list[torch.Tensor]]:
    """The trainer's loss over several micro-batches: summed token losses over all label tokens."""
    model.zero_grad()
    num_tokens = sum(count_label_tokens(b["labels"]) for b in batches)
    total = 0.0
    for batch in batches:
        loss = next_token_loss(model, model_inputs(batch), batch["labels"]) / num_tokens
        loss.backward()
        total += loss.item()
    return total, num_tokens, [p.grad.clone() for p in model.parameters()]


def pack_dataset_rows(packs: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """Packs as the trainer reads them (with position_ids), from the cache or from memory."""
    from launcher.data.packing import PackedExamples

    return list(PackedExamples(packs))


# --------------------------------------------------------------------------------------------
# the gate


@pytest.mark.parametrize("attn", ["sdpa_varlen", "sdpa", "eager"])
def test_packed_loss_and_grads_equal_unpacked(tok: Any, examples: list[dict[str, list[int]]], attn: str) -> None:
    model = tiny_llama(tok, attn)
    pad = tok.pad_token_id
    unpacked = [collate(examples[i : i + 8], pad) for i in range(0, len(examples), 8)]
    packs = pack_examples(examples, SEQ_LEN)
    assert len(packs) < len(examples) / 2, "the gate must pack several examples per sequence"
    rows = pack_dataset_rows(packs)
    want_loss, want_tokens, want_grads = loss_and_grads(model, unpacked)

    layouts = {
        "one row per pack": [collate(rows[i : i + 4], pad) for i in range(0, len(rows), 4)],
        "flattened (flash-attention layout)": [collate(rows, pad, flatten=True)],
    }
    for name, batches in layouts.items():
        loss, tokens, grads = loss_and_grads(model, batches)
        assert tokens == want_tokens, name
        assert abs(loss - want_loss) <= 1e-5, (name, loss, want_loss)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_the_gate_catches_contamination(tok: Any, examples: list[dict[str, list[int]]]) -> None:
    """Negative controls: without restarting positions, or with a 2-D mask (which makes transformers
    ignore the restarts), examples see each other and the loss moves by far more than the gate's
    tolerance (a random model attends almost uniformly, so the shift is small, yet 10x over)."""
    model = tiny_llama(tok, "sdpa")
    rows = pack_dataset_rows(pack_examples(examples, SEQ_LEN))[:4]
    batch = collate(rows, tok.pad_token_id)
    want, _, _ = loss_and_grads(model, [batch])
    leaky = {
        "2-D mask": {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "position_ids": batch["position_ids"],
        },
        "no restarts": {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
    }
    n = count_label_tokens(batch["labels"])
    for name, inputs in leaky.items():
        with torch.no_grad():
            loss = float(next_token_loss(model, inputs, batch["labels"]) / n)
        assert abs(loss - want) > 1e-4, (name, loss, want)


# --------------------------------------------------------------------------------------------
# packs and batches


def test_packs_hold_every_example_once_with_boundaries(examples: list[dict[str, list[int]]]) -> None:
    packs = pack_examples(examples, SEQ_LEN)
    assert sum(len(p["lengths"]) for p in packs) == len(examples)
    assert all(len(p["input_ids"]) == len(p["labels"]) == sum(p["lengths"]) <= SEQ_LEN for p in packs)
    pieces = []
    for p in packs:
        start = 0
        for n in p["lengths"]:
            assert p["labels"][start] == IGNORE_INDEX  # never predicted from the previous example
            pieces.append(tuple(p["input_ids"][start : start + n]))
            start += n
    assert sorted(pieces) == sorted(tuple(e["input_ids"]) for e in examples)
    assert pack_examples(examples, SEQ_LEN) == packs  # deterministic


def test_best_fit_decreasing_packs_tightly() -> None:
    rng = random.Random(0)
    lengths = [min(2048, max(8, int(rng.lognormvariate(5.0, 0.9)))) for _ in range(20_000)]
    bins = pack_lengths(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    assert packing_efficiency(sum(lengths), len(bins), 2048) >= 0.995
    with pytest.raises(ValueError):
        pack_lengths([10, 3000], 2048)


def test_collate_packed_layouts() -> None:
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, -100, 8, 9], "position_ids": [0, 1, 0, 1, 2]},
        {"input_ids": [3, 4], "labels": [-100, 4], "position_ids": [0, 1]},
    ]
    out = collate_packed(rows, pad_id=0)
    assert out["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]  # padding: a segment of its own
    assert out["labels"].tolist()[1] == [-100, 4, -100, -100, -100]
    assert out["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    assert set(model_inputs(out)) == {"input_ids", "position_ids"}  # a 2-D mask would hide the restarts
    flat = collate_packed(rows, pad_id=0, flatten=True)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4]]
    assert flat["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    assert flat["attention_mask"].all()
    assert flattens_packs("flash_attention_2") and not flattens_packs("sdpa")


def test_pack_dataset_stats(tok: Any) -> None:
    train, _ = build_datasets(DataConfig(train_files=[asset("demo/train.jsonl")]), tok, SEQ_LEN, 0)
    packed = pack_dataset(train, SEQ_LEN)
    assert packed.stats["tokens"] == train.stats["tokens"] and packed.stats["examples"] == len(train)
    assert packed.stats["packs"] == len(packed) < len(train)
    assert packed.stats["packing_efficiency"] == pytest.approx(
        train.stats["tokens"] / (len(packed) * SEQ_LEN), abs=1e-6
    )
    assert (
        sum(count_label_tokens(collate([packed[i]], 0)["labels"]) for i in range(len(packed)))
        == train.stats["trainable_tokens"]
    )


# --------------------------------------------------------------------------------------------
# the sampler over packs


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resume_mid_epoch_continues_with_the_next_unseen_sample_on_every_rank(world: int) -> None:
    """Each rank draws micro-batches, "checkpoints" (epoch, position) mid-epoch, and a fresh order
    seeked there draws exactly what the uninterrupted one would: nothing replayed, nothing skipped,
    into the next epoch too. Over an epoch the ranks read disjoint samples."""
    size, batch, seed = 23, 3, 5
    epoch_reads: list[int] = []
    for rank in range(world):
        dist = DistInfo(rank=rank, world_size=world, local_world_size=world, local_rank=rank)
        straight = DataOrder(size, seed, True, dist)
        draws = [straight.take(batch) for _ in range(12)]  # more than one epoch
        epoch_reads += [i for d in draws[: straight.batches_per_epoch(batch)] for i in d]
        for cut in (1, 2, straight.batches_per_epoch(batch), 5):
            first = DataOrder(size, seed, True, dist)
            for _ in range(cut):
                first.take(batch)
            state = (first.epoch, first.consumed)  # what TrainerState saves
            resumed = DataOrder(size, seed, True, dist)
            resumed.seek(*state)
            assert [resumed.take(batch) for _ in range(12 - cut)] == draws[cut:], (rank, cut)
    assert len(epoch_reads) == len(set(epoch_reads)) == (size // world) * world


def test_data_bench_runs_in_quick_mode(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/data_bench.py --quick: the table comes out (timings are not asserted)."""
    import importlib.util

    from launcher.paths import ROOT

    spec = importlib.util.spec_from_file_location("data_bench", ROOT / "bench" / "data_bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "efficiency" in out and "synthetic 2k" in out and "demo" in out
    assert {r["data"] for r in rows} == {"demo", "synthetic 2k"}
    assert all(0.9 < r["efficiency"] <= r["bound"] + 1e-9 <= 1 + 1e-9 for r in rows)
