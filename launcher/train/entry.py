"""The per-rank entry point: ``python -m launcher.train --config RUN_DIR/config.yaml``.

`ftl train` composes, validates and writes the config into the run dir; every rank (under
torchrun, SLURM or alone) runs this module on that one file. Users who start torchrun themselves
may pass Hydra overrides instead (``torchrun ... -m launcher.train recipe=X a.b=1``): each rank
composes the same config, rank 0 writes it into the run dir, and the trainer checks that all ranks
agree before training. Exit codes: 0 done; 130 stopped by a signal after a checkpoint; 1 training
failed; 2 the config, the run dir or the training data is unusable; 124 hung (the watchdog,
:mod:`launcher.runtime.watchdog`, found no progress and dumped every rank's stacks). Each rank also leaves its code
in the run dir (:mod:`launcher.rundir.outcome`), for the launcher to report past torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Optional

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_STOPPED, EXIT_HUNG = 0, 1, 2, 130, 124


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launcher.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the resolved config.yaml in the run dir")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS
    )  # deepspeed's launcher adds it
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, when no --config is given")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.overrides):
        parser.error("give either --config RUN_DIR/config.yaml or Hydra overrides, not both")
    return args


def topology_from_env(environ) -> list[str]:
    """The world torchrun started, as overrides placed before the user's (theirs win)."""
    if "WORLD_SIZE" not in environ:
        return []
    world, local = int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"]))
    if world == local:
        return [f"launch.nproc_per_node={local}"]
    return ["launch=torchrun", f"launch.nnodes={world // local}", f"launch.nproc_per_node={local}"]


def config_from_overrides(overrides: list[str]):  # -> (FtlConfig, PreparedRun)
    """Compose on this rank (rank 0 writes the run dir, see :func:`main`). Composition is
    deterministic, and the trainer verifies that every rank got the same config before the first
    collective that matters."""
    from launcher.session import prepare_run

    run = prepare_run(topology_from_env(os.environ) + overrides)
    return run.cfg, run


def default_cuda_allocator(environ: MutableMapping[str, str]) -> None:
    """Expandable segments for CUDA's caching allocator (it grows a segment in place instead of
    leaving differently sized blocks stranded), unless the allocator is configured already. Read
    when torch first allocates on a GPU, so set before anything does."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in environ and "PYTORCH_ALLOC_CONF" not in environ:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def main(argv: Optional[list[str]] = None) -> int:
    from launcher.quiet import install
    from launcher.redact import redact_output

    install()
    redact_output()  # what the trainer prints is cut of secrets, as the launcher's console is
    args = parse_args(argv)
    default_cuda_allocator(os.environ)
    from launcher.config.errors import ConfigErrors
    from launcher.config.validate import load_run_config
    from launcher.rundir import run_dir_of
    from launcher.rundir.lock import RunDirBusy, RunDirLock
    from launcher.rundir.outcome import record_exit
    from launcher.session import fix_estimates

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    lock = None
    try:
        cfg, run = (load_run_config(args.config), None) if args.config else config_from_overrides(args.overrides)
        if run is None:  # a config.yaml written before ftl fixed its estimates there
            fix_estimates({"checkpoint": {}, "launch": {}}, cfg)
        if rank == 0:  # the run dir's one writer: holds its lock (inherited from `ftl train` when it started us)
            lock = RunDirLock(run_dir_of(cfg), "trainer rank 0").acquire()
            if run is not None:
                from launcher.rundir.write import write_run_dir

                write_run_dir(run.raw, run.plan, run.config_path, ["(torchrun) -m launcher.train", *args.overrides])
    except ConfigErrors as e:
        print(f"ftl: {args.config or 'overrides'}: {e}", file=sys.stderr)
        return EXIT_INVALID
    except RunDirBusy as e:
        print(f"ftl: {e}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as e:
        print(f"ftl: cannot read {args.config}: {e}", file=sys.stderr)
        return EXIT_INVALID
    from launcher.redact import declare, is_secret_key

    # launch.env's secrets reach this process as variables of those names (config.yaml has them blanked)
    declare(os.environ[k] for k in cfg.launch.env if is_secret_key(k) and os.environ.get(k))
    try:
        return train(cfg, lambda code, waiting=None: record_exit(run_dir_of(cfg), rank, world, code, waiting))
    finally:
        if lock is not None:
            lock.release()


def train(cfg, record: Callable[..., None] = lambda code, waiting=None: None) -> int:
    """Train on this rank: 0 done, 130 stopped by a signal after a checkpoint, 2 unusable training
    data, 1 any other failure; 124 when the watchdog finds it hung (it exits the process itself).
    ``record(code)`` leaves the rank's exit record; the watchdog's adds whether the rank's main
    thread waited in a collective.

    A stop signal before the training loop (which saves on one) interrupts the setup; once the
    loop is left, stop signals are ignored: a failing rank's peers get SIGTERM from torchrun while
    they report their own failure, and must live to leave their exit record."""
    from launcher.runtime import watchdog

    start_watchdog(cfg, record)  # before the imports: they are the first phase it watches
    try:
        return _train(cfg, record)
    finally:
        watchdog.stop()


def start_watchdog(cfg, record: Callable[..., None]) -> None:
    """This rank's hang watchdog (train.watchdog), and the flight recorder it dumps."""
    from launcher.rundir import RunPaths, run_dir_of
    from launcher.runtime import watchdog

    paths = RunPaths(run_dir_of(cfg))
    watchdog.collective_trace_env(os.environ, paths)
    limits = watchdog.limits_of(cfg.train.watchdog, cfg.launch.dist_timeout_s, cfg.launch.io_timeout_s)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    watchdog.start(
        watchdog.Watchdog(limits, paths.root, rank, world, on_hang=lambda waiting: record(EXIT_HUNG, waiting))
    )


def _train(cfg, record: Callable[[int], None]) -> int:
    from launcher.config.errors import ConfigErrors
    from launcher.data.types import DataError
    from launcher.rundir.resume import ResumeError
    from launcher.runtime import watchdog
    from launcher.runtime.faults import step_fault
    from launcher.runtime.preflight import PreflightError
    from launcher.train.checkpoint import CheckpointError, CheckpointWriteError
    from launcher.train.finite import TrainingStopped
    from launcher.train.trainer import Trainer

    with _interrupt_until_done() as done:
        try:
            hooks = [hook] if (hook := step_fault()) else []  # a test's fault, when it asks for one
            code = EXIT_STOPPED if Trainer(cfg, step_hooks=hooks).run() == "stopped" else EXIT_OK
            done()
        except DataError as e:
            done()
            print(f"ftl: training data error: {e}", file=sys.stderr)
            code = EXIT_INVALID
        except (
            CheckpointError,
            ConfigErrors,
        ) as e:  # ConfigErrors: what only the rank's device decides (activation offloading on a CPU)
            done()
            print(f"ftl: {e}", file=sys.stderr)
            code = EXIT_INVALID
        except ResumeError as e:  # this checkpoint cannot continue this config (every rank finds it; rank 0 says so)
            done()
            if os.environ.get("RANK", "0") == "0":
                print(f"ftl: {e}", file=sys.stderr)
            code = EXIT_INVALID
        except PreflightError as e:  # every rank found it; rank 0 says so
            done()
            if os.environ.get("RANK", "0") == "0":
                print(f"ftl: {e}", file=sys.stderr)
            code = EXIT_FAILED
        except CheckpointWriteError as e:  # a full disk, a failed background write: the previous checkpoint stands
            done()
            print(f"ftl: {e}", file=sys.stderr)
            code = EXIT_FAILED
        except TrainingStopped:  # a NaN, too much forgetting: every rank stopped at the same step; rank 0 said so
            done()
            code = EXIT_FAILED
        except KeyboardInterrupt:
            done()
            watchdog.hold_if_fired()
            print("ftl: interrupted (no checkpoint written for the current step)", file=sys.stderr)
            code = EXIT_FAILED
        except Exception as e:
            done()
            watchdog.hold_if_fired()
            traceback.print_exc()
            print(f"ftl: training failed: {type(e).__name__}: {e}", file=sys.stderr)
            code = EXIT_FAILED
        record(code)
    return code


@contextlib.contextmanager
def _interrupt_until_done() -> Iterator[Callable[[], None]]:
    """SIGTERM/SIGINT raise KeyboardInterrupt until ``done()`` is called, and are ignored after."""
    state = {"done": False}

    def handle(signum: int, frame: Any) -> None:
        if not state["done"]:
            raise KeyboardInterrupt

    sigs = (signal.SIGTERM, signal.SIGINT)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, handle) for sig in sigs} if main_thread else {}
    try:
        yield lambda: state.update(done=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_now(code: int) -> None:
    """Leave without running C++ static destructors. After a distributed run has finished and
    destroyed its process group, a background thread left joinable by the communication stack can
    still make interpreter teardown call std::terminate (seen twice in this suite's DeepSpeed runs on
    gloo, after the last step), turning a finished run into a SIGABRT. Everything worth keeping is written by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run() -> None:
    """``python -m launcher.train``: a distributed rank leaves through :func:`exit_now`."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_now(code)
    sys.exit(code)
