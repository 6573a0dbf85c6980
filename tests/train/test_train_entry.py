"""Users who start torchrun themselves: `torchrun ... -m launcher.train <overrides>`."""

from __future__ import annotations

import subprocess
import sys

from helpers import TINY, ftl_env, metrics

from launcher.config.validate import load_run_config
from launcher.paths import ROOT
from launcher.train.entry import default_cuda_allocator, topology_from_env


def test_topology_from_env():
    assert topology_from_env({}) == []
    assert topology_from_env({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}) == ["launch.nproc_per_node=4"]
    assert topology_from_env({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}) == [
        "launch=torchrun",
        "launch.nnodes=2",
        "launch.nproc_per_node=8",
    ]


def test_user_torchrun_with_overrides_agrees_on_one_run_dir(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "launcher.train",
        *TINY,
        "strategy=ddp",
        "train.max_steps=3",
        "eval.after_training=false",
        f"run.dir={run}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ftl_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    cfg = load_run_config(run / "config.yaml")
    assert cfg.launch.nproc_per_node == 2 and cfg.strategy.engine == "ddp" and cfg.run.dir == str(run)


def test_entry_refuses_config_and_overrides_together(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.train", "--config", str(tmp_path / "c.yaml"), "recipe=tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_ranks_get_expandable_segments_unless_the_allocator_is_configured():
    env: dict[str, str] = {}
    default_cuda_allocator(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        mine = {name: "max_split_size_mb:512"}
        default_cuda_allocator(mine)
        assert mine == {name: "max_split_size_mb:512"}, "the user's setting stands"
