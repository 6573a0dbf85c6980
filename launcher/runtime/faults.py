"""Faults on purpose, for the tests of the preflight and of bad-node exclusion: set only by tests,
through the environment every rank inherits. Unset, each is a no-op.

- ``FTL_TEST_SLOW_NODE=HOST:SECONDS``: the preflight's point-to-point sends from HOST wait SECONDS first
  (a slow link out of that node).
- ``FTL_TEST_FAIL_NODE=HOST``: the preflight's device check on HOST fails (a broken GPU).
- ``FTL_TEST_FAIL_AT=STEP[@HOST]``: the ranks on HOST (any node without @HOST) raise after training
  step STEP, on the job's first run only (SLURM_RESTART_COUNT unset or 0): a node that dies mid-run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Optional

from launcher.runtime.nodes import node_name


class InjectedFault(RuntimeError):
    pass


def send_delay_s(environ: Mapping[str, str] = os.environ) -> float:
    host, _, seconds = environ.get("FTL_TEST_SLOW_NODE", "").rpartition(":")
    return float(seconds) if host and host == node_name(environ) else 0.0


def check_device_fault(environ: Mapping[str, str] = os.environ) -> None:
    if environ.get("FTL_TEST_FAIL_NODE") and environ["FTL_TEST_FAIL_NODE"] == node_name(environ):
        raise InjectedFault(f"FTL_TEST_FAIL_NODE={environ['FTL_TEST_FAIL_NODE']}: this node's device check fails")


def step_fault(environ: Mapping[str, str] = os.environ) -> Optional[Callable[[Any], None]]:
    """A trainer step hook that raises after step STEP on the named node, or None."""
    spec = environ.get("FTL_TEST_FAIL_AT", "")
    if not spec or int(environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        return None
    step, _, host = spec.partition("@")
    if host and host != node_name(environ):
        return None

    def fail(trainer: Any) -> None:
        if trainer.step == int(step):
            raise InjectedFault(f"FTL_TEST_FAIL_AT={spec}: a rank on {node_name(environ)} fails after step {step}")

    return fail
