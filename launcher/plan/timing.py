"""How long a run's slow phases take, from the config alone: pure arithmetic, no torch.

Two things depend on it. The collective timeout while a model loads, a checkpoint converts or
saves (``launch.io_timeout_s``): much longer than a step's (``launch.dist_timeout_s``), or rank 0
reading a 70B model trips the other ranks' watchdog; yet a hung step must still be caught quickly.
And, under SLURM, the warning before the time limit (``launch.signal``): the ranks finish the step
in flight and write a checkpoint before the job is killed, so the lead must cover both.

Both are estimates over a stated bandwidth, ``launch.io_gb_per_s`` (default 1 GB/s: an NFS
server or a busy parallel filesystem; Lustre and GPFS often sustain 10+ GB/s per job), and a
step at :data:`ASSUMED_GPU_FLOPS`.
"""

from __future__ import annotations

import math
import re

from launcher.config.schema import FtlConfig
from launcher.config.topology import planned_device_type, resolve_precision, world_size
from launcher.plan.memory import checkpoint_bytes, param_counts
from launcher.plan.report import layout_for, workload_of

MIN_IO_TIMEOUT_S = 1800
MIN_SIGNAL_LEAD_S = 120
SIGNAL_MARGIN = 1.25  # the bandwidth is a user's estimate; the job's own time limit is not
# A step's FLOPs at this rate per GPU: a conservative 10-30% of an H100's dense bf16 peak
# (989 TFLOP/s) and 30% of an A100's (312 TFLOP/s).
ASSUMED_GPU_FLOPS = 100e12
DEFAULT_SIGNAL = "USR1"
_SIGNAL = re.compile(r"^(?:B:)?(?:SIG)?(?P<name>[A-Z0-9]+)@(?P<seconds>\d+)$")


def checkpoint_gb(cfg: FtlConfig) -> float:
    """GB (1e9 bytes) one checkpoint of this job writes."""
    precision = resolve_precision(cfg.train.precision, planned_device_type(cfg))
    return checkpoint_bytes(workload_of(cfg, precision), layout_for(cfg)) / 1e9


def io_timeout_s(cfg: FtlConfig) -> int:
    """``launch.io_timeout_s``, or twice the slowest I/O phase: a resume on another world size
    reads the checkpoint and writes it again in DeepSpeed's universal format (2 × its bytes), which
    also covers reading the weights (a fraction of a checkpoint) and writing a checkpoint."""
    if cfg.launch.io_timeout_s is not None:
        return cfg.launch.io_timeout_s
    slowest = 2 * checkpoint_gb(cfg) / cfg.launch.io_gb_per_s
    return max(MIN_IO_TIMEOUT_S, math.ceil(2 * slowest))


def step_seconds(cfg: FtlConfig) -> float:
    """One optimizer step's 6·N FLOPs per token at :data:`ASSUMED_GPU_FLOPS` per GPU; 0 for a CPU job."""
    if planned_device_type(cfg) != "cuda":
        return 0.0
    t = cfg.train
    tokens = t.micro_batch_size * t.grad_accum * t.seq_len * world_size(cfg)
    return 6.0 * param_counts(cfg.model.arch).total * tokens / (ASSUMED_GPU_FLOPS * world_size(cfg))


def needed_signal_lead_s(cfg: FtlConfig) -> float:
    """Seconds between the warning and the kill that a step plus a checkpoint need."""
    return step_seconds(cfg) + checkpoint_gb(cfg) / cfg.launch.io_gb_per_s


def warning_signal(cfg: FtlConfig) -> tuple[str, int]:
    """(signal name, seconds before the time limit) for a SLURM job: ``launch.signal`` as given
    (``USR1@120``, ``B:SIGUSR1@120``), or USR1 with the lead a step and a checkpoint need, with a
    margin, in whole minutes (at least :data:`MIN_SIGNAL_LEAD_S`). ValueError for a malformed spec."""
    spec = cfg.launch.signal
    if spec is None:
        lead = max(MIN_SIGNAL_LEAD_S, 60 * math.ceil(SIGNAL_MARGIN * needed_signal_lead_s(cfg) / 60))
        return DEFAULT_SIGNAL, lead
    match = _SIGNAL.match(spec)
    if not match:
        raise ValueError(f"got {spec!r}; expected SIG@SECONDS, e.g. USR1@120")
    return match["name"], int(match["seconds"])


def slurm_time_s(limit: str) -> int | None:
    """SLURM's --time in seconds (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``); None when it does not parse."""
    days, _, rest = limit.rpartition("-") if "-" in limit else ("0", "", limit)
    try:
        parts = [int(p) for p in rest.split(":")]
        d = int(days)
    except ValueError:
        return None
    if "-" in limit:  # D-HH[:MM[:SS]]
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts[:3]
    return ((d * 24 + h) * 60 + m) * 60 + s


def signal_lead_problems(cfg: FtlConfig) -> list[tuple[str, str]]:
    """(field, message) for a SLURM job whose warning comes too late to save the run, or not at
    all within its time limit."""
    try:
        _, lead = warning_signal(cfg)
    except ValueError:
        return []  # the format error is reported on its own
    out = []
    need = needed_signal_lead_s(cfg)
    gb = checkpoint_gb(cfg)
    if cfg.launch.signal is not None and lead < need:
        suggest = 60 * math.ceil(SIGNAL_MARGIN * need / 60)
        out.append(
            (
                "launch.signal",
                f"{cfg.launch.signal!r} warns {lead} s before the time limit, but finishing a step and "
                f"writing a checkpoint takes about {need:.0f} s ({gb:,.1f} GB at launch.io_gb_per_s="
                f"{cfg.launch.io_gb_per_s:g}); use launch.signal=USR1@{suggest}, state your storage's bandwidth "
                "in launch.io_gb_per_s, or leave launch.signal unset to have it sized",
            )
        )
    limit = slurm_time_s(cfg.launch.time)
    if limit is not None and lead >= limit:
        out.append(
            (
                "launch.time",
                f"{cfg.launch.time!r} is no longer than the {lead} s warning before it "
                "(launch.signal) that the checkpoint needs; ask for more time",
            )
        )
    return out
