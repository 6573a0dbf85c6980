"""`ftl train -m a=1,2 b=x,y`: Hydra's basic sweeper semantics (the cartesian product of the
comma-separated values), one run dir per trial under <run dir>-multirun/, and a table at the end."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable


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


def run_multirun(overrides: list[str], train_once: Callable[[list[str]], int]) -> int:
    from launcher.config.compose import compose
    from launcher.config.search_path import hydra_quote
    from launcher.launch.run_dir import choose_run_dir

    trials = expand(overrides)
    raw, _, _ = compose([o for o in trials[0] if not o.startswith("run.dir=")])
    base = Path(str(choose_run_dir(raw)) + "-multirun")
    rows = []
    worst = 0
    for i, trial in enumerate(trials):
        run_dir = base / str(i)
        print(f"ftl: trial {i}/{len(trials)}: {shown(trial)}", file=sys.stderr)
        code = train_once([*trial, f"run.dir={hydra_quote(str(run_dir))}"])
        worst = worst or code
        rows.append((str(i), code, shown([o for o in trial if o not in overrides]), run_dir))
    print_trial_table(rows)
    print(f"run dirs: {base}/<trial>")
    return worst
