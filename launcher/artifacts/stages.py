"""The start of a next stage made a Hugging Face directory: ``model.path`` naming an earlier ftl run
or a PEFT adapter (:mod:`launcher.config.stage` says what it names).

Rank 0 writes it once into this run's dir (``RUN_DIR/start-<digest>``): an earlier run's newest
complete checkpoint exported as ``ftl export --merge-lora`` would (full weights, or the base with the
adapter merged in, in fp32, with the tokenizer and chat template the earlier run trained with), or
an adapter merged into the base it names. Every rank then loads that directory as any
``model.source=hf`` model: every engine's way of loading (FSDP from rank 0, ZeRO-3 partitioned as it
loads) applies unchanged. A start made from the same checkpoint is reused (a resumed run continues
on the model it started from); one made from an older checkpoint is replaced, said so.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from launcher.config.schema import ModelConfig
from launcher.config.stage import EarlierStage, earlier_stage
from launcher.files import dir_kind, mark_dir
from launcher.rundir import RunPaths

READY = ".ftl-start-complete"  # written last: a start dir without it is never used


def start_model(model_cfg: ModelConfig, run_dir: Path, *, is_main: bool, log: Callable[[str], None]) -> ModelConfig:
    """``model_cfg`` itself, or for an earlier stage the same with ``path`` at its start dir, which
    rank 0 makes (the caller waits for it at a barrier before any rank loads)."""
    stage = earlier_stage(model_cfg.path) if model_cfg.source == "hf" and model_cfg.path else None
    if stage is None:
        return model_cfg
    out = RunPaths(run_dir).start(stage.digest)
    if is_main and not (out / READY).is_file():
        for old in sorted(Path(run_dir).glob(f"{RunPaths.START_PREFIX}*")):
            if old != out and dir_kind(old) == "export":  # ftl made it: an earlier start of this run
                log(f"ftl: removing {old}, the start made from an earlier checkpoint of {model_cfg.path}")
                shutil.rmtree(old)
        log(f"ftl: model.path={model_cfg.path}: starting from {stage.describe()}; writing it to {out}")
        make_start(stage, out)
    return dataclasses.replace(model_cfg, path=str(out), revision=None, tokenizer=model_cfg.tokenizer or "")


def make_start(stage: EarlierStage, out: Path) -> Path:
    if out.exists() and dir_kind(out) == "export":
        shutil.rmtree(out)  # ours, left by a job killed while writing it (no READY marker)
    if stage.kind == "run":
        from launcher.artifacts.export import export_checkpoint

        export_checkpoint(stage.path, out, dtype="fp32", merge_lora=stage.peft != "none", log=lambda _: None)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            mark_dir(tmp, "export")
            _merge_adapter(stage, tmp)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (out / READY).write_text(stage.digest + "\n")
    return out


def _merge_adapter(stage: EarlierStage, tmp: Path) -> None:
    """The base an adapter directory names, with the adapter merged in, in fp32; the adapter's
    tokenizer when it carries one (ftl export writes it, with its chat template), else the base's."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.model.adapters import attach_adapter
    from launcher.model.families import has_tokenizer
    from launcher.model.loading import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(stage.base, dtype=torch.float32)
    merged = attach_adapter(base, stage.path).merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(str(stage.path) if has_tokenizer(stage.path) else stage.base).save_pretrained(tmp)
