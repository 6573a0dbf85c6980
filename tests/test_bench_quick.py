"""The benchmark scripts run in their quick mode: every table row prints. No timing assertions."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers import need_gpus

from launcher.paths import ROOT


def bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *args], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **env})  # fmt: skip


QUICK_RUNS = {  # script: (the rows its table must print, what marks the numbers as no result, seconds)
    "throughput": (lambda m: [*m.TRAIN_ROWS, *m.OTHER_ROWS], "quick mode", 200),
    "ablate_cpu_step": (lambda m: [name for name, *_ in m.CONFIGS], "QUICK: not a result", 200),
    "cpu_allocator": (lambda m: [*m.SIDES, "later steps, glibc default / ftl", "losses identical across all runs: yes"], "QUICK (tiny model): not a result", 200),
    "cpu_attention": (lambda m: [*m.SIDES, "speed-up of short-example path", "speed-up of one operator"], "QUICK: not a result", 120),
    "load_memory": (lambda m: [name for name, _ in m.CONFIGS], "QUICK (tiny model): not a result", 360),
    "dpo_throughput": (lambda m: list(m.SIDES.values()), "quick mode", 360),
    "loss_memory": (lambda m: ["logits", "chunked", "drop: measured", "where the peak is", "forward, head and loss", "backward"], "QUICK: not a result", 200),
}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("script", sorted(QUICK_RUNS))
def test_quick_mode_prints_every_row(script: str) -> None:
    rows, marker, timeout = QUICK_RUNS[script]
    proc = run_script(script, "--quick", timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for row in rows(bench_module(script)):
        assert row in proc.stdout, f"row {row!r} missing from:\n{proc.stdout}"
    assert marker in proc.stdout


@pytest.mark.parametrize("script", ["gpu_mfu", "gpu_attention"])
def test_gpu_benches_say_they_skipped_without_a_gpu(script: str) -> None:
    proc = run_script(script, "--quick", timeout=120, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("no GPU: skipped") and len(proc.stdout.splitlines()) == 1, proc.stdout  # no table, no numbers
    strict = run_script(script, "--require-gpu", timeout=120, CUDA_VISIBLE_DEVICES="")
    assert strict.returncode == bench_module(script).NO_GPU_EXIT


def test_gpu_attention_packs_are_full_and_vary() -> None:
    rows = bench_module("gpu_attention").example_lengths(3, 4096, 85)
    assert [sum(row) for row in rows] == [4096] * 3
    assert all(1 <= n <= 127 for row in rows for n in row) and len({n for row in rows for n in row}) > 20


def test_gpu_mfu_depth_arithmetic() -> None:
    """The default depth for an H200 (141 GB) at 4096 tokens: more than 1 layer, fewer than all 32."""
    from launcher.session import load_config

    gpu_mfu = bench_module("gpu_mfu")
    arch = load_config(gpu_mfu.model_overrides(32, "fsdp", 4096, 1, ROOT / "runs" / "unused")).cfg.model.arch
    assert gpu_mfu.layer_params(arch) == 218_112_000  # 4096² · 2 + 4096 · 1024 · 2 + 3 · 4096 · 14336 + 2 · 4096
    layers = gpu_mfu.layers_that_fit(arch, 141e9, 4096)
    assert 8 <= layers < 32
    assert gpu_mfu.layers_that_fit(arch, 1e12, 4096) == 32  # capped at the real depth


GPU_QUICK_RUNS = {  # script: (the rows its table must print, what its stderr must not say, seconds)
    "gpu_mfu": (lambda m: list(m.ROW_NAMES.values()), None, 500),  # a failed strategy already exits 1
    "gpu_attention": (lambda m: list(m.SIDES), "no flash varlen kernel", 240),  # the one-call path really ran
}


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.parametrize("script", sorted(GPU_QUICK_RUNS))
def test_gpu_quick_mode_prints_every_row(script: str) -> None:
    need_gpus(1)
    rows, not_in_stderr, timeout = GPU_QUICK_RUNS[script]
    proc = run_script(script, "--quick", timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for row in rows(bench_module(script)):
        assert row in proc.stdout, f"row {row!r} missing from:\n{proc.stdout}"
    assert not_in_stderr is None or not_in_stderr not in proc.stderr, proc.stderr[-2000:]


GPU_CHECK_STEPS = ["env", "pytest-gpu", "train-single", "train-zero3", "train-check", "gpu_mfu", "planner"]  # the order


@pytest.mark.timeout(300)
def test_gpu_check_runs_every_step_and_fails_without_a_gpu(tmp_path: Path) -> None:
    """bench/gpu_check.sh, the one call for a lent GPU, run here: every step runs, in order, and
    logs; the gpu tests skip, the CUDA runs and the MFU bench refuse, the run check finds nothing
    to pass, and the script exits non-zero."""
    (tmp_path / "wheels").mkdir()  # none to install: this machine's venv has the packages
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "FTL_WHEELS": str(tmp_path / "wheels"), "CUDA_VISIBLE_DEVICES": "", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.log" for s in GPU_CHECK_STEPS)
    started = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("== ") and "(at most" in line]
    assert started == GPU_CHECK_STEPS, proc.stdout[-3000:]
    assert "== pytest-gpu: exit 0" in proc.stdout and " skipped" in (out / "pytest-gpu.log").read_text()
    assert "varlen_attn" in (out / "env.log").read_text()
    for run in ("train-single", "train-zero3"):
        assert "train.device: cuda, but this machine shows no GPU" in (out / f"{run}.log").read_text() and f"== {run}: exit 2" in proc.stdout
    assert "no metrics.jsonl rows" in (out / "train-check.log").read_text() and "== train-check: exit 1" in proc.stdout
    assert (out / "gpu_mfu.log").read_text().startswith("no GPU: skipped") and "== gpu_mfu: exit 3" in proc.stdout
    assert "no run" in (out / "planner.log").read_text() and "== planner: exit 1" in proc.stdout


def test_gpu_runs_check_flags_the_loop_and_missing_metrics(tmp_path: Path) -> None:
    """bench/gpu_runs.py metrics, on metrics.jsonl rows as a CUDA run writes them."""
    import json

    gpu_runs = bench_module("gpu_runs")
    row = {"step": 1, "tokens_per_s": 9e4, "mfu": 0.41, "peak_mem_gb": 30.5, "attn_varlen_flash": 1.0}
    for name, rows in {"good": [row], "loop": [row, {**row, "step": 2, "attn_varlen_flash": 0.5}],
                       "nomfu": [{k: v for k, v in row.items() if k != "mfu"}]}.items():  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gpu_runs.main(["metrics", str(tmp_path / "good")]) == 0
    assert gpu_runs.main(["metrics", str(tmp_path / "loop")]) == 1
    assert gpu_runs.main(["metrics", str(tmp_path / "nomfu")]) == 1
