"""Forgetting and drift, measured at every evaluation on a retain set of general text.

A fine-tune is meant to teach its data and keep the rest ("retains general knowledge"). Two cheap
measures of what it lost, on text the run does not train on (``eval.retain.path``; by default
the general-knowledge passages shipped in ``launcher/assets/retain/``):

* ``retain_loss_change``: the retain set's next-token loss (nats per token) now minus the base's;
* ``retain_kl``: KL(base || tuned) of the next-token distributions, averaged over the retain
  tokens (:mod:`launcher.objectives.base_dist` says how each base is had, and the estimator).

The base's side is had once: under full fine-tuning a pass with the starting model before the
first step keeps its top-k rows (``retain_base.pt`` in the run dir, which a resumed run reads);
under LoRA/QLoRA the adapters are switched off. ``eval.retain.max_kl`` and
``eval.retain.max_loss_increase`` bound them: past either, ``eval.retain.action`` warns, or stops
the run (:class:`ForgettingError`, exit 1) with the step and the figure named, the checkpoints
already written kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from launcher.config.schema import RetainConfig
from launcher.data.build import collate
from launcher.data.types import DataError
from launcher.eval.metrics import eval_mode, rank_batches
from launcher.objectives.base_dist import base_logprobs, base_loss_terms, kl_full, kl_topk, label_logprobs
from launcher.objectives.preference import base_mode
from launcher.objectives.reference import ReferenceLogps, base_rows_of, resumed_copy
from launcher.paths import asset
from launcher.rundir import RunPaths
from launcher.rundir.resume import list_complete
from launcher.runtime.distributed import all_reduce_sum, reduce_sum
from launcher.train.checkpoint import CheckpointWriteError, disk_full
from launcher.train.finite import TrainingStopped

SHIPPED = "retain/general.jsonl"
SPLIT = "retain"


class ForgettingError(TrainingStopped):
    """The retain set's KL or loss change passed its limit with eval.retain.action=stop (exit 1)."""


@dataclass
class Retain:
    cfg: RetainConfig
    dataset: Any
    mode: str  # adapters_off or precomputed
    base: Optional[ReferenceLogps]  # the starting model's rows, when precomputed

    def measure(self, trainer: Any) -> dict[str, float]:
        """The retain figures of the model as it is now; collective (every rank, the same numbers)."""
        engine = trainer.engine
        totals = torch.zeros(4, dtype=torch.float64, device=trainer.device)  # tuned loss, base loss, KL, tokens
        batches = rank_batches(
            len(self.dataset), trainer.cfg.eval.batch_size, trainer.dist.rank, trainer.dist.world_size
        )
        with eval_mode(engine.model):
            for indices in batches:
                chosen = list(indices) if indices is not None else [0]  # a short rank keeps step with a repeat
                host = collate([self.dataset[i] for i in chosen], trainer.tokenizer.pad_token_id)
                batch = {k: v.to(trainer.device) for k, v in host.items()}
                logq, targets = label_logprobs(engine.model, batch, engine.autocast())
                if self.base is not None:
                    rows = self.base.lookup(SPLIT, chosen).to(trainer.device)
                    kl, base_loss = kl_topk(rows, logq), base_loss_terms(rows)
                else:
                    logp = base_logprobs(engine, batch)
                    kl, base_loss = kl_full(logp, logq), -logp.gather(-1, targets[:, None]).double()
                if indices is not None:
                    tuned_loss = -logq.gather(-1, targets[:, None]).double()
                    totals += torch.stack([tuned_loss.sum(), base_loss.sum(), kl.sum(), kl.new_tensor(len(kl))])
        loss, base, kl, tokens = all_reduce_sum(totals).tolist()
        return {"retain_loss": loss / tokens, "retain_loss_change": (loss - base) / tokens, "retain_kl": kl / tokens}

    def check(self, step: int, figures: dict[str, float], run_dir: Any, say: Callable[[str], None]) -> None:
        """Warn, or raise ForgettingError, when a figure is past its limit (a NaN is past every limit)."""
        limits = (
            ("retain_kl", self.cfg.max_kl, "the KL to the base", "eval.retain.max_kl"),
            (
                "retain_loss_change",
                self.cfg.max_loss_increase,
                "the retain loss change",
                "eval.retain.max_loss_increase",
            ),
        )
        over = [
            f"{label} is {figures[key]:.4g} nats/token, over {field}={limit:g}"
            for key, limit, label, field in limits
            if limit is not None and not figures[key] <= limit
        ]
        if not over:
            return
        text = f"forgetting at step {step} on the retain set: {'; '.join(over)}"
        if self.cfg.action == "warn":
            say(f"ftl: warning: {text}")
            return
        saved = list_complete(run_dir)
        kept = f"the last checkpoint, {saved[-1][1]}, is kept" if saved else "no checkpoint was written before it"
        raise ForgettingError(
            f"{text}; stopped (eval.retain.action=stop); {kept}. Lower train.lr, train fewer steps, "
            "add objective.kl_to_base, or use LoRA (peft=lora)"
        )


def build_retain(trainer: Any) -> Optional[Retain]:
    """The retain set and its base side, or None with eval.retain.enabled=false. Collective."""
    cfg = trainer.cfg.eval.retain
    if not cfg.enabled:
        return None
    dataset = retain_dataset(trainer.cfg, trainer.tokenizer)
    mode = base_mode(trainer.cfg)
    if mode == "adapters_off":
        return Retain(cfg, dataset, mode, None)
    run_file = RunPaths(trainer.run_dir).retain_base
    if trainer.resumed_from is not None:
        return resumed(cfg, dataset, mode, run_file, trainer.telemetry.info)
    base = ReferenceLogps({SPLIT: base_rows_of(trainer, dataset, cfg.top_k)})
    full: Optional[BaseException] = None
    if trainer.dist.is_main:
        try:
            base.save(run_file, "retain")
        except (OSError, RuntimeError) as e:
            if not disk_full(e, run_file.parent):
                raise
            full = e
    if reduce_sum(float(full is not None)):  # every rank stops, not only the one that wrote
        raise CheckpointWriteError(
            f"{run_file} (the base's side of the retain set) was not written: no space left on device; "
            "free space in the run dir, or set eval.retain.enabled=false"
        ) from full
    return Retain(cfg, dataset, mode, base)


def resumed(cfg: RetainConfig, dataset: Any, mode: str, run_file: Path, say: Callable[[str], None]) -> Optional[Retain]:
    """A resumed full fine-tune reads the starting model's rows back. Without them (a run dir from
    before ftl measured forgetting, or a checkpoint copied alone) no figure can be had: that is said,
    and is an error only where a limit was asked for."""
    what = "the base's next-token distributions on the retain set"
    if run_file.is_file() or cfg.max_kl is not None or cfg.max_loss_increase is not None:
        return Retain(cfg, dataset, mode, resumed_copy(run_file, what))
    say(f"ftl: {run_file} is missing ({what}, from the starting model): this run reports no retain figures")
    return None


def retain_dataset(cfg: Any, tokenizer: Any) -> Any:
    """The retain file tokenized as the run's data are (its chat template, label rule, seq_len), never packed."""
    from launcher.data.cache import build_in_memory

    data = dataclasses.replace(
        cfg.data,
        format=cfg.eval.retain.format,
        train_files=[cfg.eval.retain.path or asset(SHIPPED)],
        eval_files=[],
        sources=[],
        eval_fraction=0.0,
        max_train_examples=None,
        text_field="text",
        packing=False,
        shuffle=False,
        truncation="clip",
        on_error="raise",
    )
    dataset, _ = build_in_memory(data, tokenizer, cfg.train.seq_len, cfg.train.seed)
    if len(dataset) == 0:
        raise DataError(f"the retain set {data.train_files[0]} holds no examples (eval.retain.path)")
    return dataset
