"""The launch seam: each backend turns a validated config into a LaunchPlan with a pure function,
and keeps every side effect (processes, sbatch) in `submit`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from launcher.config.errors import ConfigError
from launcher.config.schema import FtlConfig
from launcher.redact import known_secrets, redact, secret_env_names
from launcher.shell import env_prefix, join


@dataclass(frozen=True)
class LaunchPlan:
    """What a backend will do: commands to run (argv lists, never shell strings), the environment
    added to them, and files it writes into the run dir first (e.g. job.sbatch)."""

    run_dir: Path
    commands: list[list[str]]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def shell_lines(self) -> list[str]:
        """The commands as a user would type them, every word quoted, each on one line. Secrets
        reach the job through the environment, never through a file or the console: an entry of
        ``env`` holding one reads the caller's variable of that name when the line runs."""
        secrets = known_secrets()
        prefix = env_prefix(self.env, secret_env_names(self.env, secrets))
        return [(prefix + " " if prefix else "") + join(redact(argv, secrets)) for argv in self.commands]


class Backend(Protocol):
    name: str

    def build(self, cfg: FtlConfig, run_dir: Path, config_path: Path) -> LaunchPlan:
        """Pure: no processes, no files."""
        ...

    def submit(self, plan: LaunchPlan) -> int:
        """Start the job; return the exit code to give the user."""
        ...

    def preflight(self, cfg: FtlConfig) -> list[ConfigError]:
        """Checks only the submitting machine can make (visible GPUs); run before anything is written."""
        ...


def trainer_argv(config_path: Path) -> list[str]:
    """The per-rank entry point, reading the one resolved config every rank shares."""
    return ["-m", "launcher.train", "--config", str(config_path)]


def python() -> str:
    return sys.executable
