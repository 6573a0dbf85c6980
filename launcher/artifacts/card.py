"""The model card of an export: ``README.md`` in Hugging Face's form (YAML front matter, then text).

What the front matter holds: the base model, the training data files with their sha256, the
recipe and the command's overrides, the metrics at the exported step (its training loss, the
evaluations at that step and before training), and the ftl version — under ``ftl:``, beside the
Hub's own keys (``base_model``, ``library_name``, ``tags``).

Names, not local paths: a card is made to travel with the model (to the Hub, to a colleague), and
an absolute path says nothing there but a user name and a cluster's layout; each data file is its
name, size and sha256, which identify it wherever it lies, and the base is its hub id (a local base
directory: its name, and with a LoRA run the sha256 its checkpoints recorded). Everything goes
through :func:`launcher.redact.redact`: no secret reaches the card.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from launcher import shell
from launcher.files import file_hashes
from launcher.rundir import RunPaths

CARD = "README.md"


def model_card(source: Any, cfg: Any, *, kind: str) -> str:
    """The card's text for the export of ``source`` (a CheckpointSource) of the run ``cfg``;
    ``kind``: "model" (full weights) or "adapter" (a PEFT adapter)."""
    import yaml

    import launcher
    from launcher.redact import known_secrets, redact
    from launcher.rundir.resume import read_checkpoint_info

    paths = RunPaths(source.run_dir)
    command = _command(paths.launch_script)
    base = _base(cfg, read_checkpoint_info(source.ckpt_dir).base)
    ftl = {
        "version": launcher.__version__,
        "run": Path(source.run_dir).name,
        "checkpoint": source.ckpt_dir.name,
        "step": source.step,
        "objective": cfg.objective.method,
        "peft": cfg.peft.method,
        "base_model": base,
        "recipe": next((w.split("=", 1)[1] for w in command if w.startswith("recipe=")), "demo"),
        "overrides": [_names_only(w) for w in command if "=" in w and not w.startswith(("recipe=", "run.dir="))],
        "data": _data_files(cfg),
        "metrics": _metrics(paths, source.step),
    }
    front = {
        "base_model": base.get("name"),
        "library_name": "peft" if kind == "adapter" else "transformers",
        "tags": ["ftl", cfg.objective.method] + ([cfg.peft.method] if cfg.peft.method != "none" else []),
        "ftl": ftl,
    }
    front = redact(front, known_secrets())
    title = f"{ftl['run']} ({source.ckpt_dir.name})"
    what = "A LoRA adapter" if kind == "adapter" else "A model"
    body = (
        f"# {title}\n\n{what} fine-tuned with ftl {launcher.__version__} ({cfg.objective.method}, "
        f"peft {cfg.peft.method}) from `{base.get('name')}`, exported from step {source.step}.\n\n"
        "The front matter above records the base model, the training data (name, size and sha256 of each "
        "file), the recipe and overrides, and the metrics at this step.\n"
    )
    return (
        "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + redact(body, known_secrets())
    )


def write_model_card(out: Path, source: Any, cfg: Any, *, kind: str) -> Path:
    path = Path(out) / CARD
    path.write_text(model_card(source, cfg, kind=kind))
    return path


def _command(launch_script: Path) -> list[str]:
    """The words of the command that made the run (launch.sh's second line, a comment written
    redacted and quoted), after ``ftl train``."""
    try:
        line = launch_script.read_text().splitlines()[1]
        words = shell.split(line.removeprefix("#").strip())
    except (OSError, IndexError, ValueError):
        return []
    return words[2:] if words[:2] == ["ftl", "train"] else words[1:]


_LOCAL_PATH = re.compile(r"(?<![\w.:])~?/[^\s,\[\]'\"]*")


def _names_only(text: str) -> str:
    """An override with each local path cut to its last component (``data.train_files=[/home/me/x.jsonl]``
    → ``data.train_files=[x.jsonl]``); run.dir is left out altogether."""
    return _LOCAL_PATH.sub(lambda m: Path(m.group(0)).name or m.group(0), text)


def _base(cfg: Any, record: dict[str, Any]) -> dict[str, Any]:
    m = cfg.model
    if m.source == "hf":
        local = Path(m.path).expanduser()
        name = local.name if local.is_dir() else m.path
    elif m.source == "smollm2":
        name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    else:
        name = f"random {m.arch.model_type} (model.arch, train.seed {cfg.train.seed})"
    out = {"name": name, "source": m.source}
    if m.revision:
        out["revision"] = m.revision
    if record.get("sha256"):
        out["sha256"] = record["sha256"]
    return out


def _data_files(cfg: Any) -> list[dict[str, Any]]:
    """Each training and evaluation file: its name, split, size and sha256 (a folder: each file in it)."""
    d = cfg.data
    entries = [(p, "train") for p in d.train_files] + [(p, "eval") for p in d.eval_files]
    entries += [(s.path, getattr(s, "split", "train") or "train") for s in d.sources]
    out: list[dict[str, Any]] = []
    for given, split in entries:
        if str(given).startswith("hub:"):
            out.append({"hub": str(given)[4:], "split": split})
            continue
        root = Path(given).expanduser()
        files = (
            sorted(f for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))
            if root.is_dir()
            else [root]
        )
        present = [f for f in files if f.is_file()]
        for f, digest in zip(present, file_hashes(present)):
            name = str(f.relative_to(root.parent)) if root.is_dir() else f.name
            out.append({"file": name, "split": split, "bytes": f.stat().st_size, "sha256": digest})
        out += [{"file": f.name, "split": split, "missing": True} for f in files if not f.is_file()]
    return out


def _metrics(paths: RunPaths, step: int) -> dict[str, Any]:
    """The training row at ``step`` (loss, tokens, ...) and the evaluations at that step and before training."""
    out: dict[str, Any] = {}
    if paths.metrics.is_file():
        for line in paths.metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step") == step:
                out["train"] = {k: v for k, v in row.items() if k in ("loss", "lr", "grad_norm", "elapsed")}
    try:
        evals = json.loads(paths.eval.read_text()) if paths.eval.is_file() else {}
    except ValueError:
        evals = {}
    for name, results in evals.items():
        if isinstance(results, dict) and (name == "before" or results.get("step") == step):
            out[f"eval_{name}"] = {k: v for k, v in results.items() if isinstance(v, (int, float)) and k != "step"}
    return out
