"""Config errors: each names the field, the bad value and what is allowed. Exit code 2."""

from __future__ import annotations

from dataclasses import dataclass

EXIT_INVALID = 2


@dataclass(frozen=True)
class ConfigError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigErrors(ValueError):
    """Every problem found in a config, raised once."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.errors)
        head = f"invalid configuration ({n} error{'s' if n != 1 else ''}):"
        return "\n".join([head] + [f"  - {e}" for e in self.errors])
