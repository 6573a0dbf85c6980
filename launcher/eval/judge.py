"""A judge model for ``ftl eval`` (``eval.judge.path`` or ``--judge PATH``): the base's and the tuned
model's answers to each held-out prompt compared pairwise, and the tuned model's win rate.

For each pair the judge reads a fixed prompt (the question, the reference answer, answers A and B)
and its next-token log-probabilities of "A" and "B" say which it prefers: P(A) is their softmax.
Every pair is judged in both orders (tuned as A, then tuned as B) and the two probabilities that
the tuned answer is better are averaged, so a judge that leans towards a position cancels out; the
lean itself is reported (``position_bias``: the mean P(A) over all judgements, 0.5 for none). The
tuned model wins a pair when that average is above 0.5, ties at exactly 0.5; the win rate counts a
tie as half a win.
"""

from __future__ import annotations

from typing import Any

import torch

PROMPT = (
    "Two answers to the same question follow. Decide which answer is better: correct, helpful and "
    "close to the reference answer. Reply with one letter, A or B.\n\n"
    "Question:\n{question}\n\nReference answer:\n{reference}\n\n"
    "Answer A:\n{a}\n\nAnswer B:\n{b}\n\nWhich answer is better, A or B?"
)
RAW_SUFFIX = "\nBetter answer:"  # a judge without a chat template continues plain text
LETTERS = ("A", "B")


def judge_pairs(model: Any, tokenizer: Any, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The judge's verdicts on the generated samples of ``before`` (base) and ``after`` (tuned),
    paired by prompt: per pair P(tuned better) in each order, the win rate, and the position bias."""
    pairs = [
        (tuned, base)
        for tuned, base in zip(after.get("samples") or [], before.get("samples") or [])
        if tuned["question"] == base["question"]
    ]
    if not pairs:
        raise ValueError("the judge needs the base's and the tuned model's answers to the same prompts")
    letters = _letter_ids(tokenizer)
    examples, firsts = [], []
    for tuned, base in pairs:
        text = {"question": tuned["question"], "reference": tuned["reference"]}
        a_tuned = _p_first(
            model, tokenizer, letters, PROMPT.format(**text, a=tuned["prediction"], b=base["prediction"])
        )
        a_base = _p_first(model, tokenizer, letters, PROMPT.format(**text, a=base["prediction"], b=tuned["prediction"]))
        firsts += [a_tuned, a_base]
        score = (a_tuned + (1.0 - a_base)) / 2
        examples.append({"tuned_as_a": a_tuned, "tuned_as_b": 1.0 - a_base, "tuned_better": score})
    wins = sum(1.0 if e["tuned_better"] > 0.5 else 0.5 if e["tuned_better"] == 0.5 else 0.0 for e in examples)
    return {
        "win_rate": wins / len(examples),
        "pairs": len(examples),
        "orders": ["tuned as A", "tuned as B"],
        "position_bias": sum(firsts) / len(firsts),
        "examples": examples,
    }


def _letter_ids(tokenizer: Any) -> tuple[int, int]:
    """The token ids the judge's next token is compared on: "A" and "B" after a chat template's
    assistant header, " A" and " B" after plain text."""
    prefix = "" if tokenizer.chat_template else " "
    ids = [tokenizer(prefix + letter, add_special_tokens=False)["input_ids"] for letter in LETTERS]
    if not all(ids) or ids[0][0] == ids[1][0]:
        raise ValueError(f"the judge's tokenizer does not tell {LETTERS} apart by their first token")
    return ids[0][0], ids[1][0]


@torch.no_grad()
def _p_first(model: Any, tokenizer: Any, letters: tuple[int, int], prompt: str) -> float:
    """P("A") against P("B") for the judge's next token after ``prompt``."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt + RAW_SUFFIX
    ids = tokenizer(text, add_special_tokens=not tokenizer.chat_template, return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids.to(model.device)).logits[0, -1].float()
    pair = torch.log_softmax(logits, dim=-1)[list(letters)]
    return float(torch.softmax(pair, dim=-1)[0])


def run_judge(path: str, results: dict[str, Any], device: Any) -> dict[str, Any]:
    """Load the judge at ``path`` and judge ``results``' before/after answers (rank 0 of ftl eval)."""
    from launcher.artifacts.inference import load_model
    from launcher.progress import phase

    with phase(f"eval: loading the judge {path}"):
        judge = load_model(path, device=device)
    with phase("eval: judging base vs tuned answers, both orders"):
        return {"model": path, **judge_pairs(judge.model, judge.tokenizer, results["before"], results["after"])}
