"""The run directory: chosen once by the launcher and handed to every rank.

A run dir holds the resolved config.yaml, the exact launch command, logs, metrics.jsonl,
checkpoints/, eval.json, the W&B files and loss_curve.png. The default, runs/<run.name>, is
stable so the same command run again resumes the same run (checkpoint.resume=auto).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from launcher.files import write_atomic
from launcher.launch.base import CONFIG_NAME, LaunchPlan
from launcher.redact import known_secrets, redact, redact_overrides

COMMAND_NAME = "launch.sh"


def choose_run_dir(raw: dict[str, Any]) -> Path:
    run = raw["run"]
    return Path(run["dir"] or Path("runs") / run["name"]).expanduser().resolve()


def config_path_for(raw: dict[str, Any], run_dir: Path) -> Path:
    """Every node of a multi-node torchrun job writes its own copy: only node_rank differs."""
    node_rank = raw["launch"].get("node_rank", 0) if raw["launch"].get("backend") == "torchrun" else 0
    return run_dir / (CONFIG_NAME if not node_rank else f"config.node{node_rank}.yaml")


def write_run_dir(raw: dict[str, Any], plan: LaunchPlan, config_path: Path, argv: list[str]) -> list[str]:
    """Write config, command and the plan's files. Returns what changed against an earlier config
    in the same dir (a resumed run with new overrides), for the user to see."""
    from omegaconf import OmegaConf

    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    changes = _config_changes(config_path, raw) if config_path.exists() else []
    write_atomic(config_path, OmegaConf.to_yaml(OmegaConf.create(redact(raw, known_secrets()))))
    script = ["#!/usr/bin/env bash", f"# ftl {shlex.join(redact_overrides(argv, known_secrets()))}", f"cd {shlex.quote(os.getcwd())}", *plan.shell_lines(), ""]
    write_atomic(run_dir / COMMAND_NAME, "\n".join(script))
    for name, text in plan.files.items():
        write_atomic(run_dir / name, redact(text, known_secrets()))
    return changes


def _config_changes(path: Path, new: dict[str, Any]) -> list[str]:
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(old, dict)
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in _diff(old, new, "")]


def _diff(a: Any, b: Any, path: str) -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if a == b else [(path, a, b)]

