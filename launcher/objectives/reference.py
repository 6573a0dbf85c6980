"""Reference log-probs computed once, and preference metrics on the eval split.

With ``objective.reference=precomputed`` (DPO's default for full fine-tuning) the reference model
is the policy before its first step: one pass over the training and eval pairs before training
stores each sequence's summed log-prob, and the model itself serves as the policy from then on.
No second model is ever held (TRL calls this ``precompute_ref_log_probs``).

The values are cached under ``$FTL_CACHE/reference/<key>.pt``, the key hashing the token ids of
every pair, the model (its config, adapters, precision, engine) and, for a random model, the seed:
a sweep over β computes them once. The run dir keeps its own copy, ``reference_logps.pt``, which
is what a resumed run reads: its model has trained since, so it could not recompute them.

The pass is distributed like evaluation: each rank runs its share of batches (the same number of
forward passes on every rank, as FSDP and ZeRO-3 need), then one all-reduce gives every rank all
of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from launcher.data.build import collate
from launcher.data.packing import flattens_packs
from launcher.data.types import DataError
from launcher.eval.metrics import eval_mode, rank_batches
from launcher.objectives.base_dist import base_pass
from launcher.objectives.losses import sequence_logps
from launcher.paths import cache_dir
from launcher.rundir import RunPaths
from launcher.runtime.distributed import all_reduce_sum, any_rank

VERSION = 1


@dataclass
class ReferenceLogps:
    """Per split: every sequence's summed log-prob in dataset order, and where each example's start."""

    splits: dict[str, tuple[torch.Tensor, list[int]]]

    def lookup(self, split: str, indices: list[int]) -> torch.Tensor:
        values, offsets = self.splits[split]
        return torch.cat([values[offsets[i] : offsets[i + 1]] for i in indices])

    def save(self, path: Path, key: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"version": VERSION, "key": key, "splits": {k: (v, o) for k, (v, o) in self.splits.items()}}, tmp)
        os.replace(tmp, path)

    @staticmethod
    def load(path: Path, key: Optional[str] = None) -> Optional["ReferenceLogps"]:
        if not path.is_file():
            return None
        data = torch.load(path, weights_only=True)
        if data.get("version") != VERSION or (key is not None and data.get("key") != key):
            return None
        return ReferenceLogps({k: (v, list(o)) for k, (v, o) in data["splits"].items()})


def sequences_per_example(dataset: Any) -> list[int]:
    return [sum(1 for p in example["position_ids"] if p == 0) for example in dataset]


def reference_key(trainer: Any) -> str:
    """What the reference log-probs depend on: the pairs' tokens, the model and how it runs."""
    cfg = trainer.cfg
    digest = hashlib.sha256()
    for ds in (trainer.train_ds, trainer.eval_ds):
        for example in ds or []:
            for name in ("input_ids", "labels", "position_ids"):
                digest.update(np.asarray(example[name], dtype=np.int64).tobytes())
        digest.update(b"|")
    material = {
        "version": VERSION,
        "data": digest.hexdigest(),
        "model": dataclasses.asdict(cfg.model),
        "peft": dataclasses.asdict(cfg.peft),
        "precision": cfg.train.precision,
        "fp32_residual": cfg.train.fp32_residual,
        "device": trainer.device.type,
        "engine": trainer.engine.name,
        "seed": cfg.train.seed if cfg.model.source == "random" else None,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def prepare_reference(trainer: Any) -> ReferenceLogps:
    """The run dir's copy (a resumed run), the cache's, or a pass over the data now."""
    run_file = RunPaths(trainer.run_dir).reference_logps
    key = reference_key(trainer)
    if trainer.resumed_from is not None:  # the resume check has refused other data or another model
        return resumed_copy(run_file, "the reference log-probs of a DPO run")
    cached = cache_dir() / "reference" / f"{key}.pt"
    found = ReferenceLogps.load(cached, key)
    if any_rank(found is None):  # every rank computes, or none: the pass is collective
        trainer.telemetry.info("computing the reference log-probs (one pass over the pairs with the starting model)")
        found = compute_reference(trainer)
        if trainer.dist.is_main:
            cached.parent.mkdir(parents=True, exist_ok=True)
            found.save(cached, key)
    if trainer.dist.is_main:
        found.save(run_file, key)
    return found


def compute_reference(trainer: Any) -> ReferenceLogps:
    splits = {"train": trainer.train_ds, **({"eval": trainer.eval_ds} if trainer.eval_ds is not None else {})}
    return ReferenceLogps({name: reference_pass(trainer, ds) for name, ds in splits.items()})


def reference_pass(trainer: Any, dataset: Any) -> tuple[torch.Tensor, list[int]]:
    counts = sequences_per_example(dataset)
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    values = torch.zeros(offsets[-1], dtype=torch.float64, device=trainer.device)
    batch_size = trainer.cfg.train.micro_batch_size
    flatten = flattens_packs(trainer.cfg.model.attn_implementation)
    model = trainer.engine.model
    with eval_mode(model):
        for indices in rank_batches(len(dataset), batch_size, trainer.dist.rank, trainer.dist.world_size):
            chosen = list(indices) if indices is not None else [0]  # a short rank keeps step with a repeat
            batch = collate([dataset[i] for i in chosen], trainer.tokenizer.pad_token_id, flatten=flatten)
            sums, _ = sequence_logps(
                model, {k: v.to(trainer.device) for k, v in batch.items()}, trainer.engine.autocast()
            )
            if indices is not None:
                values[offsets[chosen[0]] : offsets[chosen[-1] + 1]] = sums
    return all_reduce_sum(values).cpu(), offsets


def resumed_copy(run_file: Path, what: str) -> ReferenceLogps:
    """What a resumed run reads back: values its starting model gave, which it no longer has."""
    found = ReferenceLogps.load(run_file)
    if found is None:
        raise DataError(
            f"{run_file} is missing: {what} come from its starting model, "
            "which a resumed run no longer has; start afresh (checkpoint.resume=never or a new run.name)"
        )
    return found


def prepare_base_rows(trainer: Any, top_k: int) -> ReferenceLogps:
    """objective.kl_to_base under full fine-tuning: the starting model's top-k rows over the training
    split (:func:`launcher.objectives.base_dist.base_pass`), computed once; the run dir keeps them for a resume."""
    run_file = RunPaths(trainer.run_dir).base_rows
    if trainer.resumed_from is not None:
        return resumed_copy(run_file, "the base's next-token distributions of objective.kl_to_base")
    trainer.telemetry.info("computing the base's next-token distributions (one pass over the training data)")
    found = ReferenceLogps({"train": base_rows_of(trainer, trainer.train_ds, top_k)})
    if trainer.dist.is_main:
        found.save(run_file, f"kl_to_base-top{top_k}")  # read back by a resume of this run only
    return found


def base_rows_of(trainer: Any, dataset: Any, top_k: int) -> tuple[torch.Tensor, list[int]]:
    """The starting model's top-k rows over ``dataset``, as this run's engine computes them."""
    return base_pass(
        trainer.engine.model,
        dataset,
        top_k=top_k,
        batch_size=trainer.cfg.train.micro_batch_size,
        pad_id=trainer.tokenizer.pad_token_id,
        device=trainer.device,
        autocast=trainer.engine.autocast(),
        flatten=flattens_packs(trainer.cfg.model.attn_implementation),
        rank=trainer.dist.rank,
        world_size=trainer.dist.world_size,
    )
