"""ftl attacked as a hostile (or careless) user would: no command executes injected text, deletes or
overwrites what it did not create, prints or writes a secret, accepts a number it cannot train
with, fails late on a path it could have checked, leaves a process behind or ends with a raw
signal code, or trusts a damaged checkpoint.

Three tiers: pure checks (validation, rendering, the CLI in-process: seconds); a tiny run and its
run dir (real `ftl train` processes: the launcher, torchrun, signals); a kill during a write
(processes SIGKILLed while they save).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import TINY, ftl_env

from launcher.cli import main as ftl_main
from launcher.config.compose import compose
from launcher.config.errors import ConfigError, ConfigErrors
from launcher.config.validate import validate
from launcher.data.sources import check_local_rows
from launcher.files import file_hash, mark_dir
from launcher.launch.base import LaunchPlan
from launcher.launch.local import run_foreground
from launcher.paths import ROOT
from launcher.redact import REDACTED, declare, known_secrets, redact
from launcher.rundir import RunPaths
from launcher.rundir.lock import LOCK_ENV, RunDirBusy, RunDirLock, check_free, lock_path
from launcher.rundir.outcome import summarize
from launcher.rundir.write import launch_script
from launcher.shell import comment, ftl_command, join, quote

# Strings an attacker puts in a value: shell metacharacters, command substitution, a newline or a
# carriage return that would end a comment or a line, terminal escapes, Unicode line separators.
# CANARY is relative: an executed one lands in the working directory of the shell that ran it.
HOSTILE = [
    "a 0",
    "a'; touch CANARY; echo '",
    "$(touch CANARY)",
    "`touch CANARY`",
    "x\ntouch CANARY",
    "x\rtouch CANARY",
    "x\n#\ntouch CANARY #",
    "\x1b]0;owned\x07\x1b[2J",
    "a\u2028touch CANARY",
    "back\\slash\\",
    "tab\there",
    "'\"; touch CANARY; echo \"'",
]
SECRET = "hf_" + "s3cr3t" * 6  # a token-like value given on the command line
ENV_SECRET = "wandb-" + "k3y" * 12  # an API key in the environment


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """`ftl ARGV` in this process: (exit code, everything it printed)."""
    try:
        code = ftl_main(list(argv))
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def bash_words(line: str, cwd: Path) -> list[str]:
    """Run a printed `ftl ...` line in bash with `ftl` as a function printing its arguments: the
    words the user's shell would pass (and, if anything was injected, a CANARY)."""
    script = "ftl() { printf '%s\\0' \"$@\"; }\n" + line + "\n"
    out = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, check=True)
    assert not (cwd / "CANARY").exists(), f"the printed command executed injected text: {line!r}"
    return out.stdout.decode().split("\0")[:-1]


def no_canary(root: Path) -> None:
    assert not list(root.rglob("CANARY")), "a hostile string was executed"


def hostile_override(text: str) -> str:
    """A Hydra override value holding ``text`` as a quoted string."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ============================================================================================
# tier 1: pure checks
# --------------------------------------------------------------------------------------------
# injection: every string written into a script or printed as a command is one quoted line


@pytest.mark.parametrize("text", HOSTILE, ids=repr)
def test_a_quoted_word_reads_back_exactly_and_is_one_printable_line(text, tmp_path):
    word = quote(text)
    assert "\n" not in word and "\r" not in word and "\x1b" not in word and "\u2028" not in word
    out = subprocess.run(["bash", "-c", f"printf '%s' {word}"], cwd=tmp_path, capture_output=True, check=True)
    assert out.stdout == text.encode()
    assert comment(join(["ftl", text])).count("\n") == 0
    no_canary(tmp_path)


def test_shell_quoting_lives_in_one_place():
    """launcher/shell.py is the one module that quotes for the shell: no other uses shlex."""
    users = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "launcher").rglob("*.py")
        if "shlex" in p.read_text() and p.name != "shell.py"
    ]
    assert users == []


def test_nul_is_refused_not_quoted():
    from launcher.shell import UnsafeText

    with pytest.raises(UnsafeText, match="NUL"):
        quote("a\0b")


def test_launch_sh_comment_and_commands_never_run_injected_text(tmp_path, monkeypatch):
    """launch.sh as written for hostile overrides and a hostile working directory: `bash -n`
    accepts it, its comment stays one line, and run (with the interpreter replaced by a
    recorder) it executes nothing injected and passes every word intact."""
    work = tmp_path / "work $(touch CANARY)"
    work.mkdir()
    recorder = tmp_path / "python"
    recorder.write_text('#!/usr/bin/env bash\nprintf \'%s\\0\' "$@" > "$REC"\nprintf %s "$HOSTILE" > "$REC.env"\n')
    recorder.chmod(0o755)
    for text in HOSTILE:
        plan = LaunchPlan(
            tmp_path / "run", [[str(recorder), "-m", "launcher.train", "--config", text]], env={"HOSTILE": text}
        )
        monkeypatch.chdir(work)
        script = launch_script(plan, ["train", f"wandb.project={text}", f"run.name={text}"])
        lines = script.split("\n")
        assert lines[1].startswith("# ftl train ") and len(lines) == 5 and lines[4] == "", script
        path = tmp_path / "launch.sh"
        path.write_text(script)
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
        env = {**os.environ, "REC": str(tmp_path / "rec")}
        subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, check=True, capture_output=True)
        assert (tmp_path / "rec").read_bytes().decode().split("\0")[:-1] == ["-m", "launcher.train", "--config", text]
        assert (tmp_path / "rec.env").read_bytes().decode() == text
        no_canary(tmp_path)


@pytest.mark.parametrize("text", HOSTILE, ids=repr)
def test_plans_to_run_line_pastes_back_as_the_same_overrides(text, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = ["recipe=tiny", f"+launch.env.HOSTILE={hostile_override(text)}", f"run.dir={tmp_path / 'run'}"]
    code, out = run_cli(capsys, "plan", *overrides)
    assert code == 0, out
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f\u2028\u2029]", out), "raw control characters reached the terminal"
    line = next(ln for ln in out.split("\n") if "To run:" in ln).split("To run: ", 1)[1]
    assert bash_words(line, tmp_path) == ["train", *overrides]


def test_sweep_create_hints_are_quoted(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out_file = tmp_path / "sw $(touch CANARY)" / "x'y.yaml"
    code, out = run_cli(capsys, "sweep", "create", "lr", "--offline", "--out", str(out_file))
    assert code == 0, out
    commands = [
        ln.strip().split("    (")[0]
        for ln in out.splitlines()
        if ln.strip().startswith(("wandb sweep", "ftl sweep agent --offline", "ftl sweep optuna"))
    ]
    assert len(commands) == 3
    for line in commands:
        assert str(out_file) in bash_words(line.replace("wandb sweep", "ftl sweep", 1), tmp_path)


@pytest.mark.parametrize(
    "override, field",
    [
        (
            "+launch.env.X='a\nb'",
            "launch.env",
        ),  # a real string: the old check printed (key, value) tuples, which escape it
        ("launch.sbatch_args=['--comment', 'a\nb']", "launch.sbatch_args[1]"),
        ("launch.partition='gpu\tx'", "launch.partition"),
        ("launch.setup=['module load x\rtouch CANARY']", "launch.setup[0]"),
        ("launch.job_name='x\x1b[2J'", "launch.job_name"),
    ],
)
def test_slurm_refuses_control_characters_in_real_strings(override, field):
    raw, _, errors = compose(["recipe=tiny", "launch=slurm", override])
    _, more = validate(raw)
    assert [e.path for e in errors + more] == [field], errors + more
    assert "control characters" in str(more[0])


@pytest.mark.parametrize(
    "field", ["wandb.project", "run.name", "model.name", "wandb.tags", "data.train_files", "launch.rdzv_id"]
)
@pytest.mark.parametrize("text", [h for h in HOSTILE if re.search(r"[\x00-\x1f\u2028]", h)], ids=repr)
def test_control_characters_are_refused_in_names_paths_and_words(field, text, capsys):
    value = hostile_override(text)
    override = f"{field}=[{value}]" if field in ("wandb.tags", "data.train_files") else f"{field}={value}"
    code, out = run_cli(
        capsys, "plan", "recipe=tiny", "launch=torchrun" if "rdzv" in field else "launch=local", override
    )
    assert code == 2 and "control characters are not allowed here" in out, out
    assert not re.search(r"[\x00-\x09\x0b-\x1f\u2028]", out), "the error echoes the value escaped"


def test_an_error_never_sends_escape_sequences_to_the_terminal():
    text = str(ConfigErrors([ConfigError("x", "got '\x1b]0;owned\x07\x1b[2J'")]))
    assert "\x1b" not in text and "\x07" not in text and "\\x1b" in text


# --------------------------------------------------------------------------------------------
# deletion: ftl writes only where it may, and replaces only what it made


@pytest.mark.parametrize(
    "where, needle",
    [
        (".", "is the working directory"),
        ("..", "contains the working directory"),
        ("/", "contains the working directory"),
        ("~", "is your home directory"),
        ("a-file", "is a file"),
        ("a-file/below", "cannot be created: "),
        ("foreign", "holds files ftl did not write"),
        ("run/checkpoints/step-1", "sits inside the checkpoints of the run"),
        ("run/nested", "sits inside the ftl run dir"),
    ],
)
def test_run_dir_that_ftl_must_not_write_is_refused(where, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    mark_dir(tmp_path / "run", "run")
    (tmp_path / "run" / "checkpoints" / "step-1").mkdir(parents=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, out = run_cli(capsys, "train", "recipe=tiny", f"run.dir={hostile_override(where)}")
    assert code == 2 and "run.dir: " in out and needle in out, out
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before, "nothing may be written"


def test_resume_never_moves_an_earlier_runs_checkpoints_aside_and_deletes_nothing(tmp_path, capsys, monkeypatch):
    """Its saves would replace and prune the earlier run's checkpoints: they are moved aside whole."""
    from launcher.rundir.resume import set_aside_earlier_run

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    mark_dir(run, "run")
    (run / "checkpoints" / "step-3").mkdir(parents=True)
    (run / "checkpoints" / "step-3" / "weights").write_text("w")
    (run / "checkpoints" / "step-3" / "COMPLETE").write_text("{}")
    code, out = run_cli(capsys, "plan", "recipe=tiny", f"run.dir={run}", "checkpoint.resume=never")
    assert (
        code == 0
        and "checkpoints (step-3) in" in out
        and "moved aside into earlier-<time>/ (nothing is deleted)" in out
    )
    assert (run / "checkpoints" / "step-3").is_dir()  # plan moves nothing
    aside, _ = set_aside_earlier_run(run)
    assert (aside / "checkpoints" / "step-3" / "weights").read_text() == "w" and not (run / "checkpoints").exists()
    assert set_aside_earlier_run(run) is None  # nothing left to move


def test_run_dir_whose_path_holds_a_secret_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)
    code, out = run_cli(capsys, "plan", "recipe=tiny", "run.name=${oc.env:WANDB_API_KEY}")
    assert code == 2 and "would hold a secret" in out and ENV_SECRET not in out
    assert not (tmp_path / "runs").exists()


def fake_run(root: Path) -> Path:
    """A run dir with one complete (hand-made) checkpoint: enough for export's checks, which all
    come before any weight is read."""
    run = root / "run"
    mark_dir(run, "run")
    (run / "config.yaml").write_text("run: {name: x}\n")
    ckpt = run / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"step": 2} ')
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 2, "engine": "single", "files": {"trainer_state.json": 12}}))
    return run


@pytest.mark.parametrize(
    "out, overwrite, needle",
    [
        (".", True, "is the working directory"),
        ("..", True, "contains the working directory"),
        ("run", True, "is the run being exported"),
        ("run/checkpoints/step-2", True, "is the checkpoint being exported"),
        ("run/checkpoints/step-2/hf", True, "sits inside the checkpoints of the run"),
        ("foreign", True, "holds files ftl did not write"),
        ("a-file", True, "is a file"),
        ("~", True, "is your home directory"),
        ("old-export", False, "pass --overwrite"),
    ],
)
def test_export_never_replaces_what_it_did_not_write(out, overwrite, needle, tmp_path, monkeypatch):
    from launcher.artifacts.export import export_checkpoint
    from launcher.artifacts.weights import ArtifactInputError

    monkeypatch.chdir(tmp_path)
    run = fake_run(tmp_path)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("mine")
    (tmp_path / "a-file").write_text("mine")
    mark_dir(tmp_path / "old-export", "export")
    (tmp_path / "old-export" / "config.json").write_text("{}")
    before = {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(ArtifactInputError, match=needle):
        export_checkpoint(run, Path(out).expanduser(), overwrite=overwrite)
    assert {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before, "nothing touched"


def test_export_overwrite_passes_the_checks_for_an_earlier_ftl_export(tmp_path):
    from launcher.artifacts.export import check_out
    from launcher.artifacts.weights import resolve_source

    source = resolve_source(fake_run(tmp_path))
    mark_dir(tmp_path / "old", "export")
    (tmp_path / "old" / "config.json").write_text("{}")
    check_out(tmp_path / "old", source, overwrite=True)  # raises for anything else (see above)


def test_eval_out_and_sweep_out_refuse_foreign_targets(tmp_path, capsys, monkeypatch):
    from launcher.eval.job import EvalInputError, write_job

    monkeypatch.chdir(tmp_path)
    with pytest.raises(EvalInputError, match="is the working directory"):
        write_job(tmp_path, tmp_path / "model", {}, None, None, 0)
    precious = tmp_path / "notes.yaml"
    precious.write_text("mine\n")
    code, out = run_cli(capsys, "sweep", "create", "lr", "--offline", "--out", str(precious))
    assert code == 2 and "was not written by `ftl sweep create`" in out
    assert precious.read_text() == "mine\n"


# --------------------------------------------------------------------------------------------
# secrets: never printed, never written


def test_plan_cfg_job_and_errors_never_print_a_secret(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)
    secret_env = f"+launch.env.HF_TOKEN={SECRET}"
    code, out = run_cli(capsys, "plan", "recipe=tiny", secret_env, "+launch.env.MIRROR=${oc.env:WANDB_API_KEY}")
    assert code == 0 and SECRET not in out and ENV_SECRET not in out, out
    to_run = next(ln for ln in out.splitlines() if "To run:" in ln)
    assert '"+launch.env.HF_TOKEN=${HF_TOKEN}"' in to_run, "the pasted line reads the token from the environment"
    command = next(ln for ln in out.splitlines() if ln.startswith("command"))
    assert 'HF_TOKEN="${HF_TOKEN:?' in command and 'MIRROR="${MIRROR:?' in command

    code, out = run_cli(capsys, "train", "--cfg", "job", "recipe=tiny", secret_env)
    assert code == 0 and SECRET not in out and f"HF_TOKEN: {REDACTED}" in out
    # errors that echo the value, or the whole override
    for bad in (
        [secret_env, f"train.lr={SECRET}"],
        [f"+launch.env.HF_TOKEN={SECRET}'"],
        [secret_env, "wandb.project=${oc.env:WANDB_API_KEY}", "train.lrr=1"],
    ):
        code, out = run_cli(capsys, "plan", "recipe=tiny", *bad)
        assert code == 2 and SECRET not in out and ENV_SECRET not in out, out


def test_multirun_trial_lines_never_print_a_secret(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # seq_len 1 and 2 are invalid: each trial stops at validation, after its line is printed
    code, out = run_cli(capsys, "train", "-m", "recipe=tiny", "train.seq_len=1,2", f"+launch.env.HF_TOKEN={SECRET}")
    assert code == 2 and "trial 0/2" in out and SECRET not in out and f"+launch.env.HF_TOKEN={REDACTED}" in out


def test_sweep_config_holds_no_secret(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)
    out_file = tmp_path / "sweep.yaml"
    code, out = run_cli(
        capsys, "sweep", "create", "lr", f"+launch.env.HF_TOKEN={SECRET}", "--offline", "--out", str(out_file)
    )
    assert code == 0, out
    text = out_file.read_text()
    assert SECRET not in text and "HF_TOKEN" not in text and SECRET not in out
    assert "left out of the sweep's command (secrets): HF_TOKEN" in out
    # a secret under a key that does not say so cannot be left out: refused
    code, out = run_cli(
        capsys, "sweep", "create", "lr", "wandb.project=${oc.env:WANDB_API_KEY}", "--offline", "--out", str(out_file)
    )
    assert code == 2 and "secret" in out and ENV_SECRET not in out


def test_config_changes_notice_never_shows_a_secret(tmp_path):
    from launcher.rundir.write import write_run_dir

    declare([SECRET, SECRET + "-new"])
    for value in (SECRET, SECRET + "-new"):
        raw, _, _ = compose(
            ["recipe=tiny", f"run.dir={tmp_path}", f"+launch.env.HF_TOKEN={value}", f"+launch.env.MIRROR={value}"]
        )
        plan = LaunchPlan(tmp_path, [["python"]], env={"HF_TOKEN": value})
        changes = write_run_dir(raw, plan, tmp_path / "config.yaml", ["train"])
        assert not any(SECRET in c for c in changes), changes
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_redaction_cuts_the_longer_secret_first_and_declared_values_anywhere():
    assert redact(f"x{SECRET}-new y", {SECRET, SECRET + "-new"}) == f"x{REDACTED} y"
    declare([SECRET])
    assert SECRET in known_secrets()
    assert ftl_command(["ftl", "train"], [f"run.name=a{SECRET}"]) == f"ftl train 'run.name=a{REDACTED}'"


# --------------------------------------------------------------------------------------------
# numbers: finite and in range, every one


FLOAT_FIELDS = [
    "train.lr",
    "train.weight_decay",
    "train.min_lr_ratio",
    "train.epochs",
    "train.grad_clip",
    "data.eval_fraction",
    "model.arch.rope_theta",
    "model.arch.rms_norm_eps",
    "launch.gpu_mem_gb",
    "peft.alpha",
    "peft.dropout",
]


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_every_float_must_be_finite(field, value):
    raw, _, errors = compose(["recipe=tiny", "peft=lora", f"{field}={value}"])
    _, more = validate(raw)
    assert [(e.path, "finite" in e.message) for e in errors + more] == [(field, True)], errors + more


@pytest.mark.parametrize(
    "override, field",
    [
        ("data.max_train_examples=-3", "data.max_train_examples"),
        ("train.global_batch_size=-4", "train.global_batch_size"),
        ("eval.max_batches=0", "eval.max_batches"),
        ("train.seed=-1", "train.seed"),
        ("train.seed=4294967296", "train.seed"),
        ("train.max_steps=-2", "train.max_steps"),
        ("checkpoint.keep=0", "checkpoint.keep"),
        ("launch.dist_timeout_s=99999999999", "launch.dist_timeout_s"),
        ("+data.sources=[{path: x.jsonl, weight: -1}]", "data.sources[0].weight"),
    ],
)
def test_negative_and_out_of_range_counts_are_refused(override, field):
    raw, _, errors = compose(["recipe=tiny", override])
    _, more = validate(raw)
    assert field in [e.path for e in errors + more], errors + more


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.arch.num_layers=1000000000000"], "model.arch.num_layers: got 1000000000000; must be <= 1024"),
        (["model.arch.vocab_size=" + "9" * 40], "model.arch.vocab_size: got 9999999999999999999999999999999999999999"),
        (  # bash reads 2**63 as a negative number: the job would never requeue
            ["launch=slurm", "launch.max_requeues=9223372036854775808"],
            "launch.max_requeues: got 9223372036854775808; must be <= 1000",
        ),
        (["launch=slurm", "launch.max_node_requeues=" + "9" * 23], "launch.max_node_requeues: got 99999999999"),
    ],
)
def test_a_count_too_large_to_build_or_for_bash_to_count_is_refused_by_plan(overrides, needle, capsys):
    """An absurd model.arch (as in an absurd config.json) is exit 2, not a MemoryError building it."""
    with within(30):
        code, out = run_cli(capsys, "plan", "recipe=tiny", *overrides)
    assert code == 2 and needle in out and "Traceback" not in out, out


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.micro_batch_size=abc", "train.global_batch_size=8"], ["train.micro_batch_size"]),
        (["model.arch.num_heads=x"], ["model.arch.num_heads"]),
        (["launch.nproc_per_node=two"], ["launch.nproc_per_node"]),
        (["train.grad_accum=x", "train.global_batch_size=8"], ["train.grad_accum"]),
        (["+data.sources=[{path: /no/such, weight: nan}]"], ["data.sources[0].weight", "data.sources[0].path"]),
    ],
)
def test_one_bad_field_causes_no_false_errors_about_the_others(overrides, expected):
    raw, _, errors = compose(["recipe=tiny", *overrides])
    _, more = validate(raw)
    assert sorted(e.path for e in errors + more) == sorted(expected), errors + more


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--temperature", "nan"], "--temperature"),
        (["--top-p", "2"], "--top-p"),
        (["--seed", "-5"], "--seed"),
    ],
)
def test_generate_settings_are_checked_before_any_model_loads(args, needle, tmp_path, capsys):
    code, out = run_cli(capsys, "generate", str(tmp_path / "no-such-model"), "hi", *args)
    assert code == 2 and needle in out and "no such directory" not in out


# --------------------------------------------------------------------------------------------
# late errors: `ftl plan` finds what `ftl train` would


def readonly(path: Path) -> list[str]:
    """A command prefix under which ``path`` cannot be written, even by root (a read-only bind
    mount in a private mount namespace); for another user, plain permissions do it."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return []
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) to make a read-only directory as root")
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"',
        str(path),
    ]


def plan_in(prefix: list[str], cwd: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "launcher", "plan", "recipe=tiny", *overrides],
        cwd=cwd,
        env=ftl_env(PYTHONPATH=str(ROOT), **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unwritable_run_dir_and_cache_are_caught_by_plan(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    out = plan_in(readonly(locked), tmp_path, f"run.dir={locked / 'run'}", FTL_CACHE=str(locked / "cache"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"run.dir: {locked / 'run'} is not writable by this user" in out.stderr
    assert "data.cache: ftl's cache" in out.stderr and "is not writable" in out.stderr


@pytest.mark.parametrize(
    "setup, overrides, needle",
    [
        ("run-file", ["run.dir=RUN"], "is a file, not a directory"),
        ("bad-yaml", ["run.dir=RUN"], "config.yaml is not valid YAML"),
        ("list-yaml", ["run.dir=RUN"], "config.yaml is not a mapping"),
        ("not-ckpt", ["checkpoint.resume=TMP/notckpt/step-1"], "is not a complete checkpoint"),
        (
            "damaged-ckpt",
            ["checkpoint.resume=TMP/run/checkpoints/step-2"],
            "is damaged: trainer_state.json has 3 bytes",
        ),
        ("empty-data", ["data.train_files=[TMP/empty.jsonl]"], "data.train_files[0]: TMP/empty.jsonl is empty"),
        ("no-data-folder", ["data.train_files=[TMP/docs]"], "folder holds no data files"),
        ("model-dir", ["model.source=hf", "model.path=TMP/docs"], "holds no config.json"),
        ("model-file", ["model.source=hf", "model.path=TMP/empty.jsonl"], "is a file"),
    ],
)
def test_plan_catches_what_train_would_fail_on(setup, overrides, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    if setup == "run-file":
        run.write_text("not a dir")
    elif setup in ("bad-yaml", "list-yaml"):
        mark_dir(run, "run")
        (run / "config.yaml").write_text("a: [b\n" if setup == "bad-yaml" else "- a\n- b\n")
    elif setup == "not-ckpt":
        (tmp_path / "notckpt" / "step-1").mkdir(parents=True)
    elif setup == "damaged-ckpt":
        fake_run(tmp_path)
        (run / "checkpoints" / "step-2" / "trainer_state.json").write_text("{}\n")  # truncated to 3 bytes
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("not data")
    overrides = [o.replace("RUN", str(run)).replace("TMP", str(tmp_path)) for o in overrides]
    code, out = run_cli(capsys, "plan", "recipe=tiny", *overrides)
    assert code == 2 and needle.replace("TMP", str(tmp_path)) in out, out


# --------------------------------------------------------------------------------------------
# processes: the lock, exit codes, signals


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run_dir: Path, age_s: float = 0, **fields: object) -> None:
    info = {"pid": os.getpid(), "host": "elsewhere", "token": "t0k", "since": "then", "role": "test", **fields}
    lock_path(run_dir).write_text(json.dumps(info))
    then = time.time() - age_s
    os.utime(lock_path(run_dir), (then, then))


def test_run_dir_lock_refuses_a_second_writer_and_recovers_stale_ones(tmp_path, monkeypatch, capsys):
    import socket

    monkeypatch.delenv(LOCK_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    with RunDirLock(run, "first"):
        with pytest.raises(RunDirBusy, match=f"in use by pid {os.getpid()} on {socket.gethostname()}"):
            RunDirLock(run, "second").acquire()
        assert "in use" in str(check_free(run))
    assert not lock_path(run).exists() and check_free(run) is None
    # stale: a dead pid on this host; a silent holder elsewhere; this same SLURM job, requeued
    for fields, age, env in (
        ({"host": socket.gethostname(), "pid": dead_pid()}, 0, {}),
        ({}, 3600, {}),
        ({"slurm_job": "77"}, 0, {"SLURM_JOB_ID": "77"}),
    ):
        write_lock(run, age, **fields)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        lock = RunDirLock(run, "taker").acquire()
        assert json.loads(lock_path(run).read_text())["pid"] == os.getpid()
        lock.release()
    assert capsys.readouterr().err.count("taking over the stale lock") == 3
    # fresh, on another host, another job: busy; unreadable and fresh: busy too (a writer may be mid-write)
    write_lock(run, 10)
    with pytest.raises(RunDirBusy):
        RunDirLock(run, "x").acquire()
    lock_path(run).write_text("{garbage")
    with pytest.raises(RunDirBusy):
        RunDirLock(run, "x").acquire()


def test_exit_codes_are_0_1_2_130_and_never_a_raw_signal(tmp_path):
    run = tmp_path
    RunPaths(run).exits.mkdir()
    assert summarize(0, run, None)[0] == 0
    assert summarize(130, run, "SIGINT") == (
        130,
        "stopped by SIGINT after a checkpoint; run the same command again to resume",
    )
    assert summarize(2, run, None)[0] == 2
    code, message = summarize(-9, run, None)
    assert code == 1 and "SIGKILL" in message and "out of memory" in message
    assert summarize(-11, run, None) == (1, "the trainer was killed by SIGSEGV")
    assert summarize(137, run, None)[0] == 1
    assert summarize(1, run, "SIGTERM")[0] == 1  # interrupted before the checkpoint
    for rank, code in ((0, 130), (1, 130)):
        (RunPaths(run).exits / f"rank-{rank}.json").write_text(
            json.dumps({"rank": rank, "world_size": 2, "code": code})
        )
    assert summarize(1, run, "SIGTERM")[0] == 130  # torchrun says 1; both ranks say: stopped after a checkpoint
    (RunPaths(run).exits / "rank-1.json").unlink()
    code, message = summarize(1, run, None)
    assert code == 1 and "rank(s) 1 ended without an exit status" in message and "out of memory" in message


FORWARD_CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    run_dir = sys.argv[1]
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    open(os.path.join(run_dir, "child.pid"), "w").write(str(os.getpid()))
    while not got:
        time.sleep(0.05)
    time.sleep(0.5)  # "saving a checkpoint": the launcher must wait
    os.makedirs(os.path.join(run_dir, ".ftl-exit"), exist_ok=True)
    json.dump({"rank": 0, "world_size": 1, "code": 130}, open(os.path.join(run_dir, ".ftl-exit", "rank-0.json"), "w"))
    open(os.path.join(run_dir, "child.signals"), "w").write(" ".join(map(str, got)))
    sys.exit(130)
""")
LAUNCHER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from launcher.launch.base import LaunchPlan
    from launcher.launch.local import run_foreground
    run_dir = Path(sys.argv[1])
    sys.exit(run_foreground(LaunchPlan(run_dir, [[sys.executable, sys.argv[2], str(run_dir)]])))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_the_launcher_hands_a_stop_signal_on_once_and_waits(sig, tmp_path):
    (tmp_path / "child.py").write_text(FORWARD_CHILD)
    (tmp_path / "run_job.py").write_text(LAUNCHER)
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "run_job.py"), str(tmp_path), str(tmp_path / "child.py")],
        env=ftl_env(PYTHONPATH=str(ROOT)),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "child.pid").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    child = int((tmp_path / "child.pid").read_text())
    assert os.getpgid(child) == child != os.getpgid(proc.pid), "the job runs in a process group of its own"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    handed = signal.SIGTERM if sig == signal.SIGHUP else sig  # a hang-up asks the trainers to stop as SIGTERM does
    assert (tmp_path / "child.signals").read_text() == str(int(handed)), "the job got the signal exactly once"
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # waited for, not left behind
    assert f"stopped by {sig.name} after a checkpoint" in err


def test_a_launcher_killed_outright_still_stops_its_job(tmp_path):
    """SIGKILL cannot be handed on: the job, in its own process group, gets SIGTERM from the kernel
    when its launcher dies, and stops as it would on a forwarded one."""
    (tmp_path / "child.py").write_text(FORWARD_CHILD)
    (tmp_path / "run_job.py").write_text(LAUNCHER)
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "run_job.py"), str(tmp_path), str(tmp_path / "child.py")],
        env=ftl_env(PYTHONPATH=str(ROOT)),
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "child.pid").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    while not (tmp_path / "child.signals").exists():
        assert time.monotonic() < deadline, "the job outlived its launcher"
        time.sleep(0.05)
    assert (tmp_path / "child.signals").read_text() == str(int(signal.SIGTERM))


def test_a_rank_killed_by_sigkill_says_it_may_have_run_out_of_memory(tmp_path, capsys):
    plan = LaunchPlan(tmp_path, [[sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]])
    assert run_foreground(plan) == 1
    assert "killed by SIGKILL" in capsys.readouterr().err


TORCHRUN_WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    run = Path(sys.argv[1])
    if int(os.environ["RANK"]) == 1:
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does
    def stop(*_):  # rank 0, stopped by torchrun when its peer died, leaves its record as a trainer rank does
        (run / ".ftl-exit").mkdir(exist_ok=True)
        (run / ".ftl-exit" / "rank-0.json").write_text(json.dumps({"rank": 0, "world_size": 2, "code": 1}))
        sys.exit(1)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(60)
""")


def test_under_torchrun_the_killed_rank_is_named(tmp_path, capsys):
    """Real torchrun (which reports only "failed"), a stand-in trainer: the launcher reads the
    ranks' exit records and names the rank that left none."""
    worker = tmp_path / "worker.py"
    worker.write_text(TORCHRUN_WORKER)
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        str(tmp_path),
    ]
    assert run_foreground(LaunchPlan(tmp_path, [argv])) == 1
    err = capsys.readouterr().err
    assert "rank(s) 1 ended without an exit status" in err and "out of memory" in err


# --------------------------------------------------------------------------------------------
# checkpoints: verified before they are trusted


def tiny_engine():
    import torch

    from launcher.config.schema import FtlConfig, TrainConfig
    from launcher.engines import build_engine
    from launcher.runtime.distributed import DistInfo

    torch.manual_seed(0)
    cfg = FtlConfig(train=TrainConfig(lr=1e-2, precision="fp32"))
    engine = build_engine(cfg, torch.nn.Linear(4, 4), DistInfo(), torch.device("cpu"))
    engine.setup(total_steps=10)
    return engine


@pytest.mark.parametrize("damage", ["truncate", "delete", "marker", "state"])
def test_a_damaged_checkpoint_is_named_moved_aside_and_the_previous_one_resumes(damage, tmp_path):
    from launcher.runtime.distributed import DistInfo
    from launcher.train.checkpoint import TrainerState, list_complete, resume_checkpoint, save_checkpoint

    engine = tiny_engine()
    for step in (2, 4):
        save_checkpoint(tmp_path, TrainerState(step=step), engine, DistInfo(), keep=5, barrier=lambda: None)
    bad = tmp_path / "checkpoints" / "step-4"
    if damage == "truncate":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        (bad / "engine_state.pt").unlink()
    elif damage == "marker":
        (bad / "COMPLETE").write_text("{not json")
    else:
        (bad / "trainer_state.json").write_text('{"step": "x"}   ')
    warnings: list[str] = []
    path, state = resume_checkpoint("auto", tmp_path, tiny_engine(), DistInfo(), warnings.append)
    assert state.step == 2 and path.name == "step-2"
    assert len(warnings) == 1 and str(bad) in warnings[0] and "damaged" in warnings[0]
    assert [s for s, _ in list_complete(tmp_path)] == [2]
    assert len(list((tmp_path / "checkpoints").glob("step-4.corrupt-*"))) == 1, "moved aside, never deleted"


def test_a_checkpoint_marked_complete_that_does_not_load_is_skipped(tmp_path):
    from launcher.runtime.distributed import DistInfo
    from launcher.train.checkpoint import TrainerState, resume_checkpoint, save_checkpoint

    engine = tiny_engine()
    for step in (1, 3):
        save_checkpoint(tmp_path, TrainerState(step=step), engine, DistInfo(), keep=5, barrier=lambda: None)
    bad = tmp_path / "checkpoints" / "step-3" / "model.safetensors"
    bad.write_bytes(
        b"\0" * bad.stat().st_size
    )  # the same size, garbage inside, and garbage when hashed: only loading can tell
    marker = json.loads((bad.parent / "COMPLETE").read_text())
    marker["sha256"]["model.safetensors"] = file_hash(bad)
    (bad.parent / "COMPLETE").write_text(json.dumps(marker))
    warnings: list[str] = []
    path, state = resume_checkpoint("auto", tmp_path, tiny_engine(), DistInfo(), warnings.append)
    assert state.step == 1 and "does not load" in warnings[0]


# --------------------------------------------------------------------------------------------
# hostile files: every file ftl is given goes through launcher.safe_read (a FIFO is never opened,
# nothing expands exponentially or recurses without bound, every parse error is exit 2 naming it)


@contextlib.contextmanager
def within(seconds: int):
    """Fail, instead of hanging the suite, when the block blocks (a FIFO opened for reading)."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


GOOD_ROW = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


def config_dir(root: Path, recipes: dict[str, str | bytes | None]) -> Path:
    """A config dir whose recipes/ holds ``recipes`` (name -> text or bytes; None: a FIFO)."""
    conf = root / "myconf"
    (conf / "recipes").mkdir(parents=True)
    for name, text in recipes.items():
        path = conf / "recipes" / f"{name}.yaml"
        if text is None:
            os.mkfifo(path)
        else:
            path.write_bytes(text.encode() if isinstance(text, str) else text)
    return conf


def test_a_fifo_as_a_data_file_or_a_recipe_is_refused_without_being_opened(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FTL_CONFIG_DIR", "")
    os.mkfifo(tmp_path / "train.jsonl")
    os.mkfifo(tmp_path / "given.yaml")
    conf = config_dir(tmp_path, {"pipe": None})
    with within(20):
        code, out = run_cli(capsys, "plan", "recipe=tiny", f"data.train_files=[{tmp_path / 'train.jsonl'}]")
        assert code == 2 and f"{tmp_path / 'train.jsonl'} is a named pipe (FIFO), not a regular file" in out, out
        code, out = run_cli(capsys, "plan", str(tmp_path / "given.yaml"))
        assert code == 2 and f"{tmp_path / 'given.yaml'} is a named pipe (FIFO)" in out, out
        code, out = run_cli(capsys, "plan", "--config-dir", str(conf), "recipe=pipe")
        assert code == 2 and f"{conf / 'recipes' / 'pipe.yaml'} is a named pipe (FIFO)" in out, out
        code, out = run_cli(
            capsys, "plan", "--config-dir", str(conf), "recipe=tiny"
        )  # the FIFO beside it breaks nothing else
        assert code == 0, out
        code, out = run_cli(capsys, "recipes", "--config-dir", str(conf))
        assert code == 0 and "pipe" in out and "named pipe (FIFO)" in out, out
        code, out = run_cli(capsys, "recipes", "--config-dir", str(conf), "--copy", "pipe", str(tmp_path / "copy.yaml"))
        assert code == 2 and "named pipe (FIFO)" in out and not (tmp_path / "copy.yaml").exists(), out


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "{run}", "--out", "{bad}"],
        ["export", "{bad}"],
        ["eval", "{bad}"],
        ["eval", "{run}", "--out", "{bad}"],
        ["eval", "{run}", "--baseline", "{bad}"],
        ["generate", "{bad}", "hi"],
        ["chat", "{bad}"],
        ["sweep", "create", "tiny", "--offline", "--out", "{bad}"],
    ],
    ids=" ".join,
)
@pytest.mark.parametrize("bad", ["", "out\x1b[2J"], ids=["empty", "escape"])
def test_an_empty_or_control_character_path_argument_is_exit_2_before_anything_is_read(
    argv, bad, tmp_path, capsys, monkeypatch
):
    """`ftl export "$RUN" --out "$OUT"` with OUT unset: '' is the working directory, or the default,
    never silently; an escape sequence in a path would reach the terminal in every message."""
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(capsys, *[a.format(run=tmp_path / "no-run", bad=bad) for a in argv])
    needle = "got an empty path" if not bad else "got 'out\\x1b[2J'; newlines and other control characters"
    assert code == 2 and needle in out and "\x1b" not in out, out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "dest, needle",
    [
        ("", "DEST: got an empty path"),  # Path("") is the working directory
        ("a\nb.yaml", "DEST: got 'a\\nb.yaml'; newlines and other control characters are not allowed"),
        ("link.yaml", "DEST: link.yaml exists; ftl does not overwrite it"),  # a dangling symlink
    ],
)
def test_recipes_copy_to_an_empty_a_control_character_or_a_dangling_link_dest_writes_nothing(
    dest, needle, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    os.symlink(tmp_path / "elsewhere.yaml", tmp_path / "link.yaml")
    code, out = run_cli(capsys, "recipes", "--copy", "tiny", dest)
    assert code == 2 and needle in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.yaml"]


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("syntax", "train:\n  lr: [1e-3\n", "syntax.yaml, line 3, column 1: invalid YAML"),
        ("latin1", b"# caf\xe9\ntrain:\n  lr: 1.0e-3\n", "latin1.yaml, line 1: not valid UTF-8"),
        ("bomb", BILLION_LAUGHS, "bomb.yaml: its aliases (*name) expand to more than 100,000 YAML nodes"),
        ("listed", "- a\n- b\n", "listed.yaml: expected a mapping of config keys"),
    ],
)
def test_a_broken_recipe_in_a_config_dir_breaks_only_the_commands_that_use_it(
    name, text, needle, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("FTL_CONFIG_DIR", "")
    conf = config_dir(
        tmp_path, {name: text, "mine": "defaults:\n  - override /model: tiny-llama\ntrain:\n  lr: 2.0e-3\n"}
    )
    with within(20):
        code, out = run_cli(capsys, "plan", "--config-dir", str(conf), f"recipe={name}", "train.lr=1e-3")
        assert code == 2 and needle in out and "Traceback" not in out, out
        assert run_cli(capsys, "plan", "--config-dir", str(conf), "recipe=tiny")[0] == 0
        raw, choices, errors = compose(["recipe=mine"])
        assert choices["recipe"] == "mine" and raw["train"]["lr"] == 2e-3 and errors == []


@pytest.mark.parametrize("text", [None, BILLION_LAUGHS, "name: [x\n"], ids=["fifo", "bomb", "syntax"])
def test_a_broken_option_of_a_config_dir_group_breaks_only_the_runs_that_choose_it(text, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FTL_CONFIG_DIR", "")
    conf = config_dir(tmp_path, {})
    (conf / "model").mkdir()
    (conf / "model" / "mine.yaml").write_text(
        (ROOT / "conf" / "model" / "tiny-llama.yaml").read_text().replace("name: tiny-llama", "name: mine")
    )
    if text is None:
        os.mkfifo(conf / "model" / "broken.yaml")
    else:
        (conf / "model" / "broken.yaml").write_text(text)
    with within(20):
        code, out = run_cli(capsys, "plan", "--config-dir", str(conf), "recipe=tiny", "model=broken")
        assert code == 2 and f"model: {conf / 'model' / 'broken.yaml'}" in out and "Traceback" not in out, out
        code, out = run_cli(capsys, "plan", "--config-dir", str(conf), "recipe=tiny", "model=mine")
        assert code == 0 and "mine" in out, out


@pytest.mark.parametrize("where", ["recipe", "override"])
def test_an_option_named_by_a_path_outside_the_config_dirs_is_refused(where, tmp_path, capsys, monkeypatch):
    """`override /model: ../../x` in a recipe's defaults (or model=../../x) would read any YAML on disk."""
    monkeypatch.setenv("FTL_CONFIG_DIR", "")
    (tmp_path / "outside.yaml").write_text("name: outside\n")
    escape = os.path.relpath(tmp_path / "outside", ROOT / "conf" / "model")
    conf = config_dir(tmp_path, {"escape": f"defaults:\n  - override /model: {escape}\n"})
    if where == "recipe":
        args, needle = (
            ["--config-dir", str(conf), "recipe=escape"],
            f"{conf / 'recipes' / 'escape.yaml'}: defaults: 'override /model: {escape}' names a file by a path",
        )
    else:
        args, needle = (
            ["recipe=tiny", f"model={escape}"],
            f"model: '{escape}': an option is named by its file's stem in model/",
        )
    code, out = run_cli(capsys, "plan", *args)
    assert code == 2 and needle in out, out


def test_an_empty_config_dir_is_refused_not_read_as_the_working_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FTL_CONFIG_DIR", "")
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(capsys, "plan", "--config-dir", "", "recipe=tiny")
    assert code == 2 and "--config-dir: got an empty path" in out, out


@pytest.mark.parametrize(
    "row, needle",
    [
        ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "row 2: invalid JSON (nested too deeply"),
        ('{"messages": [', "row 2: invalid JSON (Expecting value"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "row 2: not valid UTF-8"),
        ('{"text": "a completion row among chat rows"}', "row 2: missing 'messages'"),
        ('{"messages": [{"role": "robot", "content": "beep"}]}', "row 2: message 1 has unknown role 'robot'"),
    ],
)
def test_bad_data_rows_stop_train_before_the_run_dir_is_written(row, needle, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_bytes(GOOD_ROW.encode() + b"\n" + (row.encode() if isinstance(row, str) else row) + b"\n")
    run = tmp_path / "run"
    with within(60):
        code, out = run_cli(
            capsys, "train", *TINY, f"run.dir={run}", f"data.train_files=[{data}]", "data.eval_fraction=0.5"
        )
    assert code == 2 and f"data: {data}, {needle}" in out and "Traceback" not in out, out
    assert not run.exists()
    raw, _, _ = compose(["recipe=tiny", f"data.train_files=[{data}]", "data.on_error=skip"])
    check_local_rows(validate(raw)[0].data)  # skipped rows are the trainer's to count, not an error


HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
}


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"num_attention_heads": 0}, "num_attention_heads: got 0; allowed: an integer from 1 to 1024"),
        ({"hidden_size": "64"}, "hidden_size: got '64'; allowed: an integer"),
        ({"vocab_size": int("9" * 400)}, "vocab_size: got 99999999999999999999...(400 characters)"),
        ({"num_hidden_layers": 10**12}, "num_hidden_layers: got 1000000000000; allowed: an integer from 1 to 1024"),
        ({"model_type": "qwen2_moe", "num_hidden_layers": 10**12}, "num_hidden_layers: got 1000000000000"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps: got nan; allowed: a finite number"),
        ({"rope_theta": "ten thousand"}, "rope_theta: got 'ten thousand'"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings: got 'false'; allowed: true or false"),
        ({"num_key_value_heads": 3}, "num_key_value_heads: 3 does not divide num_attention_heads 4"),
        ({"hidden_size": 66}, "hidden_size: 66 is not a multiple of num_attention_heads 4"),
        ({"intermediate_size": [128]}, "intermediate_size: got [128]"),
        ({"model_type": ["llama"]}, "model_type ['llama'] is not a decoder family"),
        ({"mlp_only_layers": "all", "model_type": "qwen2_moe"}, "mlp_only_layers: got 'all'"),
    ],
)
def test_a_malformed_config_json_is_exit_2_naming_the_file_and_key(change, needle, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**HF_CONFIG, **change}))
    with within(30):
        code, out = run_cli(capsys, "plan", "recipe=tiny", "model.source=hf", f"model.path={model}")
    assert code == 2 and f"model.path: {model / 'config.json'}: {needle}" in out and "Traceback" not in out, out


@pytest.mark.parametrize("baseline", ["missing", "fifo", "plain-dir"])
def test_a_bad_eval_baseline_is_exit_2_before_the_out_dir_is_written_or_a_model_loaded(
    baseline, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("FTL_CONFIG_DIR", "")
    model = tmp_path / "export"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(HF_CONFIG))  # no weights: loading it would fail differently
    path = tmp_path / baseline
    if baseline == "fifo":
        os.mkfifo(path)
    elif baseline == "plain-dir":
        path.mkdir()
    with within(30):
        code, out = run_cli(
            capsys, "eval", str(model), "recipe=tiny", "--baseline", str(path), "--out", str(tmp_path / "o")
        )
    needle = "is neither a run dir" if baseline == "plain-dir" else "no such directory"
    assert code == 2 and f"ftl eval: --baseline: {path}" in out and needle in out, out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content, needle",
    [
        ("[" * 100_000, "config.json, invalid JSON (nested too deeply"),
        (None, "config.json is a named pipe (FIFO)"),
        ('{"model_type": "llama",\n "hidden_size": }', "config.json, line 2: invalid JSON"),
    ],
)
def test_an_unreadable_config_json_is_exit_2_naming_it(content, needle, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    if content is None:
        os.mkfifo(model / "config.json")
    else:
        (model / "config.json").write_text(content)
    with within(30):
        code, out = run_cli(capsys, "plan", "recipe=tiny", "model.source=hf", f"model.path={model}")
    assert code == 2 and needle in out and "Traceback" not in out, out


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("swap", "model.safetensors does not hold what was saved (its sha256 differs"),
        ("rename", "it holds step 2, not the step 9 its name says (a renamed directory?)"),
        ("edit", "trainer_state.json says step 7, its COMPLETE marker step 4 (edited by hand?)"),
    ],
)
def test_a_checkpoint_is_trusted_by_content_and_step_not_by_size_or_name(damage, needle, tmp_path):
    """A shard swapped for another of the same size, a step dir renamed to outrank the newer ones,
    a step edited in trainer_state.json: each is named, moved aside, and the newest sound one resumes."""
    from launcher.runtime.distributed import DistInfo
    from launcher.train.checkpoint import TrainerState, resume_checkpoint, save_checkpoint

    engine = tiny_engine()
    for step in (2, 4):
        save_checkpoint(tmp_path, TrainerState(step=step), engine, DistInfo(), keep=5, barrier=lambda: None)
        engine.model.weight.data += 1  # another state each time: same sizes, other bytes
    root = tmp_path / "checkpoints"
    if damage == "swap":
        shutil.copy(root / "step-2" / "model.safetensors", root / "step-4" / "model.safetensors")
        bad, good = root / "step-4", 2
    elif damage == "rename":
        os.rename(root / "step-2", root / "step-9")
        bad, good = root / "step-9", 4
    else:
        state = root / "step-4" / "trainer_state.json"
        state.write_text(state.read_text().replace('"step": 4', '"step": 7'))
        bad, good = root / "step-4", 2
    warnings: list[str] = []
    path, state = resume_checkpoint("auto", tmp_path, tiny_engine(), DistInfo(), warnings.append)
    assert state.step == good and path.name == f"step-{good}", warnings
    assert len(warnings) == 1 and str(bad) in warnings[0] and needle in warnings[0], warnings
    assert len(list(root.glob(f"{bad.name}.corrupt-*"))) == 1, "moved aside, never deleted"


# ============================================================================================
# tier 2: a tiny run


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """3 steps with a hostile W&B project, a token on the command line and an API key in the
    environment; a checkpoint every step."""
    work = tmp_path_factory.mktemp("hostile work $(touch CANARY)")
    run = work / "run"
    note = hostile_override("p\ntouch CANARY #")
    argv = [
        *TINY,
        "train.max_steps=3",
        "checkpoint.every_steps=1",
        "checkpoint.keep=5",
        "eval.after_training=false",
        f"+launch.env.NOTE={note}",
        f"+launch.env.HF_TOKEN={SECRET}",
        f"run.dir={hostile_override(str(run))}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "train", *argv],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
        env=ftl_env(PYTHONPATH=str(ROOT), WANDB_API_KEY=ENV_SECRET),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run, proc


def test_a_hostile_run_writes_and_prints_no_secret_and_its_launch_sh_runs_nothing_injected(hostile_run):
    run, proc = hostile_run
    for secret in (SECRET, ENV_SECRET):
        assert secret not in proc.stdout + proc.stderr
        assert not [p for p in run.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    script = (run / "launch.sh").read_text()
    assert script.splitlines()[1].startswith("# ftl train ") and len(script.splitlines()) == 4
    assert 'HF_TOKEN="${HF_TOKEN:?' in script and REDACTED not in script.splitlines()[3], (
        "launch.sh reads the token from the environment"
    )
    assert subprocess.run(["bash", "-n", str(run / "launch.sh")]).returncode == 0
    assert RunPaths(run).marker.is_file() and not lock_path(run).exists()
    # launch.sh run without the token stops before anything starts
    out = subprocess.run(
        ["bash", str(run / "launch.sh")],
        env={k: v for k, v in os.environ.items() if k != "HF_TOKEN"},
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "HF_TOKEN is a secret ftl never writes down" in out.stderr
    no_canary(run.parent)


def test_rerun_skips_a_truncated_checkpoint_and_shows_no_secret_among_the_changes(hostile_run):
    run, _ = hostile_run
    bad = run / "checkpoints" / "step-3" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    argv = [
        *TINY,
        "train.max_steps=3",
        "checkpoint.every_steps=1",
        "checkpoint.keep=5",
        "eval.after_training=false",
        "+launch.env.NOTE=calm",
        f"+launch.env.HF_TOKEN={SECRET}x",
        f"run.dir={hostile_override(str(run))}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "train", *argv],
        cwd=run.parent,
        capture_output=True,
        text=True,
        timeout=600,
        env=ftl_env(PYTHONPATH=str(ROOT), WANDB_API_KEY=ENV_SECRET),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"checkpoint {run / 'checkpoints' / 'step-3'} is damaged (model.safetensors has 100 bytes" in proc.stderr
    assert "resuming from" in proc.stdout + proc.stderr and "(step 2)" in proc.stdout + proc.stderr
    assert "launch.env.NOTE: 'p\\ntouch CANARY #' -> 'calm'" in proc.stderr and SECRET not in proc.stdout + proc.stderr
    assert (run / "checkpoints" / "step-3" / "COMPLETE").is_file(), "step 3 trained again"


def test_sigterm_to_the_launcher_stops_the_trainer_after_a_checkpoint_and_a_second_writer_is_refused(tmp_path):
    run = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "launcher",
        "train",
        *TINY,
        "train.max_steps=100000",
        "eval.after_training=false",
        f"run.dir={run}",
    ]
    log = tmp_path / "log"
    with open(log, "w") as f:
        launcher = subprocess.Popen(
            argv, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, env=ftl_env(PYTHONPATH=str(ROOT))
        )
    deadline = time.monotonic() + 300
    while "step 2/" not in log.read_text():
        assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    holder = json.loads(lock_path(run).read_text())
    assert holder["role"] == "trainer rank 0" and holder["pid"] != launcher.pid
    second = subprocess.run(
        argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=ftl_env(PYTHONPATH=str(ROOT))
    )
    assert second.returncode == 2 and f"is in use by pid {holder['pid']}" in second.stderr
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=300) == 130, log.read_text()[-3000:]
    with pytest.raises(ProcessLookupError):
        os.kill(holder["pid"], 0)  # the trainer is not left behind
    text = log.read_text()
    assert "stopped by SIGTERM at step" in text and "ftl: stopped by SIGTERM after a checkpoint" in text
    assert list((run / "checkpoints").glob("step-*")) and not lock_path(run).exists()


# ============================================================================================
# tier 3: a kill during a write


RESAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    from test_hostile import tiny_engine
    from launcher.train import checkpoint
    from launcher.runtime.distributed import DistInfo
    run_dir, mode = sys.argv[1], sys.argv[3]
    engine = tiny_engine()
    if mode == "window":  # killed in the one moment a re-saved step has its old copy moved aside
        original = checkpoint._replace_dir
        checkpoint._replace_dir = lambda tmp, final: original(tmp, final, lambda: os.kill(os.getpid(), signal.SIGKILL))
        checkpoint.save_checkpoint(run_dir, checkpoint.TrainerState(step=5), engine, DistInfo(), keep=1, barrier=lambda: None)
    else:  # re-save step 5 forever, until killed at a random moment
        open(os.path.join(run_dir, "started"), "w").close()
        while True:
            checkpoint.save_checkpoint(run_dir, checkpoint.TrainerState(step=5), engine, DistInfo(), keep=1, barrier=lambda: None)
""")


def test_a_kill_while_a_step_is_saved_again_always_leaves_a_complete_checkpoint(tmp_path):
    from launcher.runtime.distributed import DistInfo
    from launcher.train.checkpoint import TrainerState, list_complete, resume_checkpoint, save_checkpoint, verify

    save_checkpoint(tmp_path, TrainerState(step=5), tiny_engine(), DistInfo(), keep=1, barrier=lambda: None)
    script = tmp_path / "resave.py"
    script.write_text(RESAVE)
    env = ftl_env(PYTHONPATH=str(ROOT))
    here = str(Path(__file__).parent)
    assert (
        subprocess.run([sys.executable, str(script), str(tmp_path), here, "window"], env=env).returncode
        == -signal.SIGKILL
    )
    found = list_complete(tmp_path)
    assert [s for s, _ in found] == [5] and found[0][1].name == ".replaced-step-5" and verify(found[0][1]) is None
    for delay in (0.3, 0.7, 1.1):  # kills at arbitrary moments of a re-save loop
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), here, "loop"], env=env)
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        (tmp_path / "started").unlink()
        found = list_complete(tmp_path)
        assert [s for s, _ in found] == [5], [p.name for p in (tmp_path / "checkpoints").iterdir()]
        path, state = resume_checkpoint("auto", tmp_path, tiny_engine(), DistInfo(), pytest.fail)
        assert state.step == 5
    save_checkpoint(tmp_path, TrainerState(step=5), tiny_engine(), DistInfo(), keep=1, barrier=lambda: None)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-5"], "leftovers pruned"


def test_a_sweep_spec_that_is_a_fifo_an_alias_bomb_or_huge_is_refused(tmp_path, capsys, monkeypatch):
    """Sweep specs go through the same reader as recipes: no hang, no expansion, exit 2 naming the file."""
    monkeypatch.setenv("FTL_CONFIG_DIR", "")
    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "bomb.yaml").write_text(BILLION_LAUGHS)
    (tmp_path / "huge.yaml").write_text(
        "method: grid\nparameters:\n  train.lr:\n    values: [" + "1," * 400_000 + "]\n"
    )
    with within(20):
        code, out = run_cli(
            capsys, "sweep", "create", str(tmp_path / "huge.yaml"), "--offline", "--out", str(tmp_path / "s.yaml")
        )
        assert code == 2 and "huge.yaml: more than 100,000 YAML nodes" in out, (
            out
        )  # not composed first: no minute, no GB
        code, out = run_cli(
            capsys, "sweep", "create", str(tmp_path / "pipe.yaml"), "--offline", "--out", str(tmp_path / "s.yaml")
        )
        assert code == 2 and "named pipe (FIFO)" in out and not (tmp_path / "s.yaml").exists(), out
        code, out = run_cli(
            capsys, "sweep", "create", str(tmp_path / "bomb.yaml"), "--offline", "--out", str(tmp_path / "s.yaml")
        )
        assert code == 2 and "expand to more than 100,000 YAML nodes" in out and not (tmp_path / "s.yaml").exists(), out
