"""``model.path`` naming an earlier stage: the start of the next one (SFT, then DPO), torch-free.

Besides a Hugging Face model directory, ``model.source=hf model.path=`` takes

* an ftl run dir (or one of its ``checkpoints/step-N`` dirs): its newest complete checkpoint. A
  full fine-tune starts from its weights; a LoRA/QLoRA run from its base with the adapter merged
  in. A new LoRA run then trains a fresh adapter on that merged model (its reference model, for
  DPO, is the merged SFT model too): the earlier adapter is not continued;
* a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, as ``ftl
  export`` writes one, TRL and axolotl too): the base it names with the adapter merged in.

Here, at composition, only what planning needs: the architecture (the earlier run's
``model.arch``, or the adapter's base's config.json) and a digest of what the start is made from.
The rank that trains makes the start a Hugging Face directory once, in its own run dir
(:mod:`launcher.artifacts.stages`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.files import CHECKPOINT_MARKER, checkpoint_problem, file_hashes, is_run_dir, step_of
from launcher.rundir import RunPaths

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name (launcher.model.adapters spells it too, with torch)


class StageError(ValueError):
    """``model.path`` looks like an earlier stage but cannot start one (the reason)."""


@dataclass(frozen=True)
class EarlierStage:
    kind: str  # "run" (a run dir or one of its checkpoints) or "adapter"
    path: Path  # the checkpoint dir (run) or the adapter dir
    model: dict[str, Any]  # run: the earlier run's model.* (its config.yaml); adapter: {}
    peft: str  # run: the earlier run's peft.method; adapter: "lora"
    base: str  # adapter: base_model_name_or_path; run: ""
    digest: str  # of what the start is made from: a new checkpoint or adapter is a new start

    def describe(self) -> str:
        if self.kind == "adapter":
            return f"the adapter {self.path} merged into its base {self.base}"
        what = "base + merged adapter" if self.peft != "none" else "weights"
        return f"the {what} of {self.path}"


def earlier_stage(path: str) -> Optional[EarlierStage]:
    """What ``model.path`` names when it is an earlier stage; None for anything else (a model
    directory, a hub id). Raises StageError for a run with no usable checkpoint."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    if (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file():
        return _adapter_stage(p)
    if (p / CHECKPOINT_MARKER).is_file() and is_run_dir(p.parent.parent):
        return _run_stage(p.parent.parent, p)
    if is_run_dir(p):
        return _run_stage(p, _newest_complete(p))
    return None


def _newest_complete(run_dir: Path) -> Path:
    root = RunPaths(run_dir).checkpoints
    steps = sorted(
        (step_of(c.name), c)
        for c in (root.iterdir() if root.is_dir() else [])
        if step_of(c.name) is not None and (c / CHECKPOINT_MARKER).is_file()
    )
    for _, candidate in reversed(steps):
        if checkpoint_problem(candidate) is None:
            return candidate
    raise StageError(f"{run_dir} is an ftl run with no complete checkpoint to start from (train it first)")


def _run_stage(run_dir: Path, ckpt: Path) -> EarlierStage:
    from launcher.safe_read import read_yaml_text

    problem = checkpoint_problem(ckpt)
    if problem:
        raise StageError(f"checkpoint {ckpt} is damaged: {problem}")
    config_file = RunPaths(run_dir).config
    try:
        import yaml

        config = yaml.safe_load(read_yaml_text(config_file)) or {}  # checked by read_yaml_text first
    except Exception as e:  # noqa: BLE001 - any unreadable file: said so, with the file
        raise StageError(f"cannot read the earlier run's config {config_file}: {e}") from None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise StageError(f"{config_file} holds no model section")
    digest = hashlib.sha256((ckpt / CHECKPOINT_MARKER).read_bytes()).hexdigest()
    peft = str((config.get("peft") or {}).get("method", "none"))
    return EarlierStage("run", ckpt.resolve(), model, peft, "", digest)


def _adapter_stage(adapter_dir: Path) -> EarlierStage:
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise StageError(f"{adapter_dir / ADAPTER_CONFIG} does not read ({type(e).__name__}: {e})") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise StageError(
            f"{adapter_dir / ADAPTER_CONFIG} names no base model (base_model_name_or_path): "
            "an adapter starts a stage only on the base it was trained on"
        )
    files = sorted(f for f in adapter_dir.iterdir() if f.is_file() and f.name.startswith("adapter_"))
    digest = hashlib.sha256(
        json.dumps({"base": base, "files": dict(zip((f.name for f in files), file_hashes(files)))}).encode()
    ).hexdigest()
    return EarlierStage("adapter", adapter_dir.resolve(), {}, "lora", str(base), digest)
