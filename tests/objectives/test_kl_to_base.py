"""objective.kl_to_base, the anchor to the base (launcher/objectives/base_dist.py, sft.py): the KL
estimators and the anchored loss against an independent computation from the base's and the tuned
model's full logits, position by position; full fine-tuning (precomputed top-k) and LoRA (adapters
off); end to end, 2 gloo ranks under a sharded engine train the numbers of one process."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, TWO_RANKS, ftl, hand_next_token_terms, metrics, tiny

from launcher.config.schema import LoraConfig
from launcher.data.build import collate
from launcher.objectives.base_dist import base_pass, kl_full, kl_topk, summarize
from launcher.objectives.reference import ReferenceLogps
from launcher.objectives.sft import SftObjective
from launcher.paths import asset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))


@pytest.fixture(scope="module")
def examples(tok: Any) -> list[dict[str, list[int]]]:
    """Six texts of different lengths, their first three tokens unlabelled (a prompt)."""
    lines = Path(asset("retain/general.jsonl")).read_text().splitlines()[:6]
    out = []
    for line in lines:
        ids = tok(json.loads(line)["text"])["input_ids"][:40]
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def perturbed(model: Any, scale: float, seed: int, only: str = "") -> Any:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.add_(scale * torch.randn_like(p))
    return model


def hand_anchored_loss(base: Any, tuned: Any, examples: list[dict[str, list[int]]], weight: float, k: int) -> float:
    """Σ over labelled positions of −log q(label) + weight · KL(base || tuned), by hand."""
    return sum(ce + weight * kl for ce, _, kl in hand_next_token_terms(base, tuned, examples, k))


def test_the_estimators_equal_a_term_by_term_sum_and_bound_the_full_kl() -> None:
    torch.manual_seed(0)
    logp = F.log_softmax(torch.randn(5, 40, dtype=torch.float64) * 2, -1)
    logq = F.log_softmax(torch.randn(5, 40, dtype=torch.float64) * 2, -1)
    targets = torch.zeros(5, dtype=torch.long)
    full = kl_full(logp, logq)
    for n in range(5):
        p, q = logp[n].exp().tolist(), logq[n].exp().tolist()
        assert float(full[n]) == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-9)
    lumped = kl_topk(summarize(logp, targets, 4), logq)
    assert bool((lumped <= full + 1e-12).all()) and bool((lumped > 0).all())  # coarsening never adds information
    torch.testing.assert_close(kl_topk(summarize(logp, targets, 40), logq), full, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(kl_topk(summarize(logp, targets, 4), logp), torch.zeros(5, dtype=torch.float64))


def test_full_fine_tuning_anchored_loss_equals_an_independent_computation(tok: Any, examples: list[Any]) -> None:
    base = tiny(tok, "sdpa")
    tuned = perturbed(copy.deepcopy(base), 0.05, seed=1)
    objective = SftObjective("chunked", kl_to_base=0.5, top_k=8, base_mode="precomputed")
    objective.base = ReferenceLogps(
        {"train": base_pass(base, examples, top_k=8, batch_size=4, pad_id=tok.pad_token_id, device=torch.device("cpu"))}
    )
    chosen = [4, 0, 2]  # out of order: the rows are found by example index
    batch = {**collate([examples[i] for i in chosen], tok.pad_token_id), "index": torch.tensor(chosen)}
    loss, stats = objective.loss(SimpleNamespace(model=tuned, autocast=lambda: None), batch)
    want = hand_anchored_loss(base, tuned, [examples[i] for i in chosen], 0.5, 8)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    cross_entropy = hand_anchored_loss(base, tuned, [examples[i] for i in chosen], 0.0, 8)
    assert float(stats["kl_to_base"]) == pytest.approx((want - cross_entropy) / 0.5, rel=1e-4)
    assert float(stats["kl_to_base"]) > 1e-3  # the tuned model really differs
    loss.backward()
    assert all(p.grad is not None for p in tuned.parameters() if p.requires_grad)


def test_lora_anchored_loss_is_the_whole_vocabulary_kl_to_the_base_with_adapters_off(
    tok: Any, examples: list[Any]
) -> None:
    from launcher.model.adapters import apply_peft

    base = tiny(tok, "sdpa")
    frozen = copy.deepcopy(base)
    model = perturbed(apply_peft(base, LoraConfig(r=4, dropout=0.0)), 0.5, seed=2, only="lora_B")
    objective = SftObjective("chunked", kl_to_base=2.0, top_k=8, base_mode="adapters_off")
    batch = collate(examples[:4], tok.pad_token_id)
    engine = SimpleNamespace(model=model, peft_model=model, autocast=lambda: None)
    loss, stats = objective.loss(engine, batch)
    vocab = frozen.config.vocab_size
    assert float(loss) == pytest.approx(hand_anchored_loss(frozen, model, examples[:4], 2.0, vocab), rel=1e-5)
    assert float(stats["kl_to_base"]) > 1e-3


STEPS = 4
ANCHORED = [
    *TINY,
    f"train.max_steps={STEPS}",
    "train.precision=fp32",
    "train.warmup_steps=1",
    "checkpoint.save_final=false",
    "eval.after_training=false",
    "eval.retain.enabled=false",
    "objective.kl_to_base=0.5",
    "objective.kl_top_k=16",
]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    run = tmp_path_factory.mktemp("anchored") / "single"
    ftl("train", *ANCHORED, "train.micro_batch_size=8", f"run.dir={run}")
    assert (run / "base_topk.pt").is_file()  # precomputed once, kept for a resume
    return metrics(run)


def test_anchored_sft_logs_its_kl_which_starts_at_zero_and_grows(one_process: list[dict[str, Any]]) -> None:
    kl = [row["kl_to_base"] for row in one_process]
    assert len(kl) == STEPS and abs(kl[0]) < 1e-6 and kl[-1] > kl[1] > 0, kl


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_two_sharded_ranks_train_the_anchored_numbers_of_one_process(
    one_process: list[dict[str, Any]], strategy: str, tmp_path: Path
) -> None:
    run = tmp_path / strategy
    ftl("train", *ANCHORED, *TWO_RANKS, f"strategy={strategy}", "train.micro_batch_size=4", f"run.dir={run}")
    for got, want in zip(metrics(run), one_process, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), (strategy, got["step"])
        assert got["kl_to_base"] == pytest.approx(want["kl_to_base"], rel=1e-3, abs=1e-7), (strategy, got["step"])


def test_lora_anchored_sft_trains_against_its_adapters_off_base(tmp_path: Path) -> None:
    run = tmp_path / "lora"
    ftl("train", *ANCHORED, "peft=lora", "train.micro_batch_size=8", f"run.dir={run}")
    kl = [row["kl_to_base"] for row in metrics(run)]
    assert kl[0] == pytest.approx(0, abs=1e-9) and kl[-1] > 1e-6, kl  # LoRA starts as its base: B = 0
    assert not (run / "base_topk.pt").exists()  # the base is the model with its adapters off
