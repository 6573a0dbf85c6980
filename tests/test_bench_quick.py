"""The benchmark scripts run in their quick mode: every table row prints. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import need_gpus

from launcher.paths import ROOT


def bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **env},
    )


QUICK_RUNS = {  # script: (the rows its table must print, what marks the numbers as no result, seconds)
    "throughput": (lambda m: [*m.TRAIN_ROWS, *m.OTHER_ROWS], "quick mode", 200),
    "ablate_cpu_step": (lambda m: [name for name, *_ in m.CONFIGS], "QUICK: not a result", 200),
    "cpu_allocator": (
        lambda m: [*m.SIDES, "later steps, glibc default / ftl", "losses identical across all runs: yes"],
        "QUICK (tiny model): not a result",
        200,
    ),
    "cpu_attention": (
        lambda m: [*m.SIDES, "speed-up of short-example path", "speed-up of one operator"],
        "QUICK: not a result",
        120,
    ),
    "load_memory": (lambda m: [name for name, _ in m.CONFIGS], "QUICK (tiny model): not a result", 360),
    "dpo_throughput": (lambda m: list(m.SIDES.values()), "quick mode", 360),
    "checkpoint_hash": (lambda m: list(m.ROWS), "QUICK (tiny model): not a result", 200),
    "lora_checkpoint_size": (lambda m: list(m.ROWS), "QUICK (tiny model): not a result", 200),
    "checkpoint_bench": (lambda m: [*m.QUICK_MODELS, *m.COLUMNS], "QUICK (tiny model): not a result", 200),
    "loss_memory": (
        lambda m: ["logits", "chunked", "drop: measured", "where the peak is", "forward, head and loss", "backward"],
        "QUICK: not a result",
        200,
    ),
}


# over a minute each alone: `make test-heavy`
HEAVY_QUICK = {"throughput", "load_memory", "dpo_throughput", "ablate_cpu_step"}
assert HEAVY_QUICK <= set(QUICK_RUNS), HEAVY_QUICK - set(QUICK_RUNS)


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "script", [pytest.param(s, marks=pytest.mark.heavy) if s in HEAVY_QUICK else s for s in sorted(QUICK_RUNS)]
)
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
    assert proc.stdout.startswith("no GPU: skipped") and len(proc.stdout.splitlines()) == 1, (
        proc.stdout
    )  # no table, no numbers
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


def gpu_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "wheels").mkdir(exist_ok=True)  # none to install: this machine's venv has the packages
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "FTL_WHEELS": str(tmp_path / "wheels"),
        "CUDA_VISIBLE_DEVICES": "",
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        **env,
    }
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280
    )


def dry_steps(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[tuple[str, int, str]]]:
    proc = gpu_check(tmp_path, FTL_GPU_CHECK_DRY="1", **env)
    steps = [re.match(r"(\S+) +(\d+) s  (.*)", line) for line in proc.stdout.splitlines()[:-1]]
    assert all(steps), proc.stdout
    return proc, [(m.group(1), int(m.group(2)), m.group(3)) for m in steps if m]


def test_gpu_check_dry_mode_lists_every_step_within_the_budget(tmp_path: Path) -> None:
    """FTL_GPU_CHECK_DRY=1: every step with its limit and the total, nothing run or written; the
    engine matrix's two waves hold every run of bench/gpu_runs.py's RUNS once; over the budget it fails."""
    proc, steps = dry_steps(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [name for name, _, _ in steps]
    assert names == ["env", "pytest-gpu", "train-a", "train-b", "runs-check", "planner", "engines", "mfu", "attention"]
    total = sum(limit for _, limit, _ in steps)
    assert proc.stdout.splitlines()[-1] == f"total {total} s of 540 s allowed" and total <= 540
    trained = [word for name, _, command in steps if name.startswith("train-") for word in command.split()]
    runs = bench_module("gpu_runs").RUNS
    assert sorted(w for w in trained if w in runs) == sorted(runs)
    assert not (tmp_path / "out").exists()
    over, _ = dry_steps(tmp_path, FTL_GPU_CHECK_BUDGET_S=str(total - 1))
    assert over.returncode == 1 and over.stdout.splitlines()[-1] == f"total {total} s of {total - 1} s allowed"


@pytest.mark.timeout(300)
def test_gpu_check_runs_every_step_and_fails_without_a_gpu(tmp_path: Path) -> None:
    """bench/gpu_check.sh, the one call for a lent GPU, run here: every step of the dry listing runs,
    in order; $OUT holds exactly check.log, summary.txt (one line per step, in order) and runs.tgz;
    the gpu tests and benches SKIP, the CUDA runs are refused and the checks of them FAIL; exit 1."""
    import tarfile

    _, steps = dry_steps(tmp_path)
    proc = gpu_check(tmp_path)
    out = tmp_path / "out"
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["check.log", "runs.tgz", "summary.txt"]
    log = (out / "check.log").read_text()
    started = [line.split()[1] for line in log.splitlines() if line.startswith("== ") and "(at most" in line]
    assert started == [name for name, _, _ in steps], log[-3000:]
    summary = [line.split() for line in (out / "summary.txt").read_text().splitlines()]
    assert [fields[1] for fields in summary] == started
    verdicts = {fields[1]: fields[0] for fields in summary}
    assert {verdicts[s] for s in ("pytest-gpu", "engines", "mfu", "attention")} == {"SKIP"}, summary
    assert {verdicts[s] for s in ("env", "train-a", "train-b", "runs-check", "planner")} == {"FAIL"}, summary
    assert "versions: torch" in log and " skipped" in log
    assert all(f"{name}: exit 2 after" in log for name in bench_module("gpu_runs").RUNS)  # every run refused at launch
    assert "train.device: cuda, but this machine shows no GPU" in log
    assert "0/13 runs exited 0" not in log and "SUMMARY 0/6 runs exited 0" in log and "SUMMARY 0/7 runs exited 0" in log
    with tarfile.open(out / "runs.tgz") as tar:
        assert {Path(n).name for n in tar.getnames()} >= {f"{name}.log" for name in bench_module("gpu_runs").RUNS}


def fake_run(runs_dir: Path, name: str, rows: list[dict[str, Any]], lora_b: float | None = None) -> None:
    """A run dir as a CUDA `ftl train` leaves it: metrics.jsonl, eval.json and (adapters) the final adapter."""
    import torch
    from safetensors.torch import save_file

    run = runs_dir / name
    (run / "checkpoints" / "step-5" / "adapter").mkdir(parents=True)
    (runs_dir / f"{name}.log").write_text("")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval.json").write_text(json.dumps({"after": {"loss": 1.0, "rougeL": 0.1}}))
    if lora_b is not None:
        tensors = {
            "base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(8, 64),
            "base_model.model.layers.0.q_proj.lora_B.weight": torch.full((64, 8), lora_b),
        }
        save_file(tensors, str(run / "checkpoints" / "step-5" / "adapter" / "adapter_model.safetensors"))


def steps_of(loss1: float = 11.76, peak: float = 4.0, **changes: Any) -> list[dict[str, Any]]:
    row = {"tokens_per_s": 9e4, "mfu": 0.41, "peak_mem_gb": peak, "attn_varlen_flash": 1.0}
    return [{"step": s, "loss": loss1 if s == 1 else 11.0, **row, **(changes if s == 2 else {})} for s in range(1, 6)]


def test_gpu_runs_metrics_checks_each_run_and_across_runs(tmp_path: Path) -> None:
    """bench/gpu_runs.py metrics on run dirs as CUDA runs write them: passes a good set, and fails
    each criterion broken alone."""
    gpu_runs = bench_module("gpu_runs")
    good = {
        "single": (steps_of(), None),
        "zero3-generate": (steps_of(11.765), None),
        "lora-ac": (steps_of(peak=3.0), 0.01),
        "lora-ac-offload": (steps_of(peak=2.0), 0.01),
        "qlora": (steps_of(11.9), 0.02),
    }
    broken = {
        "the per-example loop": {"single": (steps_of(attn_varlen_flash=0.5), None)},
        "no MFU": {"single": ([{k: v for k, v in r.items() if k != "mfu"} for r in steps_of()], None)},
        "a NaN loss": {"single": (steps_of(loss=math.nan), None)},
        "too few steps": {"single": (steps_of()[:3], None)},
        "step-1 losses apart": {"zero3-generate": (steps_of(11.80), None)},
        "an untrained adapter": {"lora-ac": (steps_of(peak=3.0), 0.0)},
        "offloading not lower": {"lora-ac-offload": (steps_of(peak=3.0), 0.01)},
    }
    for case, changes in {"good": {}, **broken}.items():
        runs_dir = tmp_path / case.replace(" ", "_")
        for name, (rows, lora_b) in {**good, **changes}.items():
            fake_run(runs_dir, name, rows, lora_b)
        assert gpu_runs.main(["metrics", str(runs_dir)]) == (0 if case == "good" else 1), case
    assert gpu_runs.main(["metrics", str(tmp_path / "empty")]) == 1


def test_gpu_runs_matrix_configs_validate() -> None:
    """Every run of the engine matrix composes and validates (train.device=cuda is checked at launch,
    not here); lora-liger's only possible error is liger-kernel missing on this machine."""
    import importlib.util

    from launcher.config.errors import ConfigErrors
    from launcher.session import load_config

    gpu_runs = bench_module("gpu_runs")
    for name, spec in gpu_runs.RUNS.items():
        try:
            cfg = load_config(gpu_runs.overrides(name, ROOT / "runs" / "unused")).cfg
        except ConfigErrors as e:
            assert (
                name == "lora-liger" and importlib.util.find_spec("liger_kernel") is None and "liger-kernel" in str(e)
            ), (name, e)
            continue
        assert (
            cfg.model.arch.hidden_size,
            cfg.model.arch.num_heads,
            cfg.model.arch.num_kv_heads,
            cfg.model.arch.vocab_size,
        ) == (1024, 8, 2, 128256)
        assert (cfg.peft.method != "none") == spec.adapters, name


@pytest.mark.timeout(200)
def test_gpu_engines_wrap_fsdp2_and_ddp_at_one_rank_on_cpu() -> None:
    """bench/gpu_engines.py's CPU path (gloo): fully_shard really wraps (root + every layer, DTensor
    parameters), the gathered LoRA adapter trained, DDP wraps, both give the same step-1 loss."""
    proc = run_script("gpu_engines", "--device", "cpu", "--variants", "fsdp-lora,ddp", "--parallel", "2", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "fully_shard: root + 2 layers" in proc.stdout and "DistributedDataParallel; ok" in proc.stdout
    assert "SUMMARY 2/2 variants wrap and train on cpu" in proc.stdout
    refused = run_script("gpu_engines", "--device", "cpu", "--variants", "fsdp-qlora", timeout=60)
    assert refused.returncode == 2 and "need CUDA" in refused.stderr


def test_gpu_mfu_projection_and_rows() -> None:
    """The projected 8B MFU: the layers' time scaled to 32 layers, the head's kept, the optimizer's
    scaled by parameters over PROJECT_WORLD GPUs; row names parse or are refused."""
    gpu_mfu = bench_module("gpu_mfu")
    row = {"layers": 4, "fb_s": 0.5, "step_s": 0.6, "n_all": 2e9, "tokens_per_step": 4096, "peak_flops": 1e15}
    head_s, n_compute, n_all = 0.1, 7.5e9, 8e9
    step = head_s + (0.5 - head_s) * 32 / 4 + 0.1 * (n_all / 2e9) / gpu_mfu.PROJECT_WORLD
    assert gpu_mfu.project_8b(row, head_s, 32, n_compute, n_all) == pytest.approx(6 * n_compute * 4096 / step / 1e15)
    assert gpu_mfu.project_8b({**row, "peak_flops": None}, head_s, 32, n_compute, n_all) is None
    assert gpu_mfu.parse_rows("fsdp,fsdp-compiled-ac,zero3-ac") == [
        ("fsdp", False, False),
        ("fsdp", True, True),
        ("zero3", False, True),
    ]
    for bad in ("zero3-compiled", "ddp", "fsdp-fast"):
        with pytest.raises(ValueError):
            gpu_mfu.parse_rows(bad)


def test_gpu_mfu_head_microbench_runs_ftls_loss_paths() -> None:
    """The head-and-loss microbench's module goes through next_token_loss's fused path (chunked)
    and its full-logits path alike, with the same loss and gradients: its rows compare like with like."""
    import torch

    from launcher.model.loss import fused_head_ok, next_token_loss

    torch.manual_seed(0)
    head = bench_module("gpu_mfu").head_only(32, 500, "cpu", torch.float32)
    assert fused_head_ok(head)
    hidden, labels = torch.randn(2, 16, 32, requires_grad=True), torch.randint(0, 500, (2, 16))
    results = []
    for impl in ("chunked", "logits"):
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        loss = next_token_loss(head, {"inputs_embeds": hidden}, labels, impl=impl)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), head.lm_head.weight.grad.clone()))
    for chunked, logits in zip(*results):
        torch.testing.assert_close(chunked, logits, rtol=1e-5, atol=1e-5)


def test_gpu_runs_jobs_side_by_side_each_under_its_limit(tmp_path: Path) -> None:
    """run_jobs, which launches the matrix's runs and the engine variants: each job's exit status and
    log; one past its limit is stopped (SIGTERM) and reported as 124 while the others finish."""
    import time

    gpu_runs = bench_module("gpu_runs")
    jobs = [
        gpu_runs.Job(name, ["bash", "-c", script], tmp_path / f"{name}.log", dict(os.environ))
        for name, script in {"ok": "echo done", "fails": "echo bad; exit 3", "hangs": "sleep 60"}.items()
    ]
    start = time.monotonic()
    results = gpu_runs.run_jobs(jobs, parallel=3, timeout=2)
    assert time.monotonic() - start < 20
    assert {name: rc for name, (rc, _) in results.items()} == {"ok": 0, "fails": 3, "hangs": 124}
    assert (tmp_path / "ok.log").read_text() == "done\n" and (tmp_path / "fails.log").read_text() == "bad\n"
