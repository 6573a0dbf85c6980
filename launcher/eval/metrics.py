"""Evaluation before and after training: perplexity on the eval split and, on its first
conversations, generated answers scored against the reference answers (ROUGE, BLEU).

Perplexity is distributable: :func:`loss_sums` runs this rank's share of the batches
(:func:`rank_batches`: dealt round-robin, the same number of forward passes on every rank, as
FSDP and ZeRO-3 need every rank in each forward) and returns (sum of token losses, token count);
:func:`perplexity` passes them through ``reduce_fn`` (an all-reduce under torchrun) before
dividing, so every token weighs the same whatever the batch or rank it fell in, and N ranks
report exactly the number one process does.

A ``stop`` callback (the trainer's: a stop signal on any rank) is asked between batches, the same
number of times on every rank; once it says so the evaluation ends with :class:`EvalStopped`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Optional

import torch

from launcher.config.schema import EvalConfig
from launcher.data.build import collate
from launcher.data.chat import prompt_and_reference
from launcher.data.packing import model_inputs
from launcher.data.types import TokenizedDataset
from launcher.model.loss import count_label_tokens, next_token_loss
from launcher.progress import phase

ReduceFn = Callable[[torch.Tensor], torch.Tensor]
GatherFn = Callable[[list[Any]], list[list[Any]]]
StopFn = Callable[[], bool]


class EvalStopped(Exception):
    """A stop signal ended the evaluation between two batches."""


def _never() -> bool:
    return False


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Eval mode and no grad, restoring the caller's mode: evaluation runs mid-training too."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def batch_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses, number of predicted tokens) for one batch, in float64."""
    loss = next_token_loss(model, model_inputs(batch), batch["labels"])
    return loss.double(), torch.tensor(count_label_tokens(batch["labels"]), dtype=torch.float64, device=loss.device)


def rank_batches(
    n_examples: int, batch_size: int, rank: int = 0, world_size: int = 1, max_batches: Optional[int] = None
) -> list[Optional[range]]:
    """This rank's eval batches (ranges of example indices): the split's batches, at most
    ``max_batches`` of them in all, dealt round-robin. Every rank gets the same number of entries;
    ``None`` marks a forward pass that only keeps a short rank in step with the others."""
    starts = range(0, n_examples, batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    mine: list[Optional[range]] = [range(s, min(s + batch_size, n_examples)) for s in starts[rank::world_size]]
    per_rank = -(-len(starts) // world_size)
    return mine + [None] * (per_rank - len(mine))


def loss_sums(
    model: Any,
    eval_ds: TokenizedDataset,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device | str,
    autocast_dtype: Optional[torch.dtype] = None,
    max_batches: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    stop: StopFn = _never,
) -> torch.Tensor:
    """This rank's ``[loss_sum, token_count]`` over its share of ``eval_ds`` (float64, on ``device``)."""
    device = torch.device(device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    batches = rank_batches(len(eval_ds), batch_size, rank, world_size, max_batches)
    with (
        eval_mode(model),
        _autocast(device, autocast_dtype),
        phase("eval: loss", total=len(batches), unit="batch") as shown,
    ):
        for indices in batches:
            if stop():
                raise EvalStopped
            batch = collate([eval_ds[i] for i in (indices if indices is not None else range(1))], pad_id)
            loss, count = batch_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
            if indices is not None:
                totals += torch.stack([loss, count])
            shown.advance()
    return totals


def perplexity(
    model: Any,
    eval_ds: TokenizedDataset,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device | str,
    autocast_dtype: Optional[torch.dtype] = None,
    max_batches: Optional[int] = None,
    reduce_fn: ReduceFn = _identity,
    rank: int = 0,
    world_size: int = 1,
    stop: StopFn = _never,
) -> dict[str, float]:
    """Token-weighted mean loss over every label != -100, and its exp. With ``world_size`` > 1
    each rank computes its share and ``reduce_fn`` must sum the shares over the ranks."""
    totals = loss_sums(
        model,
        eval_ds,
        batch_size=batch_size,
        pad_id=pad_id,
        device=device,
        autocast_dtype=autocast_dtype,
        max_batches=max_batches,
        rank=rank,
        world_size=world_size,
        stop=stop,
    )
    loss_sum, tokens = reduce_fn(totals).tolist()
    if tokens == 0:
        raise ValueError("perplexity: the eval split has no labelled tokens")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(tokens)}


def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    device: torch.device | str,
    batch_size: int,
    chat_template: Optional[str] = None,
    synced: bool = False,
    stop: StopFn = _never,
) -> list[str]:
    """Greedy answers to each conversation's last assistant turn, given everything before it.

    ``chat_template`` overrides the tokenizer's (pass the one the data was rendered with).
    ``synced``: the model is sharded over ranks (ZeRO-3, FSDP), every forward is collective, so
    every rank keeps stepping until all have finished (transformers' ``synced_gpus``): one that
    stopped at its eos while another generates on would leave that one waiting in a gather.

    Progress counts decoding steps (a token for every answer of a batch), ``max_new_tokens`` per
    batch at most: it moves while a batch generates, and its estimate is an upper bound."""
    device = torch.device(device)
    model = unwrap_for_generation(model)
    prompts = [render_prompt(tokenizer, prompt_and_reference(c)[0], chat_template) for c in conversations]
    answers: list[str] = []
    batches = range(0, len(prompts), batch_size)
    described = f"eval: {len(prompts)} answers for ROUGE/BLEU"
    with eval_mode(model), phase(described, total=len(batches) * max_new_tokens, unit="token") as shown:
        for start in batches:
            counter = DecodingSteps(shown)
            if stop():
                raise EvalStopped
            answers += _generate_batch(
                model, tokenizer, prompts[start : start + batch_size], max_new_tokens, device, synced, counter
            )
            shown.advance(max_new_tokens - counter.steps)  # the steps an early stop left out
    return answers


class DecodingSteps:
    """A stopping criterion that never stops: it counts generate's decoding steps into a phase."""

    def __init__(self, shown: Any) -> None:
        self.shown, self.steps = shown, 0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.steps += 1
        self.shown.advance()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def unwrap_for_generation(model: Any) -> Any:
    """DDP and DeepSpeed wrap the HF model (``.module``) and do not forward ``generate``; FSDP2 and
    ZeRO-3 hooks live on the inner modules, so generating with the inner model still gathers."""
    while not hasattr(model, "generate") and hasattr(model, "module"):
        model = model.module
    return model


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], chat_template: Optional[str] = None) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )
    # As in training: the template already wrote every special token the model expects.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    device: torch.device,
    synced: bool = False,
    counter: Optional[DecodingSteps] = None,
) -> list[str]:
    from transformers import StoppingCriteriaList

    # Left padding: every prompt then ends at the last column, where generation continues.
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, width - len(prompt) :] = 1
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(model, tokenizer),
        # Explicit: transformers infers it only while an HfDeepSpeedConfig is alive (not after
        # ZeRO-3 loading, nor without zero3_init) or for FSDP-managed modules.
        synced_gpus=synced,
        stopping_criteria=StoppingCriteriaList([counter] if counter is not None else []),
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output.tolist()]


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's eos (what the assistant turns were trained to end with) and whatever the
    model's generation config also stops on."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 (Porter stemming) averaged over pairs, and corpus BLEU; all on a 0-100 scale."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("generation_metrics: no predictions to score")
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    metrics = {kind: 100.0 * sum(s[kind].fmeasure for s in scores) / len(scores) for kind in kinds}
    metrics["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
    return metrics


def evaluate(
    model: Any,
    tokenizer: Any,
    eval_ds: TokenizedDataset,
    eval_cfg: EvalConfig,
    *,
    device: torch.device | str,
    autocast_dtype: Optional[torch.dtype] = None,
    reduce_fn: ReduceFn = _identity,
    rank: int = 0,
    world_size: int = 1,
    gather_fn: Optional[GatherFn] = None,
    loss_metrics: Optional[Callable[[], Optional[dict[str, float]]]] = None,
    synced: bool = False,
    stop: StopFn = _never,
) -> dict[str, Any]:
    """Perplexity always; with ``eval_cfg.generate``, answers to the first ``num_generate``
    conversations that have an assistant turn and their ROUGE/BLEU. ``samples`` (a list of
    {question, reference, prediction}; empty without generation) is the only non-scalar key.

    Perplexity is shared among ``world_size`` ranks (``reduce_fn`` sums). Generation is shared
    too when ``gather_fn`` (an all-gather of Python lists) is given, which only an unsharded
    model per rank allows; without it every rank generates every answer (FSDP and ZeRO-3 need
    every rank in each forward: ``synced`` keeps them stepping together, see :func:`generate_answers`).
    ``loss_metrics`` replaces perplexity where the objective has its own (preference pairs)."""
    results: Optional[dict[str, Any]] = loss_metrics() if loss_metrics is not None else None
    results = (
        results
        if results is not None
        else perplexity(
            model,
            eval_ds,
            batch_size=eval_cfg.batch_size,
            pad_id=tokenizer.pad_token_id,
            device=device,
            autocast_dtype=autocast_dtype,
            max_batches=eval_cfg.max_batches,
            reduce_fn=reduce_fn,
            rank=rank,
            world_size=world_size,
            stop=stop,
        )
    )
    results["samples"] = []
    if not eval_cfg.generate:
        return results
    conversations = [c for c in eval_ds.conversations if _has_assistant(c)][: eval_cfg.num_generate]
    if not conversations:
        return results
    mine = conversations[rank::world_size] if gather_fn is not None else conversations
    with _autocast(torch.device(device), autocast_dtype):
        predictions = (
            generate_answers(
                model,
                tokenizer,
                mine,
                max_new_tokens=eval_cfg.max_new_tokens,
                device=device,
                batch_size=eval_cfg.batch_size,
                chat_template=eval_ds.chat_template,
                synced=synced,
                stop=stop if gather_fn is None else _never,  # with gather_fn, ranks answer different counts
            )
            if mine
            else []
        )
    if gather_fn is not None:  # rank r answered conversations r, r+W, ...: interleave them back
        shares = gather_fn(predictions)
        predictions = [shares[i % world_size][i // world_size] for i in range(len(conversations))]
    references = [prompt_and_reference(c)[1] for c in conversations]
    results.update(generation_metrics(predictions, references))
    results["samples"] = [
        {"question": _last_user_message(c), "reference": ref, "prediction": pred}
        for c, ref, pred in zip(conversations, references, predictions)
    ]
    return results


def _has_assistant(conversation: list[dict[str, str]]) -> bool:
    return any(m["role"] == "assistant" for m in conversation)


def _last_user_message(conversation: list[dict[str, str]]) -> str:
    prompt, _ = prompt_and_reference(conversation)
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else ""
