"""The one quoting rule: every string ftl writes into a shell file or prints as a command goes
through :func:`quote` (a word) or :func:`join` (a command line). Nothing else in ftl quotes for
the shell (a test checks that no other module uses ``shlex``).

A quoted word is always one line of printable text: a word holding a newline, a carriage return or
any other control character (an ANSI escape, a NUL-free tab) becomes bash's ``$'...'`` form with
the character escaped, so a value can never end a ``#`` comment, start a new command in a script,
or rewrite the user's terminal. NUL cannot be passed through argv, the environment or a script at
all, and is refused. Pure Python, no heavy imports.
"""

from __future__ import annotations

import re
import shlex
from typing import Iterable, Mapping

# Characters that must not appear raw in a script line or on a terminal: C0 controls, DEL, C1
# controls, and the Unicode line and paragraph separators (line breaks to many editors and to
# Python's str.splitlines).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\x85]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", "'": "\\'"}


class UnsafeText(ValueError):
    """A value that cannot be written into a script or command in any quoting (it holds NUL)."""


def _escape(ch: str) -> str:
    """bash's $'...' escape of one character: ``\\xHH`` is one byte, so above ASCII ``\\uHHHH``."""
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x80 else f"\\u{ord(ch):04x}"


def quote(value: object) -> str:
    """One shell word that reads back as exactly ``value``: ``shlex.quote`` for printable text,
    bash's ``$'...'`` for text with control characters (never a raw newline)."""
    text = str(value)
    if "\0" in text:
        raise UnsafeText(f"{text!r}: NUL cannot be passed through a shell command or script")
    if not _UNSAFE.search(text):
        return shlex.quote(text)
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif _UNSAFE.match(ch):
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "$'" + "".join(out) + "'"


def has_control_chars(text: str) -> bool:
    """Whether ``text`` holds anything :func:`quote` escapes (a newline, NUL, any control character)."""
    return bool(_UNSAFE.search(text))


def split(line: str) -> list[str]:
    """The words of a command line :func:`join` wrote. Exact for printable words; a ``$'...'`` word
    (one holding a control character) is not decoded. Raises ValueError on an unbalanced quote."""
    return shlex.split(line)


def join(words: Iterable[object]) -> str:
    """A command line: every word quoted, on one line."""
    return " ".join(quote(w) for w in words)


def env_prefix(env: Mapping[str, str], from_environment: Iterable[str] = ()) -> str:
    """``K=V ...`` before a command, each value quoted. Names in ``from_environment`` (secrets) are
    written to read the caller's environment when the line runs, never with a value:
    ``HF_TOKEN="${HF_TOKEN:?...}"`` fails loudly when the variable is not set."""
    secret = set(from_environment)
    words = []
    for key in sorted(env):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UnsafeText(f"{key!r} is not a valid environment variable name")
        if key in secret:
            words.append(f'{key}="${{{key}:?{key} is a secret ftl never writes down: export it first}}"')
        else:
            words.append(f"{key}={quote(env[key])}")
    return " ".join(words)


def comment(text: object) -> str:
    """A ``#`` comment line whose text cannot end the comment: one line, control characters
    escaped (callers put user values in as :func:`quote`-d words)."""
    line = str(text)
    if _UNSAFE.search(line):
        line = _UNSAFE.sub(lambda m: _escape(m.group()), line)
    return f"# {line}"


def one_line(text: object) -> str:
    """``text`` for a console message on one line: control characters shown escaped."""
    return comment(text)[2:]


_ENV_OVERRIDE = re.compile(r"^([+~]?launch\.env\.)([A-Za-z_][A-Za-z0-9_]*)$")


def ftl_command(head: Iterable[object], overrides: Iterable[str]) -> str:
    """An ``ftl ...`` command for the user to paste: every word quoted, on one line, no secret. An
    override that sets a secret in launch.env reads it from the user's environment when pasted
    (``"+launch.env.HF_TOKEN=${HF_TOKEN}"``); any other secret-keyed value is ``<redacted>``, and
    known secret values are cut out of the rest."""
    from launcher.redact import REDACTED, is_secret_key, known_secrets, redact

    secrets = known_secrets()
    words = [quote(w) for w in head]
    for text in overrides:
        key, sep, _ = text.partition("=")
        if sep and is_secret_key(key.lstrip("+~")):
            env = _ENV_OVERRIDE.match(key)
            words.append(f'"{key}=${{{env.group(2)}}}"' if env else quote(f"{key}={REDACTED}"))
        else:
            words.append(quote(redact(text, secrets)))
    return " ".join(words)
