"""The local and torchrun backends: pure command building and the submitting machine's checks."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config.compose import compose
from launcher.config.validate import validated
from launcher.launch.local import LocalBackend, TorchrunBackend, gpu_errors, visible_gpus


def cfg_of(*overrides: str):
    raw, _, errors = compose(["recipe=tiny", *overrides])
    assert errors == []
    return validated(raw)


def test_visible_gpus_from_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == 3
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == 0


def test_more_processes_than_gpus_is_refused():
    cfg = cfg_of("strategy=ddp", "launch.nproc_per_node=8", "train.device=cuda")
    (err,) = gpu_errors(cfg, gpus=4)
    assert err.path == "launch.nproc_per_node" and "only 4 GPU" in err.message
    assert gpu_errors(cfg, gpus=8) == []
    (err,) = gpu_errors(cfg, gpus=0)
    assert err.path == "train.device"
    assert gpu_errors(cfg_of("strategy=ddp", "launch.nproc_per_node=8", "train.device=cpu"), gpus=1) == []


def test_local_and_torchrun_commands(tmp_path: Path):
    plan = LocalBackend().build(cfg_of(), tmp_path, tmp_path / "config.yaml")
    assert plan.commands[0][1:] == ["-m", "launcher.train", "--config", str(tmp_path / "config.yaml")]
    cfg = cfg_of(
        "strategy=fsdp",
        "launch=torchrun",
        "launch.nnodes=2",
        "launch.rdzv_endpoint=10.0.0.1:29400",
        "launch.local_addr=10.0.0.1",
        "launch.socket_ifname=eth1",
    )
    plan = TorchrunBackend().build(cfg, tmp_path, tmp_path / "config.yaml")
    argv = plan.commands[0]
    assert "--nnodes=2" in argv and "--rdzv_endpoint=10.0.0.1:29400" in argv and "--rdzv_conf=is_host=1" in argv
    assert plan.env["GLOO_SOCKET_IFNAME"] == "eth1" and plan.env["NCCL_SOCKET_IFNAME"] == "eth1"


def test_cpu_ranks_share_the_cores_and_ftl_eval_takes_the_same_count(tmp_path: Path, monkeypatch):
    """Each CPU rank gets cores // ranks threads (launch.env's own OMP_NUM_THREADS wins; none on
    CUDA); ftl eval in one process sets the count training's rank had, so it reproduces its numbers."""
    from launcher.launch.local import cpu_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert cpu_threads(cfg_of()) == 8
    assert cpu_threads(cfg_of("strategy=ddp", "launch.nproc_per_node=2")) == 4
    assert cpu_threads(cfg_of("+launch.env.OMP_NUM_THREADS=3")) == 3
    assert cpu_threads(cfg_of("train.device=cuda")) is None
    plan = LocalBackend().build(cfg_of("strategy=ddp", "launch.nproc_per_node=2"), tmp_path, tmp_path / "config.yaml")
    assert plan.env["OMP_NUM_THREADS"] == "4"


def test_cpu_training_tunes_malloc_unless_it_is_tuned_already_or_a_gpu_trains(tmp_path: Path, monkeypatch):
    from launcher.launch.local import CPU_MALLOC_ENV, MALLOC_KEYS, cpu_malloc_env

    assert cpu_malloc_env(cfg_of(), 0, {}) == CPU_MALLOC_ENV
    assert cpu_malloc_env(cfg_of("train.device=cpu"), 1, {}) == CPU_MALLOC_ENV
    assert cpu_malloc_env(cfg_of("train.device=auto"), 1, {}) == {}  # a GPU will train
    assert cpu_malloc_env(cfg_of("train.device=cuda"), 0, {}) == {}
    for key in MALLOC_KEYS:
        assert cpu_malloc_env(cfg_of(), 0, {key: "x"}) == {}, key  # the user's own setting stays alone
        assert cpu_malloc_env(cfg_of(f"+launch.env.{key}=1"), 0, {}) == {}, key
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for key in MALLOC_KEYS:
        monkeypatch.delenv(key, raising=False)
    plan = LocalBackend().build(cfg_of("strategy=ddp", "launch.nproc_per_node=2"), tmp_path, tmp_path / "config.yaml")
    assert {k: plan.env[k] for k in CPU_MALLOC_ENV} == CPU_MALLOC_ENV
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")  # glibc's default, set by hand: ftl's setting stays out
    plan = LocalBackend().build(cfg_of(), tmp_path, tmp_path / "config.yaml")
    assert not any(k in plan.env for k in CPU_MALLOC_ENV)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="CPU_MALLOC_ENV tunes glibc's malloc")
def test_with_cpu_malloc_env_a_large_tensor_lives_in_the_heap_that_keeps_freed_memory():
    """The mechanism (its effect on a step is bench/cpu_allocator.py's): with glibc's defaults a
    64 MiB tensor is a mapping of its own, unmapped when freed, so the next one faults in fresh
    pages; with ftl's setting it is carved from the heap ([heap] in /proc/self/maps), which keeps
    what is freed for the next block."""
    from launcher.launch.local import CPU_MALLOC_ENV, MALLOC_KEYS

    code = (
        "import torch\n"
        "t = torch.empty(16 * 2**20, dtype=torch.float32); t.fill_(1.0); address = t.data_ptr()\n"
        "for line in open('/proc/self/maps'):\n"
        "    span, name = line.split()[0], line.split()[5:]\n"
        "    lo, hi = (int(x, 16) for x in span.split('-'))\n"
        "    if lo <= address < hi: print('REGION', name[0] if name else 'anonymous')\n"
    )
    base = {k: v for k, v in os.environ.items() if k not in MALLOC_KEYS}
    region = {}
    for name, extra in (("default", {}), ("ftl", CPU_MALLOC_ENV)):
        out = subprocess.run(
            [sys.executable, "-c", code], env={**base, **extra}, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        region[name] = out.stdout.split("REGION ")[-1].strip()
    assert region == {"default": "anonymous", "ftl": "[heap]"}, region
