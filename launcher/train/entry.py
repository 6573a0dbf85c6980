"""The per-rank entry point: ``python -m launcher.train --config RUN_DIR/config.yaml``.

`ftl train` composes, validates and writes the config into the run dir; every rank (under
torchrun, SLURM or alone) runs this module on that one file. Users who start torchrun themselves
may pass Hydra overrides instead (``torchrun ... -m launcher.train recipe=X a.b=1``): each rank
composes the same config, rank 0 writes it into the run dir, and the trainer checks that all ranks
agree before training. Exit codes: 0 done, or stopped by a signal after a checkpoint; 1 training
failed; 2 the config or the training data is unusable.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import MutableMapping
from typing import Optional

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launcher.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the resolved config.yaml in the run dir")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed's launcher adds it
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


def config_from_overrides(overrides: list[str]):  # -> FtlConfig
    """Compose on this rank; rank 0 writes the run dir. Composition is deterministic, and the
    trainer verifies that every rank got the same config before the first collective that matters."""
    from launcher.launch.run_dir import write_run_dir
    from launcher.session import prepare_run

    run = prepare_run(topology_from_env(os.environ) + overrides)
    if os.environ.get("RANK", "0") == "0":
        write_run_dir(run.raw, run.plan, run.config_path, ["(torchrun) -m launcher.train", *overrides])
    return run.cfg


def default_cuda_allocator(environ: MutableMapping[str, str]) -> None:
    """Expandable segments for CUDA's caching allocator (it grows a segment in place instead of
    leaving differently sized blocks stranded), unless the allocator is configured already. Read
    when torch first allocates on a GPU, so set before anything does."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in environ and "PYTORCH_ALLOC_CONF" not in environ:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    default_cuda_allocator(os.environ)
    from launcher.config.errors import ConfigErrors
    from launcher.config.validate import load_run_config
    from launcher.data.types import DataError

    try:
        cfg = load_run_config(args.config) if args.config else config_from_overrides(args.overrides)
    except ConfigErrors as e:
        print(f"ftl: {args.config}: {e}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as e:
        print(f"ftl: cannot read {args.config}: {e}", file=sys.stderr)
        return EXIT_INVALID

    from launcher.train.trainer import Trainer

    try:
        Trainer(cfg).run()
    except DataError as e:
        print(f"ftl: training data error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("ftl: interrupted (no checkpoint written for the current step)", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:
        traceback.print_exc()
        print(f"ftl: training failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


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
