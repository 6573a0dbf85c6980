"""ddp and fsdp end to end through the real CLI, 2 gloo ranks on CPU with the tiny random Llama
(fp32): training, sharding, exact resume, resume on another world size, `ftl export` read back
by plain transformers, two torchrun agents as two nodes on one host, and an elastic restart after
a rank is killed.

Runs share two reference runs (ddp and fsdp, 10 steps, checkpoints at 5 and 10). An "interrupted"
run is a fresh run dir holding only the reference's step-5 checkpoint: the same command resumes it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    TEN_STEPS,
    TWO_RANKS,
    assert_losses_close,
    copy_interrupted,
    ftl,
    ftl_env,
    max_abs_diff,
    metrics,
    plain_transformers_logits,
    reference_run,
    step_dir,
    worker_pid,
)

from launcher.paths import ROOT
from launcher.train.checkpoint import MARKER

RUN_TIMEOUT_S = 150


def ftl_background(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        # A session of its own: a test that fails midway kills the whole process tree.
        return subprocess.Popen(
            [sys.executable, "-m", "launcher", *args],
            cwd=ROOT,
            env=ftl_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def weights(run_dir: Path, step: int, engine: str) -> dict[str, torch.Tensor]:
    """The full weights of a checkpoint, read offline by the engine's own consolidator."""
    from launcher.engines import engine_class

    return engine_class(engine).consolidate_checkpoint(step_dir(run_dir, step))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_run(tmp_path_factory, "ddp")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_run(tmp_path_factory, "fsdp")


# --------------------------------------------------------------------------------------------


def test_ddp_and_fsdp_train_the_same_10_steps(ddp_run: Path, fsdp_run: Path) -> None:
    ddp, fsdp = metrics(ddp_run), metrics(fsdp_run)
    assert [r["step"] for r in ddp] == [r["step"] for r in fsdp] == list(range(1, 11))
    assert ddp[-1]["loss"] < ddp[0]["loss"] - 0.3
    assert_losses_close(fsdp, ddp, rel=1e-4)
    for a, b in zip(fsdp, ddp):  # the global gradient norm, not one shard's
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert json.loads((step_dir(ddp_run, 10) / MARKER).read_text())["world_size"] == 2
    assert (step_dir(ddp_run, 10) / "model.safetensors").is_file()
    shards = sorted(p.name for p in (step_dir(fsdp_run, 10) / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shards
    # Same training, two checkpoint formats: the same weights.
    assert max_abs_diff(weights(fsdp_run, 10, "fsdp"), weights(ddp_run, 10, "ddp")) <= 1e-5


def test_fsdp_holds_half_the_parameter_bytes(ddp_run: Path, fsdp_run: Path) -> None:
    total = sum(t.numel() * t.element_size() for t in weights(ddp_run, 10, "ddp").values())
    ddp_local, fsdp_local = (
        metrics(ddp_run)[-1].get("param_bytes_local"),
        metrics(fsdp_run)[-1].get("param_bytes_local"),
    )
    assert fsdp_local is not None, "the trainer logs no param_bytes_local (telemetry.local_param_bytes) per step"
    assert ddp_local == total
    assert fsdp_local <= 1.05 * total / 2, (fsdp_local, total)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_exact_resume(engine: str, ddp_run: Path, fsdp_run: Path, tmp_path: Path) -> None:
    reference = {"ddp": ddp_run, "fsdp": fsdp_run}[engine]
    run_dir = copy_interrupted(reference, tmp_path / "resumed")
    out = ftl("train", *TEN_STEPS, *TWO_RANKS, f"strategy={engine}", f"run.dir={run_dir}")
    assert "resuming from" in out.stdout
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [6, 7, 8, 9, 10]
    assert_losses_close(rows, metrics(reference), rel=1e-6)
    assert max_abs_diff(weights(run_dir, 10, engine), weights(reference, 10, engine)) <= 1e-6


def test_fsdp_resumes_on_one_rank(fsdp_run: Path, tmp_path: Path) -> None:
    """2 ranks → 1 (strategy=fsdp unsharded on one rank; DCP reshards model and optimizer). With
    micro_batch_size 8 the one rank reads the same 8 samples per step as the two ranks did; the
    losses differ only by how tokens are averaged (per rank, or over the 8 samples)."""
    run_dir = copy_interrupted(fsdp_run, tmp_path / "one-rank")
    ftl(
        "train",
        *TEN_STEPS,
        "strategy=fsdp",
        "launch.nproc_per_node=1",
        "train.micro_batch_size=8",
        f"run.dir={run_dir}",
    )
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [6, 7, 8, 9, 10]
    assert_losses_close(rows, metrics(fsdp_run), rel=2e-3)
    assert json.loads((step_dir(run_dir, 10) / MARKER).read_text())["world_size"] == 1


def test_export_of_an_fsdp_checkpoint_loads_in_plain_transformers(fsdp_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    ftl("export", str(fsdp_run), "--out", str(out), "--max-shard-size", "100KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    exported = plain_transformers_logits(out, ids, tmp_path, check_tokenizer_and_dtype=True)
    # The live model: the fsdp engine on one rank resuming the same checkpoint (DCP reshards 2 → 1).
    live, engine = live_fsdp_model(fsdp_run)
    with torch.no_grad():
        logits = live(ids).logits
    assert float((exported - logits).abs().max()) <= 1e-5
    state = next(iter(engine.optimizer.state.values()))
    assert int(state["step"]) == 10 and float(state["exp_avg"].abs().sum()) > 0  # AdamW states came back too


def live_fsdp_model(run_dir: Path) -> tuple[Any, Any]:
    from launcher.config.validate import load_run_config
    from launcher.engines.fsdp import FSDPEngine
    from launcher.model.loading import load_model_and_tokenizer
    from launcher.runtime.distributed import DistInfo

    cfg = load_run_config(run_dir / "config.yaml")
    torch.manual_seed(1234)  # a different random init: every weight must come from the checkpoint
    model, _ = load_model_and_tokenizer(cfg.model)
    engine = FSDPEngine(cfg, model, DistInfo(), torch.device("cpu"))
    engine.setup(cfg.train.max_steps)
    engine.load(step_dir(run_dir, 10))
    return engine.model.eval(), engine


def test_export_rejects_what_is_not_a_run_or_checkpoint(tmp_path: Path) -> None:
    for path in (tmp_path / "missing", tmp_path):
        proc = subprocess.run(
            [sys.executable, "-m", "launcher", "export", str(path)],
            cwd=ROOT,
            env=ftl_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert "ftl export:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "overrides, rel",
    [
        # Same samples per rank and step, the same loss normalisation (the window's label tokens).
        (["train.grad_accum=2", "train.micro_batch_size=2", "strategy.activation_checkpointing=true"], 1e-5),
        (["train.precision=bf16"], 2e-2),  # MixedPrecisionPolicy: bf16 compute, fp32 master and reduce
        (["train.precision=bf16", "strategy.reduce_dtype=bf16"], 2e-2),  # the reduce-scatter in bf16
    ],
    ids=["accum-and-activation-checkpointing", "bf16", "bf16-reduce"],
)
def test_fsdp_options_train_as_the_reference(overrides: list[str], rel: float, fsdp_run: Path, tmp_path: Path) -> None:
    """3 steps: with warmup_steps=2 the first 3 learning rates do not depend on max_steps."""
    run_dir = tmp_path / "run"
    ftl(
        "train",
        *TEN_STEPS,
        *TWO_RANKS,
        "strategy=fsdp",
        "train.max_steps=3",
        "checkpoint.every_steps=0",
        *overrides,
        f"run.dir={run_dir}",
    )
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert_losses_close(rows, metrics(fsdp_run), rel=rel)
    assert (step_dir(run_dir, 3) / MARKER).is_file()


@pytest.mark.parametrize("hybrid", [False, True], ids=["fsdp", "hybrid-shard"])
def test_two_nodes_on_one_host_fsdp(hybrid: bool, fsdp_run: Path, tmp_path: Path) -> None:
    """Two torchrun agents (1 rank each) meet through c10d on loopback: the same math as 2 local
    ranks. hybrid_shard: a 2×1 mesh, replicated across the nodes, sharded within each."""
    run_dir, port = tmp_path / "two-nodes", free_port()
    args = [
        "train",
        *TEN_STEPS,
        "strategy=fsdp",
        f"strategy.hybrid_shard={str(hybrid).lower()}",
        "launch=torchrun",
        "launch.nnodes=2",
        "launch.nproc_per_node=1",
        f"launch.rdzv_endpoint=127.0.0.1:{port}",
        f"launch.rdzv_id=two-nodes-{port}",
        f"run.dir={run_dir}",
    ]
    nodes = []
    try:
        for rank in (0, 1):
            nodes.append(ftl_background(*args, f"launch.node_rank={rank}", log=tmp_path / f"node{rank}.log"))
            time.sleep(1.0)  # the two `ftl train` write their run-dir files one after the other
        codes = [node.wait(timeout=RUN_TIMEOUT_S) for node in nodes]
    finally:
        for node in nodes:
            _stop(node)
    logs = "\n".join((tmp_path / f"node{r}.log").read_text()[-3000:] for r in (0, 1))
    assert codes == [0, 0], logs
    assert (run_dir / "config.yaml").is_file() and (run_dir / "config.node1.yaml").is_file()
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 11))
    assert_losses_close(metrics(run_dir), metrics(fsdp_run), rel=1e-5)
    assert json.loads((step_dir(run_dir, 10) / MARKER).read_text())["world_size"] == 2


def test_elastic_restart_after_a_rank_is_killed(ddp_run: Path, tmp_path: Path) -> None:
    """SIGKILL rank 1 after the first checkpoint; torchrun (max_restarts=1) restarts both ranks,
    which resume from the latest checkpoint and end with the uninterrupted run's weights."""
    run_dir, port = tmp_path / "elastic", free_port()
    job = ftl_background(
        "train",
        *TEN_STEPS,
        *TWO_RANKS,
        "strategy=ddp",
        "checkpoint.every_steps=2",
        "launch=torchrun",
        "launch.max_restarts=1",
        f"launch.rdzv_endpoint=127.0.0.1:{port}",
        f"launch.rdzv_id=elastic-{port}",
        f"run.dir={run_dir}",
        log=tmp_path / "job.log",
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (step_dir(run_dir, 2) / MARKER).is_file():
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.05)
        victim = worker_pid(run_dir / "config.yaml", rank=1)
        os.kill(victim, signal.SIGKILL)
        code = job.wait(timeout=RUN_TIMEOUT_S)
    finally:
        _stop(job)
    log = (tmp_path / "job.log").read_text()
    assert code == 0, log[-4000:]
    assert "resuming from" in log, log[-4000:]
    assert max_abs_diff(weights(run_dir, 10, "ddp"), weights(ddp_run, 10, "ddp")) <= 1e-6
