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
from typing import TYPE_CHECKING, Any, Optional

from launcher.config.errors import EXIT_INVALID, ConfigErrors
from launcher.config.schema import FtlConfig
from launcher.launch.base import LaunchPlan

if TYPE_CHECKING:
    from launcher.rundir.resume import Verdict


@dataclass
class LoadedConfig:
    raw: dict[str, Any]  # the composed tree, as written into the run dir
    cfg: FtlConfig  # the same, bound to the schema and validated
    choices: dict[str, str]  # the option chosen in each config group (model=..., strategy=...)
    notes: list[str]  # what composition did that the overrides do not say


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
    from launcher.config.compose import compose, name_key_files
    from launcher.config.user_data import follow_user_data
    from launcher.config.validate import validate
    from launcher.redact import declare, is_secret_key, override_secrets

    declare(override_secrets(overrides))
    raw, choices, errors = compose(overrides)
    notes = follow_user_data(raw, choices, overrides)  # a recipe's eval data follows the user's training data
    env = (raw.get("launch") or {}).get("env")
    if isinstance(env, dict):
        declare(str(v) for k, v in env.items() if is_secret_key(str(k)) and v is not None)
    cfg, more = validate(raw)
    errors += name_key_files(more, choices, overrides)
    if check_run_dir and not any(e.path == "run" or e.path.startswith("run.") for e in errors):
        from launcher.rundir.write import choose_run_dir, run_dir_errors

        errors += run_dir_errors(raw, choose_run_dir(raw))
    if errors:
        raise ConfigErrors(errors)
    return LoadedConfig(raw, cfg, choices, notes)


def prepare_run(overrides: list[str]) -> PreparedRun:
    """The validated config with its run dir fixed and checked, and the launch plan its backend
    builds (pure)."""
    from launcher.launch import get_backend
    from launcher.rundir.write import choose_run_dir, config_path_for

    loaded = load_config(overrides, check_run_dir=True)
    loaded.notes += fix_estimates(loaded.raw, loaded.cfg)
    run_dir = choose_run_dir(loaded.raw)
    loaded.raw["run"]["dir"] = str(run_dir)
    loaded.cfg.run.dir = str(run_dir)
    config_path = config_path_for(loaded.raw, run_dir)
    plan = get_backend(loaded.cfg.launch.backend).build(loaded.cfg, run_dir, config_path)
    return PreparedRun(loaded.raw, loaded.cfg, loaded.choices, loaded.notes, plan, config_path)


def fix_estimates(raw: dict[str, Any], cfg: FtlConfig) -> list[str]:
    """The planner's estimates a run depends on, fixed here once and written into config.yaml, so
    every rank reads the launcher's number instead of estimating again: the checkpoint interval
    (``checkpoint.every_steps=auto``) and the I/O-phase timeout (``launch.io_timeout_s=null``).
    Returns the notes to print."""
    from launcher.plan.timing import io_timeout_s

    notes = []
    if cfg.checkpoint.every_steps == "auto":
        from launcher.plan.scale import resolved_every_steps

        every = resolved_every_steps(cfg)
        raw["checkpoint"]["every_steps"] = cfg.checkpoint.every_steps = every
        notes.append(
            f"checkpoint.every_steps=auto: every {every} steps (the Young/Daly interval; ftl plan's scale section)"
        )
    if cfg.launch.io_timeout_s is None:
        raw["launch"]["io_timeout_s"] = cfg.launch.io_timeout_s = io_timeout_s(cfg)
    return notes


def writes_run_dir(cfg: FtlConfig) -> bool:
    """Whether this launcher is the run dir's writer: every node of a multi-node torchrun job runs
    one, and only node 0's holds the lock (the others write only config.nodeN.yaml)."""
    return cfg.launch.backend != "torchrun" or cfg.launch.node_rank == 0


def launch(overrides: list[str]) -> int:
    """`ftl train`: refuse what cannot run (memory, this machine's GPUs) before anything is written
    or queued, then write the run dir and submit. Returns the exit code to give the user."""
    import os

    from launcher.data.heldout import held_out_notes
    from launcher.launch import get_backend
    from launcher.plan.report import memory_report, memory_verdict
    from launcher.rundir import RunPaths
    from launcher.rundir.lock import LOCK_ENV, RunDirBusy, RunDirLock
    from launcher.rundir.resume import finished_message, moved_message, refusal, set_aside_earlier_run
    from launcher.rundir.write import write_run_dir

    run = prepare_run(overrides)
    report = memory_report(run.cfg)
    if report.checked and not report.fits:
        print(
            f"ftl train: {memory_verdict(report)}; `ftl plan` shows the estimate "
            "(launch.check_memory=false skips this check)",
            file=sys.stderr,
        )
        return EXIT_INVALID
    backend = get_backend(run.cfg.launch.backend)
    errors = backend.preflight(run.cfg)  # what only this machine can tell, e.g. how many GPUs it has
    if errors:
        raise ConfigErrors(errors)
    verdict = resume_verdict_for(run)
    if verdict is not None and verdict.refused:
        print(f"ftl train: {refusal(verdict, run.run_dir, train_argv(overrides))}", file=sys.stderr)
        return EXIT_INVALID
    if verdict is not None and verdict.finished:
        print(f"ftl: {finished_message(verdict, run.run_dir)}", file=sys.stderr)
        return 0
    check_data_rows(run.cfg)
    for line in run.notes + _resume_notes(run, verdict) + held_out_notes(run.cfg.data):  # the trainer tells the rest
        print(f"ftl: {line}", file=sys.stderr)
    argv = train_argv(overrides)
    lock = RunDirLock(run.run_dir, "ftl train launcher") if writes_run_dir(run.cfg) else None
    try:
        if lock is not None:
            lock.acquire()
    except RunDirBusy as e:
        print(f"ftl train: {e}", file=sys.stderr)
        return EXIT_INVALID
    try:
        if run.cfg.checkpoint.resume == "never":
            moved = set_aside_earlier_run(run.run_dir)  # under the lock: no other writer is using them
            if moved is not None:
                print(f"ftl: {moved_message(*moved)}", file=sys.stderr)
        if run.config_path.is_file():
            print(
                f"ftl: {run.run_dir} holds an earlier run: replacing its {run.config_path.name} and {RunPaths.LAUNCH_SCRIPT}",
                file=sys.stderr,
            )
        changes = write_run_dir(run.raw, run.plan, run.config_path, argv)
        if changes:
            print("ftl: config changes since the earlier run:", file=sys.stderr)
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
    if run.cfg.launch.backend != "slurm":  # a submitted job is not done: sbatch's backend says where it logs
        print(f"ftl: {'done' if code == 0 else f'exit code {code}'}; run dir {run.run_dir}", file=sys.stderr)
    return code


def train_argv(overrides: list[str]) -> list[str]:
    """`ftl train` as this command runs it, its config dirs included (absolute): what launch.sh
    records and the printed hints repeat, so a pasted hint composes the same options."""
    from launcher.config.search_path import config_dirs

    return ["train", *(f"--config-dir={d}" for d in config_dirs()), *overrides]


def check_data_rows(cfg: FtlConfig) -> None:
    """Every row of the local data files read and parsed once, as the trainer will, before anything
    is written or launched: a file or (with data.on_error=raise) a row that does not read or parse
    is exit 2 here, naming the file and row, not a failed job later, and so is personal data or a
    credential under data.privacy=refuse (else the scan's report is printed). Tokenizing is the trainer's."""
    from launcher.config.errors import ConfigError
    from launcher.data.privacy import report
    from launcher.data.rows import DataError
    from launcher.data.sources import check_local_rows

    try:
        findings = check_local_rows(cfg.data)
    except DataError as e:
        raise ConfigErrors([ConfigError("data", str(e))]) from None
    for line in report(findings, cfg.data.privacy):
        print(f"ftl: {line}", file=sys.stderr)


def resume_verdict_for(run: PreparedRun) -> Optional[Verdict]:
    """What the checkpoint this run would continue (checkpoint.resume) says about its config:
    None when it starts fresh. Reads the run dir; imports no torch."""
    import dataclasses

    from launcher.config.topology import world_size
    from launcher.rundir.resume import (
        evaluated_after,
        is_complete,
        latest_checkpoint,
        read_checkpoint_info,
        resume_verdict,
    )

    resume = run.cfg.checkpoint.resume
    if resume == "never":
        return None
    if resume == "auto":
        info = latest_checkpoint(run.run_dir)
    else:
        path = Path(resume).expanduser()
        if not is_complete(path):
            from launcher.config.errors import ConfigError

            raise ConfigErrors(
                [
                    ConfigError(
                        "checkpoint.resume",
                        f"{resume!r} is not a complete checkpoint (a step-N directory with "
                        "a COMPLETE marker); allowed: auto, never, or such a directory",
                    )
                ]
            )
        info = read_checkpoint_info(path)
    if info is None:
        return None
    evaluated = resume == "auto" and evaluated_after(run.run_dir, info.step)
    verdict = resume_verdict(info, dataclasses.asdict(run.cfg), world_size(run.cfg), evaluated=evaluated)
    if resume != "auto":
        verdict.finished = False  # another run's checkpoint: this run has its own evaluation to do
    return verdict


def launch_notes(run: PreparedRun, verdict: Optional[Verdict]) -> list[str]:
    """What `ftl train` will do that the config alone does not say (ftl plan, ftl train): with the
    run dir's checkpoints, and with a warmup longer than the run."""
    from launcher.data.heldout import held_out_notes
    from launcher.runtime.schedule import warmup_notice

    total = run.cfg.train.max_steps if run.cfg.train.max_steps > 0 else verdict.total_steps if verdict else None
    notice = warmup_notice(run.cfg.train, total) if total else None
    return run.notes + _resume_notes(run, verdict) + ([notice] if notice else []) + held_out_notes(run.cfg.data)


def _resume_notes(run: PreparedRun, verdict: Optional[Verdict]) -> list[str]:
    from launcher.config.topology import world_size
    from launcher.rundir import RunPaths
    from launcher.rundir.resume import cross_engine_notice, earlier_run_files, list_complete

    if run.cfg.checkpoint.resume == "never":
        names = earlier_run_files(run.run_dir)
        if not names:
            return []
        steps = ", ".join(path.name for _, path in list_complete(run.run_dir))
        shown = [f"{n} ({steps})" if n == RunPaths.CHECKPOINTS and steps else n for n in names]
        return [
            f"checkpoint.resume=never: starting over; the earlier run's {', '.join(shown)} in {run.run_dir} "
            f"will be moved aside into {RunPaths.EARLIER_PREFIX}<time>/ (nothing is deleted)"
        ]
    if verdict is None:
        return []
    ckpt = verdict.checkpoint
    of = f" of {verdict.total_steps}" if verdict.total_steps else ""
    lines = [f"resuming from {ckpt.path} (step {ckpt.step}{of})"]
    if verdict.cross_engine:
        lines.append(cross_engine_notice(verdict))
    if ckpt.world_size != world_size(run.cfg):
        lines.append(
            f"checkpoint step {ckpt.step} was written by {ckpt.world_size} rank(s); continuing on {world_size(run.cfg)}"
        )
    return lines
