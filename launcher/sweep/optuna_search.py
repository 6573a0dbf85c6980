"""`ftl sweep optuna SPEC count=N [overrides]`: Bayesian search with no server, through the
hydra-optuna-sweeper plugin.

The plugin is a Hydra *sweeper*: under ``@hydra.main`` Hydra builds it from ``hydra/sweeper=optuna``
and gives it a *launcher* plugin that runs the task function per trial. ftl has no ``@hydra.main``
(the launcher composes one config.yaml per run, which every rank reads), so ``ftl train -m
hydra/sweeper=optuna`` would not reach it. Instead ftl builds the plugin's sweeper itself and runs it
unchanged: the spec's parameters become the plugin's search space in Hydra's override grammar
(``tag(log, interval(a, b))``, ``int(interval(a, b))``, ``choice(...)``), parsed by the plugin's own
code; its ask/tell loop, sampler and ``optimization_results.yaml`` are the plugin's. The one piece ftl
provides is the launcher: each batch of trials runs as ``ftl train`` (any launch backend, so a trial
can be a torchrun job), and a trial's value is its metric read back from its run dir.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from launcher.config.errors import ConfigError, ConfigErrors
from launcher.config.search_path import hydra_quote
from launcher.sweep.agents import parse_agent_args
from launcher.sweep.spec import SweepSpec, check_no_conflict, check_trials, distribution, load_spec


def grammar_value(value: Any) -> str:
    """One element of a Hydra override value (choice arguments)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return hydra_quote(str(value))


def search_space(spec: SweepSpec) -> dict[str, str]:
    """The spec's parameters in the grammar the plugin parses (its ``hydra.sweeper.params``)."""
    out = {}
    for key, p in spec.parameters.items():
        kind = distribution(p)
        if kind == "constant":
            out[key] = grammar_value(p["value"])
        elif kind == "categorical":
            out[key] = f"choice({', '.join(grammar_value(v) for v in p['values'])})"
        elif kind == "int_uniform":
            out[key] = f"int(interval({int(p['min'])}, {int(p['max'])}))"
        elif kind == "uniform":
            out[key] = f"interval({float(p['min'])!r}, {float(p['max'])!r})"
        else:  # log_uniform_values
            out[key] = f"tag(log, interval({float(p['min'])!r}, {float(p['max'])!r}))"
    return out


def sampler(method: str, seed: int) -> Any:
    import optuna

    if method == "grid":  # the plugin recognises a partial GridSampler and gives it the grid
        return functools.partial(optuna.samplers.GridSampler)
    if method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


class TrialLauncher:
    """Hydra's Launcher interface (``launch(job_overrides, initial_job_idx)``) over ``ftl train``."""

    def __init__(self, base: list[str], sweep_dir: Path, metric: str, train_once: Callable[[list[str]], int]) -> None:
        self.base, self.sweep_dir, self.metric, self.train_once = base, sweep_dir, metric, train_once
        self.rows: list[tuple[str, int, str, Path]] = []

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
        from hydra.core.utils import JobReturn, JobStatus

        from launcher.sweep.multirun import trial_metric

        returns = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            run_dir = self.sweep_dir / str(idx)
            print(f"ftl: optuna trial {idx}: {' '.join(overrides)}", file=sys.stderr)
            code = self.train_once([*self.base, *overrides, f"run.dir={hydra_quote(str(run_dir))}"])
            got = trial_metric(run_dir, self.metric) if code == 0 else None
            self.rows.append((str(idx), code, " ".join(overrides), run_dir))
            if got is None:  # the plugin marks the trial failed and goes on
                failure = RuntimeError(f"trial {idx} exited {code}" + ("" if code else f" without {self.metric}"))
                returns.append(JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=failure))
            else:
                returns.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=got[1]))
        return returns


def parse_seed(tokens: list[str]) -> tuple[int, list[str]]:
    seed, rest = 0, []
    for token in tokens:
        if token.startswith("seed="):
            value = token.partition("=")[2]
            if not value.isdigit():
                raise ConfigErrors(
                    [ConfigError("seed", f"got {value!r}; expected a non-negative integer (the sampler's seed)")]
                )
            seed = int(value)
        else:
            rest.append(token)
    return seed, rest


def new_dir(path: Path) -> Path:
    """``path``, else ``path-2``, ``path-3``, ...: the first that did not exist, created now."""
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def run_optuna(spec_arg: str, tokens: list[str], train_once: Callable[[list[str]], int]) -> int:
    from hydra.types import HydraContext
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
    from omegaconf import OmegaConf

    from launcher.rundir.write import choose_run_dir
    from launcher.sweep.multirun import print_trial_table

    seed, tokens = parse_seed(tokens)
    args = parse_agent_args(tokens)
    spec = load_spec(spec_arg)
    check_no_conflict(args.overrides, spec.overrides + list(spec.parameters))
    raw, _ = check_trials(spec, args.overrides)
    base = choose_run_dir(raw)
    # A new study each time (in memory), in a dir of its own: its trials (numbered) must not
    # resume an earlier study's run dirs, nor report their results, even one started in the same second.
    sweep_dir = new_dir(base.with_name(f"{base.name}-optuna-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    count = args.count or 10
    sweeper = OptunaSweeper(
        sampler=sampler(spec.method, seed),
        direction=spec.metric.goal,
        storage=None,
        study_name=f"ftl-{spec.name}",
        n_trials=count,
        n_jobs=1,
        max_failure_rate=1.0,
        search_space=None,
        custom_search_space=None,
        params=OmegaConf.create(search_space(spec)),
    )
    launcher = TrialLauncher([*args.overrides, *spec.overrides], sweep_dir, spec.metric.name, train_once)
    # What the plugin's setup() does, minus asking Hydra's plugin registry for a launcher plugin
    # (those must live in the hydra_plugins package): the config it reads is hydra.sweep.dir.
    impl = sweeper.sweeper
    impl.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
    impl.hydra_context = HydraContext(config_loader=None, callbacks=None)  # type: ignore[arg-type]  # read by no one here
    impl.launcher, impl.sweep_dir, impl.job_idx = launcher, str(sweep_dir), 0
    try:
        sweeper.sweep([])
    except ValueError as e:  # optuna's "no trials are completed yet": every trial failed
        print(f"ftl sweep optuna: {e}", file=sys.stderr)
    except Exception as e:  # the plugin cannot parse the search space: name the parameter
        if "Error parsing override" in str(e) or "not supported by Optuna" in str(e):
            raise ConfigErrors([ConfigError("parameters", str(e).splitlines()[0])]) from None
        raise
    print_trial_table(launcher.rows, spec.metric.name, spec.metric.goal)
    results = sweep_dir / "optimization_results.yaml"
    print(f"run dirs: {sweep_dir}/<trial>" + (f"; best parameters: {results}" if results.is_file() else ""))
    return 0 if results.is_file() else 1
