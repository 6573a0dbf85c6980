"""The preflight of a multi-node job: the verdict on each node (pure), and two torchrun agents as
two nodes on this machine, each with its own hostname (a UTS namespace; needs root), where one
node is made slow or failing by a test fault (launcher.runtime.faults) and the report names it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from helpers import TINY, ftl_env, metrics, need_gpus

from launcher.paths import ROOT
from launcher.runtime.faults import InjectedFault, check_device_fault, send_delay_s, step_fault
from launcher.runtime.nodes import NodeResult, assess, node_name, table


def nodes(*figures: tuple[float, float | None], errors: Optional[dict[int, str]] = None) -> list[NodeResult]:
    errors = errors or {}
    return [
        NodeResult(node=i, host=f"h{i}", ranks=[i], send_gbps=s, tflops=t, errors=[errors[i]] if i in errors else [])
        for i, (s, t) in enumerate(figures)
    ]


def test_a_node_below_the_median_by_the_factor_is_slow_and_an_error_fails_it():
    result = assess(nodes((10, 400), (9, 390), (2, 410), (10, 100), (11, 405), errors={4: "boom"}), slow_factor=2.0)
    assert [n.status for n in result] == ["ok", "ok", "slow", "slow", "failed"]
    assert result[2].why == "send GB/s 2 < median 10 / 2"
    assert result[3].why == "matmul TFLOPS 100 < median 400 / 2"
    assert result[4].why == "boom"
    text = table(result, {"bytes": 4 * 2**20, "ranks": 5, "seconds": 0.002, "bus_gbps": 3.36})
    assert "h2" in text and "slow send GB/s 2 < median 10 / 2" in text
    assert "all-reduce of 4 MiB over 5 ranks: 2 ms, bus bandwidth 3.36 GB/s" in text


def test_with_two_nodes_the_median_is_their_mean():
    """One of two nodes is slow only below 1/(2f - 1) of the other: at f=2, a third."""
    assert [n.status for n in assess(nodes((9, None), (3.1, None)), 2.0)] == ["ok", "ok"]
    assert [n.status for n in assess(nodes((9, None), (2.9, None)), 2.0)] == ["ok", "slow"]


def test_faults_apply_only_on_the_named_node():
    me = node_name({"SLURMD_NODENAME": "n7"})
    assert me == "n7"
    assert send_delay_s({"SLURMD_NODENAME": "n7", "FTL_TEST_SLOW_NODE": "n7:0.5"}) == 0.5
    assert send_delay_s({"SLURMD_NODENAME": "n1", "FTL_TEST_SLOW_NODE": "n7:0.5"}) == 0.0
    check_device_fault({"SLURMD_NODENAME": "n1", "FTL_TEST_FAIL_NODE": "n7"})
    with pytest.raises(InjectedFault):
        check_device_fault({"SLURMD_NODENAME": "n7", "FTL_TEST_FAIL_NODE": "n7"})
    assert step_fault({"SLURMD_NODENAME": "n1", "FTL_TEST_FAIL_AT": "3@n7"}) is None
    assert step_fault({"FTL_TEST_FAIL_AT": "3", "SLURM_RESTART_COUNT": "1"}) is None, "first run only"
    hook = step_fault({"FTL_TEST_FAIL_AT": "3"})
    assert hook is not None
    hook(type("T", (), {"step": 2})())
    with pytest.raises(InjectedFault):
        hook(type("T", (), {"step": 3})())


@pytest.fixture
def two_hostnames():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to give two torchrun agents their own hostnames")
    tag = os.getpid() % 100000
    return f"pfa{tag}", f"pfb{tag}"


def run_two_nodes(hosts: tuple[str, str], run: Path, steps: int, **fault: str) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents (static rendezvous on 127.0.0.1), one rank each, each agent in its own
    UTS namespace with its own hostname."""
    port = 29800 + os.getpid() % 150
    env = ftl_env(**fault)
    env.pop("SLURMD_NODENAME", None)
    procs = []
    for node, host in enumerate(hosts):
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node_rank={node}",
            "--nproc_per_node=1",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "launcher.train",
            *TINY,
            "strategy=ddp",
            f"train.max_steps={steps}",
            "eval.after_training=false",
            f"run.dir={run}",
        ]
        argv = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *torchrun]
        procs.append(
            subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_a_slow_node_is_named_and_the_run_goes_on(two_hostnames, tmp_path):
    a, b = two_hostnames
    run = tmp_path / "run"
    first, second = run_two_nodes(two_hostnames, run, steps=2, FTL_TEST_SLOW_NODE=f"{b}:0.5")
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:] + second.stderr[-3000:]
    report = json.loads((run / "preflight.json").read_text())
    assert report["slow"] == [b] and report["failed"] == []
    by_host = {n["host"]: n for n in report["nodes"]}
    assert by_host[b]["status"] == "slow" and by_host[a]["status"] == "ok"
    assert by_host[b]["send_gbps"] * 5 < by_host[a]["send_gbps"], (
        report
    )  # 4 MiB: 0.5 s against a few ms (tens on a loaded machine)
    console = first.stdout + first.stderr
    assert "ftl: preflight of 2 nodes (2 ranks):" in console
    assert next(line for line in console.splitlines() if line.startswith(f"1     {b}")).endswith(
        f"slow send GB/s {by_host[b]['send_gbps']:.3g} < median {(by_host[a]['send_gbps'] + by_host[b]['send_gbps']) / 2:.3g} / 2"
    )
    assert f"slow node(s) {b}" in console
    assert [m["step"] for m in metrics(run)] == [1, 2]


def test_a_failing_node_stops_the_job_before_training_and_is_named(two_hostnames, tmp_path):
    a, b = two_hostnames
    run = tmp_path / "run"
    procs = run_two_nodes(two_hostnames, run, steps=2, FTL_TEST_FAIL_NODE=b)
    assert all(p.returncode != 0 for p in procs), [p.stderr[-2000:] for p in procs]
    report = json.loads((run / "preflight.json").read_text())
    assert report["failed"] == [b]
    assert (
        f"ftl: the preflight found failing node(s) {b}: {b}: device check on rank 1: InjectedFault" in procs[0].stderr
    )
    assert not (run / "metrics.jsonl").exists(), "no step trained"
    exits = {json.loads(p.read_text())["rank"]: json.loads(p.read_text()) for p in (run / ".ftl-exit").glob("*.json")}
    assert {r: (e["code"], e["node"]) for r, e in exits.items()} == {0: (1, a), 1: (1, b)}


@pytest.mark.gpu
def test_the_device_check_times_a_gpu_matmul_and_checks_its_result():
    import torch

    from launcher.runtime.preflight import device_check

    need_gpus(1)
    tflops = device_check(torch.device("cuda", 0))
    assert tflops is not None and tflops > 1.0, tflops  # any datacenter GPU of this decade: tens to hundreds
    assert device_check(torch.device("cpu")) is None


def test_the_preflight_is_off_when_asked_and_on_one_node(tmp_path):
    import torch

    from launcher.config.schema import TorchrunLaunch
    from launcher.runtime.distributed import DistInfo
    from launcher.runtime.preflight import run_preflight

    two_nodes = DistInfo(rank=0, local_rank=0, world_size=2, local_world_size=1)
    one_node = DistInfo(rank=0, local_rank=0, world_size=2, local_world_size=2)
    cpu = torch.device("cpu")
    # No process group exists here: a preflight that ran would fail at its first collective.
    assert run_preflight(TorchrunLaunch(preflight=False), two_nodes, cpu, tmp_path, 60) is None
    assert run_preflight(TorchrunLaunch(), one_node, cpu, tmp_path, 60) is None
    with pytest.raises(ValueError, match="Default process group has not been initialized"):
        run_preflight(TorchrunLaunch(), two_nodes, cpu, tmp_path, 60)


def test_a_slow_factor_of_one_or_less_is_refused_naming_the_field():
    from launcher.config.compose import compose
    from launcher.config.validate import validate

    raw, _, errors = compose(["recipe=tiny", "launch.preflight_slow_factor=1"])
    _, more = validate(raw)
    assert [e.path for e in errors + more] == ["launch.preflight_slow_factor"]
