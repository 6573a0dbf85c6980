"""Config errors: each names the field, the bad value and what is allowed. Exit code 2."""

from __future__ import annotations

import re
from dataclasses import dataclass

EXIT_INVALID = 2
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # all but the newline a message may hold


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
        """One bullet per error; control characters a value brought in (an escape sequence, a
        carriage return) are shown escaped, never sent to the terminal."""
        n = len(self.errors)
        head = f"invalid configuration ({n} error{'s' if n != 1 else ''}):"
        return "\n".join([head] + ["  - " + _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(e)) for e in self.errors])
