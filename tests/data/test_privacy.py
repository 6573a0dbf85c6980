"""data.privacy: personal data and credentials found by kind, file, row and field without a value
ever shown; refused (exit 2, nothing launched), redacted in the tokenized cache only, clean demo data."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from launcher.config.schema import DataConfig
from launcher.data.build import build_datasets
from launcher.data.privacy import redact_text
from launcher.data.types import DataError
from launcher.paths import asset
from tests.helpers import TINY, ftl, ftl_env


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


# Fake but well-formed: each passes its kind's checksum or shape. Built here, not written out, so the
# repository holds no string that looks like a live credential.
PLANTED = {
    "email": "jane.roe@example.org",
    "phone": "+44 20 7946 0958",
    "card_number": "4111 1111 1111 1111",
    "iban": "DE89 3704 0044 0532 0130 00",
    "ip_address": "203.0.113.77",
    "aws_key": "AKIA" + "IOSFODNN7EXAMPLE",
    "github_token": "ghp_" + "x1Y2z3" * 6,
    "hf_token": "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh",
    "openai_key": "sk-" + "a1" * 10 + "T3BlbkFJ" + "b2" * 10,
    "slack_token": "xoxb-" + "123456789012-abcdefghij",
    "google_api_key": "AIza" + "Sy" + "D" * 33,
    "jwt": _b64({"alg": "HS256", "typ": "JWT"}) + "." + _b64({"sub": "42"}) + ".c2lnbmF0dXJlX2J5dGVz",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----",
}
# Fragments that would give a value away even partly (the card's last group is shared by other cards:
# its unbroken digits are what must not appear).
FRAGMENTS = [v for v in PLANTED.values()] + ["jane.roe", "7946 0958", "41111111", "0532 0130", "IOSFODNN", "x1Y2z3"]


def leaked(text: str) -> list[str]:
    return [f for f in FRAGMENTS if f in text]


def test_every_kind_is_found_counted_and_replaced() -> None:
    text = " ... ".join(f"{kind}: {value}" for kind, value in PLANTED.items())
    redacted, counts = redact_text(text)
    assert dict(counts) == {kind: 1 for kind in PLANTED}
    assert leaked(redacted) == []
    for kind in PLANTED:
        assert f"{kind}: <{kind.upper()}>" in redacted


@pytest.mark.parametrize(
    "text",
    [
        "Set train.lr=1e-4 and seq_len 2048; step 1000 of 12000 at 2026-12-07 10:32.",
        "transformers 4.46.0, torch 2.13.0, address 192.168.1.20 or 10.0.0.1 or 127.0.0.1.",
        "Order 1234 5678 9012 3456 (no Luhn), run id 1733560000123, port 29500, 65,536 tokens.",
        "DE00 1234 5678 9012 3456 78 is no IBAN; a dog@ sign; sk-not-a-key; hf_short.",
        "A hash 3f786850e387550fdab836ed7e6dc881de23001b and eyJnotajwt.eyJ.",
    ],
)
def test_ordinary_technical_text_is_not_flagged(text: str) -> None:
    assert redact_text(text) == (text, {})


def test_demo_data_scans_clean() -> None:
    from launcher.data.privacy import Scanner
    from launcher.data.sources import read_rows

    scanner = Scanner("warn")
    files = sorted(Path(asset("demo")).rglob("*.jsonl"))
    assert len(files) >= 6
    rows = 0
    for file in files:
        for row in read_rows(str(file)):
            scanner.scan(row.value, row.path, row.number)
            rows += 1
    assert rows > 1000 and scanner.findings == []


# --------------------------------------------------------------------------------------------
# in preprocessing


def chat(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def planted_rows() -> list[dict[str, Any]]:
    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(8)]
    rows[2] = chat(f"Mail {PLANTED['email']} or {PLANTED['email']}", "Noted.")
    rows[5] = chat("Pay how?", f"Card {PLANTED['card_number']}, token {PLANTED['github_token']}.")
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))


def test_warn_reports_kind_file_row_and_field(tok: Any, tmp_path: Path) -> None:
    from launcher.data.privacy import from_stats, report

    train = write_jsonl(tmp_path / "train.jsonl", planted_rows())
    ds, _ = build_datasets(DataConfig(train_files=[str(train)]), tok, seq_len=128, seed=0)
    found = {(f.row, f.field, f.kind, f.count) for f in from_stats(ds.stats["privacy"])}
    assert found == {
        (3, ".messages[0].content", "email", 2),
        (6, ".messages[1].content", "card_number", 1),
        (6, ".messages[1].content", "github_token", 1),
    }
    lines = report(from_stats(ds.stats["privacy"]), "warn")
    assert lines[0].startswith("privacy: 1 card_number, 2 email, 1 github_token in the data")
    assert f"  email in {train}: row 3 .messages[0].content (2x)" in lines
    assert leaked("\n".join(lines)) == []
    assert "Card 4111" in tok.decode(ds.examples[5]["input_ids"])  # warn trains on them as written


def test_redact_replaces_in_the_tokens_only(tok: Any, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", planted_rows())
    before = train.read_bytes()
    ds, _ = build_datasets(DataConfig(train_files=[str(train)], privacy="redact"), tok, seq_len=128, seed=0)
    text = "".join(tok.decode(e["input_ids"]) for e in ds.examples)
    assert "Mail <EMAIL> or <EMAIL>" in text and "Card <CARD_NUMBER>, token <GITHUB_TOKEN>." in text
    assert leaked(text) == []
    assert train.read_bytes() == before


def test_refuse_names_every_finding_and_no_value(tok: Any, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", planted_rows())
    evals = write_jsonl(tmp_path / "eval.jsonl", [chat("Call me", f"at {PLANTED['phone']}")])
    cfg = DataConfig(train_files=[str(train)], eval_files=[str(evals)], privacy="refuse")
    with pytest.raises(DataError) as e:
        build_datasets(cfg, tok, seq_len=128, seed=0)
    assert "1 card_number, 2 email, 1 github_token, 1 phone" in str(e.value)
    assert f"phone in {evals}: row 1 .messages[1].content" in str(e.value)
    assert leaked(str(e.value)) == []


def test_off_does_not_look(tok: Any, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", planted_rows())
    ds, _ = build_datasets(DataConfig(train_files=[str(train)], privacy="off"), tok, seq_len=128, seed=0)
    assert "privacy" not in ds.stats


# --------------------------------------------------------------------------------------------
# the CLI, end to end


def every_file_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


def test_ftl_train_refuses_with_nothing_launched(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", planted_rows())
    run_dir = tmp_path / "run"
    proc = ftl("train", *TINY, f"data.train_files=[{train}]", "data.privacy=refuse", f"run.dir={run_dir}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.privacy=refuse" in proc.stderr and "card_number in" in proc.stderr
    assert not run_dir.exists()
    assert leaked(proc.stdout + proc.stderr) == []


def test_ftl_train_and_preprocess_print_no_value(tmp_path: Path) -> None:
    """warn: told before the launch and by the trainer; redact: the eval text the run dir keeps (eval
    samples, the side-by-side page) holds placeholders. Nothing printed or written holds a value."""
    train = write_jsonl(tmp_path / "train.jsonl", planted_rows())
    evals = write_jsonl(tmp_path / "eval.jsonl", [chat(f"Reach {PLANTED['email']}?", f"Yes: {PLANTED['phone']}")] * 2)
    env = ftl_env(FTL_CACHE=str(tmp_path / "cache"))
    common = [*TINY, f"data.train_files=[{train}]", "train.max_steps=2", "eval.generate=true", "eval.max_new_tokens=4"]
    pre = ftl("preprocess", *common, env=env)
    assert "privacy: 1 card_number, 2 email, 1 github_token in the data: trained on as written" in pre.stdout
    warned = ftl("train", *common, f"run.dir={tmp_path / 'warn'}", env=env)
    assert "ftl: privacy: 1 card_number, 2 email, 1 github_token" in warned.stderr
    assert "personal data or credentials: 1 card_number, 2 email, 1 github_token" in warned.stdout + warned.stderr
    redacted = ftl(
        "train", *common, f"data.eval_files=[{evals}]", "data.privacy=redact", f"run.dir={tmp_path / 'redact'}", env=env
    )
    assert "replaced by placeholders" in redacted.stderr
    written = every_file_text(tmp_path / "warn") + every_file_text(tmp_path / "redact")
    assert leaked(pre.stdout + pre.stderr + warned.stdout + warned.stderr + redacted.stdout + redacted.stderr) == []
    assert leaked(written) == []
    assert "<EMAIL>" in every_file_text(tmp_path / "redact")  # the eval text the run kept, redacted


def test_ftl_train_scans_an_unchanged_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan before each launch remembers a file's findings by its content: relaunching over an
    unchanged file does not scan it again; a changed file is scanned anew."""
    from launcher.data import privacy
    from launcher.data.sources import check_local_rows

    monkeypatch.setenv("FTL_CACHE", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "train.jsonl", planted_rows())
    cfg = DataConfig(train_files=[str(train)])
    first = check_local_rows(cfg)
    assert privacy.summary(first) == "1 card_number, 2 email, 1 github_token"
    records = list((tmp_path / "cache" / "data" / "privacy").iterdir())
    assert len(records) == 1 and leaked(records[0].read_text()) == []

    def no_scan(text: str) -> Any:
        raise AssertionError("an unchanged file was scanned again")

    monkeypatch.setattr(privacy, "redact_text", no_scan)
    assert check_local_rows(cfg) == first
    with pytest.raises(DataError, match="refused"):
        check_local_rows(DataConfig(train_files=[str(train)], privacy="refuse"))
    write_jsonl(train, planted_rows()[:4])
    with pytest.raises(AssertionError, match="scanned again"):
        check_local_rows(cfg)
    monkeypatch.undo()
    monkeypatch.setenv("FTL_CACHE", str(tmp_path / "cache"))
    assert privacy.summary(check_local_rows(cfg)) == "2 email"
