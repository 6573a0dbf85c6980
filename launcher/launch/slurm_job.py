"""``python -m launcher.launch.slurm_job OVERRIDES...``: the plain-sbatch path (slurm/train.sbatch).

Run inside a SLURM batch job, it does what ``ftl train ... launch=slurm`` does before submitting:
compose and validate the config from the overrides (with launch=slurm and the allocation's node
and GPU counts) and write the run dir with config.yaml and job.sbatch. Then it execs
``bash job.sbatch`` in its own process, the job's batch shell, so the signals SLURM sends that
shell reach the script's traps: a job submitted by hand runs the very same srun/torchrun/signal/
requeue logic as one ftl submits. Exit codes (when it does not exec): 2 invalid config, 1 not
inside a SLURM job.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Optional

from launcher.config.errors import EXIT_INVALID, ConfigError, ConfigErrors

TRAIN_SBATCH_LEAD_S = 120  # slurm/train.sbatch's #SBATCH --signal=B:USR1@120


def allocation_overrides(user: list[str], environ: Mapping[str, str]) -> list[str]:
    """Pure: the overrides to compose with. The allocation decides nodes and GPUs per node (0
    when it has none: a CPU job), so its values come last and win over the user's; launch=slurm
    is added unless the user chose it."""
    groups = [o.split("=", 1)[1] for o in user if o.split("=", 1)[0].lstrip("+~") == "launch" and "=" in o]
    if any(g != "slurm" for g in groups):
        raise ConfigErrors([ConfigError("launch", f"got {groups[-1]!r}; slurm/train.sbatch runs launch=slurm")])
    out = ([] if groups else ["launch=slurm"]) + list(user)
    out.append(f"launch.nodes={int(environ.get('SLURM_JOB_NUM_NODES') or environ.get('SLURM_NNODES') or 1)}")
    out.append(f"launch.gpus_per_node={allocated_gpus(environ) or 0}")
    return out


def allocated_gpus(environ: Mapping[str, str]) -> Optional[int]:
    """GPUs per node of this allocation, asked for with --gpus-per-node (SLURM_GPUS_PER_NODE: "8",
    "a100:8" or "gpu:a100:8") or --gres=gpu:N (SLURM_GPUS_ON_NODE, the batch step's count); None
    when the job has none."""
    for name in ("SLURM_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE"):
        count = environ.get(name, "").rsplit(":", 1)[-1]
        if count.isdigit() and int(count) > 0:
            return int(count)
    return None


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not os.environ.get("SLURM_JOB_ID"):
        print(
            "ftl: launcher.launch.slurm_job runs inside a SLURM job: sbatch --nodes=N slurm/train.sbatch "
            "recipe=NAME key=value ...; outside SLURM use `ftl train ... launch=slurm`",
            file=sys.stderr,
        )
        return 1
    from launcher.rundir import RunPaths
    from launcher.rundir.lock import check_free
    from launcher.rundir.write import write_run_dir
    from launcher.session import prepare_run

    try:
        overrides = allocation_overrides(args, os.environ)
        run = prepare_run(overrides)
    except ConfigErrors as e:
        print(f"ftl (slurm/train.sbatch): {e}", file=sys.stderr)
        return EXIT_INVALID
    plan = run.plan
    busy = check_free(plan.run_dir)  # rank 0 of the job takes the lock when it starts
    if busy:
        print(f"ftl (slurm/train.sbatch): {busy}", file=sys.stderr)
        return EXIT_INVALID
    from launcher.launch.slurm import warning_signal

    lead = warning_signal(run.cfg)[1]
    if run.cfg.launch.signal is None and lead > TRAIN_SBATCH_LEAD_S:
        print(
            f"ftl: slurm/train.sbatch asks for its warning {TRAIN_SBATCH_LEAD_S} s before the time limit, but a step and a "
            f"checkpoint of this run take about {lead} s: submit with --signal=B:USR1@{lead} launch.signal=USR1@{lead}",
            file=sys.stderr,
        )
    changes = write_run_dir(run.raw, plan, run.config_path, ["train", *overrides])
    for c in changes:
        print(f"ftl: config changed since the last run in {plan.run_dir}: {c}", file=sys.stderr)
    print(f"ftl: run dir {plan.run_dir}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    script = str(RunPaths(plan.run_dir).job_script)
    # plan.env: launch.env secrets, which job.sbatch does not hold
    os.execvpe("bash", ["bash", script], {**os.environ, **plan.env})


if __name__ == "__main__":
    sys.exit(main())
