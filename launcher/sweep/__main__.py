"""``python -m launcher.sweep replay RECORD``: what a requeued SLURM sweep job runs (slurm/sweep.sbatch.j2)."""

from __future__ import annotations

import sys

from launcher.sweep import main

sys.exit(main())
