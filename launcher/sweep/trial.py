"""A trial: ``ftl train`` started by a W&B agent (or ftl's offline one), and, inside a SLURM sweep
job, the record a requeued job replays.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from launcher.config.errors import ConfigError, ConfigErrors
from launcher.config.search_path import hydra_quote
from launcher.files import mark_dir, write_atomic
from launcher.sweep.spec import check_no_conflict, safe_name, sweep_dir_for

# The environment the W&B agent gives a trial, and what a requeued trial needs of it again.
AGENT_ENV = ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR")
OVERRIDES_ENV = "FTL_SWEEP_OVERRIDES"  # JSON list: the overrides given to `ftl sweep agent`
JOB_ENV = "FTL_SWEEP_JOB"  # inside a SLURM sweep job: the trial record, jobs/<job id>.json


@dataclass(frozen=True)
class Trial:
    sweep_id: str
    run_id: str
    argv_overrides: list[str]  # as the agent gave them: the sweep's fixed overrides and parameters
    overrides: list[str]  # what the trial composes: + the agent's overrides, run.name, run.dir
    run_dir: Path
    backend: str
    job_record: Optional[Path]  # FTL_SWEEP_JOB: inside a SLURM sweep job


def agent_overrides(environ: Mapping[str, str]) -> list[str]:
    text = environ.get(OVERRIDES_ENV) or "[]"
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigErrors([ConfigError(OVERRIDES_ENV, f"expected a JSON list of overrides, got {text!r}")])
    return value


def trial_run_dir(base: Path, sweep_id: str, run_id: str) -> Path:
    return sweep_dir_for(base, sweep_id) / safe_name(run_id)


def sweep_trial(overrides: list[str], environ: Mapping[str, str]) -> Optional[Trial]:
    """The trial this `ftl train` is, when a W&B agent (or ftl's offline one) started it."""
    sweep_id, run_id = environ.get("WANDB_SWEEP_ID"), environ.get("WANDB_RUN_ID")
    if not (sweep_id and run_id):
        return None
    from launcher.config.compose import compose
    from launcher.rundir.write import choose_run_dir

    extra = agent_overrides(environ)
    check_no_conflict(extra, overrides)
    composed = [*extra, *overrides]
    raw, _, _ = compose(composed)  # what is wrong in it, prepare_run reports with the rest
    run_dir = trial_run_dir(choose_run_dir(raw), sweep_id, run_id)
    name = f"{raw['run']['name']}-{run_id}"
    job = environ.get(JOB_ENV)
    return Trial(
        sweep_id,
        run_id,
        list(overrides),
        [*composed, f"run.name={hydra_quote(name)}", f"run.dir={hydra_quote(str(run_dir))}"],
        run_dir,
        str(raw["launch"]["backend"]),
        Path(job) if job else None,
    )


def run_trial(trial: Trial, train_once: Any, environ: Mapping[str, str]) -> int:
    """Train the trial: here (train_once), or, inside a SLURM sweep job, across its allocation."""
    from launcher.rundir import RunPaths
    from launcher.sweep.multirun import shown

    print(f"ftl: sweep {trial.sweep_id} trial {trial.run_id}: {shown(trial.argv_overrides)}", file=sys.stderr)
    if trial.backend == "slurm" and trial.job_record is None:
        raise ConfigErrors(
            [
                ConfigError(
                    "launch",
                    "a sweep trial with launch=slurm runs inside its SLURM job: "
                    "`ftl sweep agent SWEEP_ID count=K launch=slurm ...` submits them",
                )
            ]
        )
    mark_dir(trial.run_dir, "run")
    # The W&B run the agent made is this run dir's run: a restart (requeue, resume) continues it.
    write_atomic(RunPaths(trial.run_dir).wandb_id, trial.run_id + "\n")
    if trial.job_record is None:
        return train_once(trial.overrides)
    record_trial(trial, environ)
    trial.job_record.with_suffix(".pid").write_text(f"{os.getpid()}\n")  # the job forwards its warning signal here
    from launcher.launch.slurm_job import main as run_in_allocation

    return run_in_allocation(trial.overrides)  # execs the run's job.sbatch in this process


def record_trial(trial: Trial, environ: Mapping[str, str]) -> None:
    """jobs/<job id>.json: what a requeued job runs again instead of drawing a new trial."""
    assert trial.job_record is not None
    record = {
        "argv": [sys.executable, "-m", "launcher", "train", *trial.argv_overrides],
        "env": {k: environ[k] for k in AGENT_ENV if environ.get(k)},
        "run_dir": str(trial.run_dir),
    }
    if trial.job_record.is_file():
        old = json.loads(trial.job_record.read_text())
        if old.get("env", {}).get("WANDB_RUN_ID") != trial.run_id:
            raise ConfigErrors(
                [
                    ConfigError(
                        JOB_ENV,
                        f"{trial.job_record} records run {old.get('env', {}).get('WANDB_RUN_ID')}, "
                        f"not {trial.run_id}: one trial per job",
                    )
                ]
            )
        return
    trial.job_record.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(trial.job_record, json.dumps(record, indent=2) + "\n")


def replay(record_path: str) -> int:
    """In a requeued sweep job: run the recorded trial again, same command, same W&B run."""
    record = json.loads(Path(record_path).read_text())
    argv, env = list(record["argv"]), {**os.environ, **record["env"]}
    print(
        f"ftl: job {os.environ.get('SLURM_JOB_ID', '?')} (restart {os.environ.get('SLURM_RESTART_COUNT', '0')}): "
        f"trial {record['env'].get('WANDB_RUN_ID')} of sweep {record['env'].get('WANDB_SWEEP_ID')}, run dir {record['run_dir']}",
        flush=True,
    )
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
