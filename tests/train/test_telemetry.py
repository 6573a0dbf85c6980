"""Rank-0 sinks: W&B mode resolution and secret redaction, metrics.jsonl on resume, the loss curve,
the before/after report, and nothing at all on other ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from launcher.config.schema import FtlConfig, RunConfig, WandbConfig
from launcher.paths import ROOT
from launcher.runtime.distributed import DistInfo
from launcher.train import telemetry
from launcher.train.telemetry import (
    CLEAR_REFS,
    ConsoleSink,
    JsonlSink,
    build_telemetry,
    peak_memory_gb,
    read_metrics,
    redact,
    render_eval_report,
    reset_peak_memory,
    write_loss_curve,
)
from launcher.wandb_auth import resolve_wandb_mode

KEY = "k" * 40


def test_wandb_mode_auto(tmp_path: Path) -> None:
    empty = tmp_path / "empty.netrc"
    empty.write_text("")
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": KEY}) == "online"
    assert resolve_wandb_mode("auto", {"NETRC": str(empty)}) == "offline"
    assert resolve_wandb_mode("auto", {"NETRC": str(tmp_path / "missing")}) == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    netrc.chmod(0o600)
    assert resolve_wandb_mode("auto", {"NETRC": str(netrc)}) == "online"
    assert resolve_wandb_mode("auto", {"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.com"}) == "offline"
    for mode in ("online", "offline", "disabled"):
        assert resolve_wandb_mode(mode, {"WANDB_API_KEY": KEY}) == mode


def test_redact_keys_and_values() -> None:
    config = {
        "launch": {"env": {"WANDB_API_KEY": KEY, "HF_TOKEN": "hf_x", "NCCL_DEBUG": "INFO"}},
        "model": {"tokenizer": "path/tok", "path": f"https://user:{KEY}@host/model"},
        "eval": {"max_new_tokens": 64},
        "list": [KEY, 1],
    }
    out = redact(config, {KEY})
    assert out["launch"]["env"] == {"WANDB_API_KEY": "<redacted>", "HF_TOKEN": "<redacted>", "NCCL_DEBUG": "INFO"}
    assert out["model"] == {"tokenizer": "path/tok", "path": "https://user:<redacted>@host/model"}
    assert out["eval"] == {"max_new_tokens": 64}
    assert out["list"] == ["<redacted>", 1]
    assert KEY not in json.dumps(out)


def test_disabled_wandb_imports_nothing_from_wandb(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from launcher.config.schema import FtlConfig, RunConfig, WandbConfig\n"
        "from launcher.runtime.distributed import DistInfo\n"
        "from launcher.train.telemetry import build_telemetry\n"
        f"cfg = FtlConfig(wandb=WandbConfig(mode='disabled'), run=RunConfig(dir={str(tmp_path)!r}))\n"
        f"t = build_telemetry(cfg, __import__('pathlib').Path({str(tmp_path)!r}), DistInfo(), 3, 0)\n"
        "t.log_step(1, dict(loss=1.0, lr=0.1, grad_norm=1.0, tokens_per_s=1.0, peak_mem_gb=0.1, elapsed=0.1, step_s=0.1))\n"
        "t.close(0)\n"
        "assert not [m for m in sys.modules if m == 'wandb' or m.startswith('wandb.')], 'wandb imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_other_ranks_report_nothing(tmp_path: Path) -> None:
    cfg = FtlConfig(wandb=WandbConfig(mode="offline"), run=RunConfig(dir=str(tmp_path)))
    telemetry = build_telemetry(cfg, tmp_path, DistInfo(rank=1, world_size=2, local_rank=1, local_world_size=2), 10, 0)
    telemetry.info("hello")
    telemetry.log_step(1, {"loss": 1.0})
    telemetry.log_eval("after", 1, {"loss": 1.0})
    telemetry.close(0)
    assert list(tmp_path.iterdir()) == []


def row(step: int) -> dict[str, float]:
    return {
        "loss": 5.0 - step * 0.1,
        "lr": 0.1,
        "grad_norm": 1.0,
        "tokens_per_s": 10.0,
        "peak_mem_gb": 0.1,
        "elapsed": step,
    }


def test_jsonl_resume_drops_steps_after_the_checkpoint(tmp_path: Path) -> None:
    path, curve = tmp_path / "metrics.jsonl", tmp_path / "loss_curve.png"
    sink = JsonlSink(path, 0, curve)
    for step in range(1, 13):
        sink.log_step(step, row(step))
    sink.file.close()  # killed: no close(), no curve
    with path.open("a") as f:
        f.write('{"step": 13, "lo')  # a line cut short
    sink = JsonlSink(path, 10, curve)
    for step in range(11, 15):
        sink.log_step(step, row(step))
    sink.close(0)
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 15))
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_curve_without_metrics(tmp_path: Path) -> None:
    assert write_loss_curve(tmp_path / "missing.jsonl", tmp_path / "curve.png") is None


def test_eval_report_side_by_side() -> None:
    sample = {"question": "What is ftl?", "reference": "A launcher."}
    before = {
        "loss": 3.0,
        "perplexity": 20.0,
        "rougeL": 10.0,
        "bleu": 1.0,
        "samples": [{**sample, "prediction": "no idea"}],
    }
    after = {
        "loss": 1.0,
        "perplexity": 2.7,
        "rougeL": 60.0,
        "bleu": 30.0,
        "samples": [{**sample, "prediction": "A launcher!"}],
    }
    console = Console(record=True, width=120)
    for renderable in render_eval_report(before, after, show_samples=1):
        console.print(renderable)
    text = console.export_text()
    for expected in ("perplexity", "ROUGE-L", "BLEU", "What is ftl?", "no idea", "A launcher!", "fine-tuned"):
        assert expected in text
    assert len(render_eval_report(before, after, show_samples=0)) == 1


@pytest.mark.parametrize("start", [0, 5])
def test_eval_file_survives_restart(tmp_path: Path, start: int) -> None:
    (tmp_path / "eval.json").write_text(
        json.dumps({"before": {"step": 0, "loss": 3.0}, "step_8": {"step": 8, "loss": 2.0}})
    )
    cfg = FtlConfig(wandb=WandbConfig(mode="disabled"), run=RunConfig(dir=str(tmp_path)))
    telemetry = build_telemetry(cfg, tmp_path, DistInfo(), 10, start)
    telemetry.log_eval("after", 10, {"loss": 1.0, "samples": []})
    telemetry.close(0)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert sorted(saved) == (["after", "before"] if start else ["after"])


@pytest.mark.skipif(
    not CLEAR_REFS.exists(), reason="no /proc/self/clear_refs (not Linux): the CPU peak is the process's"
)
def test_cpu_peak_memory_is_the_peak_since_the_last_reset() -> None:
    """A step's peak_mem_gb is that step's: 256 MiB held in one window and freed does not show in
    the next (Linux resets the resident high-water mark on request)."""
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    before = peak_memory_gb(cpu)
    held = bytearray(256 * 2**20)  # zero-filled: every page touched
    during = peak_memory_gb(cpu)
    del held
    reset_peak_memory(cpu)
    after = peak_memory_gb(cpu)
    assert during - before > 0.2, (before, during)
    assert after < during - 0.2, (during, after)


@pytest.mark.gpu
def test_cuda_peak_memory_is_the_peak_since_the_last_reset() -> None:
    from helpers import need_gpus

    need_gpus(1)
    cuda = torch.device("cuda")
    held = torch.empty(2**30, dtype=torch.uint8, device=cuda)
    del held
    assert peak_memory_gb(cuda) >= 1.0
    reset_peak_memory(cuda)
    assert peak_memory_gb(cuda) < 0.5, "the freed GiB belongs to the last window"


def test_piped_step_lines_show_the_total_the_pace_and_an_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SLURM log (no terminal): `step N/total`, the seconds per step since the last line and the
    time left at that pace (issue 35)."""
    import io

    now = [100.0]
    monkeypatch.setattr(telemetry.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, color_system=None, soft_wrap=True, width=120)
    sink = ConsoleSink(console, total=100, start=20, log_every=10, show_samples=0, evals={})  # resumed at step 20
    metrics = {"loss": 1.5, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 1000.0, "peak_mem_gb": 1.0}
    now[0] += 300.0  # the eval before training: no part of the pace
    for step in range(21, 51):
        now[0] += 2.0 if step <= 40 else 3.0
        sink.log_step(step, {**metrics, "step_s": 1.5})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("step 30/100  loss 1.5000") and lines[0].endswith("  1.5 s/step  ETA 1:45")  # its own
    assert lines[1].startswith("step 40/100  loss 1.5000") and lines[1].endswith("  2 s/step  ETA 2:00")
    assert lines[2].startswith("step 50/100  loss 1.5000") and lines[2].endswith("  3 s/step  ETA 2:30")
