"""Personal data and credentials in the training and eval text (``data.privacy``): found, counted by
kind, file, row and field, and never shown, not even in part.

The finding is done by maintained libraries where one fits: Yelp's ``detect-secrets`` plugins for
credentials (AWS, GitHub, GitLab, Slack, OpenAI and Stripe keys, public IPv4 addresses: their
patterns; JWTs: its check that one decodes as a JWT), with its plugin base for the two tokens it
does not know (Hugging Face, Google API keys); ``phonenumbers`` (the lite build: no geocoding data) for phone numbers,
international ones anywhere and US/Canada ones without a country code; ``python-stdnum`` for the
checksums that keep digits from being taken for cards (Luhn) and IBANs (country format and mod 97).
Written here: the email pattern, the digit runs the checksums then confirm, a JWT's and a private
key's whole extent (the plugins match a prefix or a header line; redacting needs the whole token).

Kinds are tried in a fixed order on a working copy of each string, each match replaced by its
placeholder (``<EMAIL>``) before the next kind looks: a card number is not also counted as a phone
number, and redacting is the same pass as scanning. ``redact`` keeps that copy for the tokenized
cache; the user's files are only ever read.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from launcher.data.rows import DataError

SCAN_VERSION = 1  # bump when what is found changes: files scanned by an earlier version are scanned again
SHOWN_PER_KIND = 10  # locations listed per kind and file; the rest counted

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
CARD_CANDIDATE = re.compile(r"(?<![\d.,])[2-6](?:[ -]?\d){12,18}(?![\d.,]\d)")
IBAN_CANDIDATE = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")
JWT = re.compile(r"eyJ[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]+=*(?:\.[A-Za-z0-9_-]+=*)?")  # header.payload.signature
PRIVATE_KEY_BLOCK = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)", re.S
)


@dataclass(frozen=True)
class Finding:
    """``count`` matches of ``kind`` in one field of one row (``field`` spelled as jq does)."""

    path: str
    row: int
    field: str
    kind: str
    count: int


@dataclass
class Scanner:
    """Scans rows as they are read; keeps what it found. ``scan`` returns the row to use: the
    redacted copy with ``data.privacy=redact``, else the row itself."""

    mode: str
    findings: list[Finding] = field(default_factory=list)

    def scan(self, value: Any, path: str, row: int) -> Any:
        redacted = self._walk(value, "", path, row)
        return redacted if self.mode == "redact" else value

    def _walk(self, value: Any, where: str, path: str, row: int) -> Any:
        if isinstance(value, str):
            text, counts = redact_text(value)
            for kind, n in counts.items():
                self.findings.append(Finding(path, row, redact_text(where or ".")[0], kind, n))
            return text
        if isinstance(value, dict):
            return {k: self._walk(v, f"{where}.{k}", path, row) for k, v in value.items()}
        if isinstance(value, list):
            return [self._walk(v, f"{where}[{i}]", path, row) for i, v in enumerate(value)]
        return value


def scanner_for(mode: str) -> Scanner | None:
    return None if mode == "off" else Scanner(mode)


def remembered(file: Path, digest: str) -> tuple[Path, list[Finding] | None]:
    """(where the findings of a local file whose bytes hash to ``digest`` are kept, and what they
    were if it was scanned before): ``ftl train`` scans each launch's files before it starts, and an
    unchanged file is not scanned again. Places and counts only, like every other record of the scan."""
    from launcher.paths import cache_dir

    record = cache_dir() / "data" / "privacy" / f"v{SCAN_VERSION}-{digest}.json"
    if not record.is_file():
        return record, None
    return record, [Finding(str(file), *row) for row in json.loads(record.read_text())]


def remember(record: Path, findings: list[Finding]) -> None:
    from launcher.files import write_atomic

    record.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps([[f.row, f.field, f.kind, f.count] for f in findings]))


def redact_text(text: str) -> tuple[str, Counter[str]]:
    """``text`` with every finding replaced by ``<KIND>``, and how many of each kind there were."""
    counts: Counter[str] = Counter()
    for kind, find in detectors():
        found = set(find(text))
        for value in sorted(found, key=len, reverse=True):  # a longer match first: it may contain a shorter
            n = text.count(value)
            if n:
                counts[kind] += n
                text = text.replace(value, f"<{kind.upper()}>")
    return text, counts


@cache
def detectors() -> list[tuple[str, Callable[[str], Iterable[str]]]]:
    """(kind, a function yielding the matches in a string), in the order they are tried."""
    from detect_secrets.plugins.aws import AWSKeyDetector
    from detect_secrets.plugins.base import RegexBasedDetector
    from detect_secrets.plugins.github_token import GitHubTokenDetector
    from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
    from detect_secrets.plugins.ip_public import IPPublicDetector
    from detect_secrets.plugins.jwt import JwtTokenDetector
    from detect_secrets.plugins.openai import OpenAIDetector
    from detect_secrets.plugins.slack import SlackDetector
    from detect_secrets.plugins.stripe import StripeDetector

    class HuggingFaceTokenDetector(RegexBasedDetector):
        secret_type = "Hugging Face Token"
        denylist = (re.compile(r"\bhf_[A-Za-z]{34}\b"),)

    class GoogleApiKeyDetector(RegexBasedDetector):
        secret_type = "Google API Key"
        denylist = (re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),)

    def plugin(cls: type) -> Callable[[str], Iterable[str]]:
        # Whole matches, not the plugin's analyze_string: that yields a pattern's groups, e.g. only
        # the "ghp" of a GitHub token, and redacting must cover the whole token.
        return lambda text: (match.group() for pattern in cls.denylist for match in pattern.finditer(text))

    def jwts(text: str) -> Iterator[str]:
        return (m.group() for m in JWT.finditer(text) if JwtTokenDetector.is_formally_valid(m.group()))

    return [
        ("private_key", PRIVATE_KEY_BLOCK.findall),
        ("jwt", jwts),
        ("aws_key", plugin(AWSKeyDetector)),
        ("github_token", plugin(GitHubTokenDetector)),
        ("gitlab_token", plugin(GitLabTokenDetector)),
        ("hf_token", plugin(HuggingFaceTokenDetector)),
        ("openai_key", plugin(OpenAIDetector)),
        ("slack_token", plugin(SlackDetector)),
        ("stripe_key", plugin(StripeDetector)),
        ("google_api_key", plugin(GoogleApiKeyDetector)),
        ("email", lambda text: EMAIL.findall(text) if "@" in text else ()),
        ("card_number", card_numbers),
        ("iban", ibans),
        ("ip_address", lambda text: plugin(IPPublicDetector)(text) if text.count(".") >= 3 else ()),
        ("phone", phone_numbers),
    ]


def card_numbers(text: str) -> Iterator[str]:
    if _digits(text) < 13:
        return
    from stdnum import luhn

    for match in CARD_CANDIDATE.finditer(text):
        digits = re.sub(r"[ -]", "", match.group())
        if 13 <= len(digits) <= 19 and luhn.is_valid(digits):
            yield match.group()


def ibans(text: str) -> Iterator[str]:
    """Each candidate's longest prefix that is a valid IBAN: the pattern may run on into the next word."""
    if _digits(text) < 4:
        return
    from stdnum import iban

    for match in IBAN_CANDIDATE.finditer(text):
        candidate = match.group()
        for end in range(len(candidate), 14, -1):
            if candidate[end - 1] != " " and iban.is_valid(candidate[:end]):
                yield candidate[:end]
                break


def phone_numbers(text: str) -> Iterator[str]:
    if _digits(text) < 7:  # the matcher is the slowest kind: most text has no phone number
        return
    import phonenumbers

    for match in phonenumbers.PhoneNumberMatcher(text, "US", leniency=phonenumbers.Leniency.VALID):
        yield match.raw_string


def _digits(text: str) -> int:
    return sum(map(str.isdigit, text))


# --------------------------------------------------------------------------------------------
# what is said


def counts_by_kind(findings: Iterable[Finding]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for f in findings:
        counts[f.kind] += f.count
    return counts


def summary(findings: Iterable[Finding]) -> str:
    """'3 email, 1 card_number': counts only."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts_by_kind(findings).items()))


def report(findings: list[Finding], mode: str) -> list[str]:
    """What was found, where (file, row, field), and what ``mode`` does about it; never a value."""
    if not findings:
        return []
    what = {
        "warn": "trained on as written (data.privacy=redact replaces them with placeholders in the tokenized "
        "data, data.privacy=refuse stops)",
        "redact": "replaced by placeholders such as <EMAIL> in the tokenized data; your files are unchanged",
        "refuse": "refused (data.privacy=refuse): remove them, or set data.privacy=redact to train on placeholders",
    }[mode]
    lines = [f"privacy: {summary(findings)} in the data: {what}"]
    places: dict[tuple[str, str], list[Finding]] = {}
    for f in findings:
        places.setdefault((f.kind, f.path), []).append(f)
    for (kind, path), found in sorted(places.items()):
        shown = [f"row {f.row} {f.field}" + (f" ({f.count}x)" if f.count > 1 else "") for f in found[:SHOWN_PER_KIND]]
        more = f", and {len(found) - SHOWN_PER_KIND} more rows" if len(found) > SHOWN_PER_KIND else ""
        lines.append(f"  {kind} in {path}: {', '.join(shown)}{more}")
    return lines


def check(findings: list[Finding], mode: str) -> None:
    """Raise the refusal (a DataError: exit 2) when ``mode`` is refuse and something was found."""
    if mode == "refuse" and findings:
        raise DataError("\n".join(report(findings, mode)))


def to_stats(findings: list[Finding]) -> list[list[Any]]:
    """Findings as ``stats['privacy']`` keeps them in the cache's meta.json (no values in them)."""
    return [[f.path, f.row, f.field, f.kind, f.count] for f in findings]


def from_stats(rows: list[list[Any]]) -> list[Finding]:
    return [Finding(*row) for row in rows]
