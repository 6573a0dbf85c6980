"""``python -m launcher.launch.torchrun ARGS``: torchrun (``torch.distributed.run``, same arguments),
ending in an exit status instead of a traceback.

torchrun turns a stop signal into a ``SignalException`` once its ranks have stopped, and a failed
rank into a ``ChildFailedError``; both leave the agent as a 30-line traceback after ftl's own
message. The ranks say what happened (ftl reads their exit records, :mod:`launcher.rundir.outcome`),
so here a signal ends torchrun as the signal's conventional status (128 + N) and a failure as 1
(124 when the hang watchdog ended a rank: a job script can tell a hang from a crash),
with one line for the ranks that were killed by a signal (the only ones that cannot say so
themselves). torchrun's own error line for each rank that exited non-zero goes too: a rank that
stopped after a checkpoint (130) is no failure, whatever torchrun makes of it.
"""

from __future__ import annotations

import sys
from typing import Optional

from launcher.rundir.outcome import EXIT_HUNG, signal_name


def main(argv: Optional[list[str]] = None) -> int:
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        killed = [f"rank {rank} by {signal_name(f.exitcode)}" for rank, f in e.failures.items() if f.exitcode < 0]
        if killed:
            print(f"torchrun: killed: {', '.join(sorted(killed))}", file=sys.stderr)
        return EXIT_HUNG if any(f.exitcode == EXIT_HUNG for f in e.failures.values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
