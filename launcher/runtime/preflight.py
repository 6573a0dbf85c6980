"""The preflight: a few seconds of checks on every node of a multi-node job, after the process group
is up and before the model loads, so that a broken or slow node is named before it costs a run.

Every rank checks its device (a memory write and read-back; on a GPU also a matmul against the
identity, timed). All ranks time an all-reduce and check its sums. One rank per node (the node's
local rank 0) sends a buffer to its neighbouring nodes in turn (both neighbours in a ring of
nodes, one at a time, each transfer acknowledged) and checks what arrives: a node's figure is its
best send bandwidth, so a slow link out of one node names that node, not its neighbours (with two
nodes, a link slow both ways slows both alike and names neither: the table still shows it).

Rank 0 prints one short table and writes ``preflight.json`` into the run dir
(:func:`launcher.runtime.nodes.report`); a node with an error makes every rank raise
:class:`PreflightError` naming it, so the job exits 1 and, under SLURM, leaves that node
(:mod:`launcher.launch.bad_nodes`). A slow node is named and the run goes on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as torch_dist

from launcher.config.schema import LaunchBase
from launcher.files import write_atomic
from launcher.rundir import RunPaths
from launcher.runtime import faults
from launcher.runtime.distributed import DistInfo, collective_timeout
from launcher.runtime.nodes import NodeResult, assess, hosts_with, node_name, report, table

ITERS = 3  # timed repetitions after one warm-up; the best (for bandwidth) counts
MATMUL_N = 4096
MIB = 2**20


class PreflightError(RuntimeError):
    pass


def transfer_bytes(device: torch.device) -> int:
    return (64 if device.type == "cuda" else 4) * MIB


def run_preflight(
    launch: LaunchBase, dist: DistInfo, device: torch.device, run_dir: Path, restore_timeout_s: float
) -> Optional[dict[str, Any]]:
    """The checks on a job of two or more nodes with launch.preflight, under the step timeout; then
    the collective timeout goes back to ``restore_timeout_s``. The report, on every rank; None when skipped."""
    nodes = dist.world_size // dist.local_world_size
    if not launch.preflight or nodes < 2:
        return None
    with collective_timeout(launch.dist_timeout_s, restore=restore_timeout_s):
        return _preflight(launch, dist, device, run_dir, nodes)


def _preflight(launch: LaunchBase, dist: DistInfo, device: torch.device, run_dir: Path, nodes: int) -> dict[str, Any]:
    node = dist.rank // dist.local_world_size  # torchrun numbers each node's ranks contiguously
    errors: list[str] = []
    tflops = None
    try:
        tflops = device_check(device)
    except Exception as e:  # any failure of the device is this node's, and named
        errors.append(f"device check on rank {dist.rank}: {type(e).__name__}: {e}")
    all_reduce = time_all_reduce(device, dist.world_size, errors)
    mine = {"rank": dist.rank, "node": node, "host": node_name(), "errors": errors, "tflops": tflops}
    leaders: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(leaders, dist.rank if dist.local_rank == 0 else None)
    mine["send_gbps"] = send_bandwidth(sorted(r for r in leaders if r is not None), dist.rank, device, errors)
    everyone: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(everyone, mine)
    results = assess(node_results(everyone), launch.preflight_slow_factor)
    out = report(results, all_reduce, launch.preflight_slow_factor, time.time())
    if dist.is_main:
        write_atomic(RunPaths(run_dir).preflight, json.dumps(out, indent=1) + "\n")
        print(f"ftl: preflight of {nodes} nodes ({dist.world_size} ranks):\n{table(results, all_reduce)}", flush=True)
    failed = [n for n in results if n.status == "failed"]
    if failed:
        raise PreflightError(
            f"the preflight found failing node(s) {', '.join(hosts_with(results, 'failed'))}: "
            + "; ".join(f"{n.host}: {n.why}" for n in failed)
        )
    if dist.is_main and out["slow"]:
        print(f"ftl: warning: slow node(s) {', '.join(out['slow'])}; details in {RunPaths(run_dir).preflight}")
    return out


def node_results(per_rank: list[dict[str, Any]]) -> list[NodeResult]:
    """One result per node from every rank's: its errors, its slowest GPU, its leader's send bandwidth."""
    nodes: dict[int, NodeResult] = {}
    for r in sorted(per_rank, key=lambda r: r["rank"]):
        n = nodes.setdefault(r["node"], NodeResult(node=r["node"], host=r["host"], ranks=[]))
        n.ranks.append(r["rank"])
        n.errors += r["errors"]
        if r["tflops"] is not None:
            n.tflops = r["tflops"] if n.tflops is None else min(n.tflops, r["tflops"])
        if r["send_gbps"] is not None:
            n.send_gbps = r["send_gbps"]
    return [nodes[k] for k in sorted(nodes)]


def device_check(device: torch.device) -> Optional[float]:
    """Write a buffer and read it back; on a GPU also a matmul with the identity, exact in bf16.
    The GPU's matmul TFLOPS; None on a CPU."""
    faults.check_device_fault()
    values = torch.arange(16 * MIB // 4, dtype=torch.int32, device=device)
    n = values.numel()
    if int(values.sum(dtype=torch.int64)) != n * (n - 1) // 2:
        raise RuntimeError("memory read back differs from what was written")
    if device.type != "cuda":
        return None
    a = torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=torch.bfloat16)
    eye = torch.eye(MATMUL_N, device=device, dtype=torch.bfloat16)
    if not torch.equal(a @ eye, a):
        raise RuntimeError("a matmul with the identity changed the matrix")
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize(device)
    return 10 * 2 * MATMUL_N**3 / (time.perf_counter() - start) / 1e12


def time_all_reduce(device: torch.device, world: int, errors: list[str]) -> dict[str, Any]:
    nbytes = transfer_bytes(device)
    t = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    torch_dist.all_reduce(t)
    torch_dist.barrier()
    times = []
    for _ in range(ITERS):
        t.fill_(1.0)
        start = time.perf_counter()
        torch_dist.all_reduce(t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if not bool((t == world).all()):
        errors.append(f"all-reduce of ones over {world} ranks did not sum to {world}")
    seconds = min(times)
    return {
        "bytes": nbytes,
        "ranks": world,
        "seconds": seconds,
        "bus_gbps": 2 * (world - 1) / world * nbytes / seconds / 1e9,
    }


def send_bandwidth(leaders: list[int], me: int, device: torch.device, errors: list[str]) -> Optional[float]:
    """Each node's first rank sends to its neighbours in a ring of nodes, one transfer at a time in
    the same order on every rank (so none waits on a peer busy elsewhere). This rank's best send
    GB/s; None for a rank that is not its node's first."""
    n = len(leaders)
    pairs = [(i, (i + shift) % n) for shift in sorted({1, n - 1}) for i in range(n)]
    nbytes = transfer_bytes(device)
    buf = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    ack = torch.zeros(1, dtype=torch.float32, device=device)
    delay = faults.send_delay_s()
    best = None
    for src, dst in pairs:
        if leaders[src] == me:
            buf.fill_(src + 1)
            times = []
            for _ in range(1 + ITERS):
                start = time.perf_counter()
                time.sleep(delay)
                torch_dist.send(buf, leaders[dst])
                torch_dist.recv(ack, leaders[dst])
                ack.item()  # on a GPU: waits for the transfer
                times.append(time.perf_counter() - start)
            gbps = nbytes / min(times[1:]) / 1e9
            best = gbps if best is None else max(best, gbps)
        elif leaders[dst] == me:
            intact = True
            for _ in range(1 + ITERS):
                torch_dist.recv(buf, leaders[src])
                intact = intact and bool((buf == src + 1).all())
                torch_dist.send(ack, leaders[src])
            if not intact:
                errors.append(f"data from rank {leaders[src]} arrived changed")
    return best
