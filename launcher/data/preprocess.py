"""``ftl preprocess``: build (or find) a run's data cache alone, before any GPU is held, and say
what is in it. A later ``ftl train`` with the same overrides reads the same cache."""

from __future__ import annotations

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


def run_preprocess(cfg: FtlConfig) -> list[str]:
    """Prepare the data as rank 0 of a single process would; the report, line by line."""
    from launcher.data.cache import prepare

    tokenizer = load_tokenizer_for(cfg.model)
    prepared = prepare(cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed)
    if prepared.directory is None:
        where = "data.cache=false: built in memory, nothing written"
    else:
        where = f"{'built' if prepared.built else 'reused'} {prepared.directory}"
    lines = [f"data cache  {where} ({prepared.seconds:.1f} s)"]
    lines += stats_table({"train": prepared.train.stats, **({"eval": prepared.eval.stats} if prepared.eval else {})})
    efficiency = prepared.train.stats.get("packing_efficiency")
    if efficiency is not None:
        lines.append(f"packing     {efficiency:.2%} of train tokens are real (non-pad), in sequences of {cfg.train.seq_len}")
    else:
        lines.append("packing     off (data.packing=false): batches are padded to their longest example")
    return lines


def stats_table(splits: dict[str, dict[str, Any]]) -> list[str]:
    columns = [(key, title) for key, title in COLUMNS if any(key in stats for stats in splits.values())]
    rows = [["split", *(title for _, title in columns)]]
    for name, stats in splits.items():
        rows.append([name, *(_cell(stats.get(key)) for key, _ in columns)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2%}"
    return f"{value:,}"
