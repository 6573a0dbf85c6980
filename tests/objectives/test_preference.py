"""Preference objectives in one process: the data format, the losses against an independent
computation, packing, and the LoRA reference (adapters off) against an explicit frozen copy."""

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
from helpers import tiny

from launcher.config.schema import DataConfig, DpoObjective, LoraConfig, SimpoObjective
from launcher.data.packing import collate_packed, pack_examples, pack_lengths
from launcher.data.preference import PreferenceFormat
from launcher.data.types import IGNORE_INDEX, RowError
from launcher.objectives.losses import preference_losses, sequence_logps
from launcher.paths import asset

pytestmark = pytest.mark.usefixtures("one_thread")
PAIRS = Path(asset("demo/preferences/train.jsonl"))


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))


@pytest.fixture(scope="module")
def fmt(tok: Any) -> PreferenceFormat:
    return PreferenceFormat.from_config(DataConfig(format="preference"), tok)


def encoded(fmt: PreferenceFormat, n: int) -> list[dict[str, list[int]]]:
    """The first ``n`` demo pairs as examples (chosen then rejected, with their lengths)."""
    out = []
    for line in PAIRS.read_text().splitlines()[:n]:
        (c, lc), (r, lr) = fmt.encode_pair(fmt.parse(json.loads(line)))
        out.append({"input_ids": c + r, "labels": lc + lr, "lengths": [len(c), len(r)]})
    return out


def batch_of(
    examples: list[dict[str, list[int]]], seq_len: int, pad_id: int, *, alone: bool, flatten: bool = False
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """A batch of ``examples``, packed several to a row or one per row, and the example each
    pair in the batch came from (packing groups examples by length)."""
    groups = (
        [[i] for i in range(len(examples))] if alone else pack_lengths([len(e["input_ids"]) for e in examples], seq_len)
    )
    packs = pack_examples(examples, seq_len, alone=alone)
    rows = [
        {
            "input_ids": p["input_ids"],
            "labels": p["labels"],
            "position_ids": [i for n in p["lengths"] for i in range(n)],
        }
        for p in packs
    ]
    return collate_packed(rows, pad_id, flatten=flatten), [i for g in groups for i in g]


def by_example(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Per-sequence values (chosen, rejected per pair, in batch order) in example order."""
    pairs = values.view(-1, 2)
    out = torch.empty_like(pairs)
    out[torch.tensor(order)] = pairs
    return out.flatten()


# --------------------------------------------------------------------------------------------
# the data format


def test_conversational_rows_label_the_completion_only(tok: Any, fmt: PreferenceFormat) -> None:
    row = {
        "prompt": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "how do I resume?"},
        ],
        "chosen": "Run the same command again.",
        "rejected": [{"role": "assistant", "content": "Delete the run dir."}],
    }
    (ids, labels), (rids, rlabels) = fmt.encode_pair(fmt.parse(row))
    trained = tok.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert trained.startswith("Run the same command again.") and "hello there" not in trained
    assert tok.decode([t for t, label in zip(rids, rlabels) if label != IGNORE_INDEX]).startswith("Delete the run dir.")
    prompt_len = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert ids[:prompt_len] == rids[:prompt_len]  # both completions follow the very same prompt tokens


def test_plain_rows_tokenize_prompt_and_completion_with_eos(tok: Any, fmt: PreferenceFormat) -> None:
    (ids, labels), _ = fmt.encode_pair(
        fmt.parse({"prompt": "Q: what is ftl?", "chosen": " a launcher", "rejected": " a fish"})
    )
    n_prompt = len(tok("Q: what is ftl?", add_special_tokens=True)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "chosen": "a"}, "missing 'rejected'"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "use data.format=chat",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "chosen": "b",
                "rejected": "c",
            },
            "ends with an assistant",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "user", "content": "b"}],
                "rejected": "c",
            },
            "assistant messages only",
        ),
        ({"prompt": "q", "chosen": " ", "rejected": "c"}, "empty 'chosen'"),
        ({"prompt": [{"role": "wizard", "content": "q"}], "chosen": "b", "rejected": "c"}, "unknown role"),
        ("not an object", "expected an object"),
    ],
)
def test_bad_rows_say_what_is_wrong(fmt: PreferenceFormat, row: Any, message: str) -> None:
    with pytest.raises(RowError, match=message):
        fmt.parse(row)


# --------------------------------------------------------------------------------------------
# the losses


def alone_logps(model: Any, example: dict[str, list[int]]) -> list[float]:
    """Each sequence of a pair run alone, full logits, log-softmax: independent of ftl's packing,
    attention and output-layer hook."""
    out, start = [], 0
    for n in example["lengths"]:
        ids = torch.tensor([example["input_ids"][start : start + n]])
        labels = torch.tensor(example["labels"][start : start + n])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        keep = labels[1:] != IGNORE_INDEX
        out.append(float(logp[keep].gather(1, labels[1:][keep, None]).sum()))
        start += n
    return out


def oracle(
    objective: Any, policy: list[float], reference: list[float], counts: list[int]
) -> tuple[list[float], list[float], list[float]]:
    """The papers' formulas, pair by pair, in plain Python."""
    losses, chosen, rejected = [], [], []
    b, eps = objective.beta, objective.label_smoothing

    def logsig(x: float) -> float:
        return -math.log1p(math.exp(-x))

    for i in range(0, len(policy), 2):
        pc, pr, rc, rr, nc, nr = policy[i], policy[i + 1], reference[i], reference[i + 1], counts[i], counts[i + 1]
        if objective.method == "simpo":
            c, r = b * pc / nc, b * pr / nr
            z = c - r - objective.gamma
            loss = -(1 - eps) * logsig(z) - eps * logsig(-z)
        elif objective.loss == "ipo":
            h = (pc - rc) / nc - (pr - rr) / nr
            c, r, loss = b * (pc - rc) / nc, b * (pr - rr) / nr, (h - 1 / (2 * b)) ** 2
        else:
            c, r = b * (pc - rc), b * (pr - rr)
            loss = -(1 - eps) * logsig(c - r) - eps * logsig(r - c)
        losses.append(loss), chosen.append(c), rejected.append(r)
    return losses, chosen, rejected


@pytest.mark.parametrize(
    "objective",
    [
        DpoObjective(beta=0.1),
        DpoObjective(beta=0.5, label_smoothing=0.1),
        DpoObjective(beta=0.1, loss="ipo"),
        SimpoObjective(beta=2.0, gamma=0.5, label_smoothing=0.05),
    ],
    ids=["dpo", "dpo-smoothed", "ipo", "simpo"],
)
def test_losses_and_rewards_equal_an_independent_computation(tok: Any, fmt: PreferenceFormat, objective: Any) -> None:
    examples = encoded(fmt, 6)
    policy_model, reference_model = tiny(tok, "sdpa_varlen"), tiny(tok, "sdpa_varlen")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in reference_model.parameters():  # another model, so that the rewards are not all zero
            p.add_(0.02 * torch.randn_like(p))
    batch, order = batch_of(examples, 512, tok.pad_token_id, alone=False)
    with torch.no_grad():
        policy, counts = (by_example(v, order) for v in sequence_logps(policy_model, batch))
        reference = by_example(sequence_logps(reference_model, batch)[0], order)
    losses, chosen, rejected = preference_losses(objective, policy, counts, reference)

    eager_policy, eager_reference = copy.deepcopy(policy_model), copy.deepcopy(reference_model)
    for m in (eager_policy, eager_reference):
        m.config._attn_implementation = "eager"
    want_policy = [v for e in examples for v in alone_logps(eager_policy, e)]
    want_reference = [v for e in examples for v in alone_logps(eager_reference, e)]
    want_counts = [
        sum(1 for label in e["labels"][s + 1 : s + n] if label != IGNORE_INDEX)
        for e in examples
        for s, n in zip([0, e["lengths"][0]], e["lengths"])
    ]
    assert counts.tolist() == want_counts
    torch.testing.assert_close(policy.double(), torch.tensor(want_policy, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    want = oracle(objective, want_policy, want_reference, want_counts)
    for got, expected in zip((losses, chosen, rejected), want):
        torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert float(chosen.abs().sum()) > 1e-3  # the comparison covered non-zero rewards


def test_packed_pairs_equal_one_pair_per_row(tok: Any, fmt: PreferenceFormat) -> None:
    """The same per-sequence log-probs and gradients whether pairs share rows, each has its own
    padded row, or all are flattened into one row."""
    examples = encoded(fmt, 8)
    model = tiny(tok, "sdpa_varlen")
    objective = DpoObjective(beta=0.1)
    results = []
    for alone, flatten in ((True, False), (False, False), (False, True)):
        batch, order = batch_of(examples, 512, tok.pad_token_id, alone=alone, flatten=flatten)
        assert (batch["input_ids"].shape[0] == len(examples)) == alone
        model.zero_grad()
        policy, counts = (by_example(v, order) for v in sequence_logps(model, batch))
        losses, _, _ = preference_losses(objective, policy, counts, policy.detach() - 1.0 * torch.arange(len(policy)))
        losses.sum().backward()
        results.append((policy.detach(), losses.detach(), [p.grad.clone() for p in model.parameters()]))
    (p0, l0, g0), *others = results
    for p, loss, g in others:
        torch.testing.assert_close(p, p0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, l0, rtol=1e-5, atol=1e-6)
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lora_reference_with_adapters_off_equals_a_frozen_copy(tok: Any, fmt: PreferenceFormat) -> None:
    from launcher.model.adapters import apply_peft
    from launcher.objectives.preference import PreferenceObjective

    base = tiny(tok, "sdpa_varlen")
    frozen = copy.deepcopy(base)
    model = apply_peft(base, LoraConfig(r=4, dropout=0.0))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # trained adapters: the policy now differs from its base
                p.add_(0.5 * torch.randn_like(p))
    batch, _ = batch_of(encoded(fmt, 4), 512, tok.pad_token_id, alone=False)
    engine = SimpleNamespace(peft_model=model, autocast=lambda: None)
    cfg = SimpleNamespace(objective=DpoObjective(reference="adapters_off"), peft=LoraConfig())
    objective = PreferenceObjective(cfg)  # type: ignore[arg-type]
    assert objective.reference_mode == "adapters_off"
    with torch.no_grad():
        got = objective.reference_logps(engine, batch, "train")
        want = sequence_logps(frozen, batch)[0]
        policy = sequence_logps(model, batch)[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert float((policy - want).abs().max()) > 1e-2  # and the adapters were really on for the policy
    assert float(F.mse_loss(policy, got)) > 0


@pytest.mark.parametrize(
    "objective", [DpoObjective(beta=0.1), SimpoObjective(beta=2.0, gamma=0.5)], ids=["dpo", "simpo"]
)
def test_chunked_log_probs_train_the_numbers_of_the_full_logits(
    tok: Any, fmt: PreferenceFormat, objective: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preference objectives compute their log-probs chunk by chunk (never the [labels, vocab]
    fp32 logits): the per-sequence log-probs, the losses and every gradient are the full logits'."""
    import launcher.model.loss as loss_module

    monkeypatch.setattr(
        loss_module, "chunk_rows", lambda vocab, device_type="cpu": 7
    )  # many chunks, the last one short
    model = tiny(tok, "sdpa_varlen")
    batch, _ = batch_of(encoded(fmt, 6), 512, tok.pad_token_id, alone=False)
    results = {}
    for chunked in (True, False):
        if not chunked:  # what preference objectives computed before: the logits at the labels, then log-softmax
            monkeypatch.setattr(loss_module, "fused_head_ok", lambda m: False)
        model.zero_grad()
        policy, counts = sequence_logps(model, batch)
        reference = policy.detach() - 0.3 * torch.arange(len(policy))  # rewards not all zero
        losses, _, _ = preference_losses(objective, policy, counts, reference)
        losses.sum().backward()
        results[chunked] = (policy.detach(), losses.detach(), [p.grad.clone() for p in model.parameters()])
    (p1, l1, g1), (p0, l0, g0) = results[True], results[False]
    torch.testing.assert_close(p1, p0, rtol=1e-7, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
