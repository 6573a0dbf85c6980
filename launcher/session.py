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


def load_config(overrides: list[str], *, check_run_dir: bool = False) -> LoadedConfig:
    """Compose and validate; raises ConfigErrors with every problem at once (with
    ``check_run_dir``, the run dir's problems too). Secrets in the overrides and in launch.env are
    declared to the redactor before anything can be printed."""
    from launcher.config.compose import compose
    from launcher.config.validate import validate
    from launcher.redact import declare, is_secret_key, override_secrets

    declare(override_secrets(overrides))
    raw, choices, errors = compose(overrides)
    env = (raw.get("launch") or {}).get("env")
    if isinstance(env, dict):
        declare(str(v) for k, v in env.items() if is_secret_key(str(k)) and v is not None)
    cfg, more = validate(raw)
    errors += more
    if check_run_dir and not any(e.path == "run" or e.path.startswith("run.") for e in errors):
        from launcher.launch.run_dir import choose_run_dir, run_dir_errors

        errors += run_dir_errors(raw, choose_run_dir(raw))
    if errors:
        raise ConfigErrors(errors)
    return LoadedConfig(raw, cfg, choices)


def prepare_run(overrides: list[str]) -> PreparedRun:
    """The validated config with its run dir fixed and checked, and the launch plan its backend
    builds (pure)."""
    from launcher.launch import get_backend
    from launcher.launch.run_dir import choose_run_dir, config_path_for

    loaded = load_config(overrides, check_run_dir=True)
    run_dir = choose_run_dir(loaded.raw)
    loaded.raw["run"]["dir"] = str(run_dir)
    loaded.cfg.run.dir = str(run_dir)
    config_path = config_path_for(loaded.raw, run_dir)
    plan = get_backend(loaded.cfg.launch.backend).build(loaded.cfg, run_dir, config_path)
    return PreparedRun(loaded.raw, loaded.cfg, loaded.choices, plan, config_path)


def writes_run_dir(cfg: FtlConfig) -> bool:
    """Whether this launcher is the run dir's writer: every node of a multi-node torchrun job runs
    one, and only node 0's holds the lock (the others write only config.nodeN.yaml)."""
    return cfg.launch.backend != "torchrun" or cfg.launch.node_rank == 0


def launch(overrides: list[str]) -> int:
    """`ftl train`: refuse what cannot run (memory, this machine's GPUs) before anything is written
    or queued, then write the run dir and submit. Returns the exit code to give the user."""
    import os

    from launcher.launch import get_backend
    from launcher.launch.lock import LOCK_ENV, RunDirBusy, RunDirLock
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
    lock = RunDirLock(run.run_dir, "ftl train launcher") if writes_run_dir(run.cfg) else None
    try:
        if lock is not None:
            lock.acquire()
    except RunDirBusy as e:
        print(f"ftl train: {e}", file=sys.stderr)
        return EXIT_INVALID
    try:
        changes = write_run_dir(run.raw, run.plan, run.config_path, ["train", *overrides])
        if changes:
            print(f"ftl: {run.run_dir} holds an earlier run; config changes since then:", file=sys.stderr)
            for c in changes:
                print(f"  {c}", file=sys.stderr)
        print(f"ftl: run dir {run.run_dir}", file=sys.stderr)
        for line in run.plan.shell_lines():
            print(f"ftl: launching {line}", file=sys.stderr)
        if lock is not None and run.cfg.launch.backend != "slurm":
            lock.export()  # the trainers started here hold it through this launcher
        code = backend.submit(run.plan)
    finally:
        if lock is not None:
            lock.release()
            os.environ.pop(LOCK_ENV, None)
    print(f"ftl: {'done' if code == 0 else f'exit code {code}'}; run dir {run.run_dir}", file=sys.stderr)
    return code
