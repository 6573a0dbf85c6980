"""Shared by the end-to-end tests: run the real `ftl` CLI in a subprocess and read a run dir back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from launcher.paths import ROOT

# Every run in the suite: tiny model, no W&B, and a short process-group timeout so a broken rank
# fails the test in a minute instead of hanging it for ten.
TINY = ["recipe=tiny", "wandb.mode=disabled", "launch.dist_timeout_s=60"]


def ftl_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # DeepSpeed's JIT ops, built once
    return env


def ftl(*args: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=env or ftl_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if check:
        assert proc.returncode == 0, f"ftl {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_dir(run_dir: Path, step: int) -> Path:
    from launcher.checkpoint import checkpoints_dir

    return checkpoints_dir(run_dir) / f"step-{step}"


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest elementwise difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
