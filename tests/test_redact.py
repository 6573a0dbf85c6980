"""Secrets given on the command line or in launch.env never reach a file in the run dir."""

from __future__ import annotations

from helpers import TINY, ftl, ftl_env

from launcher.redact import REDACTED, redact_overrides

SECRET = "s3cr3t-" + "x" * 33


def test_redact_overrides_blanks_secret_keys_and_known_values():
    out = redact_overrides(["+launch.env.HF_TOKEN=abc123456", "train.lr=1", f"run.name=a{SECRET}"], {SECRET})
    assert out == [f"+launch.env.HF_TOKEN={REDACTED}", "train.lr=1", f"run.name=a{REDACTED}"]


def test_no_secret_in_run_dir_files(tmp_path):
    run = tmp_path / "run"
    ftl(
        "train",
        *TINY,
        "train.max_steps=3",
        "eval.after_training=false",
        f"+launch.env.HF_TOKEN={SECRET}",
        f"run.dir={run}",
        env=ftl_env(WANDB_API_KEY=SECRET),
    )
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "launch.sh" for p in files) and any(p.name == "config.yaml" for p in files)
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []
