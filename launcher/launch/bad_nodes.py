"""``python -m launcher.launch.bad_nodes RUN_DIR ...``: after a SLURM job's training step failed,
name the node(s) to blame, and requeue the job without them.

The job script (slurm/job.sbatch.j2) runs this on its first node when srun ended non-zero and no
signal stopped the ranks. The evidence is what this run of the job left in the run dir (files
older than ``--since`` belong to an earlier run):

1. ``preflight.json``: the nodes the preflight found failing;
2. else, when the hang watchdog ended the ranks (exit 124), the nodes of the ranks whose main thread
   was in no collective when it fired (each exit record says, :func:`launcher.runtime.watchdog.in_collective`):
   the ranks that waited in one were waiting for them. When every rank or none was in one, that
   tells nothing, and the rules below decide;
3. else the ranks' exit records (``.ftl-exit/rank-N.json``, each with its node): ranks with no
   record died without one (a crash, the OOM killer, a watchdog's hard exit), and when they sit on
   some nodes but not all, those nodes are blamed (the preflight's table says which ranks each node
   holds); else the node of the first rank to fail: its peers fail after it, when its connections drop.

With nodes to blame and ``--max`` not yet spent (node requeues of this job, counted in
``excluded_nodes.txt``), the nodes are appended there and the job is requeued held, its
ExcNodeList extended, and released (SLURM 22.05 changes ExcNodeList only while a job is pending):
it starts again on other nodes and resumes from its last checkpoint. Exit 0 when requeued, 1 when
not (the reason printed). Values go to scontrol as argument lists, never through a shell.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launcher.rundir import RunPaths
from launcher.rundir.outcome import EXIT_HUNG, EXIT_INVALID, EXIT_OK, EXIT_STOPPED


@dataclass(frozen=True)
class Blame:
    nodes: list[str]
    reason: str


def read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def blame(run_dir: Path, since: float) -> Optional[Blame]:
    """The node(s) this run's failure is pinned on, from the run dir; None when it cannot be told."""
    paths = RunPaths(run_dir)
    preflight = read_json(paths.preflight)
    preflight = preflight if preflight and preflight.get("time", 0) >= since else None
    if preflight and preflight.get("failed"):
        return Blame(sorted(preflight["failed"]), "the preflight found it failing")
    records = [r for p in sorted(paths.exits.glob("rank-*.json")) if (r := read_json(p)) and r.get("time", 0) >= since]
    if not records:
        return None
    hung = hung_outside_collectives(records)
    if hung:
        ranks = ", ".join(str(r["rank"]) for r in hung)
        return Blame(
            sorted({r["node"] for r in hung}),
            f"the watchdog found rank(s) {ranks} there hung outside any collective, the others waiting in one",
        )
    world = max(int(r["world_size"]) for r in records)
    missing = set(range(world)) - {int(r["rank"]) for r in records}
    if missing and preflight:
        hosts = {n["host"]: set(n["ranks"]) for n in preflight["nodes"]}
        silent = sorted(h for h, ranks in hosts.items() if ranks & missing)
        if 0 < len(silent) < len(hosts):
            ranks = ", ".join(map(str, sorted(missing)))
            return Blame(silent, f"rank(s) {ranks} there ended without an exit record (killed or crashed)")
    failed = [r for r in records if int(r["code"]) not in (EXIT_OK, EXIT_INVALID, EXIT_STOPPED) and r.get("node")]
    if not failed:
        return None
    first = min(failed, key=lambda r: float(r["time"]))
    return Blame([first["node"]], f"rank {first['rank']} there failed first (exit code {first['code']})")


def hung_outside_collectives(records: list[dict]) -> list[dict]:
    """The records of ranks the watchdog ended while their main thread was in no collective, when
    others waited in one; [] when the records do not tell (no hang, or all or none in one)."""
    hung = [r for r in records if int(r["code"]) == EXIT_HUNG and isinstance(r.get("in_collective"), bool)]
    outside = sorted((r for r in hung if not r["in_collective"] and r.get("node")), key=lambda r: int(r["rank"]))
    return outside if outside and any(r["in_collective"] for r in hung) else []


def node_requeues(path: Path, job: str) -> int:
    """Requeues of ``job`` after a node failure, as excluded_nodes.txt records them (one run, one or more lines)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    return len({fields[2] for line in lines if len(fields := line.split("\t")) >= 4 and fields[1] == job})


def record(path: Path, found: Blame, job: str, restarts: int) -> None:
    with path.open("a") as f:
        for node in found.nodes:
            f.write(f"{node}\t{job}\t{restarts}\t{found.reason}\n")


def scontrol(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=False, timeout=60)


def excluded_now(job: str) -> list[str]:
    """The job's ExcNodeList (the user's --exclude included), as node names."""
    shown = scontrol("show", "job", "-o", job).stdout
    match = re.search(r"\bExcNodeList=(\S+)", shown)
    if not match or match.group(1) == "(null)":
        return []
    return scontrol("show", "hostnames", match.group(1)).stdout.split()


def requeue_without(job: str, nodes: list[str]) -> Optional[str]:
    """Requeue ``job`` held, add ``nodes`` to its ExcNodeList and release it; the error, or None.
    Requeueing sends this job's processes SIGTERM: this one ignores it (the batch shell traps it)."""
    exclude = sorted(set(excluded_now(job)) | set(nodes))
    for args in (
        ("requeuehold", job),
        ("update", f"JobId={job}", f"ExcNodeList={','.join(exclude)}"),
        ("release", job),
    ):
        done = scontrol(*args)
        if done.returncode != 0:
            if args[0] != "requeuehold":
                scontrol("release", job)  # never leave the job held
            return f"scontrol {' '.join(args)}: {(done.stderr or done.stdout).strip()}"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # scontrol requeuehold signals the whole job, this process too
    parser = argparse.ArgumentParser(prog="python -m launcher.launch.bad_nodes", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--job", required=True, help="the job (ARRAY_TASK for an array task)")
    parser.add_argument("--since", type=float, required=True, help="when this run of the job started (epoch s)")
    parser.add_argument("--restarts", type=int, required=True, help="SLURM_RESTART_COUNT")
    parser.add_argument("--max", type=int, required=True, help="launch.max_node_requeues")
    args = parser.parse_args(argv)
    found = blame(args.run_dir, args.since)
    if found is None:
        print("ftl: cannot tell which node failed: not requeueing", file=sys.stderr)
        return 1
    nodes = ", ".join(found.nodes)
    excluded = RunPaths(args.run_dir).excluded_nodes
    done = node_requeues(excluded, args.job)
    if done >= args.max:
        print(
            f"ftl: node(s) {nodes} failed ({found.reason}); not requeueing: launch.max_node_requeues={args.max} "
            f"spent (see {excluded})",
            file=sys.stderr,
        )
        return 1
    record(excluded, found, args.job, args.restarts)
    print(
        f"ftl: node(s) {nodes} failed ({found.reason}): requeueing job {args.job} without them "
        f"({done + 1} of {args.max}); recorded in {excluded}",
        file=sys.stderr,
        flush=True,
    )
    error = requeue_without(args.job, found.nodes)
    if error:
        print(f"ftl: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
