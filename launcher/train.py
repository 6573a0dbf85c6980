"""The per-rank entry point: ``python -m launcher.train --config RUN_DIR/config.yaml``.

`ftl train` composes, validates and writes the config into the run dir; every rank (under
torchrun, SLURM or alone) runs this module on that one file. Exit codes: 0 done, or stopped by a
signal after a checkpoint; 1 training failed; 2 the config or the training data is unusable.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Optional

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launcher.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the resolved config.yaml in the run dir")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from launcher.config.errors import ConfigErrors
    from launcher.config.validate import load_run_config
    from launcher.data import DataError

    try:
        cfg = load_run_config(args.config)
    except ConfigErrors as e:
        print(f"ftl: {args.config}: {e}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as e:
        print(f"ftl: cannot read {args.config}: {e}", file=sys.stderr)
        return EXIT_INVALID

    from launcher.trainer import Trainer

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


if __name__ == "__main__":
    sys.exit(main())
