"""``python -m launcher.launch.torchrun ARGS``: torchrun (``torch.distributed.run``, same arguments),
ending in an exit status instead of a traceback.

torchrun turns a stop signal into a ``SignalException`` once its ranks have stopped, and a failed
rank into a ``ChildFailedError``; both leave the agent as a 30-line traceback after ftl's own
message. The ranks say what happened (ftl reads their exit records, :mod:`launcher.launch.outcome`),
so here a signal ends torchrun as the signal's conventional status (128 + N) and a failure as 1,
with one line naming the ranks that failed and how.
"""

from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        failed = ", ".join(f"{rank} (exit code {f.exitcode})" for rank, f in sorted(e.failures.items()))
        print(f"torchrun: rank(s) {failed} failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
