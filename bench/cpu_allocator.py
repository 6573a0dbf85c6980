"""CPU training with glibc's malloc as it comes against ftl's setting (``launch/local.py``'s
``CPU_MALLOC_ENV``: no mmap for large blocks, the heap's top kept), measured side by side.

The same ``ftl train`` of the demo recipe (SmolLM2-135M, packed chat data) runs with each
environment in turn, ``--rounds`` times, each a fresh run dir with nothing saved or evaluated.
Per run: the first step's seconds, the median of the later steps, the peak resident memory the
trainer logs, and the whole command's wall time. The losses must be the same bit for bit (the
allocator changes where memory comes from, never what is computed). The ratio is glibc default over
ftl's setting, of the later steps' median over all runs of each side.

    python bench/cpu_allocator.py [--rounds 2] [--steps 6] [--quick]

``--quick`` runs the tiny recipe for 3 steps, one round: it shows that the script runs, and its
millisecond steps are noise, not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.launch.local import CPU_MALLOC_ENV, MALLOC_KEYS  # noqa: E402

SIDES = {"glibc default": "default", "ftl (CPU_MALLOC_ENV)": "ftl"}


def run(recipe: str, steps: int, side: str, run_dir: Path) -> dict[str, float | list[float]]:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_KEYS}
    # ftl sets CPU_MALLOC_ENV unless malloc is tuned already: an explicit glibc default keeps it out.
    env.update(CPU_MALLOC_ENV if side == "ftl" else {"MALLOC_MMAP_MAX_": "65536"})
    argv = [
        sys.executable,
        "-m",
        "launcher",
        "train",
        f"recipe={recipe}",
        f"train.max_steps={steps}",
        f"train.warmup_steps={steps - 1}",
        "eval.before_training=false",
        "eval.after_training=false",
        "checkpoint.save_final=false",
        "wandb.mode=disabled",
        f"run.dir={run_dir}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{side}: ftl train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "first": rows[0]["step_s"],
        "later": statistics.median(r["step_s"] for r in rows[1:]),
        "peak": max(r["peak_mem_gb"] for r in rows),
        "wall": wall,
        "losses": [r["loss"] for r in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    recipe, steps, rounds = ("tiny", 3, 1) if args.quick else ("demo", args.steps, args.rounds)
    results: dict[str, list[dict]] = {side: [] for side in SIDES.values()}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for side in SIDES.values():
                results[side].append(run(recipe, steps, side, Path(tmp) / f"{side}-{r}"))
                print(
                    f"round {r + 1} {side}: later steps {results[side][-1]['later']:.2f} s", file=sys.stderr, flush=True
                )
    losses = {tuple(res["losses"]) for runs in results.values() for res in runs}
    print(f"recipe={recipe}, {steps} steps, {rounds} round(s) taking turns; OMP_NUM_THREADS as ftl sets it")
    print(f"{'malloc':24s} | 1st step s | later steps s (median) | peak RSS GB | wall s")
    print(f"{'-' * 24}-|------------|------------------------|-------------|-------")
    for name, side in SIDES.items():
        runs = results[side]
        print(
            f"{name:24s} | {statistics.median(x['first'] for x in runs):10.2f} | {statistics.median(x['later'] for x in runs):22.2f} | "
            f"{max(x['peak'] for x in runs):11.2f} | {statistics.median(x['wall'] for x in runs):6.1f}"
        )
    ratio = statistics.median(x["later"] for x in results["default"]) / statistics.median(
        x["later"] for x in results["ftl"]
    )
    print(f"later steps, glibc default / ftl: {ratio:.2f}x")
    print(f"losses identical across all runs: {'yes' if len(losses) == 1 else 'NO'}")
    if args.quick:
        print("QUICK (tiny model): not a result")
    if len(losses) != 1:
        sys.exit(1)


if __name__ == "__main__":
    main()
