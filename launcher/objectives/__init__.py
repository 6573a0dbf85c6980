"""Training objectives, siblings chosen by ``objective.method``: ``sft`` (the next-token loss) and
the preference objectives ``dpo`` (with IPO as a loss variant) and ``simpo``. The interface is
:mod:`launcher.objectives.base`; importing this package imports no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.config.schema import FtlConfig
    from launcher.objectives.base import Objective


def build_objective(cfg: FtlConfig) -> Objective:
    if cfg.objective.method == "sft":
        from launcher.objectives.preference import base_mode
        from launcher.objectives.sft import SftObjective

        o = cfg.objective
        return SftObjective(cfg.train.loss, o.kl_to_base, o.kl_top_k, base_mode(cfg))
    from launcher.objectives.preference import PreferenceObjective

    return PreferenceObjective(cfg)
