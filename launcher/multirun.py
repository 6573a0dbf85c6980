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


def run_multirun(overrides: list[str], train_once: Callable[[list[str]], int]) -> int:
    from launcher.config.compose import compose
    from launcher.runs import choose_run_dir

    trials = expand(overrides)
    raw, _, _ = compose([o for o in trials[0] if not o.startswith("run.dir=")])
    base = Path(str(choose_run_dir(raw)) + "-multirun")
    rows = []
    worst = 0
    for i, trial in enumerate(trials):
        run_dir = base / str(i)
        print(f"ftl: trial {i}/{len(trials)}: {' '.join(trial)}", file=sys.stderr)
        code = train_once([*trial, f"run.dir={run_dir}"])
        worst = worst or code
        rows.append((i, " ".join(o for o in trial if o not in overrides), code, trial_result(run_dir)))
    print(f"\n{'trial':>5}  {'exit':>4}  {'loss':>8}  {'eval_ppl':>9}  overrides")
    for i, ov, code, res in rows:
        loss = f"{res['loss']:.4f}" if "loss" in res else "-"
        ppl = f"{res['eval_ppl']:.3f}" if "eval_ppl" in res else "-"
        print(f"{i:>5}  {code:>4}  {loss:>8}  {ppl:>9}  {ov}")
    print(f"run dirs: {base}/<trial>")
    return worst
