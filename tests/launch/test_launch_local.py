"""The local and torchrun backends: pure command building and the submitting machine's checks."""

from __future__ import annotations

from pathlib import Path

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
    cfg = cfg_of("strategy=fsdp", "launch=torchrun", "launch.nnodes=2", "launch.rdzv_endpoint=10.0.0.1:29400",
                 "launch.local_addr=10.0.0.1", "launch.socket_ifname=eth1")  # fmt: skip
    plan = TorchrunBackend().build(cfg, tmp_path, tmp_path / "config.yaml")
    argv = plan.commands[0]
    assert "--nnodes=2" in argv and "--rdzv_endpoint=10.0.0.1:29400" in argv and "--rdzv_conf=is_host=1" in argv
    assert plan.env["GLOO_SOCKET_IFNAME"] == "eth1" and plan.env["NCCL_SOCKET_IFNAME"] == "eth1"


def test_cpu_ranks_share_the_cores_and_ftl_eval_takes_the_same_count(tmp_path: Path, monkeypatch):
    """Each CPU rank gets cores // ranks threads (launch.env's own OMP_NUM_THREADS wins; none on
    CUDA); ftl eval in one process sets the count training's rank had, so it reproduces its numbers."""
    import os

    from launcher.launch.local import cpu_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert cpu_threads(cfg_of()) == 8
    assert cpu_threads(cfg_of("strategy=ddp", "launch.nproc_per_node=2")) == 4
    assert cpu_threads(cfg_of("+launch.env.OMP_NUM_THREADS=3")) == 3
    assert cpu_threads(cfg_of("train.device=cuda")) is None
    plan = LocalBackend().build(cfg_of("strategy=ddp", "launch.nproc_per_node=2"), tmp_path, tmp_path / "config.yaml")
    assert plan.env["OMP_NUM_THREADS"] == "4"
