"""launch=local (one process on this machine, or `torchrun --standalone` for nproc_per_node > 1)
and launch=torchrun (one agent per node, c10d or static rendezvous)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Mapping

from launcher.config.errors import ConfigError
from launcher.config.schema import FtlConfig
from launcher.launch.base import LaunchPlan, python, trainer_argv
from launcher.rundir.outcome import clear_exits, summarize


def _env(cfg: FtlConfig) -> dict[str, str]:
    env = dict(cfg.launch.env)
    ifname = getattr(cfg.launch, "socket_ifname", None)
    if ifname:
        env.setdefault("GLOO_SOCKET_IFNAME", ifname)
        env.setdefault("NCCL_SOCKET_IFNAME", ifname)
    threads = cpu_threads(cfg)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    for key, value in cpu_malloc_env(cfg, visible_gpus(), os.environ).items():
        env.setdefault(key, value)
    return env


# glibc's malloc gives every block above its mmap threshold (32 MiB at most) back to the kernel when
# it is freed, and serves the next one from fresh pages, zeroed one page fault at a time. A CPU step
# makes dozens of such blocks (the loss's chunk logits, the head's and embeddings' gradients,
# optimizer temporaries); on a virtual machine the faults cost more than the arithmetic on them. With
# mmap off and the heap's top never trimmed, freed blocks are reused. Measured in bench/cpu_allocator.py.
CPU_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
MALLOC_KEYS = (*CPU_MALLOC_ENV, "GLIBC_TUNABLES")


def cpu_malloc_env(cfg: FtlConfig, gpus: int, environ: Mapping[str, str]) -> dict[str, str]:
    """:data:`CPU_MALLOC_ENV` for training on CPU, unless malloc is tuned already (``launch.env``
    or ``environ``). Not when a GPU trains (``train.device=cuda``, or ``auto`` with ``gpus``
    visible): the host heap would keep for the whole run the memory a rank held only while it
    loaded the model."""
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and gpus > 0):
        return {}
    if any(key in cfg.launch.env or key in environ for key in MALLOC_KEYS):
        return {}
    return dict(CPU_MALLOC_ENV)


def cpu_threads(cfg: FtlConfig) -> int | None:
    """Each CPU rank's share of the machine's cores (torch would otherwise start one OpenMP thread
    per core in every rank and oversubscribe), or ``launch.env``'s ``OMP_NUM_THREADS``; None on
    CUDA. ``ftl eval`` in one process takes the same count, so it computes what training computed:
    on the project's CPU (AMX) bf16 eval losses move by up to 0.7% between 1 and 2 threads."""
    if cfg.train.device == "cuda":
        return None
    given = str(cfg.launch.env.get("OMP_NUM_THREADS", ""))
    if given:
        return int(given) if given.isdigit() and int(given) > 0 else None
    return max(1, (os.cpu_count() or 1) // cfg.launch.nproc_per_node)


# torchrun with its arguments, ending in an exit status rather than a traceback (launcher/launch/torchrun.py)
TORCHRUN = "launcher.launch.torchrun"


class LocalBackend:
    name = "local"

    def build(self, cfg: FtlConfig, run_dir: Path, config_path: Path) -> LaunchPlan:
        n = cfg.launch.nproc_per_node
        if n == 1:
            argv = [python(), *trainer_argv(config_path)]
        else:
            argv = [python(), "-m", TORCHRUN, "--standalone", f"--nproc_per_node={n}"]
            if cfg.launch.master_port:
                argv += [f"--master_port={cfg.launch.master_port}"]
            argv += [*trainer_argv(config_path)]
        return LaunchPlan(run_dir=run_dir, commands=[argv], env=_env(cfg))

    def submit(self, plan: LaunchPlan) -> int:
        return run_foreground(plan)

    def preflight(self, cfg: FtlConfig) -> list[ConfigError]:
        return gpu_errors(cfg, visible_gpus())


class TorchrunBackend:
    name = "torchrun"

    def build(self, cfg: FtlConfig, run_dir: Path, config_path: Path) -> LaunchPlan:
        launch = cfg.launch
        argv = [
            python(),
            "-m",
            TORCHRUN,
            f"--nnodes={launch.nnodes}",
            f"--nproc_per_node={launch.nproc_per_node}",
            f"--rdzv_backend={launch.rdzv_backend}",
            f"--rdzv_endpoint={launch.rdzv_endpoint}",
            f"--rdzv_id={launch.rdzv_id}",
            f"--max_restarts={launch.max_restarts}",
        ]
        if launch.rdzv_backend == "static":
            argv.append(f"--node_rank={launch.node_rank}")
        if launch.local_addr:
            argv.append(f"--local_addr={launch.local_addr}")
            if launch.rdzv_backend == "c10d" and launch.local_addr == launch.rdzv_endpoint.rsplit(":", 1)[0].strip(
                "[]"
            ):
                # c10d elects the store host by matching the endpoint against the hostname, which
                # fails when the node is known by an address its hostname does not resolve to.
                argv.append("--rdzv_conf=is_host=1")
        argv += trainer_argv(config_path)
        notes = []
        if launch.nnodes > 1:
            notes.append(
                f"run the same `ftl train` on each of the {launch.nnodes} nodes with launch.node_rank=0..{launch.nnodes - 1}"
            )
        return LaunchPlan(run_dir=run_dir, commands=[argv], env=_env(cfg), notes=notes)

    def submit(self, plan: LaunchPlan) -> int:
        return run_foreground(plan)

    def preflight(self, cfg: FtlConfig) -> list[ConfigError]:
        return gpu_errors(cfg, visible_gpus())


def visible_gpus(environ: dict[str, str] | None = None) -> int:
    """GPUs this machine shows a process, without importing torch: CUDA_VISIBLE_DEVICES when set,
    else the NVIDIA device files."""
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"])
    return len([p for p in Path("/dev").glob("nvidia[0-9]*")])


def gpu_errors(cfg: FtlConfig, gpus: int) -> list[ConfigError]:
    """A job on this machine that asks for more GPUs than it has fails before anything starts."""
    nproc = cfg.launch.nproc_per_node
    if cfg.train.device == "cuda" and gpus == 0:
        return [ConfigError("train.device", "cuda, but this machine shows no GPU (use train.device=auto or cpu)")]
    if cfg.train.device != "cpu" and 0 < gpus < nproc:
        return [
            ConfigError(
                "launch.nproc_per_node", f"{nproc} processes but only {gpus} GPU(s) are visible on this machine"
            )
        ]
    return []


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# How long torchrun lets its ranks finish a step and save after a stop signal before it kills them.
SHUTDOWN_TIMEOUT_S = "300"


def _stop_when_parent_dies() -> Callable[[], None] | None:
    """Linux: the job gets SIGTERM (it saves and stops) if this launcher is killed outright, which
    no handler can forward; its own process group no longer shares the launcher's fate."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only makes the call
    return lambda: libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


def run_foreground(plan: LaunchPlan, records: bool = True) -> int:
    """Run each command in turn with the plan's environment, and give back 0, 1, 2 or 130 (see
    :mod:`launcher.rundir.outcome`; ``records``: the command is the trainer, which leaves exit
    records in the run dir).

    The job runs in a process group of its own, so a Ctrl-C at the terminal reaches this launcher
    alone, which hands it on exactly once: the trainers (or torchrun, which tells its ranks) finish
    their step, save a checkpoint and stop, while this process waits for them. SIGTERM and SIGHUP
    are handed on the same way, never leaving the job behind. A second signal goes to the whole
    group: the ranks stop at once."""
    env = {**os.environ, **plan.env}
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    if records:
        clear_exits(plan.run_dir)
    for argv in plan.commands:
        code, interrupted = _run_forwarding_signals(argv, env)
        exit_code, message = summarize(code, plan.run_dir if records else None, interrupted)
        if exit_code != 0:
            print(f"ftl: {message}", file=sys.stderr)
            return exit_code
    return 0


def _run_forwarding_signals(argv: list[str], env: dict[str, str]) -> tuple[int, str | None]:
    """(exit status, the first stop signal handed on, if any)."""
    proc = subprocess.Popen(argv, env=env, process_group=0, preexec_fn=_stop_when_parent_dies())
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            signum = signal.SIGTERM  # the terminal went away: stop as on SIGTERM (the trainers save on it)
        try:
            if len(received) == 1:
                proc.send_signal(signum)
                print(
                    f"ftl: {name}: the job finishes its step, saves a checkpoint and stops ({name} again: stop at once)",
                    file=sys.stderr,
                )
            else:
                os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS} if on_main_thread else {}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, signal.Signals(received[0]).name if received else None
