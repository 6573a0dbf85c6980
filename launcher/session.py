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
    from launcher.train.resume import Verdict


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


def load_config(overrides: list[str]) -> LoadedConfig:
    """Compose and validate; raises ConfigErrors with every problem at once."""
    from launcher.config.compose import compose
    from launcher.config.user_data import follow_user_data
    from launcher.config.validate import validate

    raw, choices, errors = compose(overrides)
    notes = follow_user_data(raw, choices, overrides)  # a recipe's eval data follows the user's training data
    cfg, more = validate(raw)
    errors += more
    if errors:
        raise ConfigErrors(errors)
    return LoadedConfig(raw, cfg, choices, notes)


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
    return PreparedRun(loaded.raw, loaded.cfg, loaded.choices, loaded.notes, plan, config_path)


def launch(overrides: list[str]) -> int:
    """`ftl train`: refuse what cannot run (memory, this machine's GPUs) before anything is written
    or queued, then write the run dir and submit. Returns the exit code to give the user."""
    from launcher.launch import get_backend
    from launcher.launch.run_dir import write_run_dir
    from launcher.plan.report import memory_report, memory_verdict
    from launcher.train.resume import discard_checkpoints, finished_message, refusal

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
    verdict = resume_verdict_for(run)
    if verdict is not None and verdict.refused:
        print(f"ftl train: {refusal(verdict, run.run_dir, ['train', *overrides])}", file=sys.stderr)
        return EXIT_INVALID
    if verdict is not None and verdict.finished:
        print(f"ftl: {finished_message(verdict, run.run_dir)}", file=sys.stderr)
        return 0
    for line in run.notes + _resume_notes(run, verdict):  # the trainer tells the rest
        print(f"ftl: {line}", file=sys.stderr)
    if run.cfg.checkpoint.resume == "never":
        discard_checkpoints(run.run_dir)  # resume_lines said what goes
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
    if run.cfg.launch.backend != "slurm":  # a submitted job is not done: sbatch's backend says where it logs
        print(f"ftl: {'done' if code == 0 else f'exit code {code}'}; run dir {run.run_dir}", file=sys.stderr)
    return code


def resume_verdict_for(run: PreparedRun) -> Optional[Verdict]:
    """What the checkpoint this run would continue (checkpoint.resume) says about its config:
    None when it starts fresh. Reads the run dir; imports no torch."""
    import dataclasses

    from launcher.config.topology import world_size
    from launcher.train.resume import evaluated_after, is_complete, latest_checkpoint, read_checkpoint_info, resume_verdict

    resume = run.cfg.checkpoint.resume
    if resume == "never":
        return None
    if resume == "auto":
        info = latest_checkpoint(run.run_dir)
    else:
        path = Path(resume).expanduser()
        if not is_complete(path):
            from launcher.config.errors import ConfigError

            raise ConfigErrors([ConfigError("checkpoint.resume", f"{resume!r} is not a complete checkpoint (a step-N directory with "
                                                                 "a COMPLETE marker); allowed: auto, never, or such a directory")])  # fmt: skip
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
    from launcher.train.schedule import warmup_notice

    total = run.cfg.train.max_steps if run.cfg.train.max_steps > 0 else verdict.total_steps if verdict else None
    notice = warmup_notice(run.cfg.train, total) if total else None
    return run.notes + _resume_notes(run, verdict) + ([notice] if notice else [])


def _resume_notes(run: PreparedRun, verdict: Optional[Verdict]) -> list[str]:
    from launcher.config.topology import world_size
    from launcher.train.resume import cross_engine_notice, list_complete

    if run.cfg.checkpoint.resume == "never":
        steps = [path.name for _, path in list_complete(run.run_dir)]
        if not steps:
            return []
        return [f"checkpoint.resume=never: starting over; deleting the earlier run's checkpoints {', '.join(steps)} "
                f"in {run.run_dir / 'checkpoints'} (ftl wrote them)"]  # fmt: skip
    if verdict is None:
        return []
    ckpt = verdict.checkpoint
    of = f" of {verdict.total_steps}" if verdict.total_steps else ""
    lines = [f"resuming from {ckpt.path} (step {ckpt.step}{of})"]
    if verdict.cross_engine:
        lines.append(cross_engine_notice(verdict))
    if ckpt.world_size != world_size(run.cfg):
        lines.append(f"checkpoint step {ckpt.step} was written by {ckpt.world_size} rank(s); continuing on {world_size(run.cfg)}")
    return lines
