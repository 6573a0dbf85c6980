"""`ftl export`: any engine's checkpoint → a Hugging Face ``save_pretrained`` directory.

Offline and on CPU: no process group, no GPU. The checkpoint is read back as Hugging Face weights
(:mod:`launcher.artifacts.weights`: the engine that wrote it consolidates its files) and written as
size-sharded safetensors with the tokenizer and its chat template, and a model card (``README.md``,
:mod:`launcher.artifacts.card`): plain ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads it.

LoRA/QLoRA runs (every checkpoint holds ``adapter/``, gathered from all ranks):

* ``merge_lora``: the adapter merged into the base weights (PEFT's ``merge_and_unload``), written
  as the plain Hugging Face directory above. The base is rebuilt from the run's model config (a
  checkpoint names and hashes it, never copies it; one whose files changed since is refused): LoRA
  in the dtype it trained in, QLoRA in full precision (the 4-bit weights it trained against are
  an approximation of those).
* otherwise: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and the
  tokenizer, with ``base_model_name_or_path`` naming the base: ``model.path`` (and ``revision``)
  for ``model.source=hf``; for ``smollm2`` the converted directory in ftl's cache
  (``$FTL_CACHE/smollm2-135m-instruct``, which ``ftl train`` creates); for ``random`` (a base that
  exists nowhere else) the base itself, exported into ``OUT/base``.
  ``peft.AutoPeftModelForCausalLM.from_pretrained(out)`` loads it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from launcher.artifacts.card import write_model_card
from launcher.artifacts.weights import (
    ArtifactInputError,
    CheckpointSource,
    build_hf_model,
    hf_config_and_tokenizer,
    load_checkpoint_config,
    read_checkpoint,
    refuse_nonfinite,
    resolve_source,
    set_chat_template,
)
from launcher.files import apply_umask, mark_dir, output_dir_problems
from launcher.progress import phase
from launcher.rundir import RunPaths

DTYPES = ("auto", "fp32", "bf16", "fp16")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


# --------------------------------------------------------------------------------------------
# pure: what to export


def parse_size(text: str) -> int:
    """'2GB' → 2_000_000_000, '500MiB' → 524_288_000, '1024' → 1024 bytes."""
    match = _SIZE.match(str(text))
    if not match or int(match.group(1)) == 0:
        raise ArtifactInputError(f"--max-shard-size {text!r}: expected a positive size such as 2GB, 500MB or 4GiB")
    return int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]


def default_out(source: CheckpointSource) -> Path:
    return RunPaths(source.run_dir).export_of(source.ckpt_dir.name)


def choose_checkpoint(path: Path, best: Optional[bool], log: Callable[[str], None] = print) -> Path:
    """What to export from ``path``: a run dir's best step's checkpoint with ``best`` (``--best``;
    None: when the run trained with early stopping, which kept that checkpoint), else ``path``
    as given (a run dir: its latest checkpoint)."""
    from launcher.rundir.resume import get, latest_checkpoint, list_complete

    path = Path(path).expanduser().resolve()
    run_dir = RunPaths(path).config.is_file()
    if best and not run_dir:
        raise ArtifactInputError(f"--best takes a run dir (whose checkpoints record their best eval), not {path}")
    latest = latest_checkpoint(path) if run_dir and best is not False else None
    if latest is None:  # a checkpoint dir, --latest, or no checkpoint (resolve_source says so)
        return path
    early_stopping = int(get(latest.config, "train.early_stopping.patience") or 0) > 0
    if best is None and not early_stopping:
        return path
    if latest.best_step is None:
        raise ArtifactInputError(
            f"--best: {path} ran no eval during training (eval.every_steps=0): it has no best step"
        )
    found = dict(list_complete(path)).get(latest.best_step)
    if found is None:
        raise ArtifactInputError(
            f"--best: the best eval of {path} was at step {latest.best_step}, whose checkpoint is not under "
            "checkpoints/ (only train.early_stopping keeps it); export a checkpoint dir or the latest (--latest)"
        )
    why = "--best" if best else "the run trained with early stopping; --latest exports the last checkpoint"
    log(f"ftl export: the best checkpoint, step {latest.best_step} of {latest.step} ({why})")
    return found


# --------------------------------------------------------------------------------------------
# the work


def export_checkpoint(
    path: Path,
    out: Optional[Path] = None,
    *,
    max_shard_size: str = "2GB",
    dtype: str = "auto",
    overwrite: bool = False,
    config: Optional[Path] = None,
    merge_lora: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    shard_bytes = parse_size(max_shard_size)
    if dtype not in DTYPES:
        raise ArtifactInputError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    source = resolve_source(path, config)  # verified: names, sizes and hashes
    out = Path(out).expanduser().absolute() if out else default_out(source)
    check_out(out, source, overwrite)
    cfg = load_checkpoint_config(source.config_path)
    engine = source.engine or cfg.strategy.engine
    peft = cfg.peft.method
    log(
        f"ftl export: {source.ckpt_dir} (engine {engine}, step {source.step}{f', peft {peft}' if peft != 'none' else ''})"
    )
    if merge_lora and peft == "none":
        log("ftl export: merge_lora ignored: this run trained every weight (peft.method=none)")
    if out.is_dir() and any(out.iterdir()):  # check_out allowed it: an earlier ftl export, with --overwrite
        log(f"ftl export: {out} holds an earlier export: replacing it once the new one is complete")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # ours alone: no other file is touched
    try:
        return _export_into(tmp, out, source, cfg, engine, peft, merge_lora, dtype, shard_bytes, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the export succeeded


def check_out(out: Path, source: CheckpointSource, overwrite: bool) -> None:
    """``--out`` may be a new or empty directory, or with ``--overwrite`` an earlier ftl export
    (its marker says so); never the working or home directory, the run or checkpoint being
    exported or anything holding them, a checkpoint dir, or a directory ftl did not write."""
    problems = output_dir_problems(
        out,
        "export",
        protect={"the run being exported": source.run_dir, "the checkpoint being exported": source.ckpt_dir},
    )
    if problems:
        raise ArtifactInputError(f"--out {out} " + "; ".join(problems))
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ArtifactInputError(f"{out} exists: an earlier export (pass --overwrite to replace it, or another --out)")


def _export_into(
    tmp: Path,
    out: Path,
    source: CheckpointSource,
    cfg: Any,
    engine: str,
    peft: str,
    merge_lora: bool,
    dtype: str,
    shard_bytes: int,
    log: Callable[[str], None],
) -> Path:
    mark_dir(tmp, "export")
    if peft != "none" and not merge_lora:
        with phase(f"export: writing the adapter to {out}"):
            base = export_adapter(source, cfg, engine, tmp, final_dir=out, max_shard_size=shard_bytes)
            write_model_card(tmp, source, cfg, kind="adapter")
        _replace(tmp, out)
        log(
            f"ftl export: wrote the {peft} adapter to {out} (base: {base}); load it with "
            f"peft.AutoPeftModelForCausalLM.from_pretrained({str(out)!r})"
        )
        return out
    with phase(f"export: reading {source.ckpt_dir.name} ({engine})"):
        if peft == "none":
            state_dict = read_checkpoint(source, engine)
            refuse_nonfinite(state_dict.items(), source.ckpt_dir)
            model, tokenizer = build_hf_model(cfg, state_dict, dtype)
            del state_dict
        else:
            model, tokenizer = merged_peft_model(source.ckpt_dir, dtype)
            refuse_nonfinite(model.named_parameters(), source.ckpt_dir)
    with phase(f"export: writing {out}"):
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard_bytes)
        tokenizer.save_pretrained(tmp)
        write_model_card(tmp, source, cfg, kind="model")
    _replace(tmp, out)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"ftl export: wrote {out} ({n_params / 1e6:.2f}M params, {model.dtype}); load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
    )
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Put the finished export in place; an earlier one (checked by :func:`check_out` to be an ftl
    export, or empty) goes only once the new one is complete beside it. It gets the user's umask."""
    apply_umask(tmp)
    if out.exists():
        old = out.with_name(f"{tmp.name}-old")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
        return
    os.rename(tmp, out)


def merged_peft_model(ckpt_dir: Path, dtype: str) -> tuple[Any, Any]:
    """A LoRA/QLoRA checkpoint's adapter merged into its full-precision base, in ``dtype``."""
    import torch

    from launcher.artifacts.weights import load_checkpoint_model

    model, tokenizer, _, _ = load_checkpoint_model(ckpt_dir, quantized=False)
    model = model.merge_and_unload()
    target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    model.to(target)
    model.eval()
    return model, tokenizer


def export_adapter(
    source: CheckpointSource, cfg: Any, engine: str, tmp: Path, *, final_dir: Path, max_shard_size: int
) -> str:
    """The checkpoint's ``adapter/`` and the run's tokenizer into ``tmp`` (renamed to ``final_dir``
    afterwards), ``base_model_name_or_path`` pointing at the base. Returns that reference."""
    from launcher.model.adapters import ADAPTER_CONFIG, ADAPTER_DIR, load_adapter_weights, set_adapter_base

    adapter_dir = source.ckpt_dir / ADAPTER_DIR
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ArtifactInputError(
            f"{source.ckpt_dir} has no {ADAPTER_DIR}/{ADAPTER_CONFIG}: written before ftl saved adapters?"
        )
    refuse_nonfinite(load_adapter_weights(adapter_dir).items(), source.ckpt_dir)
    shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True)
    _, tokenizer, _ = hf_config_and_tokenizer(cfg.model)
    set_chat_template(tokenizer, cfg)
    tokenizer.save_pretrained(tmp)
    revision = None
    if cfg.model.source == "hf":
        path = Path(cfg.model.path).expanduser()
        base, revision = (str(path.resolve()) if path.is_dir() else cfg.model.path), cfg.model.revision
    elif cfg.model.source == "smollm2":
        from launcher.model.smollm2 import smollm2_dir

        base = str(smollm2_dir())
    else:  # random: the base exists only in this run, rebuilt from its seed (checked against its hash)
        from launcher.artifacts.weights import peft_base

        model, _ = peft_base(source, cfg)
        model.float()
        model.save_pretrained(tmp / "base", safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp / "base")
        base = str(final_dir / "base")
    set_adapter_base(tmp, base, revision)
    return base
