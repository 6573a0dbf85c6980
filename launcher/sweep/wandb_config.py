"""The W&B sweep config of a spec: its command runs ``ftl train``; ``ftl sweep create`` writes it and,
with an API key, creates the sweep on W&B. Also the W&B pieces the agents reuse: the `sweeps` package
(W&B's schema and search engine) and the agent's own expansion of a trial's command.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from launcher.config.errors import ConfigError, ConfigErrors
from launcher.files import write_atomic
from launcher.redact import known_secrets, redact
from launcher.shell import ftl_command, join, quote
from launcher.sweep.spec import SweepSpec, check_trials, load_spec, safe_name, secret_overrides

COMMAND_HEAD = ["${env}", "${interpreter}", "-m", "launcher", "train"]
ARGS_MACRO = "${args_no_hyphens}"


def wandb_sweep_config(spec: SweepSpec) -> dict[str, Any]:
    """The W&B sweep config: the spec's W&B fields and the command that runs `ftl train`."""
    out: dict[str, Any] = {
        "name": spec.name,
        "method": spec.method,
        "metric": {"name": spec.metric.name, "goal": spec.metric.goal},
    }
    if spec.description:
        out["description"] = spec.description
    out["parameters"] = {k: dict(v) for k, v in spec.parameters.items()}
    for key in ("early_terminate", "project", "entity"):
        if getattr(spec, key) is not None:
            out[key] = getattr(spec, key)
    kept, _ = secret_overrides(spec.overrides)  # launch.env secrets reach the trials through their environment
    out["command"] = [*COMMAND_HEAD, *kept, ARGS_MACRO]
    leaked = redact(out, known_secrets()) != out
    if leaked:
        raise ConfigErrors(
            [
                ConfigError(
                    "spec",
                    "holds the value of a secret (an API key or token from the environment), which a "
                    "sweep config (stored by W&B) must not",
                )
            ]
        )
    return out


def schema_violations(config: dict[str, Any]) -> list[str]:
    """W&B's own sweep-config schema check (the `sweeps` package, wandb[sweeps]), where installed."""
    try:
        sweeps = import_sweeps()
    except ImportError:
        return []
    return list(sweeps.schema_violations_from_proposed_config(config))


def import_sweeps() -> Any:
    """The `sweeps` package (W&B's sweep engine), without the pydantic-v1 warnings it prints on import."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


def expand_command(command: list[Any], params: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    """The argv the W&B agent runs for a trial (wandb/wandb_agent.py, Agent._command_run): macros
    replaced by wandb's own argument formats, ``${envvar:X}`` by wandb's own helper."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    sweep_vars: dict[str, Any] = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars.update(interpreter=["python"], env=["/usr/bin/env"])
    out: list[str] = []
    for c in create_sweep_command([str(c) for c in command]):
        if c.startswith("${") and c.endswith("}"):
            out += sweep_vars.get(c[2:-1]) or []
        else:
            out.append(c)
    return out


def wandb_online() -> bool:
    from launcher.wandb_auth import wandb_api_key_configured

    return wandb_api_key_configured()


SWEEP_FILE_HEADER = "# A W&B sweep config written by `ftl sweep create` (ftl may overwrite this file).\n"


def is_sweep_file(path: Path) -> bool:
    """A file `ftl sweep create` wrote (its header line), which it may overwrite."""
    try:
        with open(path) as f:
            return f.readline() == SWEEP_FILE_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def sweep_file(raw: dict[str, Any], name: str) -> Path:
    from launcher.rundir.write import choose_run_dir

    return choose_run_dir(raw).parent / f"sweep-{safe_name(name)}.yaml"


def create(spec_arg: str, extra: list[str], out: Optional[str], offline: bool) -> int:
    import yaml

    spec = load_spec(spec_arg, extra)
    raw, cfg = check_trials(spec, require_wandb=True)
    spec.project = spec.project or cfg.wandb.project
    spec.entity = spec.entity or cfg.wandb.entity
    config = wandb_sweep_config(spec)
    violations = schema_violations(config)
    if violations:
        raise ConfigErrors([ConfigError("spec", f"W&B's sweep schema: {v}") for v in violations])
    path = Path(out) if out else sweep_file(raw, spec.name)
    if path.exists() and not is_sweep_file(path):
        raise ConfigErrors(
            [ConfigError("--out", f"{path} exists and was not written by `ftl sweep create`; choose another --out")]
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, SWEEP_FILE_HEADER + yaml.safe_dump(config, sort_keys=False))
    print(f"ftl: wrote the W&B sweep config {path}", file=sys.stderr)
    _, env_names = secret_overrides(spec.overrides)
    if env_names:
        print(
            f"ftl: left out of the sweep's command (secrets): {', '.join(env_names)}; export them where the agents run",
            file=sys.stderr,
        )
    offline_cmds = [
        f"ftl sweep agent --offline {quote(path)} count=K    (W&B's search engine, no server)",
        f"ftl sweep optuna {quote(path)} count=K            (Optuna TPE via hydra-optuna-sweeper)",
    ]
    grid = [f"{k}={','.join(map(str, p['values']))}" for k, p in spec.parameters.items() if "values" in p]
    if len(grid) == len(spec.parameters):
        offline_cmds.append(
            f"{ftl_command(['ftl', 'train', '-m'], spec.overrides + grid)}    (every combination, Hydra's basic sweeper)"
        )
    if offline or not wandb_online():
        reason = "--offline" if offline else "no W&B API key (WANDB_API_KEY or `wandb login`)"
        print(
            f"ftl: {reason}: the sweep was not created. Where W&B is reachable:\n"
            f"  {join(['wandb', 'sweep', '--project', spec.project, path])}\n"
            f"  ftl sweep agent {quote(f'ENTITY/{spec.project}/SWEEP_ID')} count=K [launch=slurm launch.nodes=N ...]\n"
            "Air-gapped, the same search space:\n  " + "\n  ".join(offline_cmds)
        )
        return 0
    import wandb

    sweep_id = wandb.sweep(config, project=spec.project, entity=spec.entity)
    print(sweep_id)
    print(
        f"ftl: created sweep {sweep_id}; run trials with:\n"
        f"  ftl sweep agent {quote(sweep_id)} count=K                       (here)\n"
        f"  ftl sweep agent {quote(sweep_id)} count=K launch=slurm launch.nodes=N   (K SLURM jobs)",
        file=sys.stderr,
    )
    return 0
