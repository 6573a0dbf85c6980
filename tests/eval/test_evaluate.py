"""Evaluation: token-weighted perplexity, batched greedy generation, ROUGE/BLEU."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from launcher.config.schema import ArchConfig, DataConfig, EvalConfig, ModelConfig
from launcher.data.build import build_datasets
from launcher.data.chat import prompt_and_reference
from launcher.data.types import IGNORE_INDEX, TokenizedDataset
from launcher.eval.metrics import evaluate, generate_answers, generation_metrics, perplexity, render_prompt
from launcher.model.loading import load_model_and_tokenizer
from launcher.paths import asset

TINY = ModelConfig(
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
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is ftl?"}, {"role": "assistant", "content": "A launcher for fine-tuning."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I resume a run after a crash on the cluster?"},
        {"role": "assistant", "content": "Rerun the same command; ftl finds the last checkpoint."},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "user", "content": "Which engines are there?"},
        {"role": "assistant", "content": "single, ddp, deepspeed and fsdp."},
        {"role": "user", "content": "And launchers?"},
        {"role": "assistant", "content": "local, torchrun and slurm."},
    ],
    [{"role": "user", "content": "Does it log to W&B?"}, {"role": "assistant", "content": "Yes, online or offline."}],
]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    torch.manual_seed(0)
    return load_model_and_tokenizer(TINY)


@pytest.fixture(scope="module")
def eval_ds(tiny: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> TokenizedDataset:
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    _, tokenizer = tiny
    train, _ = build_datasets(DataConfig(train_files=[str(path)]), tokenizer, seq_len=256, seed=0)
    return train


def independent_loss(model: Any, eval_ds: TokenizedDataset) -> tuple[float, int]:
    """Each example alone, unpadded: sum of next-token losses over all examples / their count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in eval_ds:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor(example["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1]
            total += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    return total / count, count


def test_perplexity_is_token_weighted(tiny: tuple[Any, Any], eval_ds: TokenizedDataset) -> None:
    model, tokenizer = tiny
    want_loss, want_tokens = independent_loss(model, eval_ds)
    got = perplexity(model, eval_ds, batch_size=2, pad_id=tokenizer.pad_token_id, device="cpu")
    assert got["tokens"] == want_tokens
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want_loss), rel=1e-5)

    # The fixture must tell the two apart: the mean of per-batch means is a different number.
    pad = tokenizer.pad_token_id
    batches = [TokenizedDataset(eval_ds.examples[i : i + 2], []) for i in range(0, len(eval_ds), 2)]
    batch_means = [perplexity(model, b, batch_size=2, pad_id=pad, device="cpu")["loss"] for b in batches]
    assert abs(sum(batch_means) / len(batch_means) - want_loss) > 1e-4


def test_perplexity_reduce_hook_and_max_batches(tiny: tuple[Any, Any], eval_ds: TokenizedDataset) -> None:
    model, tokenizer = tiny
    seen: list[torch.Tensor] = []

    def two_identical_ranks(totals: torch.Tensor) -> torch.Tensor:
        seen.append(totals.clone())
        return totals * 2

    base = perplexity(model, eval_ds, batch_size=2, pad_id=tokenizer.pad_token_id, device="cpu")
    doubled = perplexity(
        model, eval_ds, batch_size=2, pad_id=tokenizer.pad_token_id, device="cpu", reduce_fn=two_identical_ranks
    )
    assert seen[0].shape == (2,) and seen[0].dtype == torch.float64
    assert doubled["tokens"] == 2 * base["tokens"] and doubled["loss"] == pytest.approx(base["loss"])

    first = perplexity(model, eval_ds, batch_size=2, pad_id=tokenizer.pad_token_id, device="cpu", max_batches=1)
    assert first["tokens"] == sum(sum(x != IGNORE_INDEX for x in ex["labels"][1:]) for ex in eval_ds.examples[:2])


def test_evaluation_restores_training_mode(tiny: tuple[Any, Any], eval_ds: TokenizedDataset) -> None:
    model, tokenizer = tiny
    model.train()
    perplexity(model, eval_ds, batch_size=4, pad_id=tokenizer.pad_token_id, device="cpu", autocast_dtype=torch.bfloat16)
    assert model.training
    model.eval()


def test_batched_generation_matches_one_at_a_time(tiny: tuple[Any, Any]) -> None:
    """Left padding must not change what a prompt generates."""
    model, tokenizer = tiny
    alone = generate_answers(model, tokenizer, CONVERSATIONS, max_new_tokens=6, device="cpu", batch_size=1)
    batched = generate_answers(model, tokenizer, CONVERSATIONS, max_new_tokens=6, device="cpu", batch_size=3)
    assert batched == alone
    assert len(alone) == len(CONVERSATIONS) and all(isinstance(a, str) for a in alone)


def test_generation_unwraps_ddp_style_wrappers(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny

    class Wrapper(torch.nn.Module):  # like DDP / a DeepSpeed engine: .module, no .generate
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    kwargs = dict(max_new_tokens=3, device="cpu", batch_size=2)
    wrapped = generate_answers(Wrapper(model), tokenizer, CONVERSATIONS[:2], **kwargs)
    assert wrapped == generate_answers(model, tokenizer, CONVERSATIONS[:2], **kwargs)


def test_prompt_is_everything_before_the_last_answer(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    prompt, reference = prompt_and_reference(CONVERSATIONS[3])
    assert reference == "local, torchrun and slurm." and prompt == CONVERSATIONS[3][:3]
    text = tokenizer.decode(render_prompt(tokenizer, prompt))
    assert text.endswith("<|im_start|>user\nAnd launchers?<|im_end|>\n<|im_start|>assistant\n")
    assert "single, ddp" in text and "torchrun and slurm" not in text


def test_generation_metrics_match_the_libraries() -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = ["the cat sat on the mat", "ftl resumes from the last checkpoints", "nothing alike"]
    references = ["the cat is sitting on the mat", "ftl resumes from the latest checkpoint", "entirely different"]
    got = generation_metrics(predictions, references)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for kind in ("rouge1", "rouge2", "rougeL"):
        want = 100 * sum(scorer.score(r, p)[kind].fmeasure for p, r in zip(predictions, references)) / 3
        assert got[kind] == pytest.approx(want)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert 0 < got["bleu"] < 100 and 0 < got["rouge2"] < got["rouge1"] < 100

    assert generation_metrics(["same words here"], ["same words here"])["rouge1"] == pytest.approx(100)
    with pytest.raises(ValueError):
        generation_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        generation_metrics([], [])


def test_evaluate_combines_everything(tiny: tuple[Any, Any], eval_ds: TokenizedDataset) -> None:
    model, tokenizer = tiny
    cfg = EvalConfig(batch_size=2, generate=True, num_generate=3, max_new_tokens=4)
    results = evaluate(model, tokenizer, eval_ds, cfg, device="cpu")
    assert set(results) == {"loss", "perplexity", "tokens", "rouge1", "rouge2", "rougeL", "bleu", "samples"}
    assert results["loss"] == pytest.approx(independent_loss(model, eval_ds)[0], rel=1e-5)
    assert [s["reference"] for s in results["samples"]] == [c[-1]["content"] for c in CONVERSATIONS[:3]]
    assert [s["question"] for s in results["samples"]] == [
        "What is ftl?",
        "How do I resume a run after a crash on the cluster?",
        "Hi",
    ]
    samples = results["samples"]
    expected = generation_metrics([s["prediction"] for s in samples], [s["reference"] for s in samples])
    assert {k: results[k] for k in expected} == pytest.approx(expected)

    no_generation = evaluate(model, tokenizer, eval_ds, EvalConfig(batch_size=2, generate=False), device="cpu")
    assert set(no_generation) == {"loss", "perplexity", "tokens", "samples"} and no_generation["samples"] == []


def test_generation_progress_moves_with_every_decoding_step(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of answers can take minutes on a CPU: the progress counts each decoding step, not
    each finished batch (issue 35: eval progress sat at 0/10 for 3 minutes)."""
    import contextlib

    from launcher.eval import metrics

    seen: dict[str, Any] = {"advances": []}

    class Recorder:
        def advance(self, n: int = 1) -> None:
            seen["advances"].append(n)

    @contextlib.contextmanager
    def recording_phase(description: str, total: int, **kwargs: Any) -> Any:
        seen.update(description=description, total=total, **kwargs)
        yield Recorder()

    monkeypatch.setattr(metrics, "phase", recording_phase)
    model, tokenizer = tiny
    with_progress = generate_answers(model, tokenizer, CONVERSATIONS, max_new_tokens=6, device="cpu", batch_size=3)
    assert seen["total"] == 2 * 6 and seen["unit"] == "token"  # 2 batches of at most 6 decoding steps
    assert sum(seen["advances"]) == seen["total"] and len(seen["advances"]) > 2  # moved within each batch
    monkeypatch.undo()
    assert with_progress == generate_answers(
        model, tokenizer, CONVERSATIONS, max_new_tokens=6, device="cpu", batch_size=3
    )  # counting changes no answer
