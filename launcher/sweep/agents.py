"""Agents: ``ftl sweep agent`` against a W&B server or ``--offline`` with W&B's search engine, running
trials here or submitting one SLURM job per trial (slurm/sweep.sbatch.j2).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from launcher.config.errors import ConfigError, ConfigErrors
from launcher.rundir import RunPaths
from launcher.shell import join, quote
from launcher.sweep.spec import (
    agent_args,
    check_no_conflict,
    check_trials,
    fixed_overrides,
    load_spec,
    merge_overrides,
    secret_overrides,
    sweep_dir_for,
)
from launcher.sweep.trial import OVERRIDES_ENV
from launcher.sweep.wandb_config import (
    expand_command,
    import_sweeps,
    schema_violations,
    wandb_online,
    wandb_sweep_config,
)

TEMPLATE = "sweep.sbatch.j2"


@dataclass(frozen=True)
class AgentArgs:
    count: Optional[int]
    overrides: list[str]


def parse_agent_args(tokens: list[str]) -> AgentArgs:
    count: Optional[int] = None
    rest = []
    for token in tokens:
        if token.startswith("count="):
            value = token.partition("=")[2]
            if not value.isdigit() or int(value) < 1:
                raise ConfigErrors([ConfigError("count", f"got {value!r}; expected a positive number of trials")])
            count = int(value)
        else:
            rest.append(token)
    return AgentArgs(count, rest)


def trial_environ(extra: list[str], environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """What a trial's environment needs from ftl: the agent's overrides, and this interpreter as
    the `python` the agent runs (``${interpreter}``)."""
    env = dict(os.environ if environ is None else environ)
    env[OVERRIDES_ENV] = json.dumps(extra)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def agent(sweep_id: str, tokens: list[str]) -> int:
    """`ftl sweep agent SWEEP_ID count=K [overrides]` against a W&B server."""
    args = parse_agent_args(tokens)
    fixed = server_fixed_overrides(sweep_id)
    check_no_conflict(args.overrides, fixed)
    from launcher.session import load_config

    loaded = load_config([*args.overrides, *fixed])
    raw, cfg = loaded.raw, loaded.cfg
    if cfg.launch.backend == "slurm" and args.count is None:
        raise ConfigErrors([ConfigError("count", "launch=slurm submits one job per trial: give count=K")])
    if not wandb_online():  # the jobs inherit this environment: their agents would have no key either
        print(
            "ftl sweep agent: no W&B API key (WANDB_API_KEY or `wandb login`): the W&B agent needs its server.\n"
            "Air-gapped: ftl sweep agent --offline SPEC count=K, ftl sweep optuna SPEC count=K, ftl train -m ...",
            file=sys.stderr,
        )
        return 2
    if cfg.launch.backend == "slurm":
        return submit_jobs(raw, cfg, sweep_id, args.overrides, [None] * args.count)  # type: ignore[operator]
    import wandb

    os.environ.update(trial_environ(args.overrides))
    wandb.agent(sweep_id, count=args.count)
    return 0


def server_fixed_overrides(sweep_id: str) -> list[str]:
    """The fixed overrides in the sweep's command on the server, to check the agent's against."""
    if not wandb_online():
        return []
    try:
        import wandb

        return fixed_overrides(wandb.Api().sweep(sweep_id).config.get("command") or [])
    except Exception as e:  # noqa: BLE001 - only a check; the trial validates its own config
        print(
            f"ftl: could not read sweep {sweep_id}'s command ({type(e).__name__}); not checking overrides against it",
            file=sys.stderr,
        )
        return []


def render_sweep_script(
    cfg: Any, sweep_dir: Path, sweep_id: str, extra: list[str], offline: bool, python: str, workdir: Path
) -> str:
    """Pure: the SLURM script of a sweep's trial jobs (slurm/sweep.sbatch.j2)."""
    from launcher.launch.slurm import jinja_env, template_values

    values = template_values(cfg, sweep_dir, RunPaths(sweep_dir).config, python, workdir)
    # launch.env secrets among the agent's overrides stay out of the script: sbatch hands them to
    # the job in its environment (launcher.launch.slurm.secret_env), and the trials inherit them.
    values.update(
        sweep_id=sweep_id,
        jobs_dir=str(sweep_dir / "jobs"),
        agent_overrides=json.dumps(secret_overrides(extra)[0]),
        offline=offline,
        script_path=str(sweep_dir / "sweep.sbatch"),
    )
    if not cfg.launch.job_name:
        values["job_name"] = f"ftl-sweep-{sweep_id}"
    return jinja_env().get_template(TEMPLATE).render(**values)


def submit_jobs(
    raw: dict[str, Any], cfg: Any, sweep_id: str, extra: list[str], trial_files: list[Optional[Path]]
) -> int:
    """One SLURM job per trial, all from one script rendered into the sweep dir."""
    from launcher.launch.slurm import UnsafeValue, run_sbatch, secret_env
    from launcher.rundir.write import choose_run_dir

    sweep_dir = sweep_dir_for(choose_run_dir(raw), sweep_id)
    script = sweep_dir / "sweep.sbatch"
    try:
        text = render_sweep_script(
            cfg, sweep_dir, sweep_id, extra, trial_files[0] is not None, sys.executable, Path.cwd()
        )
    except UnsafeValue as e:
        raise ConfigErrors([ConfigError(e.field, str(e))]) from None
    RunPaths(sweep_dir).logs.mkdir(parents=True, exist_ok=True)  # SLURM will not create it
    script.write_text(text)
    for trial_file in trial_files:
        argv = ["sbatch", "--parsable", str(script), *([str(trial_file)] if trial_file else [])]
        code, job_id = run_sbatch(argv, secret_env(cfg))
        if code:
            return code
        print(job_id)
    print(
        f"ftl: submitted {len(trial_files)} trial job(s) of sweep {sweep_id}; logs in {RunPaths(sweep_dir).logs}, "
        f"trials in {sweep_dir}/<run id>",
        file=sys.stderr,
    )
    return 0


def offline_agent(spec_arg: str, tokens: list[str]) -> int:
    """`ftl sweep agent --offline SPEC count=K [overrides]`: W&B's search engine, no server."""
    import yaml

    from launcher.rundir.write import choose_run_dir
    from launcher.sweep.multirun import print_trial_table, trial_metric

    args = parse_agent_args(tokens)
    if args.count is None:
        raise ConfigErrors([ConfigError("count", "give count=K: how many trials to run")])
    spec = load_spec(spec_arg)
    # No server to report to: the trials' W&B runs are offline ones (`wandb sync` later).
    if not any(o == "wandb.mode=disabled" for o in spec.overrides):
        spec.overrides = merge_overrides(spec.overrides, ["wandb.mode=offline"])
    check_no_conflict(args.overrides, spec.overrides + list(spec.parameters))
    raw, cfg = check_trials(spec, args.overrides)
    config = wandb_sweep_config(spec)
    violations = schema_violations(config)
    if violations:
        raise ConfigErrors([ConfigError("spec", f"W&B's sweep schema: {v}") for v in violations])
    sweep_id = "offline-" + hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    sweep_dir = sweep_dir_for(choose_run_dir(raw), sweep_id)
    params_dir = sweep_dir / "wandb" / f"sweep-{sweep_id}"  # where the W&B agent keeps them too
    params_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = trial_environ(args.overrides)
    env.update(WANDB_SWEEP_ID=sweep_id, WANDB_DIR=str(sweep_dir))
    # The sweep's command holds no secret: the trials read launch.env secrets from their environment.
    env.update(
        {name: str(cfg.launch.env[name]) for name in secret_overrides(spec.overrides)[1] if name in cfg.launch.env}
    )

    def draw(pending: list[Any]) -> Optional[tuple[str, dict[str, Any], Path]]:
        run = next_run(config, [*history(params_dir, sweep_dir, spec.metric.name), *pending])
        if run is None:
            return None
        run_id = new_run_id()
        params = {k: plain(v["value"]) for k, v in run.config.items()}
        path = params_dir / f"config-{run_id}.yaml"
        path.write_text(yaml.safe_dump({k: {"value": v} for k, v in params.items()}))
        return run_id, params, path

    if cfg.launch.backend == "slurm":
        sweeps = import_sweeps()
        files: list[Optional[Path]] = []
        pending: list[Any] = []
        for _ in range(args.count):
            drawn = draw(pending)
            if drawn is None:
                break
            run_id, params, path = drawn
            pending.append(
                sweeps.SweepRun(
                    name=run_id, state=sweeps.RunState.running, config={k: {"value": v} for k, v in params.items()}
                )
            )
            trial = {
                "argv": expand_command(config["command"], params, env),
                "run_dir": str(sweep_dir / run_id),
                "env": {
                    "WANDB_SWEEP_ID": sweep_id,
                    "WANDB_RUN_ID": run_id,
                    "WANDB_SWEEP_PARAM_PATH": str(path),
                    "WANDB_DIR": str(sweep_dir),
                },
            }
            files.append(sweep_dir / "trials" / f"{run_id}.json")
            files[-1].parent.mkdir(exist_ok=True)  # type: ignore[union-attr]
            files[-1].write_text(json.dumps(trial, indent=2) + "\n")  # type: ignore[union-attr]
        if len(files) < args.count:
            print(
                f"ftl: sweep {sweep_id}: the search space is exhausted after {len(files)} more trial(s)",
                file=sys.stderr,
            )
        return submit_jobs(raw, cfg, sweep_id, args.overrides, files) if files else 0

    rows = []
    for i in range(args.count):
        drawn = draw([])
        if drawn is None:
            print(f"ftl: sweep {sweep_id}: the search space is exhausted", file=sys.stderr)
            break
        run_id, params, path = drawn
        argv = expand_command(config["command"], params, env)
        print(f"ftl: offline sweep {sweep_id}, trial {i + 1}/{args.count} ({run_id}): {join(argv)}", file=sys.stderr)
        code = subprocess.run(
            argv, env={**env, "WANDB_RUN_ID": run_id, "WANDB_SWEEP_PARAM_PATH": str(path)}, check=False
        ).returncode
        rows.append((run_id, code, " ".join(agent_args(params)), sweep_dir / run_id))
        got = trial_metric(sweep_dir / run_id, spec.metric.name)
        print(
            f"ftl: trial {run_id} exited {code}; {got[0] + '=' + format(got[1], '.4f') if got else 'no metric'}",
            file=sys.stderr,
        )
    print_trial_table(rows, spec.metric.name, spec.metric.goal)
    print(f"sweep {sweep_id}: {sweep_dir}/<run id>; W&B offline runs: {wandb_sync_command(sweep_dir)}")
    return max((code for _, code, _, _ in rows), default=0) and 1


def wandb_sync_command(sweep_dir: Path) -> str:
    """The command that uploads an offline sweep's runs: the sweep dir one quoted word, the pattern
    after it left for the shell to expand."""
    return f"wandb sync {quote(str(sweep_dir))}/*/wandb/offline-run-*"


def next_run(config: dict[str, Any], runs: list[Any]) -> Any:
    return import_sweeps().next_run(config, runs)


def history(params_dir: Path, sweep_dir: Path, metric: str) -> list[Any]:
    """The sweep's earlier trials, as the search engine wants them: parameters and metric."""
    import yaml

    from launcher.sweep.multirun import trial_metric

    sweeps = import_sweeps()
    runs = []
    for path in sorted(params_dir.glob("config-*.yaml")):
        run_id = path.stem.removeprefix("config-")
        got = trial_metric(sweep_dir / run_id, metric)
        state = sweeps.RunState.finished if got else sweeps.RunState.running
        runs.append(
            sweeps.SweepRun(
                name=run_id,
                state=state,
                config=yaml.safe_load(path.read_text()),
                summary_metrics={metric: got[1]} if got else {},
            )
        )
    return runs


def new_run_id() -> str:
    """A W&B-style run id ([a-z0-9], 8 characters)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def plain(value: Any) -> Any:
    """numpy scalars from the search engine as Python numbers."""
    return value.item() if hasattr(value, "item") else value
