"""The one place that reads the distributed environment and owns the process group.

torchrun (and our SLURM template, through torchrun) sets RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; nothing else in ftl reads them. Everything here is
a no-op for a single process, so the trainer calls these helpers unconditionally.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as torch_dist

from launcher.config.schema import LaunchBase


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_dist_env(environ: Mapping[str, str] = os.environ) -> DistInfo:
    """Pure: what torchrun told this process. Absent variables mean a single process."""

    def get(name: str, default: int) -> int:
        raw = environ.get(name, "")
        try:
            return int(raw) if raw != "" else default
        except ValueError as e:
            raise ValueError(f"environment variable {name}={raw!r} is not an integer") from e

    world = get("WORLD_SIZE", 1)
    info = DistInfo(
        rank=get("RANK", 0),
        local_rank=get("LOCAL_RANK", 0),
        world_size=world,
        local_world_size=get("LOCAL_WORLD_SIZE", world),
    )
    if not 0 <= info.rank < info.world_size or not 0 <= info.local_rank < info.local_world_size:
        raise ValueError(f"inconsistent distributed environment: {info}")
    return info


def init_distributed(
    launch: LaunchBase, device: torch.device, environ: Mapping[str, str] = os.environ, timeout_s: Optional[float] = None
) -> DistInfo:
    """Join the process group torchrun prepared: nccl on GPU, gloo on CPU, always with a timeout so
    one dead rank fails the job instead of hanging it: ``timeout_s``, else launch.dist_timeout_s.
    The trainer starts with its I/O-phase timeout (the model loads under it) and lowers it to the
    step timeout once set up (:func:`set_collective_timeout`)."""
    info = read_dist_env(environ)
    if info.world_size == 1 or torch_dist.is_initialized():
        return info
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={info.world_size} but {', '.join(missing)} unset: start ranks with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dump = environ.get("TORCH_FR_DUMP_TEMP_FILE")  # NCCL's dump on a collective timeout (runtime.watchdog)
        if dump:
            os.makedirs(os.path.dirname(dump) or ".", exist_ok=True)
    timeout = timedelta(seconds=launch.dist_timeout_s if timeout_s is None else timeout_s)
    torch_dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=timeout,
        rank=info.rank,
        world_size=info.world_size,
        device_id=device if device.type == "cuda" else None,
        store=elastic_attempt_store(info, environ, timeout),
    )
    return info


def elastic_attempt_store(
    info: DistInfo, environ: Mapping[str, str], timeout: timedelta
) -> Optional["torch_dist.Store"]:
    """Under torchrun, the rendezvous store with a key prefix per restart attempt; None elsewhere.

    torchrun (torch 2.13, c10d rendezvous) keeps one TCPStore, same port and same keys, across
    ``--max_restarts`` restarts. The restarted ranks would read the dead attempt's gloo addresses
    back and never connect; a prefix per attempt keeps each attempt's keys apart."""
    attempt = environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    hosted_by_agent = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = torch_dist.TCPStore(
        environ["MASTER_ADDR"],
        int(environ["MASTER_PORT"]),
        info.world_size,
        is_master=not hosted_by_agent and info.rank == 0,
        timeout=timeout,
    )
    return torch_dist.PrefixStore(f"ftl/attempt-{attempt}", store)


def set_collective_timeout(seconds: float) -> None:
    """From now on a collective on any process group (the default one, and those DeepSpeed and
    FSDP's device mesh made) fails after ``seconds``. All ranks meet at a barrier first, under the
    old timeout: a rank still finishing a slow phase (rank 0 reading the model) must not find its
    peers already waiting under a shorter one. (torch has no public setter; torchtitan lowers its
    timeouts after the first step the same way, through ``_set_pg_timeout``.)"""
    if not torch_dist.is_initialized():
        return
    torch_dist.barrier()
    from torch.distributed import distributed_c10d as c10d

    groups = [torch_dist.group.WORLD, *(g for g in c10d._world.pg_map if g is not torch_dist.group.WORLD)]
    for group in groups:
        if not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timedelta(seconds=seconds), group)


@contextlib.contextmanager
def collective_timeout(seconds: float, restore: float) -> Iterator[None]:
    """Collectives inside the block (a checkpoint's) time out after ``seconds``, those after it after ``restore``."""
    set_collective_timeout(seconds)
    yield  # after a failure inside, no barrier: the peers may never reach it
    set_collective_timeout(restore)


TEARDOWN_LIMIT_S = 120  # a clean teardown takes milliseconds


def destroy(clean: bool = True) -> None:
    """Leave the process group. Callers meet at :func:`barrier` after their last collective, so no
    rank tears the group down while a peer is still inside one (a known cause of
    destroy_process_group hanging, pytorch/pytorch#75097). A teardown that still takes longer than
    :data:`TEARDOWN_LIMIT_S` prints every thread's stack to stderr and exits 1 rather than hold the
    job (faulthandler's watchdog runs without the GIL, which a hung C++ destructor may hold). After
    a failure (``clean=False``) the group is left alone: peers may be blocked in a collective this
    rank never joins, and the launcher ends them when this process exits."""
    if not torch_dist.is_initialized() or not clean:
        return
    faulthandler.dump_traceback_later(TEARDOWN_LIMIT_S, exit=True)
    try:
        torch_dist.destroy_process_group()
    finally:
        faulthandler.cancel_dump_traceback_later()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def _all_reduce(value: float, op: "torch_dist.ReduceOp.RedOpType") -> float:
    if not torch_dist.is_initialized():
        return value
    backend = torch_dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place over all ranks, and returned (the ``reduce_fn`` evaluation takes)."""
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def reduce_sum(value: float) -> float:
    return _all_reduce(value, torch_dist.ReduceOp.SUM)


def reduce_mean(value: float) -> float:
    return reduce_sum(value) / (torch_dist.get_world_size() if torch_dist.is_initialized() else 1)


def check_same_on_all_ranks(value: str, what: str) -> None:
    """Fail on every rank, naming the odd ones out, unless all ranks hold the same ``value``."""
    if not torch_dist.is_initialized():
        return
    values: list[Optional[str]] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        odd = [r for r, v in enumerate(values) if v != values[0]]
        raise RuntimeError(
            f"ranks disagree on the {what}: ranks {odd} differ from rank 0; start every node with the same command"
        )


def reduce_max(value: float) -> float:
    return _all_reduce(value, torch_dist.ReduceOp.MAX)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on one: a stop signal that reached a single rank must
    stop all of them at the same step, or the checkpoint's collectives hang."""
    return _all_reduce(1.0 if flag else 0.0, torch_dist.ReduceOp.MAX) > 0
