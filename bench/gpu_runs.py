"""bench/gpu_check.sh's engine matrix: short `ftl train` runs on a GPU, launched side by side,
then checked against each other and set beside the planner.

    python bench/gpu_runs.py train RUNS_DIR NAME...   # the named runs of RUNS, --parallel at a time
    python bench/gpu_runs.py metrics RUNS_DIR         # every run's pass criteria, and across runs
    python bench/gpu_runs.py planner RUNS_DIR         # `ftl plan`'s memory estimate beside the measured peak

The model: Llama-3-8B's layout made narrow (hidden 1024, 8 heads and 2 KV heads of 128, GQA
4:1, MLP 3584, 2 layers, vocab 128,256), random weights (no hub), bf16, the demo data packed into
2048-token rows, 5 steps of 2 × 2 micro-batches, one eval batch. Each run is one
``python -m launcher train`` process with its own ``FTL_CACHE``; several share the GPU at once
(80 GB hold them all), so their tokens/s and MFU are no result, only their losses and memory are.

``metrics`` passes when every run of RUNS that was asked for:

* logged all its steps, every loss finite, tokens/s, MFU and peak memory present;
* ran packed attention as one flash varlen call (``attn_varlen_flash`` 1.0 at every step);
* wrote ``eval.json`` (the runs with ``eval.generate``: generation metrics in it);

and, across runs: step 1's loss agrees within :data:`LOSS_TOLERANCE` among the runs of one
``group`` (same model, data and objective); each adapter-training run's final ``adapter/`` holds
tensors, some of them non-zero (LoRA's B starts at zero: all zero means nothing trained or nothing
was gathered); each run in :data:`LOWER_PEAK` peaked below its partner. It prints one
``SUMMARY`` line with the key numbers and exits 1 on any failure.

``planner`` reports, and exits 1 only for a run dir that holds no run: the measured peak is
``torch.cuda.max_memory_allocated``, so the estimate is shown both whole and without its
allowances for the CUDA context and the allocator's fragmentation, which that counter does not see.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.paths import asset

STEPS = 5
LOSS_TOLERANCE = 2e-2
NARROW_LLAMA = [  # Llama-3-8B's layout (GQA 4:1, head_dim 128, vocab 128,256), narrow and 2 layers deep
    "model=llama3-8b",
    "model.name=llama3-narrow",
    "model.source=random",
    f"model.tokenizer={asset('tiny-tokenizer')}",
    "model.arch.hidden_size=1024",
    "model.arch.intermediate_size=3584",
    "model.arch.num_heads=8",
    "model.arch.num_kv_heads=2",
    "model.arch.num_layers=2",
]
BASE = [
    "recipe=tiny",
    *NARROW_LLAMA,
    "train.device=cuda",
    "train.precision=bf16",
    "train.compile=false",
    "data.packing=true",
    "train.seq_len=2048",
    "train.micro_batch_size=2",
    "train.grad_accum=2",
    f"train.max_steps={STEPS}",
    "train.warmup_steps=1",
    "checkpoint.every_steps=0",
    "checkpoint.save_final=false",
    "eval.max_batches=1",
    "eval.generate=false",
    "wandb.mode=disabled",
    "launch.dist_timeout_s=120",
]
ADAPTER = ["checkpoint.save_final=true"]  # the adapter is checked in the final checkpoint
DPO = ["data=demo_preferences", "objective=dpo", "peft=lora", *ADAPTER]


@dataclass(frozen=True)
class Run:
    group: str  # runs of one group train the same model on the same data: the same step-1 loss
    overrides: tuple[str, ...]
    adapters: bool = False  # trains LoRA/QLoRA adapters: its final checkpoint's adapter/ is checked
    generates: bool = False  # evaluates with generation: its eval.json has generation metrics


RUNS: dict[str, Run] = {  # in bench/gpu_check.sh's order of value
    "single": Run("sft", ("strategy=single",)),
    "single-compiled": Run("sft", ("strategy=single", "train.compile=true")),
    "zero3-generate": Run(
        "sft", ("strategy=zero3", "eval.generate=true", "eval.num_generate=2", "eval.max_new_tokens=8"), generates=True
    ),
    "lora-liger": Run("sft", ("peft=lora", "train.loss=liger", *ADAPTER), adapters=True),
    "qlora": Run("qlora", ("peft=qlora", *ADAPTER), adapters=True),
    "dpo-adapters-off": Run("dpo", (*DPO, "objective.reference=adapters_off"), adapters=True),
    "zero1": Run("sft", ("strategy=zero1",)),
    "zero2": Run("sft", ("strategy=zero2",)),
    "qlora-compiled": Run("qlora", ("peft=qlora", "train.compile=true", *ADAPTER), adapters=True),
    "qlora-zero3": Run("qlora", ("strategy=zero3", "peft=qlora", *ADAPTER), adapters=True),
    # LoRA keeps the optimizer's memory small, so what the forward saves for backward shows in the peak.
    "lora-ac": Run("sft", ("peft=lora", "strategy.activation_checkpointing=true", *ADAPTER), adapters=True),
    "lora-ac-offload": Run(
        "sft",
        ("peft=lora", "strategy.activation_checkpointing=true", "strategy.activation_offloading=true", *ADAPTER),
        adapters=True,
    ),
    "dpo-precomputed": Run("dpo", (*DPO, "objective.reference=precomputed"), adapters=True),
}
LOWER_PEAK = {"lora-ac-offload": "lora-ac"}  # this run's peak memory must be below that one's
REQUIRED = ("tokens_per_s", "mfu", "peak_mem_gb", "attn_varlen_flash")


def overrides(name: str, runs_dir: Path) -> list[str]:
    return [*BASE, *RUNS[name].overrides, f"run.dir={runs_dir / name}"]


# --------------------------------------------------------------------------------------------
# train: processes side by side, each under its own time limit


@dataclass(frozen=True)
class Job:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]


def run_jobs(jobs: Sequence[Job], parallel: int, timeout: float) -> dict[str, tuple[int, float]]:
    """Run ``jobs``, ``parallel`` at a time, each its output to its log; past ``timeout`` seconds it
    gets SIGTERM (``ftl train`` hands it to the trainer, which stops), 10 s later SIGKILL, and exit
    124 is reported. The jobs stay in this process's group, so a ``timeout`` around this one reaches
    them too. Returns name -> (exit status, seconds), printing one line per job as it ends."""

    def one(job: Job) -> tuple[str, tuple[int, float]]:
        start = time.monotonic()
        with job.log.open("w") as log:
            proc = subprocess.Popen(job.argv, cwd=ROOT, env=job.env, stdout=log, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                rc = 124
        seconds = time.monotonic() - start
        tail = job.log.read_text(errors="replace").strip().splitlines()[-1:] if rc else []
        print(
            f"{job.name}: exit {rc} after {seconds:.0f} s"
            + (" (timed out)" if rc == 124 else "")
            + (f": {tail[0][:200]}" if tail else ""),
            flush=True,
        )
        return job.name, (rc, seconds)

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        return dict(pool.map(one, jobs))


def train(runs_dir: Path, names: list[str], parallel: int, timeout: float) -> int:
    runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        Job(
            name,
            [sys.executable, "-m", "launcher", "train", *overrides(name, runs_dir)],
            runs_dir / f"{name}.log",
            {**os.environ, "FTL_CACHE": str(runs_dir / ".cache" / name)},
        )
        for name in names
    ]
    results = run_jobs(jobs, parallel, timeout)
    ok = [n for n, (rc, _) in results.items() if rc == 0]
    times = ", ".join(f"{n} {s:.0f}s" for n, (_, s) in results.items())
    print(f"SUMMARY {len(ok)}/{len(names)} runs exited 0 ({times})")
    return 0 if len(ok) == len(names) else 1


# --------------------------------------------------------------------------------------------
# metrics: each run's criteria, then across runs


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_problems(run_dir: Path, spec: Run) -> list[str]:
    rows = read_metrics(run_dir)
    if not rows:
        return ["no metrics.jsonl rows"]
    problems = [] if len(rows) >= STEPS else [f"{len(rows)} of {STEPS} steps logged"]
    bad_loss = [
        r.get("step") for r in rows if not (isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"]))
    ]
    if bad_loss:
        problems.append(f"loss not finite at steps {bad_loss}")
    for key in REQUIRED:
        missing = [r.get("step") for r in rows if not isinstance(r.get(key), (int, float))]
        if missing:
            problems.append(f"{key} missing at steps {missing}")
    flash = [r["attn_varlen_flash"] for r in rows if isinstance(r.get("attn_varlen_flash"), (int, float))]
    if flash and min(flash) < 1.0:
        problems.append(f"packed attention took the per-example loop (share {min(flash):.2f})")
    evals = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    if not evals:
        problems.append("no eval.json")
    elif spec.generates and not any("rougeL" in result for result in evals.values()):
        problems.append("eval.json has no generation metrics (rougeL)")
    if spec.adapters:
        problems += adapter_problems(run_dir)
    return problems


def adapter_problems(run_dir: Path) -> list[str]:
    from safetensors import safe_open

    files = sorted(run_dir.glob("checkpoints/*/adapter/adapter_model.safetensors"))
    if not files:
        return ["no checkpoints/*/adapter/adapter_model.safetensors"]
    with safe_open(str(files[-1]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not tensors or any(t.numel() == 0 for t in tensors.values()):
        return [f"adapter holds {len(tensors)} tensors, some empty: {files[-1]}"]
    if not any(bool(t.float().abs().sum() > 0) for k, t in tensors.items() if "lora_B" in k):
        return ["every lora_B is zero: the adapter did not train (or was not gathered)"]
    return []


def step1_losses(runs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Per group, each run's step-1 loss."""
    groups: dict[str, dict[str, float]] = {}
    for name, run_dir in runs.items():
        first = next((r for r in read_metrics(run_dir) if r.get("step") == 1), None)
        if first is not None and isinstance(first.get("loss"), (int, float)) and math.isfinite(first["loss"]):
            groups.setdefault(RUNS[name].group, {})[name] = first["loss"]
    return groups


def peak(run_dir: Path) -> float | None:
    return max(
        (r["peak_mem_gb"] for r in read_metrics(run_dir) if isinstance(r.get("peak_mem_gb"), (int, float))),
        default=None,
    )


def metrics(runs_dir: Path) -> int:
    runs = {
        name: runs_dir / name for name in RUNS if (runs_dir / f"{name}.log").is_file() or (runs_dir / name).is_dir()
    }
    failures, passing = [], 0
    print(
        f"{'run':<18} {'steps':>5} {'loss 1':>8} {'loss 5':>8} {'tokens/s':>10} {'peak GiB':>9} {'flash':>6}  problems"
    )
    for name, run_dir in runs.items():
        rows, problems = read_metrics(run_dir), run_problems(run_dir, RUNS[name])
        first, last = (rows[0] if rows else {}), (rows[-1] if rows else {})

        def cell(row: dict[str, Any], key: str, fmt: str) -> str:
            return format(row[key], fmt) if isinstance(row.get(key), (int, float)) else "-"

        print(
            f"{name:<18} {len(rows):>5} {cell(first, 'loss', '.4f'):>8} {cell(last, 'loss', '.4f'):>8} {cell(last, 'tokens_per_s', ',.0f'):>10} "
            f"{cell(last, 'peak_mem_gb', '.2f'):>9} {cell(last, 'attn_varlen_flash', '.2f'):>6}  {'; '.join(problems) or 'ok'}"
        )
        failures += [f"{name}: {p}" for p in problems]
        passing += not problems
    spreads = []
    for group, losses in step1_losses(runs).items():
        spread = max(losses.values()) - min(losses.values())
        spreads.append(f"{group} {spread:.4f} over {len(losses)}")
        if spread > LOSS_TOLERANCE:
            failures.append(f"step-1 losses of group {group} differ by {spread:.4f} > {LOSS_TOLERANCE}: {losses}")
    peaks = []
    for low, high in LOWER_PEAK.items():
        if low in runs and high in runs:
            a, b = peak(runs[low]), peak(runs[high])
            peaks.append(f"{low} {a if a is None else round(a, 3)} < {high} {b if b is None else round(b, 3)} GiB")
            if a is None or b is None or not a < b:
                failures.append(f"peak memory of {low} ({a}) is not below {high}'s ({b})")
    print(
        "(tokens/s of runs sharing the GPU: no result; step-1 loss spread per group: "
        + ", ".join(spreads or ["none"])
        + ")"
    )
    for failure in failures:
        print("FAIL", failure)
    missing = [name for name in RUNS if name not in runs]
    print(
        f"SUMMARY {passing}/{len(runs)} runs pass"
        + (f" ({len(missing)} not run)" if missing else "")
        + "; step-1 loss spread "
        + (", ".join(spreads) or "-")
        + "; "
        + ("; ".join(peaks) or "no offload pair")
    )
    return 1 if failures or not runs else 0


# --------------------------------------------------------------------------------------------
# planner


def planner(runs_dir: Path) -> int:
    from launcher.config.validate import load_run_config
    from launcher.plan.memory import FIXED_GPU_OVERHEAD, FRAGMENTATION, GiB
    from launcher.plan.report import memory_report

    print(f"{'run':<18} {'planned GiB':>11} {'planned, allocated part':>24} {'measured max allocated':>23}")
    missing, ratios = 0, []
    for name in RUNS:
        run = runs_dir / name
        if not (run / "config.yaml").is_file():
            print(f"{name:<18} {'no run':>11}")
            missing += 1
            continue
        e = memory_report(load_run_config(run / "config.yaml")).chosen
        allocated = (e.total - FIXED_GPU_OVERHEAD) / (1 + FRAGMENTATION)
        measured = peak(run)
        if measured:
            ratios.append(allocated / GiB / measured)
        shown = f"{measured:.2f}" if measured is not None else "no steps"
        print(f"{name:<18} {e.total / GiB:>11.2f} {allocated / GiB:>24.2f} {shown:>23}")
    print(
        "(planned: launcher/plan/memory.py for the run's config; allocated part: without the 1 GiB CUDA context and the 10% "
        "fragmentation allowance, which torch.cuda.max_memory_allocated does not count)"
    )
    span = f"planned/measured {min(ratios):.2f}-{max(ratios):.2f}" if ratios else "nothing measured"
    print(f"SUMMARY {len(RUNS) - missing}/{len(RUNS)} runs; {span}")
    return 1 if missing else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("train", "metrics", "planner"))
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("names", nargs="*", help=f"train: runs of {', '.join(RUNS)}")
    parser.add_argument("--parallel", type=int, default=4, help="train: runs at a time")
    parser.add_argument("--timeout", type=float, default=120, help="train: seconds per run")
    args = parser.parse_intermixed_args(argv)
    unknown = [n for n in args.names if n not in RUNS]
    if unknown or (args.command == "train") != bool(args.names):
        parser.error(f"train takes run names (of {', '.join(RUNS)}), the others none; got {args.names}")
    if args.command == "train":
        return train(args.runs_dir, args.names, args.parallel, args.timeout)
    return metrics(args.runs_dir) if args.command == "metrics" else planner(args.runs_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
