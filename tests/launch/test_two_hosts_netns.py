"""Two hosts with their own addresses: two network namespaces joined by a veth pair, one torchrun
agent in each, rendezvous on node 0's address. What crosses between them crosses a real (virtual)
network link, with gloo bound to the veth interface (launch.socket_ifname) and each node's own
address (launch.local_addr). Needs root and iproute2; skips visibly otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers import TINY, ftl_env, metrics

from launcher.paths import ROOT

STEPS = 4


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 (ip netns) to create two hosts")
    tag = f"{os.getpid() % 100000}"
    hosts = [(f"ftl{tag}a", f"ftlv{tag}a", "10.231.7.1"), (f"ftl{tag}b", f"ftlv{tag}b", "10.231.7.2")]
    try:
        for ns, _, _ in hosts:
            sh("ip", "netns", "add", ns)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create network namespaces here: {e.stderr.strip()}")
    try:
        sh("ip", "link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for ns, dev, addr in hosts:
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for ns, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_two_hosts_in_network_namespaces(two_hosts, strategy, tmp_path):
    run = tmp_path / "run"
    (ns0, dev0, addr0), (ns1, dev1, addr1) = two_hosts
    port = 29700 + os.getpid() % 200
    common = [
        *TINY,
        f"strategy={strategy}",
        f"train.max_steps={STEPS}",
        "eval.after_training=false",
        "launch=torchrun",
        "launch.nnodes=2",
        "launch.nproc_per_node=1",
        f"launch.rdzv_endpoint={addr0}:{port}",
        f"launch.rdzv_id=netns-{port}",
        f"run.dir={run}",
    ]
    procs = []
    for rank, (ns, dev, addr) in enumerate(two_hosts):
        cmd = [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-m",
            "launcher",
            "train",
            *common,
            f"launch.node_rank={rank}",
            f"launch.local_addr={addr}",
            f"launch.socket_ifname={dev}",
        ]
        log = open(tmp_path / f"node{rank}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ftl_env(), stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((tmp_path / f"node{r}.log").read_text(errors="replace")[-2500:] for r in (0, 1))
    assert codes == [0, 0], logs
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert f"--local_addr={addr1}" in (tmp_path / "node1.log").read_text(errors="replace")
