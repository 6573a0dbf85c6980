"""What bench/gpu_check.sh's short `ftl train` runs on a GPU logged, checked, and set beside the planner.

    python bench/gpu_runs.py metrics RUN_DIR...   # every step logged tokens/s, MFU and peak memory,
                                                  # and packed attention ran as one flash varlen call
    python bench/gpu_runs.py planner RUN_DIR...   # `ftl plan`'s memory estimate beside the measured peak

``metrics`` exits 1 when a run lacks a step's tokens/s, MFU or peak memory, or when a packed
attention call took the per-example loop (``attn_varlen_flash`` below 1.0, or absent: no packed
call ran on CUDA). ``planner`` reports, and exits 1 only for a run dir that holds no run: the measured peak is ``torch.cuda.max_memory_allocated``,
so the estimate is shown both whole and without its allowances for the CUDA context and the
allocator's fragmentation, which that counter does not see.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REQUIRED = ("tokens_per_s", "mfu", "peak_mem_gb", "attn_varlen_flash")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def metrics(run_dirs: list[Path]) -> int:
    bad = 0
    print(f"{'run':<14} {'steps':>5} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'flash share':>11}  problems")
    for run in run_dirs:
        rows = read_metrics(run)
        problems = [] if rows else ["no metrics.jsonl rows"]
        for key in REQUIRED:
            missing = [r.get("step") for r in rows if not isinstance(r.get(key), (int, float))]
            if missing:
                problems.append(f"{key} missing at steps {missing}")
        flash = [r["attn_varlen_flash"] for r in rows if isinstance(r.get("attn_varlen_flash"), (int, float))]
        if flash and min(flash) < 1.0:
            problems.append(f"packed attention took the per-example loop (share {min(flash):.2f})")
        last = rows[-1] if rows else {}

        def cell(key: str, fmt: str) -> str:
            return format(last[key], fmt) if isinstance(last.get(key), (int, float)) else "-"

        print(f"{run.name:<14} {len(rows):>5} {cell('tokens_per_s', ',.0f'):>10} {cell('mfu', '.1%'):>7} "
              f"{cell('peak_mem_gb', '.2f'):>9} {cell('attn_varlen_flash', '.2f'):>11}  {'; '.join(problems) or 'ok'}")  # fmt: skip
        bad += bool(problems)
    print("(the last step's values; MFU from the model as built: launcher/train/mfu.py)")
    return 1 if bad else 0


def planner(run_dirs: list[Path]) -> int:
    from launcher.config.validate import load_run_config
    from launcher.plan.memory import FIXED_GPU_OVERHEAD, FRAGMENTATION, GiB
    from launcher.plan.report import memory_report

    print(f"{'run':<14} {'planned GiB':>11} {'planned, allocated part':>24} {'measured max allocated':>23}")
    missing = 0
    for run in run_dirs:
        if not (run / "config.yaml").is_file():
            print(f"{run.name:<14} {'no run':>11}")
            missing += 1
            continue
        cfg = load_run_config(run / "config.yaml")
        e = memory_report(cfg).chosen
        allocated = (e.total - FIXED_GPU_OVERHEAD) / (1 + FRAGMENTATION)
        rows = read_metrics(run)
        measured = max((r["peak_mem_gb"] for r in rows if "peak_mem_gb" in r), default=None)
        shown = f"{measured:.2f}" if measured is not None else "no run"
        print(f"{run.name:<14} {e.total / GiB:>11.2f} {allocated / GiB:>24.2f} {shown:>23}")
    print("(planned: launcher/plan/memory.py for the run's config; allocated part: without the 1 GiB CUDA context and the 10% "
          "fragmentation allowance, which torch.cuda.max_memory_allocated does not count)")  # fmt: skip
    return 1 if missing else 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("metrics", "planner"):
        print(__doc__, file=sys.stderr)
        return 2
    runs = [Path(a) for a in argv[1:]]
    return metrics(runs) if argv[0] == "metrics" else planner(runs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
