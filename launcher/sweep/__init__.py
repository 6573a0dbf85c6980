"""Sweeps: one search space (a spec in conf/sweep/ or a file), run by W&B or offline.

A spec is a W&B sweep config (method, metric, parameters, early_terminate, ...) whose parameter names are
ftl override keys, plus ``overrides``: the fixed part of every trial's ``ftl train`` command
(:mod:`launcher.sweep.spec`: reading and checking specs, the override helpers).

* ``ftl sweep create SPEC``: the W&B sweep config, whose command is
  ``${env} ${interpreter} -m launcher train FIXED... ${args_no_hyphens}``: the agent's parameters
  arrive as Hydra overrides ``key=value``. Created through the W&B API when an API key is set
  (:mod:`launcher.sweep.wandb_config`).
* ``ftl sweep agent SWEEP_ID count=K [overrides]``: trials here (``wandb.agent``; launch=local or
  torchrun), or K SLURM jobs, each drawing one trial with ``wandb agent --count 1`` and training
  across its allocation (launch=slurm; :mod:`launcher.sweep.agents`, as is the next).
* ``ftl sweep agent --offline SPEC count=K``: no server. W&B's own search engine (the ``sweeps``
  package behind W&B's local controller) draws the trials, and each runs exactly as the agent
  would run it: the same command expansion, WANDB_SWEEP_ID / WANDB_RUN_ID in its environment.
* ``ftl train -m`` and ``ftl sweep optuna SPEC`` (launcher/sweep/multirun.py, launcher/sweep/optuna_search.py): Hydra's sweepers.

A trial is ``ftl train`` started with WANDB_SWEEP_ID and WANDB_RUN_ID set
(:func:`launcher.sweep.trial.sweep_trial`). Its parameters are overrides like any other, composed once
by the launcher into the run dir's config.yaml, which every rank reads; its run dir is
``<run dir>-sweep-<sweep id>/<run id>``, named by the W&B run id, and holds that id in ``wandb_run_id``.
Inside a SLURM sweep job, the trial records its command in ``jobs/<job id>.json``: a requeued job replays
that record (``python -m launcher.sweep replay``, :func:`main`) instead of asking the agent for a new
trial, so it resumes the same run dir, checkpoint and W&B run.
"""

from __future__ import annotations

import sys
from typing import Optional

from launcher.sweep.trial import replay


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m launcher.sweep replay RECORD``: what a requeued SLURM sweep job runs."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "replay":
        print("usage: python -m launcher.sweep replay JOBS_DIR/JOB_ID.json", file=sys.stderr)
        return 2
    return replay(args[1])
