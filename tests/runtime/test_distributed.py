"""The distributed environment: parsing torchrun's variables, device and precision choice, and a
real 2-rank gloo group on CPU started by torchrun."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.config.schema import LocalLaunch, TrainConfig
from launcher.paths import ROOT
from launcher.runtime import distributed
from launcher.runtime.device import autocast_dtype, cpu_has_native_bf16, select_device
from launcher.runtime.distributed import DistInfo, init_distributed, read_dist_env

CPU = torch.device("cpu")


def test_single_process_by_default() -> None:
    info = read_dist_env({})
    assert info == DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1) and info.is_main
    assert init_distributed(LocalLaunch(), CPU, {}) == info
    assert not torch.distributed.is_initialized()


def test_torchrun_variables() -> None:
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    info = read_dist_env(env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size, info.is_main) == (3, 1, 4, 2, False)
    with pytest.raises(ValueError, match="inconsistent"):
        read_dist_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="RANK='x'"):
        read_dist_env({"RANK": "x"})


def test_process_group_gets_backend_and_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(distributed.torch_dist, "init_process_group", lambda **kw: seen.update(kw))
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    info = init_distributed(LocalLaunch(dist_timeout_s=42), CPU, env)
    assert info.rank == 1 and info.world_size == 2
    assert seen["backend"] == "gloo" and seen["timeout"] == timedelta(seconds=42)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        init_distributed(LocalLaunch(), CPU, {"RANK": "0", "WORLD_SIZE": "2"})


def test_device_and_autocast_on_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectations")
    assert select_device(TrainConfig(device="auto")) == CPU
    assert select_device(TrainConfig(device="cpu")) == CPU
    with pytest.raises(RuntimeError, match="no CUDA"):
        select_device(TrainConfig(device="cuda"))
    assert autocast_dtype("auto", CPU) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(RuntimeError, match="fp16 needs a CUDA"):
        autocast_dtype("fp16", CPU)


def test_native_bf16_is_read_from_the_cpus_flags_not_onednns_emulation() -> None:
    """An AVX512 CPU without AVX512-BF16 emulates bf16 (oneDNN still says it supports it): auto
    must stay fp32 there."""
    ice_lake = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni avx512vl\n"
    assert not cpu_has_native_bf16(ice_lake)
    assert cpu_has_native_bf16(ice_lake.replace("avx512vl", "avx512vl avx512_bf16"))  # Zen 4, Cooper Lake
    assert cpu_has_native_bf16(ice_lake.replace("avx512vl", "amx_tile amx_bf16"))  # Sapphire Rapids
    assert cpu_has_native_bf16("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")  # Graviton 3
    assert not cpu_has_native_bf16("processor\t: 0\nFeatures\t: fp asimd\n")
    assert not cpu_has_native_bf16("")


WORKER = """
import sys
from pathlib import Path
import torch.distributed as dist
from launcher.config.schema import LocalLaunch
from launcher.runtime import distributed
import torch
info = distributed.init_distributed(LocalLaunch(dist_timeout_s=30), torch.device("cpu"))
assert dist.is_initialized() and dist.get_backend() == "gloo" and info.world_size == 2
assert distributed.any_rank(info.rank == 1) and not distributed.any_rank(False)
assert distributed.reduce_mean(float(info.rank)) == 0.5 and distributed.reduce_sum(1.0) == 2.0
assert distributed.all_reduce_sum(torch.ones(2, dtype=torch.float64)).tolist() == [2.0, 2.0]
distributed.barrier()
distributed.destroy()
(Path(sys.argv[1]) / f"rank{info.rank}.ok").write_text("ok")  # a file each: printed lines of two ranks interleave
"""


def test_two_rank_gloo_group(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path),
    ]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["rank0.ok", "rank1.ok"]


HUNG_TEARDOWN = """
import time
import torch.distributed as dist
from launcher.runtime import distributed
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
distributed.destroy(clean=False)  # after a failure: the group is left alone
assert dist.is_initialized()
distributed.TEARDOWN_LIMIT_S = 2
dist.destroy_process_group = lambda: time.sleep(60)  # a teardown that hangs
distributed.destroy()
print("returned")
"""


def test_a_hung_teardown_prints_stacks_and_exits() -> None:
    """destroy(): destroy_process_group under a watchdog that dumps every thread's
    stack and exits 1 instead of hanging the job (and the test suite)."""
    done = subprocess.run(
        [sys.executable, "-c", HUNG_TEARDOWN],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 1 and "returned" not in done.stdout, done.stdout + done.stderr[-3000:]
    assert "Timeout" in done.stderr and "in destroy" in done.stderr, done.stderr[-3000:]


PHASES = """
import sys, time
from pathlib import Path
import torch
import torch.distributed as dist
from launcher.config.schema import LocalLaunch
from launcher.runtime import distributed
out = Path(sys.argv[1])
# Set up under the long I/O-phase timeout: rank 1 "loads the model" for 4 s, longer than a step's 2 s.
info = distributed.init_distributed(LocalLaunch(dist_timeout_s=2), torch.device("cpu"), timeout_s=60)
if info.rank == 1:
    time.sleep(4)
dist.all_reduce(torch.ones(1))
distributed.set_collective_timeout(2)  # steps: 2 s
with distributed.collective_timeout(60, restore=2):  # a checkpoint: 4 s of writing on rank 1 is fine
    if info.rank == 1:
        time.sleep(4)
    dist.all_reduce(torch.ones(1))
(out / f"phases-ok{info.rank}").write_text("ok")
if info.rank == 1:  # a hung step: rank 0 must fail within the step timeout, not the I/O one
    time.sleep(10)
    sys.exit(0)
start = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except RuntimeError:
    (out / "step-timeout").write_text(f"{time.monotonic() - start:.1f}")
"""


def test_steps_and_io_phases_have_their_own_collective_timeouts(tmp_path: Path) -> None:
    """Real gloo ranks: a slow load and a slow checkpoint pass under the I/O timeout; once lowered,
    a rank that hangs in a step fails its peer's collective after the step timeout (2 s)."""
    script = tmp_path / "phases.py"
    script.write_text(PHASES)
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path),
    ]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert sorted(p.name for p in tmp_path.glob("phases-ok*")) == ["phases-ok0", "phases-ok1"]
    waited = float((tmp_path / "step-timeout").read_text())
    assert 1.5 <= waited < 8, f"rank 0 gave up after {waited} s"
