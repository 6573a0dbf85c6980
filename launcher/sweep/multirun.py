"""`ftl train -m a=1,2 b=x,y`: Hydra's basic sweeper semantics (the cartesian product of the
comma-separated values), one run dir per trial under <run dir>-multirun/, and a table at the end.

A trial's dir is named by its overrides and a hash of them (:func:`trial_dir_name`), so a sweep
run again with other values runs its own trials, and the same values find their own earlier trial
by its hash (:func:`trial_dir`): complete, it is reported as it is; cut short, it resumes. Before
any trial runs, every existing trial dir's config.yaml must equal the config its trial composes now
(an edited recipe, another config dir, a default changed by an upgrade would differ): otherwise the
sweep is refused, exit 2, naming the trial and the differing keys. Refused, not rerun: rerunning
would mean starting over in a run dir whose checkpoints, metrics and evaluation are a finished
experiment; the user chooses (a new run.name for the sweep, or moving that dir away), and nothing
is lost.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

from launcher.config.errors import EXIT_INVALID
from launcher.rundir import RunPaths
from launcher.sweep.spec import override_key, safe_name

NAME_CHARS = 80  # the readable part of a trial dir's name; the hash after it tells trials apart


def expand(overrides: list[str]) -> tuple[list[list[str]], set[str]]:
    """The trials (each a list of overrides, as Hydra writes them back) and the keys they sweep."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [trial for batch in batches for trial in batch], {
        override_key(o.get_key_element()) for o in parsed if o.is_sweep_override()
    }


def trial_result(run_dir: Path) -> dict[str, object]:
    """The last logged loss and the final eval, read back from the trial's run dir."""
    out: dict[str, object] = {}
    metrics = RunPaths(run_dir).metrics
    if metrics.exists():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        steps = [m for m in lines if "loss" in m]
        if steps:
            out["step"], out["loss"] = steps[-1].get("step"), steps[-1]["loss"]
    evals = RunPaths(run_dir).eval
    if evals.exists():
        after = json.loads(evals.read_text()).get("after") or {}
        if "perplexity" in after:
            out["eval_ppl"] = after["perplexity"]
    return out


DEFAULT_METRIC = "eval/loss"


def trial_metric(run_dir: Path, name: str = DEFAULT_METRIC) -> tuple[str, float] | None:
    """The number a trial reports, read back from its run dir: ``eval/<k>`` from the final
    evaluation in eval.json (``after``, else the latest ``step_N``), ``train/<k>`` from the last
    line of metrics.jsonl. A run without that eval (eval.after_training=false) reports its last
    train loss instead, named so: (name actually read, value), or None when the run logged nothing."""
    section, _, key = name.partition("/")
    evals = RunPaths(run_dir).eval
    if section == "eval" and evals.is_file():
        results = json.loads(evals.read_text())
        final = results.get("after") or max(
            (v for k, v in results.items() if k.startswith("step_")), key=lambda v: v.get("step", 0), default={}
        )
        if isinstance(final.get(key), (int, float)):
            return name, float(final[key])
    metrics = RunPaths(run_dir).metrics
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    key = key if section == "train" else "loss"
    rows = [r for r in rows if isinstance(r.get(key), (int, float))]
    return (f"train/{key}", float(rows[-1][key])) if rows else None


def print_trial_table(
    rows: list[tuple[str, int, str, Path]], metric: str = DEFAULT_METRIC, goal: str = "minimize"
) -> None:
    """The table at the end of a sweep: one row per (trial, exit code, its overrides, run dir),
    with the metric it reports, and the best trial."""
    results = [
        (label, code, ov, trial_metric(run_dir, metric), trial_result(run_dir)) for label, code, ov, run_dir in rows
    ]
    width = max([5, *(len(r[0]) for r in results)])
    print(f"\n{'trial':>{width}}  {'exit':>4}  {'metric':>22}  {'loss':>8}  {'eval_ppl':>9}  overrides")
    for label, code, ov, got, res in results:
        shown = f"{got[0]}={got[1]:.4f}" if got else "-"
        loss = f"{res['loss']:.4f}" if "loss" in res else "-"
        ppl = f"{res['eval_ppl']:.3f}" if "eval_ppl" in res else "-"
        print(f"{label:>{width}}  {code:>4}  {shown:>22}  {loss:>8}  {ppl:>9}  {ov}")
    scored = [(got[1], label, got[0]) for label, code, _, got, _ in results if got and code == 0]
    if scored:
        value, label, name = (min if goal == "minimize" else max)(scored)
        print(f"best: trial {label} ({name}={value:.4f}, {goal})")


def shown(overrides: list[str]) -> str:
    """A trial's overrides as printed: quoted words, secrets blanked."""
    from launcher.redact import known_secrets, redact_overrides
    from launcher.shell import join

    return join(redact_overrides(overrides, known_secrets()))


def trial_dir_name(trial: list[str], swept: list[str]) -> str:
    """``<the overrides it sweeps, sanitised>-<hash of all its overrides>``: the hash tells trials
    apart (the same overrides, the same hash; other ones, another); the readable part, which
    depends on what else the sweep varies, is cut to NAME_CHARS and has secret values blanked."""
    from launcher.redact import known_secrets, redact_overrides

    readable = safe_name(",".join(redact_overrides(swept, known_secrets())))[:NAME_CHARS]
    return f"{readable}-{trial_hash(trial)}" if swept else trial_hash(trial)


def trial_hash(trial: list[str]) -> str:
    return hashlib.sha256(json.dumps(trial).encode()).hexdigest()[:10]


def trial_dir(base: Path, trial: list[str], swept: list[str]) -> Path:
    """The dir of this trial's earlier run (found by its hash: swept with other values, its
    readable name differed), else a new one named by :func:`trial_dir_name`."""
    digest = trial_hash(trial)
    earlier = (
        sorted(p for p in base.glob(f"*{digest}") if p.name == digest or p.name.endswith(f"-{digest}"))
        if base.is_dir()
        else []
    )
    return earlier[0] if earlier else base / trial_dir_name(trial, swept)


def stale_trials(trials: list[tuple[str, list[str], Path]]) -> list[str]:
    """For each (label, overrides with its run.dir, run dir) whose run dir exists and holds a
    config.yaml other than the one the trial composes now: what to tell the user (the trial, its
    dir, the differing keys). A trial with no dir yet is composed when it runs, as any run is."""
    from launcher.redact import known_secrets, redact
    from launcher.rundir.write import _config_changes
    from launcher.session import prepare_run

    out = []
    for label, overrides, run_dir in trials:
        if not run_dir.exists():
            continue
        run = prepare_run(overrides)  # bad config: ConfigErrors, naming every field, before any trial runs
        if run.config_path.is_file():
            changes = _config_changes(run.config_path, redact(run.raw, known_secrets()))
            if changes:
                out.append(f"trial {label} in {run.run_dir} holds a run with other settings than this trial's:")
                out += [f"  {c}" for c in changes]
    return out


def run_multirun(overrides: list[str], train_once: Callable[[list[str]], int]) -> int:
    from launcher.config.compose import compose
    from launcher.config.search_path import hydra_quote
    from launcher.rundir.write import choose_run_dir

    trials, swept_keys = expand(overrides)
    raw, _, _ = compose([o for o in trials[0] if not o.startswith("run.dir=")])
    base = Path(str(choose_run_dir(raw)) + "-multirun")
    planned = []  # (label, its overrides, the ones it sweeps, its run dir)
    for i, trial in enumerate(trials):
        swept = [o for o in trial if override_key(o) in swept_keys]
        planned.append((str(i), trial, swept, trial_dir(base, trial, swept)))

    def with_dir(trial: list[str], run_dir: Path) -> list[str]:
        return [*trial, f"run.dir={hydra_quote(str(run_dir))}"]

    stale = stale_trials(
        [(f"{label} ({shown(swept)})", with_dir(trial, run_dir), run_dir) for label, trial, swept, run_dir in planned]
    )
    if stale:
        print("ftl train -m: " + "\n".join(stale), file=sys.stderr)
        print(
            f"Nothing was run: those results are not this sweep's. Choose one: a new run.name for this sweep, "
            f"or move those trial dirs out of {base}.",
            file=sys.stderr,
        )
        return EXIT_INVALID
    rows = []
    worst = 0
    for label, trial, swept, run_dir in planned:
        print(f"ftl: trial {label}/{len(trials)}: {shown(trial)}  (run dir {run_dir})", file=sys.stderr)
        code = train_once(with_dir(trial, run_dir))
        worst = worst or code
        rows.append((label, code, shown(swept), run_dir))
    print_trial_table(rows)
    print(f"run dirs: {base}/<trial>, each named by its overrides")
    return worst
