"""The local two-node SLURM cluster for tests (started by `slurm/local-cluster.sh start`).

`local_cluster()` returns a handle with the environment client commands need, or skips the test
visibly with the reason, or fails it when FTL_REQUIRE_SLURM=1 (as .ci/run sets): CI must not pass
by skipping its SLURM tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOT = Path(os.environ.get("FTL_SLURM_ROOT") or "/tmp/ftl-slurm")
START = "slurm/local-cluster.sh start"
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    restarts: int
    fields: dict[str, str]


@dataclass(frozen=True)
class LocalCluster:
    env: dict[str, str]  # os.environ + SLURM_CONF

    def run(
        self, *argv: str, cwd: Optional[Path] = None, timeout: float = 60, check: bool = True, **kw: object
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(argv), env=self.env, cwd=cwd, check=False, capture_output=True, text=True, timeout=timeout, **kw
        )  # type: ignore[call-overload]
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def job(self, job_id: str) -> Job:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout.strip()
        # Values hold spaces (names, paths), so split on the known `Key=` starts instead of blanks.
        keys = list(re.finditer(r"(?:^|\s)([A-Za-z/:]+)=", out))
        fields = {
            m.group(1): out[m.end() : keys[i + 1].start() if i + 1 < len(keys) else len(out)].rstrip()
            for i, m in enumerate(keys)
        }
        return Job(job_id, fields.get("JobState", "?"), int(fields.get("Restarts", "0") or 0), fields)

    def wait(self, job_id: str, timeout: float) -> Job:
        """Poll (every 0.5 s; `sbatch --wait` backs off to tens of seconds) until the job ends."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.state in FINAL_STATES:
                return job
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise AssertionError(f"job {job_id} still {job.state} after {timeout:.0f}s (cancelled)")
            time.sleep(0.5)


def _unavailable() -> tuple[Optional[str], dict[str, str]]:
    env_file = ROOT / "env"
    if not env_file.is_file():
        return f"no local SLURM cluster ({env_file} missing); start one with `{START}`", {}
    match = re.search(r"SLURM_CONF=(\S+)", env_file.read_text())
    if not match:
        return f"{env_file} names no SLURM_CONF", {}
    env = {**os.environ, "SLURM_CONF": match.group(1)}
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], env=env, check=False, capture_output=True, text=True, timeout=20
        )
    except FileNotFoundError:
        return f"sinfo not found; `{START}` installs SLURM", {}
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld does not answer", {}
    if proc.returncode != 0:
        return f"the local SLURM cluster does not answer ({proc.stderr.strip()}); `{START}`", {}
    up = [line.split()[0] for line in proc.stdout.splitlines() if re.search(r"\s(idle|mix|alloc)", line)]
    if len(up) < 2:
        return f"the local SLURM cluster has {len(up)} usable node(s), tests need 2:\n{proc.stdout}", {}
    return None, env


def local_cluster() -> LocalCluster:
    reason, env = _unavailable()
    if reason:
        if os.environ.get("FTL_REQUIRE_SLURM") == "1":
            pytest.fail(f"FTL_REQUIRE_SLURM=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return LocalCluster(env)
