"""launcher/train/loss.py: the output layer run only at labelled positions gives the full-logits loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from launcher.data.types import IGNORE_INDEX
from launcher.train.loss import count_label_tokens, logits_at_labels, next_token_loss, output_layer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model() -> Any:
    from helpers import tiny
    from transformers import AutoTokenizer

    from launcher.paths import asset

    return tiny(AutoTokenizer.from_pretrained(asset("tiny-tokenizer")), "sdpa_varlen")


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (3, 40), generator=g)
    labels = ids.clone()
    labels[torch.rand(3, 40, generator=g) < 0.5] = IGNORE_INDEX  # about half the positions unlabelled
    labels[2] = IGNORE_INDEX  # and a row with no label at all
    return {"input_ids": ids, "labels": labels}


def full_logits_loss(model: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), b["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def test_loss_and_gradients_equal_the_full_logits_loss(model: Any) -> None:
    b = batch()
    model.train()
    want = full_logits_loss(model, b)
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = next_token_loss(model, {"input_ids": b["input_ids"]}, b["labels"])
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    for p, w in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)


def test_the_head_sees_only_labelled_positions_and_is_unhooked_after(model: Any) -> None:
    b = batch()
    n = count_label_tokens(b["labels"])
    assert 0 < n < b["labels"][:, 1:].numel() // 2 + 20
    with torch.no_grad(), logits_at_labels(model, b["labels"]) as targets:
        logits = model(input_ids=b["input_ids"], use_cache=False).logits
    assert logits.shape == (n, 512) and targets.shape == (n,)
    assert torch.equal(targets, b["labels"][:, 1:][b["labels"][:, 1:] != IGNORE_INDEX])
    with torch.no_grad():
        assert model(input_ids=b["input_ids"], use_cache=False).logits.shape == (3, 40, 512)


def test_the_head_is_found_through_wrappers(model: Any) -> None:
    from peft import LoraConfig, get_peft_model

    class Wrapper(torch.nn.Module):  # what DDP and DeepSpeed's engine look like from outside
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, **kwargs: Any) -> Any:
            return self.module(**kwargs)

    head = model.lm_head
    assert output_layer(Wrapper(model)) is head
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert output_layer(Wrapper(peft)) is head
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(next_token_loss(Wrapper(peft), {"input_ids": b["input_ids"]}, b["labels"]), full_logits_loss(peft, b))


def test_a_model_without_an_output_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="get_output_embeddings"):
        output_layer(torch.nn.Linear(2, 2))
