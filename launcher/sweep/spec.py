"""Sweep specs: conf/sweep/<name>.yaml or a file, read and checked before any trial runs, and the
override helpers the sweep commands share.

A spec is a W&B sweep config (method, metric, parameters, early_terminate, ...) whose parameter names are
ftl override keys, plus ``overrides``: the fixed part of every trial's ``ftl train`` command.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from launcher.config.errors import ConfigError, ConfigErrors
from launcher.config.search_path import options
from launcher.paths import CONF_DIR

SWEEP_DIR = CONF_DIR / "sweep"
METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "log_uniform_values")
PARAM_KEYS = ("value", "values", "min", "max", "distribution")


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


def spec_path(spec: str) -> Path:
    """A name in conf/sweep/ or a config dir's sweep/, or a file (a spec, or a W&B sweep config
    `ftl sweep create` wrote)."""
    named = options("sweep")
    if "/" not in spec and not spec.endswith((".yaml", ".yml")) and spec in named:
        return named[spec]
    from launcher.safe_read import file_problem

    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(sorted(named))
        raise ConfigErrors(
            [
                ConfigError(
                    "spec", f"{spec!r}: no such file, nor a sweep in conf/sweep/ or a config dir (available: {names})"
                )
            ]
        )
    problem = file_problem(path)
    if problem:
        raise ConfigErrors([ConfigError("spec", problem)])
    return path


def load_spec(spec: str, extra: list[str] = ()) -> SweepSpec:  # type: ignore[assignment]
    """Read and check a spec; ``extra`` overrides replace the spec's own of the same key. Raises
    ConfigErrors naming every bad field at once (exit 2)."""
    import yaml

    from launcher.safe_read import UnreadableFile, read_yaml_text

    path = spec_path(spec)
    try:
        data = yaml.safe_load(read_yaml_text(path))
    except UnreadableFile as e:
        raise ConfigErrors([ConfigError("spec", str(e))]) from None
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
    if (
        not isinstance(metric, dict)
        or set(metric) - {"name", "goal", "target"}
        or not isinstance(metric.get("name", ""), str)
    ):
        errors.append(ConfigError("metric", f"expected {{name: eval/loss, goal: minimize}}, got {metric!r}"))
    else:
        spec.metric = MetricSpec(name=metric.get("name", "eval/loss"), goal=metric.get("goal", "minimize"))
    if spec.metric.goal not in ("minimize", "maximize"):
        errors.append(ConfigError("metric.goal", f"got {spec.metric.goal!r}; expected minimize or maximize"))
    if spec.metric.name.partition("/")[0] not in ("eval", "train") or "/" not in spec.metric.name:
        errors.append(
            ConfigError(
                "metric.name",
                f"got {spec.metric.name!r}; ftl logs eval/<k> (loss, perplexity, ...) and train/<k> (loss, ...)",
            )
        )
    if spec.method not in METHODS:
        errors.append(ConfigError("method", f"got {spec.method!r}; expected one of {', '.join(METHODS)}"))
    if not isinstance(spec.overrides, list) or not all(isinstance(o, str) for o in spec.overrides):
        errors.append(ConfigError("overrides", f"expected a list of override strings, got {spec.overrides!r}"))
        spec.overrides = []
    if not isinstance(spec.parameters, dict) or not spec.parameters:
        errors.append(
            ConfigError(
                "parameters",
                "expected a mapping of ftl override keys to W&B parameter specs, e.g. train.lr: {values: [1e-4, 3e-4]}",
            )
        )
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
            errors.append(
                ConfigError(
                    where,
                    "expected {values: [...]}, {value: v} or {min, max, distribution}; "
                    "nest keys with dots (train.lr), not with W&B's nested parameters",
                )
            )
            continue
        extra = set(param) - set(PARAM_KEYS)
        if extra:
            errors.append(
                ConfigError(f"{where}.{sorted(extra)[0]}", f"not supported by ftl sweeps (use {', '.join(PARAM_KEYS)})")
            )
        kind = distribution(param)
        if kind not in DISTRIBUTIONS:
            errors.append(
                ConfigError(f"{where}.distribution", f"got {kind!r}; ftl sweeps support {', '.join(DISTRIBUTIONS)}")
            )
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
    from launcher.session import load_config

    errors: list[ConfigError] = []
    first: Optional[tuple[dict[str, Any], Any]] = None
    for params in corner_trials(spec):
        try:
            loaded = load_config([*extra, *spec.overrides, *agent_args(params)])
        except ConfigErrors as e:
            named = (
                ConfigError(f"parameters.{x.path}" if x.path in spec.parameters else x.path, x.message)
                for x in e.errors
            )
            errors += [x for x in named if x not in errors]  # the second trial repeats the first's
            continue
        raw, cfg = loaded.raw, loaded.cfg
        first = first or (raw, cfg)
        if require_wandb and cfg.wandb.mode == "disabled":
            errors.append(
                ConfigError(
                    "wandb.mode",
                    "disabled: a W&B sweep's trials must report to W&B; add wandb.mode=auto to the spec's overrides",
                )
            )
            break
        section = spec.metric.name.partition("/")[0]
        if section == "eval" and not (cfg.eval.after_training or cfg.eval.every_steps):
            errors.append(
                ConfigError(
                    "metric.name",
                    f"{spec.metric.name} needs an evaluation (eval.after_training=true), or use train/loss",
                )
            )
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


def fixed_overrides(command: list[Any]) -> list[str]:
    """The fixed overrides in a sweep command made by :func:`launcher.sweep.wandb_config.wandb_sweep_config`."""
    words = [str(c) for c in command]
    start = words.index("train") + 1 if "train" in words else len(words)
    return [w for w in words[start:] if not (w.startswith("${") and w.endswith("}"))]


def check_no_conflict(extra: list[str], fixed: list[str]) -> None:
    """The agent's overrides add to the sweep's command; they may not change what it fixes."""
    taken = {override_key(o) for o in fixed}
    clash = [o for o in extra if override_key(o) in taken]
    if clash:
        raise ConfigErrors(
            [
                ConfigError(override_key(o), f"{o!r}: the sweep's command already sets it; change the sweep instead")
                for o in clash
            ]
        )


def secret_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(the overrides that may be written into a sweep's command, the names of the launch.env
    secrets left out: a trial gets those from its environment). Any other secret in an override
    cannot go into a sweep config, which W&B stores: ConfigErrors."""
    from launcher.redact import is_secret_key, known_secrets, redact

    kept, names, errors = [], [], []
    secrets = known_secrets()
    for text in overrides:
        key, sep, _ = text.partition("=")
        bare = key.lstrip("+~")
        if sep and is_secret_key(bare) and re.fullmatch(r"launch\.env\.[A-Za-z_][A-Za-z0-9_]*", bare):
            names.append(bare.rsplit(".", 1)[1])
        elif (sep and is_secret_key(bare)) or redact(text, secrets) != text:
            errors.append(
                ConfigError(
                    bare,
                    "holds a secret, which a sweep config (stored by W&B) must not: "
                    "pass it to the trials through the environment",
                )
            )
        else:
            kept.append(text)
    if errors:
        raise ConfigErrors(errors)
    return kept, names


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "_"


def sweep_dir_for(base: Path, sweep_id: str) -> Path:
    """``<run dir>-sweep-<id>``: the sweep's jobs, logs and trials; ENTITY/PROJECT/ID names it by ID."""
    return base.with_name(f"{base.name}-sweep-{safe_name(sweep_id.rsplit('/', 1)[-1])}")
