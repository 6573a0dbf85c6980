"""Secrets never reach the run dir, the logs, W&B, sweep configs or printed commands. Pure Python.

A secret is known to ftl in three ways: the value of an environment variable whose name looks like
one (``WANDB_API_KEY``, ``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``), the value of an override or a
``launch.env`` entry whose key looks like one (``+launch.env.HF_TOKEN=...``), declared by the
command that read it (:func:`declare`), and any dict key that looks like one (its value is
blanked whatever it is). :func:`redact` cuts them out of data and text; the ``ftl`` command line
also passes everything it prints through :class:`RedactingStream`.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Iterable, Mapping, Optional, TextIO

SECRET_KEY = re.compile(
    r"(^|[_.-])(api[_-]?key|apikey|access[_-]?key|private[_-]?key|key|token|secret|password|passwd|passphrase|credentials?|auth)($|[_.-])",
    re.IGNORECASE,
)
REDACTED = "<redacted>"
MIN_ENV_SECRET = 8  # an environment value shorter than this is not cut out of text (it would blank common words)
MIN_DECLARED_SECRET = 4  # a value the user named a secret (a token-like key) is cut out from this length

_declared: set[str] = set()


def is_secret_key(key: str) -> bool:
    """A key (an environment variable, a config key, an override's dotted key) naming a secret."""
    return bool(SECRET_KEY.search(str(key).rsplit(".", 1)[-1]))


def declare(values: Iterable[str]) -> None:
    """Secret values this process learnt from its input (overrides, launch.env): from now on cut
    out of everything it prints or writes."""
    for value in values:
        value = str(value)
        if len(value) >= MIN_DECLARED_SECRET:
            _declared.add(value)


def known_secrets(environ: Optional[Mapping[str, str]] = None) -> set[str]:
    """Values of secret-looking environment variables (long enough not to blank common words),
    and every value :func:`declare`-d in this process."""
    env = os.environ if environ is None else environ
    return {v for k, v in env.items() if is_secret_key(k) and len(v) >= MIN_ENV_SECRET} | _declared


def override_secrets(overrides: Iterable[str]) -> set[str]:
    """The values of ``key=value`` overrides whose key names a secret, as typed and unquoted."""
    out = set()
    for text in overrides:
        key, sep, value = str(text).partition("=")
        if sep and is_secret_key(key.lstrip("+~")):
            out.add(value)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                out.add(value[1:-1])
    return {v for v in out if v}


def redact(value: Any, secrets: set[str]) -> Any:
    """A copy with secret-looking keys blanked and every known secret value cut out."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(str(k)) else redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in sorted(secrets, key=len, reverse=True):  # a longer secret holding a shorter one goes first
            value = value.replace(secret, REDACTED)
    return value


def redact_overrides(overrides: list[str], secrets: set[str]) -> list[str]:
    """Command-line overrides as they may be written down: `+launch.env.HF_TOKEN=...` keeps its key
    and loses its value; known secret values are cut out of the rest."""
    out = []
    for text in overrides:
        key, sep, _ = text.partition("=")
        out.append(f"{key}={REDACTED}" if sep and is_secret_key(key.lstrip("+~")) else redact(text, secrets))
    return out


def secret_env_names(env: Mapping[str, str], secrets: Optional[set[str]] = None) -> set[str]:
    """Environment entries that must never be written down: a secret-looking name, or a value
    holding a known secret."""
    secrets = known_secrets() if secrets is None else secrets
    return {k for k, v in env.items() if is_secret_key(k) or redact(str(v), secrets) != str(v)}


class RedactingStream:
    """A text stream that cuts every known secret out of what is written to it (the ftl command
    line wraps stdout and stderr in one). Secrets are looked up at each write, so values declared
    while the command runs are covered from then on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text, known_secrets()) if isinstance(text, str) else text)
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def redact_output() -> None:
    """Pass everything this process prints through :class:`RedactingStream`, as the ftl command
    line does: for the processes it starts (the trainers, ``ftl eval``'s ranks), whose console and
    logs are the user's too."""
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)  # type: ignore[assignment]
