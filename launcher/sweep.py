"""Sweeps: one search space (a spec in conf/sweep/ or a file), run by W&B or offline.

A spec is a W&B sweep config (method, metric, parameters, early_terminate, ...) whose parameter names are
ftl override keys, plus ``overrides``: the fixed part of every trial's ``ftl train`` command.

* ``ftl sweep create SPEC``: the W&B sweep config, whose command is
  ``${env} ${interpreter} -m launcher train FIXED... ${args_no_hyphens}``: the agent's parameters
  arrive as Hydra overrides ``key=value``. Created through the W&B API when an API key is set.
* ``ftl sweep agent SWEEP_ID count=K [overrides]``: trials here (``wandb.agent``; launch=local or
  torchrun), or K SLURM jobs, each drawing one trial with ``wandb agent --count 1`` and training
  across its allocation (launch=slurm).
* ``ftl sweep agent --offline SPEC count=K``: no server. W&B's own search engine (the ``sweeps``
  package behind W&B's local controller) draws the trials, and each runs exactly as the agent
  would run it: the same command expansion, WANDB_SWEEP_ID / WANDB_RUN_ID in its environment.
* ``ftl train -m`` and ``ftl sweep optuna SPEC`` (launcher/sweep_optuna.py): Hydra's sweepers.

A trial is ``ftl train`` started with WANDB_SWEEP_ID and WANDB_RUN_ID set (:func:`sweep_trial`).
Its parameters are overrides like any other, composed once by the launcher into the run dir's
config.yaml, which every rank reads; its run dir is ``<run dir>-sweep-<sweep id>/<run id>``, named
by the W&B run id, and holds that id in ``wandb_run_id``. Inside a SLURM sweep job, the trial records
its command in ``jobs/<job id>.json``: a requeued job replays that record instead of asking the
agent for a new trial, so it resumes the same run dir, checkpoint and W&B run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import string
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from launcher.config.errors import ConfigError, ConfigErrors
from launcher.paths import CONF_DIR

SWEEP_DIR = CONF_DIR / "sweep"
COMMAND_HEAD = ["${env}", "${interpreter}", "-m", "launcher", "train"]
ARGS_MACRO = "${args_no_hyphens}"
METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "log_uniform_values")
PARAM_KEYS = ("value", "values", "min", "max", "distribution")
# The environment the W&B agent gives a trial, and what a requeued trial needs of it again.
AGENT_ENV = ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR")
OVERRIDES_ENV = "FTL_SWEEP_OVERRIDES"  # JSON list: the overrides given to `ftl sweep agent`
JOB_ENV = "FTL_SWEEP_JOB"  # inside a SLURM sweep job: the trial record, jobs/<job id>.json
TEMPLATE = "sweep.sbatch.j2"


@dataclass
class MetricSpec:
    name: str = "eval/loss"
    goal: str = "minimize"


@dataclass
class SweepSpec:
    """conf/sweep/<name>.yaml. Every field but ``overrides`` is W&B's sweep config field of that name."""

    name: str = ""
    description: str = ""
    method: str = "bayes"
    metric: MetricSpec = field(default_factory=MetricSpec)
    overrides: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    early_terminate: Optional[dict[str, Any]] = None
    project: Optional[str] = None
    entity: Optional[str] = None


# --------------------------------------------------------------------------------------------
# specs


def spec_path(spec: str) -> Path:
    """A name in conf/sweep/, or a file (a spec, or a W&B sweep config `ftl sweep create` wrote)."""
    named = SWEEP_DIR / f"{spec}.yaml"
    if "/" not in spec and not spec.endswith((".yaml", ".yml")) and named.is_file():
        return named
    path = Path(spec).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")))
        raise ConfigErrors([ConfigError("spec", f"{spec!r}: no such file, nor a sweep in conf/sweep/ (available: {names})")])
    return path


def load_spec(spec: str, extra: list[str] = ()) -> SweepSpec:  # type: ignore[assignment]
    """Read and check a spec; ``extra`` overrides replace the spec's own of the same key. Raises
    ConfigErrors naming every bad field at once (exit 2)."""
    import yaml

    path = spec_path(spec)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigErrors([ConfigError("spec", f"{path}: not YAML: {e}")]) from None
    if not isinstance(data, dict):
        raise ConfigErrors([ConfigError("spec", f"{path}: expected a mapping, got {type(data).__name__}")])
    data = dict(data)
    if "command" in data and "overrides" not in data:  # a W&B sweep config written by `ftl sweep create`
        data["overrides"] = fixed_overrides(data.pop("command"))
    data.pop("command", None)
    data.pop("program", None)
    data.setdefault("name", path.stem)
    errors: list[ConfigError] = []
    spec = _bind_spec(data, errors)
    spec.overrides = merge_overrides(spec.overrides, list(extra))
    errors += check_parameters(spec)
    if errors:
        raise ConfigErrors(errors)
    return spec


def _bind_spec(data: dict[str, Any], errors: list[ConfigError]) -> SweepSpec:
    from launcher.config.compose import suggest

    known = {f.name for f in fields(SweepSpec)}
    for key in data:
        if key not in known:
            errors.append(ConfigError(str(key), "unknown sweep field" + suggest(str(key), known)))
    spec = SweepSpec(**{k: v for k, v in data.items() if k in known and k != "metric"})
    metric = data.get("metric") or {}
    if not isinstance(metric, dict) or set(metric) - {"name", "goal", "target"} or not isinstance(metric.get("name", ""), str):
        errors.append(ConfigError("metric", f"expected {{name: eval/loss, goal: minimize}}, got {metric!r}"))
    else:
        spec.metric = MetricSpec(name=metric.get("name", "eval/loss"), goal=metric.get("goal", "minimize"))
    if spec.metric.goal not in ("minimize", "maximize"):
        errors.append(ConfigError("metric.goal", f"got {spec.metric.goal!r}; expected minimize or maximize"))
    if spec.metric.name.partition("/")[0] not in ("eval", "train") or "/" not in spec.metric.name:
        errors.append(ConfigError("metric.name", f"got {spec.metric.name!r}; ftl logs eval/<k> (loss, perplexity, ...) and train/<k> (loss, ...)"))
    if spec.method not in METHODS:
        errors.append(ConfigError("method", f"got {spec.method!r}; expected one of {', '.join(METHODS)}"))
    if not isinstance(spec.overrides, list) or not all(isinstance(o, str) for o in spec.overrides):
        errors.append(ConfigError("overrides", f"expected a list of override strings, got {spec.overrides!r}"))
        spec.overrides = []
    if not isinstance(spec.parameters, dict) or not spec.parameters:
        errors.append(ConfigError("parameters", "expected a mapping of ftl override keys to W&B parameter specs, e.g. train.lr: {values: [1e-4, 3e-4]}"))
        spec.parameters = {}
    return spec


def distribution(param: Mapping[str, Any]) -> str:
    """W&B's choice when none is given: values -> categorical, integer bounds -> int_uniform."""
    if "distribution" in param:
        return str(param["distribution"])
    if "value" in param:
        return "constant"
    if "values" in param:
        return "categorical"
    return "int_uniform" if all(isinstance(param.get(k), int) for k in ("min", "max")) else "uniform"


def check_parameters(spec: SweepSpec) -> list[ConfigError]:
    """Each parameter: a known distribution with its fields, values an override can carry."""
    errors = []
    for key, param in spec.parameters.items():
        where = f"parameters.{key}"
        if not isinstance(param, dict) or "parameters" in param:
            errors.append(ConfigError(where, "expected {values: [...]}, {value: v} or {min, max, distribution}; "
                                             "nest keys with dots (train.lr), not with W&B's nested parameters"))  # fmt: skip
            continue
        extra = set(param) - set(PARAM_KEYS)
        if extra:
            errors.append(ConfigError(f"{where}.{sorted(extra)[0]}", f"not supported by ftl sweeps (use {', '.join(PARAM_KEYS)})"))
        kind = distribution(param)
        if kind not in DISTRIBUTIONS:
            errors.append(ConfigError(f"{where}.distribution", f"got {kind!r}; ftl sweeps support {', '.join(DISTRIBUTIONS)}"))
        elif kind == "constant" and "value" not in param:
            errors.append(ConfigError(where, "distribution constant needs `value`"))
        elif kind == "categorical" and (not isinstance(param.get("values"), list) or not param["values"]):
            errors.append(ConfigError(f"{where}.values", f"expected a non-empty list, got {param.get('values')!r}"))
        elif kind in ("int_uniform", "uniform", "log_uniform_values"):
            lo, hi = param.get("min"), param.get("max")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or lo >= hi:  # type: ignore[operator]
                errors.append(ConfigError(where, f"{kind} needs numbers min < max, got min={lo!r} max={hi!r}"))
            elif kind == "log_uniform_values" and lo <= 0:  # type: ignore[operator]
                errors.append(ConfigError(f"{where}.min", f"log_uniform_values needs min > 0, got {lo!r}"))
        if spec.method == "grid" and kind not in ("constant", "categorical", "int_uniform"):
            errors.append(ConfigError(where, f"method grid needs discrete values; {kind} is continuous"))
    return errors


def corner_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """Two parameter sets to validate a spec with: every first value / min, every last / max."""
    def pick(param: Mapping[str, Any], last: bool) -> Any:
        if "value" in param:
            return param["value"]
        if "values" in param:
            return param["values"][-1 if last else 0]
        return param["max" if last else "min"]

    return [{k: pick(p, last) for k, p in spec.parameters.items()} for last in (False, True)]


def check_trials(spec: SweepSpec, extra: list[str] = (), require_wandb: bool = False) -> tuple[dict[str, Any], Any]:  # type: ignore[assignment]
    """Compose and validate the sweep's corner trials as `ftl plan` would: unknown keys and bad
    values are errors now, not in the middle of a sweep. Returns the first trial's (raw, cfg)."""
    from launcher.cli import _load

    errors: list[ConfigError] = []
    first: Optional[tuple[dict[str, Any], Any]] = None
    for params in corner_trials(spec):
        try:
            raw, cfg, _ = _load([*extra, *spec.overrides, *agent_args(params)])
        except ConfigErrors as e:
            named = (ConfigError(f"parameters.{x.path}" if x.path in spec.parameters else x.path, x.message) for x in e.errors)
            errors += [x for x in named if x not in errors]  # the second trial repeats the first's
            continue
        first = first or (raw, cfg)
        if require_wandb and cfg.wandb.mode == "disabled":
            errors.append(ConfigError("wandb.mode", "disabled: a W&B sweep's trials must report to W&B; add wandb.mode=auto to the spec's overrides"))
            break
        section = spec.metric.name.partition("/")[0]
        if section == "eval" and not (cfg.eval.after_training or cfg.eval.every_steps):
            errors.append(ConfigError("metric.name", f"{spec.metric.name} needs an evaluation (eval.after_training=true), or use train/loss"))
            break
    if errors or first is None:
        raise ConfigErrors(errors)
    return first


def agent_args(params: Mapping[str, Any]) -> list[str]:
    """``${args_no_hyphens}`` as the W&B agent expands it: wandb's own code where it imports."""
    try:
        from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    except ImportError:  # same format: f"{param}={value}"
        return [f"{k}={v}" for k, v in params.items()]
    return list(create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args_no_hyphens"])


def override_key(text: str) -> str:
    return text.split("=", 1)[0].lstrip("+~")


def merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with each override of ``extra`` replacing the one of the same key."""
    keys = {override_key(o) for o in extra}
    return [o for o in base if override_key(o) not in keys] + list(extra)


def hydra_quote(value: str) -> str:
    """A value as one quoted Hydra override value: any path, spaces and quotes included."""
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + escaped.replace("'", "\\'") + "'"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "_"


def sweep_dir_for(base: Path, sweep_id: str) -> Path:
    """``<run dir>-sweep-<id>``: the sweep's jobs, logs and trials; ENTITY/PROJECT/ID names it by ID."""
    return base.with_name(f"{base.name}-sweep-{safe_name(sweep_id.rsplit('/', 1)[-1])}")


# --------------------------------------------------------------------------------------------
# the W&B sweep config


def wandb_sweep_config(spec: SweepSpec) -> dict[str, Any]:
    """The W&B sweep config: the spec's W&B fields and the command that runs `ftl train`."""
    out: dict[str, Any] = {"name": spec.name, "method": spec.method, "metric": {"name": spec.metric.name, "goal": spec.metric.goal}}
    if spec.description:
        out["description"] = spec.description
    out["parameters"] = {k: dict(v) for k, v in spec.parameters.items()}
    for key in ("early_terminate", "project", "entity"):
        if getattr(spec, key) is not None:
            out[key] = getattr(spec, key)
    out["command"] = [*COMMAND_HEAD, *spec.overrides, ARGS_MACRO]
    return out


def fixed_overrides(command: list[Any]) -> list[str]:
    """The fixed overrides in a sweep command made by :func:`wandb_sweep_config`."""
    words = [str(c) for c in command]
    start = words.index("train") + 1 if "train" in words else len(words)
    return [w for w in words[start:] if not (w.startswith("${") and w.endswith("}"))]


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
    from launcher.telemetry import wandb_api_key_configured

    return wandb_api_key_configured()


def sweep_file(raw: dict[str, Any], name: str) -> Path:
    from launcher.runs import choose_run_dir

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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"ftl: wrote the W&B sweep config {path}", file=sys.stderr)
    offline_cmds = [f"ftl sweep agent --offline {shlex.quote(str(path))} count=K    (W&B's search engine, no server)",
                    f"ftl sweep optuna {shlex.quote(str(path))} count=K            (Optuna TPE via hydra-optuna-sweeper)"]  # fmt: skip
    grid = [f"{k}={','.join(map(str, p['values']))}" for k, p in spec.parameters.items() if "values" in p]
    if len(grid) == len(spec.parameters):
        offline_cmds.append(f"ftl train -m {shlex.join(spec.overrides + grid)}    (every combination, Hydra's basic sweeper)")
    if offline or not wandb_online():
        reason = "--offline" if offline else "no W&B API key (WANDB_API_KEY or `wandb login`)"
        print(f"ftl: {reason}: the sweep was not created. Where W&B is reachable:\n"
              f"  wandb sweep --project {shlex.quote(spec.project)} {shlex.quote(str(path))}\n"
              f"  ftl sweep agent ENTITY/{spec.project}/SWEEP_ID count=K [launch=slurm launch.nodes=N ...]\n"
              "Air-gapped, the same search space:\n  " + "\n  ".join(offline_cmds))  # fmt: skip
        return 0
    import wandb

    sweep_id = wandb.sweep(config, project=spec.project, entity=spec.entity)
    print(sweep_id)
    print(f"ftl: created sweep {sweep_id}; run trials with:\n"
          f"  ftl sweep agent {sweep_id} count=K                       (here)\n"
          f"  ftl sweep agent {sweep_id} count=K launch=slurm launch.nodes=N   (K SLURM jobs)", file=sys.stderr)  # fmt: skip
    return 0


# --------------------------------------------------------------------------------------------
# a trial: `ftl train` started by an agent


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


def check_no_conflict(extra: list[str], fixed: list[str]) -> None:
    """The agent's overrides add to the sweep's command; they may not change what it fixes."""
    taken = {override_key(o) for o in fixed}
    clash = [o for o in extra if override_key(o) in taken]
    if clash:
        raise ConfigErrors([ConfigError(override_key(o), f"{o!r}: the sweep's command already sets it; change the sweep instead") for o in clash])


def trial_run_dir(base: Path, sweep_id: str, run_id: str) -> Path:
    return sweep_dir_for(base, sweep_id) / safe_name(run_id)


def sweep_trial(overrides: list[str], environ: Mapping[str, str]) -> Optional[Trial]:
    """The trial this `ftl train` is, when a W&B agent (or ftl's offline one) started it."""
    sweep_id, run_id = environ.get("WANDB_SWEEP_ID"), environ.get("WANDB_RUN_ID")
    if not (sweep_id and run_id):
        return None
    from launcher.config.compose import compose
    from launcher.runs import choose_run_dir

    extra = agent_overrides(environ)
    check_no_conflict(extra, overrides)
    composed = [*extra, *overrides]
    raw, _, _ = compose(composed)  # what is wrong in it, prepare_run reports with the rest
    run_dir = trial_run_dir(choose_run_dir(raw), sweep_id, run_id)
    name = f"{raw['run']['name']}-{run_id}"
    job = environ.get(JOB_ENV)
    return Trial(sweep_id, run_id, list(overrides), [*composed, f"run.name={hydra_quote(name)}", f"run.dir={hydra_quote(str(run_dir))}"],
                 run_dir, str(raw["launch"]["backend"]), Path(job) if job else None)  # fmt: skip


def run_trial(trial: Trial, train_once: Any, environ: Mapping[str, str]) -> int:
    """Train the trial: here (train_once), or, inside a SLURM sweep job, across its allocation."""
    from launcher.runs import _write_atomic
    from launcher.telemetry import WANDB_ID_FILE

    print(f"ftl: sweep {trial.sweep_id} trial {trial.run_id}: {' '.join(trial.argv_overrides)}", file=sys.stderr)
    if trial.backend == "slurm" and trial.job_record is None:
        raise ConfigErrors([ConfigError("launch", "a sweep trial with launch=slurm runs inside its SLURM job: "
                                        "`ftl sweep agent SWEEP_ID count=K launch=slurm ...` submits them")])  # fmt: skip
    trial.run_dir.mkdir(parents=True, exist_ok=True)
    # The W&B run the agent made is this run dir's run: a restart (requeue, resume) continues it.
    _write_atomic(trial.run_dir / WANDB_ID_FILE, trial.run_id + "\n")
    if trial.job_record is None:
        return train_once(trial.overrides)
    record_trial(trial, environ)
    trial.job_record.with_suffix(".pid").write_text(f"{os.getpid()}\n")  # the job forwards its warning signal here
    from launcher.launch.slurm_job import main as run_in_allocation

    return run_in_allocation(trial.overrides)  # execs the run's job.sbatch in this process


def record_trial(trial: Trial, environ: Mapping[str, str]) -> None:
    """jobs/<job id>.json: what a requeued job runs again instead of drawing a new trial."""
    assert trial.job_record is not None
    record = {"argv": [sys.executable, "-m", "launcher", "train", *trial.argv_overrides],
              "env": {k: environ[k] for k in AGENT_ENV if environ.get(k)}, "run_dir": str(trial.run_dir)}  # fmt: skip
    if trial.job_record.is_file():
        old = json.loads(trial.job_record.read_text())
        if old.get("env", {}).get("WANDB_RUN_ID") != trial.run_id:
            raise ConfigErrors([ConfigError(JOB_ENV, f"{trial.job_record} records run {old.get('env', {}).get('WANDB_RUN_ID')}, "
                                                     f"not {trial.run_id}: one trial per job")])  # fmt: skip
        return
    trial.job_record.parent.mkdir(parents=True, exist_ok=True)
    tmp = trial.job_record.with_name(f".{trial.job_record.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, trial.job_record)


def replay(record_path: str) -> int:
    """In a requeued sweep job: run the recorded trial again, same command, same W&B run."""
    record = json.loads(Path(record_path).read_text())
    argv, env = list(record["argv"]), {**os.environ, **record["env"]}
    print(f"ftl: job {os.environ.get('SLURM_JOB_ID', '?')} (restart {os.environ.get('SLURM_RESTART_COUNT', '0')}): "
          f"trial {record['env'].get('WANDB_RUN_ID')} of sweep {record['env'].get('WANDB_SWEEP_ID')}, run dir {record['run_dir']}", flush=True)  # fmt: skip
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)


# --------------------------------------------------------------------------------------------
# agents


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
    from launcher.cli import _load

    raw, cfg, _ = _load([*args.overrides, *fixed])
    if cfg.launch.backend == "slurm" and args.count is None:
        raise ConfigErrors([ConfigError("count", "launch=slurm submits one job per trial: give count=K")])
    if not wandb_online():  # the jobs inherit this environment: their agents would have no key either
        print("ftl sweep agent: no W&B API key (WANDB_API_KEY or `wandb login`): the W&B agent needs its server.\n"
              "Air-gapped: ftl sweep agent --offline SPEC count=K, ftl sweep optuna SPEC count=K, ftl train -m ...", file=sys.stderr)  # fmt: skip
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
        print(f"ftl: could not read sweep {sweep_id}'s command ({type(e).__name__}); not checking overrides against it", file=sys.stderr)
        return []


def render_sweep_script(cfg: Any, sweep_dir: Path, sweep_id: str, extra: list[str], offline: bool, python: str, workdir: Path) -> str:
    """Pure: the SLURM script of a sweep's trial jobs (slurm/sweep.sbatch.j2)."""
    from launcher.launch.slurm import jinja_env, template_values

    values = template_values(cfg, sweep_dir, sweep_dir / "config.yaml", python, workdir)
    values.update(sweep_id=sweep_id, jobs_dir=str(sweep_dir / "jobs"), agent_overrides=json.dumps(extra),
                  offline=offline, script_path=str(sweep_dir / "sweep.sbatch"))  # fmt: skip
    if not cfg.launch.job_name:
        values["job_name"] = f"ftl-sweep-{sweep_id}"
    return jinja_env().get_template(TEMPLATE).render(**values)


def submit_jobs(raw: dict[str, Any], cfg: Any, sweep_id: str, extra: list[str], trial_files: list[Optional[Path]]) -> int:
    """One SLURM job per trial, all from one script rendered into the sweep dir."""
    from launcher.launch.slurm import LOG_DIR, UnsafeValue, run_sbatch, secret_env
    from launcher.runs import choose_run_dir

    sweep_dir = sweep_dir_for(choose_run_dir(raw), sweep_id)
    script = sweep_dir / "sweep.sbatch"
    try:
        text = render_sweep_script(cfg, sweep_dir, sweep_id, extra, trial_files[0] is not None, sys.executable, Path.cwd())
    except UnsafeValue as e:
        raise ConfigErrors([ConfigError(e.field, str(e))]) from None
    (sweep_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)  # SLURM will not create it
    script.write_text(text)
    for trial_file in trial_files:
        argv = ["sbatch", "--parsable", str(script), *([str(trial_file)] if trial_file else [])]
        code, job_id = run_sbatch(argv, secret_env(cfg))
        if code:
            return code
        print(job_id)
    print(f"ftl: submitted {len(trial_files)} trial job(s) of sweep {sweep_id}; logs in {sweep_dir / LOG_DIR}, "
          f"trials in {sweep_dir}/<run id>", file=sys.stderr)  # fmt: skip
    return 0


def offline_agent(spec_arg: str, tokens: list[str]) -> int:
    """`ftl sweep agent --offline SPEC count=K [overrides]`: W&B's search engine, no server."""
    import yaml

    from launcher.multirun import print_trial_table, trial_metric
    from launcher.runs import choose_run_dir

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
            pending.append(sweeps.SweepRun(name=run_id, state=sweeps.RunState.running, config={k: {"value": v} for k, v in params.items()}))
            trial = {"argv": expand_command(config["command"], params, env), "run_dir": str(sweep_dir / run_id),
                     "env": {"WANDB_SWEEP_ID": sweep_id, "WANDB_RUN_ID": run_id, "WANDB_SWEEP_PARAM_PATH": str(path), "WANDB_DIR": str(sweep_dir)}}  # fmt: skip
            files.append(sweep_dir / "trials" / f"{run_id}.json")
            files[-1].parent.mkdir(exist_ok=True)  # type: ignore[union-attr]
            files[-1].write_text(json.dumps(trial, indent=2) + "\n")  # type: ignore[union-attr]
        if len(files) < args.count:
            print(f"ftl: sweep {sweep_id}: the search space is exhausted after {len(files)} more trial(s)", file=sys.stderr)
        return submit_jobs(raw, cfg, sweep_id, args.overrides, files) if files else 0

    rows = []
    for i in range(args.count):
        drawn = draw([])
        if drawn is None:
            print(f"ftl: sweep {sweep_id}: the search space is exhausted", file=sys.stderr)
            break
        run_id, params, path = drawn
        argv = expand_command(config["command"], params, env)
        print(f"ftl: offline sweep {sweep_id}, trial {i + 1}/{args.count} ({run_id}): {shlex.join(argv)}", file=sys.stderr)
        code = subprocess.run(argv, env={**env, "WANDB_RUN_ID": run_id, "WANDB_SWEEP_PARAM_PATH": str(path)}, check=False).returncode
        rows.append((run_id, code, " ".join(agent_args(params)), sweep_dir / run_id))
        got = trial_metric(sweep_dir / run_id, spec.metric.name)
        print(f"ftl: trial {run_id} exited {code}; {got[0] + '=' + format(got[1], '.4f') if got else 'no metric'}", file=sys.stderr)
    print_trial_table(rows, spec.metric.name, spec.metric.goal)
    print(f"sweep {sweep_id}: {sweep_dir}/<run id>; W&B offline runs: wandb sync {sweep_dir}/*/wandb/offline-run-*")
    return max((code for _, code, _, _ in rows), default=0) and 1


def next_run(config: dict[str, Any], runs: list[Any]) -> Any:
    return import_sweeps().next_run(config, runs)


def history(params_dir: Path, sweep_dir: Path, metric: str) -> list[Any]:
    """The sweep's earlier trials, as the search engine wants them: parameters and metric."""
    import yaml

    from launcher.multirun import trial_metric

    sweeps = import_sweeps()
    runs = []
    for path in sorted(params_dir.glob("config-*.yaml")):
        run_id = path.stem.removeprefix("config-")
        got = trial_metric(sweep_dir / run_id, metric)
        state = sweeps.RunState.finished if got else sweeps.RunState.running
        runs.append(sweeps.SweepRun(name=run_id, state=state, config=yaml.safe_load(path.read_text()),
                                    summary_metrics={metric: got[1]} if got else {}))  # fmt: skip
    return runs


def new_run_id() -> str:
    """A W&B-style run id ([a-z0-9], 8 characters)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def plain(value: Any) -> Any:
    """numpy scalars from the search engine as Python numbers."""
    return value.item() if hasattr(value, "item") else value


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m launcher.sweep replay RECORD``: what a requeued SLURM sweep job runs."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "replay":
        print("usage: python -m launcher.sweep replay JOBS_DIR/JOB_ID.json", file=sys.stderr)
        return 2
    return replay(args[1])


if __name__ == "__main__":
    sys.exit(main())
