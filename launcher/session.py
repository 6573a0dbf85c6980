"""Preparing a run, for every way one starts: `ftl plan` / `ftl train`, the per-rank entry when a
user runs torchrun themselves, the job entry of a plain `sbatch slurm/train.sbatch`, and sweep trials.

Compose and validate the overrides (:func:`load_config`), choose the run dir once and build the
launch plan (:func:`prepare_run`), then check, write the run dir and submit (:func:`launch`).
Imports no torch: `ftl plan` runs on login nodes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config.errors import EXIT_INVALID, ConfigErrors
from launcher.config.schema import FtlConfig
from launcher.launch.base import LaunchPlan


@dataclass
class LoadedConfig:
    raw: dict[str, Any]  # the composed tree, as written into the run dir
    cfg: FtlConfig  # the same, bound to the schema and validated
    choices: dict[str, str]  # the option chosen in each config group (model=..., strategy=...)


@dataclass
class PreparedRun(LoadedConfig):
    plan: LaunchPlan
    config_path: Path  # where every rank reads the resolved config

    @property
    def run_dir(self) -> Path:
        return self.plan.run_dir


def load_config(overrides: list[str]) -> LoadedConfig:
    """Compose and validate; raises ConfigErrors with every problem at once."""
    from launcher.config.compose import compose
    from launcher.config.validate import validate

    raw, choices, errors = compose(overrides)
    cfg, more = validate(raw)
    errors += more
    if errors:
        raise ConfigErrors(errors)
    return LoadedConfig(raw, cfg, choices)


def prepare_run(overrides: list[str]) -> PreparedRun:
    """The validated config with its run dir fixed, and the launch plan its backend builds (pure)."""
    from launcher.launch import get_backend
    from launcher.launch.run_dir import choose_run_dir, config_path_for

    loaded = load_config(overrides)
    run_dir = choose_run_dir(loaded.raw)
    loaded.raw["run"]["dir"] = str(run_dir)
    loaded.cfg.run.dir = str(run_dir)
    config_path = config_path_for(loaded.raw, run_dir)
    plan = get_backend(loaded.cfg.launch.backend).build(loaded.cfg, run_dir, config_path)
    return PreparedRun(loaded.raw, loaded.cfg, loaded.choices, plan, config_path)


def launch(overrides: list[str]) -> int:
    """`ftl train`: refuse what cannot run (memory, this machine's GPUs) before anything is written
    or queued, then write the run dir and submit. Returns the exit code to give the user."""
    from launcher.launch import get_backend
    from launcher.launch.run_dir import write_run_dir
    from launcher.plan.report import memory_report, memory_verdict

    run = prepare_run(overrides)
    report = memory_report(run.cfg)
    if report.checked and not report.fits:
        print(f"ftl train: {memory_verdict(report)}; `ftl plan` shows the estimate "
              "(launch.check_memory=false skips this check)", file=sys.stderr)  # fmt: skip
        return EXIT_INVALID
    backend = get_backend(run.cfg.launch.backend)
    errors = backend.preflight(run.cfg)  # what only this machine can tell, e.g. how many GPUs it has
    if errors:
        raise ConfigErrors(errors)
    from launcher.config.search_path import config_dirs

    argv = ["train", *(f"--config-dir={d}" for d in config_dirs()), *overrides]
    changes = write_run_dir(run.raw, run.plan, run.config_path, argv)
    if changes:
        print(f"ftl: {run.run_dir} holds an earlier run; config changes since then:", file=sys.stderr)
        for c in changes:
            print(f"  {c}", file=sys.stderr)
    print(f"ftl: run dir {run.run_dir}", file=sys.stderr)
    for line in run.plan.shell_lines():
        print(f"ftl: launching {line}", file=sys.stderr)
    code = backend.submit(run.plan)
    print(f"ftl: {'done' if code == 0 else f'exit code {code}'}; run dir {run.run_dir}", file=sys.stderr)
    return code
