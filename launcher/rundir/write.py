"""The run directory: chosen once by the launcher and handed to every rank.

A run dir holds the resolved config.yaml, the exact launch command, logs, metrics.jsonl,
checkpoints/, eval.json, the W&B files and loss_curve.png. The default, runs/<run.name>, is
stable so the same command run again resumes the same run (checkpoint.resume=auto). A SLURM job's
default is runs/<run.name>-slurm: the same recipe submitted from the same checkout must not target,
and with more steps continue, a run made on this machine (another world size, another device).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path
from typing import Any

from launcher.config.errors import ConfigError
from launcher.files import mark_dir, output_dir_problems, write_atomic
from launcher.launch.base import LaunchPlan
from launcher.redact import known_secrets, redact, redact_overrides
from launcher.rundir.paths import RunPaths
from launcher.rundir.resume import config_diff
from launcher.shell import comment, join, quote

SLURM_SUFFIX = "-slurm"


def choose_run_dir(raw: dict[str, Any]) -> Path:
    """run.dir, else runs/<run.name>, and for a SLURM job runs/<run.name>-slurm."""
    run = raw["run"]
    if run["dir"]:
        return Path(run["dir"]).expanduser().resolve()
    suffix = SLURM_SUFFIX if raw["launch"].get("backend") == "slurm" else ""
    return (Path("runs") / f"{run['name']}{suffix}").resolve()


def config_path_for(raw: dict[str, Any], run_dir: Path) -> Path:
    """Every node of a multi-node torchrun job writes its own copy: only node_rank differs."""
    node_rank = raw["launch"].get("node_rank", 0) if raw["launch"].get("backend") == "torchrun" else 0
    return RunPaths(run_dir).node_config(node_rank)


def run_dir_errors(raw: dict[str, Any], run_dir: Path) -> list[ConfigError]:
    """What makes ``run_dir`` unusable, found before anything is written or launched (``ftl plan``
    reports them too): a place ftl must not write into (see
    :func:`launcher.files.output_dir_problems`: the working directory, a non-ftl directory, a
    file, somewhere unwritable, inside another run), and an earlier config.yaml that is not YAML."""
    where = "run.dir" if raw["run"].get("dir") else "run.name"
    if redact(str(run_dir), known_secrets()) != str(run_dir):
        return [ConfigError(where, "the run dir's path would hold a secret (the value of an API key or token)")]
    errors = [ConfigError(where, f"{run_dir} {p}") for p in output_dir_problems(run_dir, "run")]
    if errors or not run_dir.is_dir():
        return errors
    config = RunPaths(run_dir).config
    if config.exists():
        problem = _unreadable_config(config)
        if problem:
            errors.append(
                ConfigError(where, f"{config} {problem}: not an ftl config; move it away or choose another run.dir")
            )
    return errors


def _unreadable_config(path: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        return f"cannot be read ({e.__class__.__name__})"
    except yaml.YAMLError as e:
        return f"is not valid YAML ({str(e).splitlines()[0]})"
    return "" if isinstance(data, dict) else f"is not a mapping (a {type(data).__name__})"


def write_run_dir(raw: dict[str, Any], plan: LaunchPlan, config_path: Path, argv: list[str]) -> list[str]:
    """Write config, command and the plan's files. Returns what changed against an earlier config
    in the same dir (a resumed run with new overrides), for the user to see."""
    from omegaconf import OmegaConf

    run_dir = plan.run_dir
    mark_dir(run_dir, "run")
    secrets = known_secrets()
    stored = redact(raw, secrets)
    changes = _config_changes(config_path, stored) if config_path.exists() else []
    write_atomic(config_path, OmegaConf.to_yaml(OmegaConf.create(stored)))
    write_atomic(RunPaths(run_dir).launch_script, launch_script(plan, argv))
    for name, text in plan.files.items():
        write_atomic(run_dir / name, redact(text, secrets))
    return changes


def launch_script(plan: LaunchPlan, argv: list[str]) -> str:
    """launch.sh: the command that made the run (a comment: quoted words, one line, secrets
    blanked), then the job's commands. Secrets are read from the caller's environment."""
    head = comment(join(["ftl", *redact_overrides(argv, known_secrets())]))
    return "\n".join(["#!/usr/bin/env bash", head, f"cd {quote(os.getcwd())}", *_script_commands(plan), ""])


def _script_commands(plan: LaunchPlan) -> list[str]:
    """The plan's commands as launch.sh runs them: a job that depends on the one submitted before it
    (launch.preprocess_job's training job) reads that job's id from the first sbatch's --parsable
    output when the script runs, where `submit` fills in the placeholder. A random token stands in
    for the placeholder while the words are quoted, so no user text can be mistaken for it."""
    from launcher.launch.slurm import PREVIOUS_JOB

    token = "ftlpreviousjob" + secrets.token_hex(8)  # a plain word: quoting leaves it as is
    commands = [
        [w.replace(PREVIOUS_JOB, token) if w.startswith("--dependency=") else w for w in argv] for argv in plan.commands
    ]
    lines = dataclasses.replace(plan, commands=commands).shell_lines()
    out = []
    for line, following in zip(lines, [*lines[1:], ""]):
        line = line.replace(token, '"${previous_job%%;*}"')
        out.append(f"previous_job=$({line}) || exit" if token in following else line)
    return out


def _config_changes(path: Path, new: dict[str, Any]) -> list[str]:
    """Keys whose values differ from the earlier config.yaml; both sides are redacted (the stored
    one always was), so an unchanged secret is no change and a changed one is never shown."""
    from omegaconf import OmegaConf

    old = redact(OmegaConf.to_container(OmegaConf.load(path)), known_secrets())
    assert isinstance(old, dict)
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in config_diff(old, new, "")]
