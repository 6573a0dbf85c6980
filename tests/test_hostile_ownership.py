"""ftl attacked as a hostile (or careless) user would, second round: a user's folder taken for a run
dir, an earlier run's metrics truncated, a hint printed with an unquoted value, a secret in what
the trainer or `ftl eval` prints and writes (W&B's record of the command line included), exports
the group cannot read, a lock held by a zombie or shaped as a directory, and a launch.sh replay
of a preprocess-job run.

Pure checks first (seconds), then one tiny run with W&B offline that the secret and export
checks share.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY, ftl, ftl_env
from test_hostile import HOSTILE, run_cli

from launcher.files import mark_dir
from launcher.paths import ROOT
from launcher.rundir.lock import LockInfo, RunDirBusy, RunDirLock, check_free, lock_path, stale_reason
from launcher.rundir.resume import CheckpointInfo, Verdict, finished_message, refusal, set_aside_earlier_run
from launcher.rundir.write import launch_script

# A planted value: spaces, command substitution, both quotes, a semicolon.
PLANTED = "a b$(touch CANARY)'\";x"


# --------------------------------------------------------------------------------------------
# run-dir ownership: only ftl's marker makes a dir ftl's


def test_a_folder_with_config_and_launch_sh_but_no_marker_is_refused_and_untouched(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / "launch.sh").write_text("#!/bin/sh\necho my own script\n")
    before = {p.name: p.read_text() for p in mine.iterdir()}
    for command in ("plan", "train"):
        code, out = run_cli(capsys, command, *TINY, f"run.dir={mine}")
        assert code == 2 and f"run.dir: {mine} exists and holds files ftl did not write (no .ftl-run marker)" in out, (
            out
        )
        assert "move these files away" in out and "Traceback" not in out
    assert {p.name: p.read_text() for p in mine.iterdir()} == before, "nothing written into the user's folder"


def test_a_run_dir_inside_a_look_alike_folder_is_not_refused_as_inside_a_run(tmp_path, capsys, monkeypatch):
    """The look-alike counts as no run dir for nesting either: only the marker makes one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "config.yaml").write_text("x: 1\n")
    (tmp_path / "proj" / "launch.sh").write_text("true\n")
    code, out = run_cli(capsys, "plan", *TINY, f"run.dir={tmp_path / 'proj' / 'run'}")
    assert code == 0 and "sits inside the ftl run dir" not in out, out


def test_resume_never_moves_the_earlier_runs_metrics_aside_too(tmp_path, capsys, monkeypatch):
    """An earlier run with no checkpoint left (checkpoint.every_steps=0) still has its metrics: a
    new run must not truncate them."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    mark_dir(run, "run")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "eval.json").write_text('{"after": {"step": 1}}\n')
    code, out = run_cli(capsys, "plan", *TINY, f"run.dir={run}", "checkpoint.resume=never")
    assert code == 0 and "the earlier run's metrics.jsonl, eval.json in" in out and "moved aside" in out, out
    assert (run / "metrics.jsonl").is_file(), "plan moves nothing"
    aside, names = set_aside_earlier_run(run)
    assert names == ["metrics.jsonl", "eval.json"] and aside.parent == run
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n' and not (
        run / "metrics.jsonl"
    ).exists()


# --------------------------------------------------------------------------------------------
# every printed hint is quoted


def _verdict(run_dir: Path) -> Verdict:
    ckpt = CheckpointInfo(
        path=run_dir / "checkpoints" / "step-4",
        step=4,
        world_size=1,
        engine="single",
        total_steps=4,
        train_samples=8,
        config={},
    )
    return Verdict(ckpt, total_steps=4)


def bash_words(text: str, cwd: Path) -> list[str]:
    """The words bash makes of ``text`` (any injected command would leave a CANARY in ``cwd``)."""
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {text}"], cwd=cwd, capture_output=True, check=True)
    assert not (cwd / "CANARY").exists(), f"the hint executed injected text: {text!r}"
    return out.stdout.decode().split("\0")[:-1]


def printable(text: str) -> bool:
    return text.isprintable()  # shlex reads these; bash's $'...' form (control characters) it does not


@pytest.mark.parametrize("text", [PLANTED, *HOSTILE], ids=repr)
def test_the_new_run_hints_are_one_safe_shell_word_naming_the_new_dir(text, tmp_path):
    """The "a new run" hint is one shell word, and Hydra reads it back as a run.dir beside this
    run's: run.name would leave a run given by run.dir (or a SLURM run's runs/<name>-slurm) where it is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_dir = tmp_path / text.replace("/", "_")
    argv = ["train", "recipe=tiny", f"run.dir={run_dir}", "run.name=x"]
    hint = finished_message(_verdict(run_dir), run_dir).split("a new run:", 1)[1].strip().split(", or ", 1)[0]
    line = next(ln for ln in refusal(_verdict(run_dir), run_dir, argv).splitlines() if "a new run:" in ln)
    for shown, want in ((hint, 1), (line.split("a new run:", 1)[1], 5)):
        words = bash_words(shown, tmp_path)
        assert len(words) == want and not any(w.startswith("run.dir=") for w in words[:-1]), words
        override = OverridesParser.create().parse_override(words[-1])
        assert override.key_or_group == "run.dir" and override.value() == f"{run_dir}-2", shown
        assert not printable(text) or shlex.split(shown) == words


@pytest.mark.parametrize("text", [PLANTED, *HOSTILE], ids=repr)
def test_the_wandb_sync_hint_quotes_the_sweep_dir(text, tmp_path):
    from launcher.sweep.agents import wandb_sync_command

    sweep_dir = tmp_path / text.replace("/", "_")
    command = wandb_sync_command(sweep_dir)
    assert not printable(text) or shlex.split(command) == ["wandb", "sync", f"{sweep_dir}/*/wandb/offline-run-*"]
    (sweep_dir / "t1" / "wandb" / "offline-run-1").mkdir(parents=True)  # the shell expands the pattern, not the name
    assert bash_words(command.removeprefix("wandb "), tmp_path) == [
        "sync",
        str(sweep_dir / "t1" / "wandb" / "offline-run-1"),
    ]


# --------------------------------------------------------------------------------------------
# the run dir's lock


def test_a_lock_held_by_a_zombie_is_stale(tmp_path):
    child = subprocess.Popen(["true"])  # exits at once; not waited for, it stays a zombie
    try:
        for _ in range(200):
            if Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        mark_dir(tmp_path, "run")
        lock_path(tmp_path).write_text(
            json.dumps(
                {"pid": child.pid, "host": os.uname().nodename, "token": "t", "since": "then", "role": "trainer rank 0"}
            )
        )
        info = LockInfo(pid=child.pid, host=os.uname().nodename, token="t", since="then", role="trainer rank 0")
        assert stale_reason(info, tmp_path) == f"pid {child.pid} is gone"
        assert check_free(tmp_path) is None
    finally:
        child.wait()


def test_a_lock_that_is_a_directory_is_refused_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    mark_dir(run, "run")
    lock_path(run).mkdir()
    (lock_path(run) / "x").write_text("")
    old = time.time() - 3600  # an "unreadable" lock this old would be taken over
    os.utime(lock_path(run), (old, old))
    with pytest.raises(RunDirBusy, match=r"\.ftl-lock is a directory, not the lock file ftl writes"):
        RunDirLock(run, "test").acquire()
    assert "is a directory" in (check_free(run) or "")
    code, out = run_cli(capsys, "train", *TINY, f"run.dir={run}", "train.max_steps=1")
    assert code == 2 and ".ftl-lock is a directory" in out and "Traceback" not in out, out
    assert lock_path(run).is_dir() and (lock_path(run) / "x").is_file(), "ftl removes nothing it did not write"


# --------------------------------------------------------------------------------------------
# launch.sh of a preprocess-job run, replayed


def test_a_replayed_launch_sh_of_a_preprocess_job_run_chains_the_jobs(tmp_path, monkeypatch):
    from launcher.session import prepare_run

    monkeypatch.chdir(tmp_path)
    run = prepare_run([*TINY, "launch=slurm", "launch.preprocess_job=true", f"run.dir={tmp_path / 'run x'}"])
    script = launch_script(run.plan, ["train", "launch=slurm", "launch.preprocess_job=true"])
    assert "{previous_job}" not in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"  # records its words, answers as `sbatch --parsable` does: "id;cluster"
    fake.write_text(
        '#!/usr/bin/env bash\nn=$(( $(ls "$REC" | wc -l) + 41 ))\nprintf \'%s\\0\' "$@" > "$REC/$n"\necho "$n;cluster"\n'
    )
    fake.chmod(0o755)
    (tmp_path / "rec").mkdir()
    (tmp_path / "launch.sh").write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REC": str(tmp_path / "rec")}
    subprocess.run(["bash", str(tmp_path / "launch.sh")], cwd=tmp_path, env=env, check=True, capture_output=True)
    first, second = (tmp_path / "rec" / "41").read_bytes(), (tmp_path / "rec" / "42").read_bytes()
    assert first.decode().split("\0")[:-1] == ["--parsable", str(tmp_path / "run x" / "preprocess.sbatch")]
    assert second.decode().split("\0")[:-1] == [
        "--parsable",
        "--dependency=afterok:41",
        str(tmp_path / "run x" / "job.sbatch"),
    ]


# --------------------------------------------------------------------------------------------
# one tiny run (W&B offline): secrets and file modes

ENV_SECRET = "hf_" + "0wn3rsh1p" * 4  # HF_TOKEN in the environment
LAUNCH_SECRET = "lnch-" + "t0k" * 5  # given as +launch.env.MY_API_TOKEN=...


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny run whose eval data quotes both secrets, trained and then evaluated with `ftl eval`
    (in process), W&B offline, the secret given in +launch.env to both."""
    root = tmp_path_factory.mktemp("secret")
    data = root / "eval.jsonl"
    rows = [
        [
            {"role": "user", "content": f"my token is {ENV_SECRET} and {LAUNCH_SECRET}"},
            {"role": "assistant", "content": f"ok {ENV_SECRET} {LAUNCH_SECRET}"},
        ]
    ] * 2
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    run_dir = root / "run"
    env = ftl_env(HF_TOKEN=ENV_SECRET, WANDB_MODE="offline")
    env.pop("WANDB_API_KEY", None)
    common = [
        f"data.eval_files=[{data}]",
        "eval.generate=true",
        "eval.num_generate=2",
        "eval.max_new_tokens=4",
        "eval.show_samples=2",
        "eval.max_batches=1",
        "wandb.mode=offline",
        f"+launch.env.MY_API_TOKEN={LAUNCH_SECRET}",
    ]
    train = ftl(
        "train",
        *[a for a in TINY if not a.startswith("wandb.")],
        f"run.dir={run_dir}",
        "eval.before_training=true",
        *common,
        "train.max_steps=2",
        env=env,
    )
    evaluated = ftl("eval", str(run_dir), *common, "--out", str(root / "eval-out"), env=env)
    return {
        "root": root,
        "run_dir": run_dir,
        "outputs": [train.stdout, train.stderr, evaluated.stdout, evaluated.stderr],
        "train": [
            "train",
            *[a for a in TINY if not a.startswith("wandb.")],
            f"run.dir={run_dir}",
            "eval.before_training=true",
            *common,
        ],
        "env": env,
    }


def test_no_secret_in_anything_the_run_and_ftl_eval_print_or_write(secret_run):
    root = secret_run["root"]
    run_dir = secret_run["run_dir"]
    assert isinstance(root, Path) and isinstance(run_dir, Path)
    evals = json.loads((run_dir / "eval.json").read_text())
    assert "<redacted>" in evals["after"]["samples"][0]["question"], "the samples are there, cut"
    assert "<redacted>" in json.loads((root / "eval-out" / "eval.json").read_text())["after"]["samples"][0]["question"]
    wandb_files = list(run_dir.rglob("*.wandb"))
    assert len(wandb_files) >= 2, "the run and `ftl eval` each wrote an offline W&B run"
    for text in secret_run["outputs"]:
        assert isinstance(text, str) and ENV_SECRET not in text and LAUNCH_SECRET not in text
    for path in [*run_dir.rglob("*"), *(root / "eval-out").rglob("*")]:
        if path.is_file():
            content = path.read_bytes()
            assert ENV_SECRET.encode() not in content and LAUNCH_SECRET.encode() not in content, path


def test_an_export_gets_the_users_umask(secret_run):
    run_dir = secret_run["run_dir"]
    assert isinstance(run_dir, Path)
    out = run_dir.parent / "export"
    old = os.umask(0o022)  # the child inherits it
    try:
        ftl("export", str(run_dir), "--out", str(out))
    finally:
        os.umask(old)
    again = ftl("export", str(run_dir), "--out", str(out), "--overwrite")
    assert f"{out} holds an earlier export: replacing it once the new one is complete" in again.stdout + again.stderr
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert all(mode == (0o755 if p.is_dir() else 0o644) for p, mode in modes.items()), {
        str(p): oct(m) for p, m in modes.items()
    }
    assert any(p.suffix == ".safetensors" for p in modes)


@pytest.mark.parametrize(
    "entry", [["launcher.train", "--config"], ["launcher.eval.job", "--job"]], ids=["trainer", "eval-rank"]
)
def test_the_trainer_and_eval_ranks_print_no_secret(entry, tmp_path):
    """What the processes `ftl train` and `ftl eval` start print (here: the path they could not
    read, which holds the token) is cut of secrets, as the launcher's console is."""
    missing = tmp_path / ENV_SECRET / "file"
    proc = subprocess.run(
        [sys.executable, "-m", entry[0], entry[1], str(missing)],
        cwd=ROOT,
        env=ftl_env(HF_TOKEN=ENV_SECRET),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "<redacted>" in proc.stderr, proc.stderr
    assert ENV_SECRET not in proc.stdout + proc.stderr


def test_ftl_says_before_it_rewrites_an_earlier_runs_config_and_launch_sh(secret_run):
    """Run last on the shared run: it continues it for one more step."""
    run_dir = secret_run["run_dir"]
    assert isinstance(run_dir, Path)
    proc = ftl(*secret_run["train"], "train.max_steps=3", env=secret_run["env"])  # type: ignore[misc]
    said = proc.stderr
    assert f"ftl: {run_dir} holds an earlier run: replacing its config.yaml and launch.sh" in said, said
    assert "train.max_steps: 2 -> 3" in said and said.index("replacing its config.yaml") < said.index("ftl: launching")
