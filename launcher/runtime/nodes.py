"""Nodes by name, and the preflight's verdict on them: pure Python (no torch), so the job-side code
that excludes a failed node (:mod:`launcher.launch.bad_nodes`) reads the same names and records.

A node is named as SLURM names it (``SLURMD_NODENAME``, which ``scontrol update ExcNodeList=``
takes) and otherwise by its hostname.
"""

from __future__ import annotations

import os
import socket
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


def node_name(environ: Mapping[str, str] = os.environ) -> str:
    return environ.get("SLURMD_NODENAME") or socket.gethostname()


@dataclass
class NodeResult:
    """One node's preflight figures: ``send_gbps`` its best point-to-point send bandwidth to another
    node (GB/s), ``tflops`` its slowest GPU's matmul (None on CPU), ``errors`` what failed there."""

    node: int
    host: str
    ranks: list[int]
    send_gbps: Optional[float] = None
    tflops: Optional[float] = None
    errors: list[str] = field(default_factory=list)
    status: str = "ok"  # ok, slow or failed
    why: str = ""


FIGURES = (("send_gbps", "send GB/s"), ("tflops", "matmul TFLOPS"))


def assess(nodes: Sequence[NodeResult], slow_factor: float) -> list[NodeResult]:
    """Mark each node failed (an error on it), slow (a figure below the median of all nodes divided
    by ``slow_factor``) or ok, saying why with the figure and the median. Higher figures are better.
    With two nodes the median is their mean: one is named slow only below 1/(2 × factor - 1) of the other."""
    medians = {
        key: statistics.median(values)
        for key, _ in FIGURES
        if (values := [v for n in nodes if (v := getattr(n, key)) is not None])
    }
    for n in nodes:
        if n.errors:
            n.status, n.why = "failed", "; ".join(n.errors)
            continue
        slow = [
            f"{label} {value:.3g} < median {medians[key]:.3g} / {slow_factor:g}"
            for key, label in FIGURES
            if (value := getattr(n, key)) is not None and value * slow_factor < medians[key]
        ]
        n.status, n.why = ("slow", "; ".join(slow)) if slow else ("ok", "")
    return list(nodes)


def hosts_with(nodes: Sequence[NodeResult], status: str) -> list[str]:
    return sorted({n.host for n in nodes if n.status == status})


def table(nodes: Sequence[NodeResult], all_reduce: Mapping[str, Any]) -> str:
    """The short report rank 0 prints: one line per node, then the all-reduce over every rank."""

    def fig(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3g}"

    rows = [("node", "host", *(label for _, label in FIGURES), "status")]
    rows += [
        (str(n.node), n.host, *(fig(getattr(n, key)) for key, _ in FIGURES), f"{n.status} {n.why}".strip())
        for n in nodes
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines.append(
        f"all-reduce of {all_reduce['bytes'] / 2**20:g} MiB over {all_reduce['ranks']} ranks: "
        f"{all_reduce['seconds'] * 1e3:.3g} ms, bus bandwidth {all_reduce['bus_gbps']:.3g} GB/s"
    )
    return "\n".join(lines)


def report(nodes: Sequence[NodeResult], all_reduce: Mapping[str, Any], slow_factor: float, when: float) -> dict:
    """What ``preflight.json`` holds."""
    return {
        "time": when,
        "slow_factor": slow_factor,
        "failed": hosts_with(nodes, "failed"),
        "slow": hosts_with(nodes, "slow"),
        "nodes": [asdict(n) for n in nodes],
        "all_reduce": dict(all_reduce),
    }
