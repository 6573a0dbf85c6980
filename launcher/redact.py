"""Secrets never reach the run dir, the logs, W&B or printed commands. Pure Python."""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

SECRET_KEY = re.compile(
    r"(^|[_.-])(api[_-]?key|apikey|token|secret|password|passwd|credentials?|auth)($|[_.-])", re.IGNORECASE
)
REDACTED = "<redacted>"


def redact(value: Any, secrets: set[str]) -> Any:
    """A copy with secret-looking keys blanked and every known secret value cut out."""
    if isinstance(value, dict):
        return {k: REDACTED if SECRET_KEY.search(str(k)) else redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value


def known_secrets(environ: Optional[Mapping[str, str]] = None) -> set[str]:
    """Values of secret-looking environment variables (long enough not to blank common words)."""
    env = os.environ if environ is None else environ
    return {v for k, v in env.items() if SECRET_KEY.search(k) and len(v) >= 8}


def redact_overrides(overrides: list[str], secrets: set[str]) -> list[str]:
    """Command-line overrides as they may be written down: `+launch.env.HF_TOKEN=...` keeps its key
    and loses its value; known secret values are cut out of the rest."""
    out = []
    for text in overrides:
        key, sep, _ = text.partition("=")
        out.append(f"{key}={REDACTED}" if sep and SECRET_KEY.search(key.rsplit(".", 1)[-1]) else redact(text, secrets))
    return out
