"""`ftl train -m a=1,2 b=x,y`: Hydra's basic sweeper semantics (the cartesian product of the
comma-separated values), one run dir per trial under <run dir>-multirun/, and a table at the end.

A trial's dir is named by its overrides (:func:`trial_dir_name`), so a sweep run again with other
values runs its own trials, and the same values find their own earlier trial: complete, it is
reported as it is; cut short, it resumes. Before any trial runs, every existing trial dir's
config.yaml must equal the config its trial composes now (an edited recipe, another config dir,
a default changed by an upgrade would differ): otherwise the sweep is refused, exit 2, naming the
trial and the differing keys. Refused, not rerun: rerunning would mean starting over in a run dir
whose checkpoints, metrics and evaluation are a finished experiment; the user chooses (a new
run.name for the sweep, or moving that dir away), and nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

from launcher.config.errors import EXIT_INVALID
from launcher.sweep.spec import safe_name

NAME_CHARS = 80  # the readable part of a trial dir's name; the hash after it tells trials apart


def expand(overrides: list[str]) -> list[list[str]]:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [trial for batch in batches for trial in batch]


def trial_result(run_dir: Path) -> dict[str, object]:
    """The last logged loss and the final eval, read back from the trial's run dir."""
    out: dict[str, object] = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        steps = [m for m in lines if "loss" in m]
        if steps:
            out["step"], out["loss"] = steps[-1].get("step"), steps[-1]["loss"]
    evals = run_dir / "eval.json"
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
    evals = run_dir / "eval.json"
    if section == "eval" and evals.is_file():
        results = json.loads(evals.read_text())
        final = results.get("after") or max((v for k, v in results.items() if k.startswith("step_")),
                                            key=lambda v: v.get("step", 0), default={})  # fmt: skip
        if isinstance(final.get(key), (int, float)):
            return name, float(final[key])
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    key = key if section == "train" else "loss"
    rows = [r for r in rows if isinstance(r.get(key), (int, float))]
    return (f"train/{key}", float(rows[-1][key])) if rows else None


def print_trial_table(rows: list[tuple[str, int, str, Path]], metric: str = DEFAULT_METRIC, goal: str = "minimize") -> None:
    """The table at the end of a sweep: one row per (trial, exit code, its overrides, run dir),
    with the metric it reports, and the best trial."""
    results = [(label, code, ov, trial_metric(run_dir, metric), trial_result(run_dir)) for label, code, ov, run_dir in rows]
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
    """``<swept overrides, sanitised>-<hash of all the trial's overrides>``: the same overrides
    always name the same dir, other ones never do. The readable part is cut to NAME_CHARS and has
    secret values blanked (the hash stands for them)."""
    from launcher.redact import known_secrets, redact_overrides

    digest = hashlib.sha256(json.dumps(trial).encode()).hexdigest()[:10]
    readable = safe_name(",".join(redact_overrides(swept, known_secrets())))[:NAME_CHARS]
    return f"{readable}-{digest}" if swept else digest


def stale_trials(trials: list[tuple[str, list[str]]]) -> list[str]:
    """For each (label, overrides with its run.dir) whose run dir holds a config.yaml other than
    the one the trial composes now: what to tell the user (the trial, its dir, the differing keys)."""
    from launcher.launch.run_dir import _config_changes
    from launcher.redact import known_secrets, redact
    from launcher.session import prepare_run

    out = []
    for label, overrides in trials:
        run = prepare_run(overrides)  # bad config: ConfigErrors, naming every field, before any trial runs
        if run.config_path.is_file():
            changes = _config_changes(run.config_path, redact(run.raw, known_secrets()))
            if changes:
                out.append(f"trial {label} ({run.run_dir}) holds a run with other settings than this trial's:")
                out += [f"  {c}" for c in changes]
    return out


def run_multirun(overrides: list[str], train_once: Callable[[list[str]], int]) -> int:
    from launcher.config.compose import compose
    from launcher.config.search_path import hydra_quote
    from launcher.launch.run_dir import choose_run_dir

    trials = expand(overrides)
    raw, _, _ = compose([o for o in trials[0] if not o.startswith("run.dir=")])
    base = Path(str(choose_run_dir(raw)) + "-multirun")
    planned = []  # (label, the overrides it sweeps, its overrides with its run dir, the run dir)
    for i, trial in enumerate(trials):
        swept = [o for o in trial if o not in overrides]
        run_dir = base / trial_dir_name(trial, swept)
        planned.append((str(i), swept, [*trial, f"run.dir={hydra_quote(str(run_dir))}"], run_dir))
    stale = stale_trials([(label, full) for label, _, full, _ in planned])
    if stale:
        print("ftl train -m: " + "\n".join(stale), file=sys.stderr)
        print(f"Nothing was run: those results are not this sweep's. Choose one: a new run.name for this sweep, "
              f"or move those trial dirs out of {base}.", file=sys.stderr)  # fmt: skip
        return EXIT_INVALID
    rows = []
    worst = 0
    for label, swept, full, run_dir in planned:
        print(f"ftl: trial {label}/{len(trials)}: {shown(swept)} in {run_dir}", file=sys.stderr)
        code = train_once(full)
        worst = worst or code
        rows.append((label, code, shown(swept), run_dir))
    print_trial_table(rows)
    print(f"run dirs: {base}/<trial>, each named by its overrides")
    return worst
