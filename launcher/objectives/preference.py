"""Preference objectives on (prompt, chosen, rejected) pairs: DPO (sigmoid, with label smoothing;
IPO as a loss variant) and the reference-free SimPO. The arithmetic is :mod:`launcher.objectives.losses`.

The reference is the base with the LoRA adapters switched off (no second copy), or the starting
model's log-probs computed once before training (:mod:`launcher.objectives.reference`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from launcher.config.schema import FtlConfig
from launcher.objectives.base import Objective
from launcher.objectives.losses import count_sequences, pair_stats, preference_losses, sequence_logps


class PreferenceObjective(Objective):
    def __init__(self, cfg: FtlConfig) -> None:
        self.cfg = cfg.objective
        self.name = self.cfg.method
        self.reference_mode = reference_mode(cfg)
        self.reference: Any = None  # launcher.objectives.reference.ReferenceLogps, when precomputed

    def prepare(self, trainer: Any) -> None:
        if self.reference_mode == "precomputed":
            from launcher.objectives.reference import prepare_reference

            self.reference = prepare_reference(trainer)

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return count_sequences(batch) // 2

    def loss(self, engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy, counts = sequence_logps(engine.model, batch, engine.autocast())
        reference = self.reference_logps(engine, batch, "train")
        losses, chosen, rejected = preference_losses(self.cfg, policy, counts, reference)
        return losses.sum(), pair_stats(chosen, rejected, policy)

    def reference_logps(self, engine: Any, batch: dict[str, torch.Tensor], split: str) -> Optional[torch.Tensor]:
        """Per-sequence log-prob sums of the reference model on ``batch`` (None for SimPO)."""
        if self.reference_mode == "none":
            return None
        if self.reference_mode == "precomputed":
            return self.reference.lookup(split, batch["index"].tolist()).to(batch["labels"].device)
        with torch.no_grad(), engine.peft_model.disable_adapter():
            return sequence_logps(engine.peft_model, batch, engine.autocast())[0]

    def eval_metrics(self, trainer: Any) -> dict[str, float]:
        """Preference metrics on the eval pairs, against this run's reference."""
        from launcher.data.packing import flattens_packs
        from launcher.eval.preference import preference_metrics
        from launcher.runtime.distributed import all_reduce_sum

        engine = trainer.engine
        return preference_metrics(
            engine.model,
            trainer.eval_ds,
            self.cfg,
            lambda batch: self.reference_logps(engine, batch, "eval"),
            batch_size=trainer.cfg.eval.batch_size,
            pad_id=trainer.tokenizer.pad_token_id,
            device=trainer.device,
            autocast=engine.autocast,
            max_batches=trainer.cfg.eval.max_batches,
            rank=trainer.dist.rank,
            world_size=trainer.dist.world_size,
            reduce_fn=all_reduce_sum,
            flatten=flattens_packs(trainer.cfg.model.attn_implementation),
        )


def reference_mode(cfg: FtlConfig) -> str:
    """none (SimPO), adapters_off or precomputed; ``auto`` is adapters_off under LoRA/QLoRA."""
    if cfg.objective.method == "simpo":
        return "none"
    if cfg.objective.reference != "auto":
        return cfg.objective.reference
    return base_mode(cfg)


def base_mode(cfg: FtlConfig) -> str:
    """How a run has its base model beside the one it trains: adapters_off under LoRA/QLoRA (the
    same model, adapters switched off), else precomputed (the starting model's values, computed once)."""
    return "adapters_off" if cfg.peft.method != "none" else "precomputed"
