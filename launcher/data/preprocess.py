"""``ftl preprocess``: build (or find) a run's data cache alone, before any GPU is held, and say
what is in it. A later ``ftl train`` with the same overrides reads the same cache. With
``--fetch-model`` it also stages the model where the training job's ranks read it offline: a hub
model downloaded once into ``HF_HOME`` (``launch.hf_home`` in a SLURM job), SmolLM2 converted once
into ftl's cache. The SLURM preparation job (``launch.preprocess_job=true``) runs it that way."""

from __future__ import annotations

import os
from typing import Any

from launcher.config.schema import FtlConfig, ModelConfig

COLUMNS = (
    ("examples", "examples"),
    ("packs", "packs"),
    ("tokens", "tokens"),
    ("trainable_tokens", "trainable"),
    ("truncated", "clipped"),
    ("dropped", "dropped"),
    ("skipped", "skipped"),
    ("empty", "empty"),
    ("identical", "chosen=rejected"),
    ("packing_efficiency", "packing eff."),
)


def load_tokenizer_for(model_cfg: ModelConfig) -> Any:
    """The tokenizer the trainer gets from :func:`launcher.model.loading.load_model_and_tokenizer`,
    without loading any weights (the cache key depends on the tokenizer only)."""
    from launcher.model.loading import ensure_pad_token, load_tokenizer

    if model_cfg.source == "smollm2":
        from launcher.model.smollm2 import smollm2_dir

        path, revision = model_cfg.tokenizer or str(smollm2_dir()), None
    elif model_cfg.source == "hf":
        separate = bool(model_cfg.tokenizer) and model_cfg.tokenizer != model_cfg.path
        path, revision = model_cfg.tokenizer or model_cfg.path, None if separate else model_cfg.revision
    else:
        path, revision = model_cfg.tokenizer, None
    tokenizer = load_tokenizer(path, revision=revision, trust_remote_code=model_cfg.trust_remote_code)
    ensure_pad_token(tokenizer)
    return tokenizer


class ModelStagingError(RuntimeError):
    pass


def stage_model(model_cfg: ModelConfig) -> str:
    """Put the model's files where the trainer reads them, once; one line saying where they are.
    A hub id is downloaded into the Hugging Face cache (HF_HOME), all its files but second copies of
    the weights (.bin beside .safetensors, Meta's original/ checkpoint, other frameworks'): then
    32 ranks under HF_HUB_OFFLINE=1 read the one copy instead of each asking the hub."""
    from pathlib import Path

    if model_cfg.source == "smollm2":
        from launcher.model.smollm2 import smollm2_dir

        return f"model       SmolLM2-135M-Instruct converted in {smollm2_dir()}"
    if model_cfg.source == "random":
        return "model       model.source=random: nothing to stage"
    if Path(model_cfg.path).is_dir():
        return f"model       {model_cfg.path}: a local directory, read in place"
    from huggingface_hub import HfApi, constants, snapshot_download

    skip = list(HUB_SKIP)
    try:
        files = [] if constants.HF_HUB_OFFLINE else HfApi().list_repo_files(model_cfg.path, revision=model_cfg.revision)
        if any(f.endswith(".safetensors") for f in files):
            skip.append("*.bin")  # the same weights, pickled
        path = snapshot_download(model_cfg.path, revision=model_cfg.revision, ignore_patterns=skip)
    except Exception as e:  # network, authentication, a repo or revision that does not exist, offline without a copy
        where = os.environ.get("HF_HOME", "the Hugging Face cache (HF_HOME)")
        raise ModelStagingError(
            f"cannot stage model.path={model_cfg.path!r} into {where}: {type(e).__name__}: {e}"
        ) from None
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return f"model       {model_cfg.path} staged in {path} ({size / 1e9:,.1f} GB)"


# Weights a hub repo often carries a second time: Meta's original consolidated checkpoint, and
# other frameworks' formats (pickled .bin beside safetensors is decided per repo).
HUB_SKIP = ["original/*", "*.pth", "*.msgpack", "*.h5", "*.onnx", "*.ot"]


def run_preprocess(cfg: FtlConfig, fetch_model: bool = False, show: int = 0, color: bool = False) -> list[str]:
    """Prepare the data as rank 0 of a single process would (and, with ``fetch_model``, stage the
    model first); the report, line by line, and the first ``show`` training examples decoded with
    their trained tokens marked (:mod:`launcher.data.show`; ``color``: for a terminal)."""
    from launcher.data.cache import prepare
    from launcher.data.privacy import from_stats, report

    staged = [stage_model(cfg.model)] if fetch_model else []
    tokenizer = load_tokenizer_for(cfg.model)
    prepared = prepare(cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed)
    if prepared.directory is None:
        where = "data.cache=false: built in memory, nothing written"
    else:
        where = f"{'built' if prepared.built else 'reused'} {prepared.directory}"
    lines = [*staged, f"data cache  {where} ({prepared.seconds:.1f} s)"]
    lines += stats_table({"train": prepared.train.stats, **({"eval": prepared.eval.stats} if prepared.eval else {})})
    found = [
        *prepared.train.stats.get("privacy", []),
        *(prepared.eval.stats.get("privacy", []) if prepared.eval else []),
    ]
    lines += report(from_stats(found), cfg.data.privacy)
    efficiency = prepared.train.stats.get("packing_efficiency")
    if efficiency is not None:
        lines.append(
            f"packing     {efficiency:.2%} of train tokens are real (non-pad), in sequences of {cfg.train.seq_len}"
        )
    else:
        lines.append("packing     off (data.packing=false): batches are padded to their longest example")
    if show:
        from launcher.data.show import shown_examples

        lines += shown_examples(prepared.train, tokenizer, show, color=color)
    return lines


def stats_table(splits: dict[str, dict[str, Any]]) -> list[str]:
    columns = [(key, title) for key, title in COLUMNS if any(key in stats for stats in splits.values())]
    rows = [["split", *(title for _, title in columns)]]
    for name, stats in splits.items():
        rows.append([name, *(_cell(stats.get(key)) for key, _ in columns)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows
    ]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2%}"
    return f"{value:,}"
