"""Sweeps (launcher/sweep/).

What is real here and what is not: no W&B server is reachable from the test machines, so nothing
creates a sweep on W&B or runs `wandb agent` against one. What these tests use instead is W&B's own
code wherever it runs without a server: the sweep-config schema of the `sweeps` package (wandb[sweeps],
what wandb's controller validates with), its search engine to draw trials, and the agent's own
expansion of `${args_no_hyphens}` (wandb.sdk.launch.sweeps.utils). The SLURM test runs trials drawn
that way (`ftl sweep agent --offline`) as real jobs on the local two-node cluster: the same job script,
trial record, in-allocation launch and requeue path a W&B agent's trial takes, minus the agent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ftl_env, wandb_offline_attempts
from slurm_cluster import local_cluster

from launcher.config.errors import ConfigErrors
from launcher.config.search_path import hydra_quote
from launcher.sweep.agents import render_sweep_script
from launcher.sweep.multirun import trial_dir, trial_dir_name
from launcher.sweep.spec import SWEEP_DIR, load_spec
from launcher.sweep.trial import sweep_trial
from launcher.sweep.wandb_config import expand_command, import_sweeps, schema_violations, wandb_sweep_config

FTL = [sys.executable, "-m", "launcher"]
FAST = ["train.max_steps=4", "eval.max_batches=1", "launch.dist_timeout_s=60"]


def run_ftl(
    *args: str, cwd: Path, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FTL, *args], cwd=cwd, env=env or ftl_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def spec_file(tmp_path: Path, method: str, parameters: dict, overrides: list[str], name: str = "t") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "method": method,
                "metric": {"name": "eval/loss", "goal": "minimize"},
                "overrides": overrides,
                "parameters": parameters,
            }
        )
    )
    return path


# --------------------------------------------------------------------------------------------
# specs and the W&B sweep config


@pytest.mark.parametrize("path", sorted(SWEEP_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_specs_make_configs_wandb_accepts(path):
    spec = load_spec(path.stem)
    config = wandb_sweep_config(spec)
    assert schema_violations(config) == []
    sweeps = import_sweeps()
    validated = sweeps.SweepConfig(config)  # raises on a schema violation
    assert validated["command"] == [
        "${env}",
        "${interpreter}",
        "-m",
        "launcher",
        "train",
        *spec.overrides,
        "${args_no_hyphens}",
    ]
    assert set(validated["parameters"]) == set(spec.parameters)


def test_create_writes_the_config_and_says_how_to_run_it_offline(tmp_path):
    env = {k: v for k, v in ftl_env().items() if k != "WANDB_API_KEY"}
    out = run_ftl(
        "sweep",
        "create",
        "lr",
        "--out",
        str(tmp_path / "s.yaml"),
        cwd=tmp_path,
        env={**env, "NETRC": str(tmp_path / "none")},
    )
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load((tmp_path / "s.yaml").read_text())
    assert config["method"] == "bayes" and config["command"][-1] == "${args_no_hyphens}"
    assert config["command"][:5] == ["${env}", "${interpreter}", "-m", "launcher", "train"]
    assert "wandb sweep --project ftl" in out.stdout and "ftl sweep agent --offline" in out.stdout
    # the written W&B config is a spec too: the same search space offline
    assert load_spec(str(tmp_path / "s.yaml")).overrides == load_spec("lr").overrides


def test_bad_spec_exits_2_naming_every_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "method: nope\nmetric: {name: eval/loss, goal: up}\nfoo: 1\n"
        "parameters:\n  train.lr: {min: 1, max: 0, distribution: log_uniform_values}\n  train.seed: {values: []}\n"
    )
    out = run_ftl("sweep", "create", str(bad), cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    for needle in (
        "- foo: unknown sweep field",
        "- method: got 'nope'",
        "- metric.goal: got 'up'",
        "- parameters.train.lr: log_uniform_values needs numbers min < max",
        "- parameters.train.seed.values",
    ):
        assert needle in out.stderr, needle
    # ftl's own validation of the trials it would run: unknown keys, bad values
    bad.write_text(
        "metric: {name: eval/loss}\noverrides: [recipe=tiny, wandb.mode=auto]\nparameters:\n  train.lrr: {values: [1]}\n"
    )
    out = run_ftl("sweep", "create", str(bad), cwd=tmp_path)
    assert out.returncode == 2 and "- parameters.train.lrr: unknown key; did you mean train.lr" in out.stderr, (
        out.stderr
    )
    out = run_ftl("sweep", "create", "lr", "wandb.mode=disabled", cwd=tmp_path)
    assert out.returncode == 2 and "- wandb.mode: disabled: a W&B sweep's trials must report to W&B" in out.stderr, (
        out.stderr
    )
    assert not (tmp_path / "runs").exists()


def test_agent_expansion_of_drawn_trials_is_accepted_by_ftl_plan(tmp_path):
    """W&B's search engine draws trials from the shipped spec; W&B's agent code expands the sweep
    command with them; `ftl plan` accepts the resulting `ftl train` arguments as they are."""
    spec = load_spec("lr")
    config = wandb_sweep_config(spec)
    sweeps = import_sweeps()
    runs = []
    for _ in range(2):
        run = sweeps.next_run(config, runs)
        runs.append(sweeps.SweepRun(name=str(len(runs)), state=sweeps.RunState.running, config=run.config))
        params = {k: v["value"].item() if hasattr(v["value"], "item") else v["value"] for k, v in run.config.items()}
        argv = expand_command(config["command"], params, os.environ)
        assert argv[:5] == ["/usr/bin/env", "python", "-m", "launcher", "train"]
        assert argv[5:] == [*spec.overrides, *(f"{k}={v}" for k, v in params.items())]
        out = run_ftl("plan", *argv[5:], cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert f"lr {params['train.lr']:g} cosine, warmup {params['train.warmup_steps']}" in out.stdout


def test_a_trial_composes_its_parameters_into_a_run_dir_named_by_its_run_id(tmp_path):
    env = {
        "WANDB_SWEEP_ID": "sw1",
        "WANDB_RUN_ID": "r1",
        "FTL_SWEEP_OVERRIDES": json.dumps(["strategy=ddp", "launch.nproc_per_node=2"]),
    }
    trial = sweep_trial(["recipe=tiny", f"run.dir={hydra_quote(str(tmp_path / 'x y'))}", "train.lr=0.01"], env)
    assert trial is not None and trial.run_id == "r1" and trial.backend == "local"
    assert trial.run_dir == tmp_path / "x y-sweep-sw1" / "r1"
    from launcher.session import load_config

    cfg = load_config(trial.overrides).cfg  # what config.yaml will hold, for every rank
    assert cfg.train.lr == 0.01 and cfg.launch.nproc_per_node == 2 and cfg.run.dir == str(trial.run_dir)
    assert sweep_trial(["recipe=tiny"], {"WANDB_RUN_ID": "r1"}) is None, "a run id alone is not a sweep"
    with pytest.raises(ConfigErrors, match=re.escape("train.lr: 'train.lr=1': the sweep's command already sets it")):
        sweep_trial(["recipe=tiny", "train.lr=0.01"], {**env, "FTL_SWEEP_OVERRIDES": '["train.lr=1"]'})


def test_hydra_quote_round_trips_any_path():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for value in ["/a b/c", "it's", "a\\", "a\\'b", "x,y", "${oc.env:HOME}", "a=b"]:
        (override,) = OverridesParser.create().parse_overrides([f"run.dir={hydra_quote(value)}"])
        assert override.value() == value


@pytest.mark.parametrize("offline", [False, True], ids=["wandb-agent", "offline"])
def test_sweep_job_script_renders_and_parses(tmp_path, offline):
    from launcher.session import load_config

    cfg = load_config(["recipe=tiny", "launch=slurm", "launch.nodes=2", "strategy=ddp"]).cfg
    hostile = "ent/proj/a b'c\";$(touch CANARY)"
    text = render_sweep_script(
        cfg, tmp_path / "sweep", hostile, ["launch=slurm", "x='y z'"], offline, "/venv/bin/python", tmp_path
    )
    path = tmp_path / "sweep.sbatch"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, check=False).returncode == 0
    assert "#SBATCH --nodes=2\n" in text and "#SBATCH --requeue\n" in text and "#SBATCH --signal=B:USR1@120\n" in text
    assert ('"$python" -m wandb agent --count 1' in text) != offline and ('cp -- "$1"' in text) == offline
    assert 'exec "$python" -m launcher.sweep replay "$FTL_SWEEP_JOB"' in text
    assert not [line for line in text.splitlines() if line.lstrip().startswith("srun")], (
        "the trial's own job.sbatch runs srun"
    )
    (export,) = [line for line in text.splitlines() if line.startswith("export FTL_SWEEP_OVERRIDES=")]
    shown = subprocess.run(
        ["bash", "-c", export + '; printf %s "$FTL_SWEEP_OVERRIDES"'], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(shown) == ["launch=slurm", "x='y z'"]


# --------------------------------------------------------------------------------------------
# offline: Hydra multirun and Optuna, tiny model


def test_multirun_two_trials_write_two_run_dirs_and_a_table(tmp_path):
    out = run_ftl("train", "-m", "recipe=tiny", "wandb.mode=disabled", *FAST, "train.lr=1e-3,3e-3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    base = tmp_path / "runs" / "tiny-multirun"
    names = sorted(p.name for p in base.iterdir())
    assert [re.fullmatch(r"train\.lr_(0\.00[13])-[0-9a-f]{10}", n).group(1) for n in names] == ["0.001", "0.003"], names  # type: ignore[union-attr]
    for name, lr in zip(names, [0.001, 0.003]):
        assert yaml.safe_load((base / name / "config.yaml").read_text())["train"]["lr"] == lr
    rows = re.findall(r"^\s+(\d)\s+0\s+eval/loss=(\d+\.\d+)\s.*(train\.lr=\S+)$", out.stdout, re.MULTILINE)
    assert [(r[0], r[2]) for r in rows] == [("0", "train.lr=0.001"), ("1", "train.lr=0.003")], out.stdout
    assert re.search(r"^best: trial [01] \(eval/loss=\d", out.stdout, re.MULTILINE)


def test_a_trial_dir_is_named_by_its_overrides_sanitised_bounded_and_hashed(tmp_path):
    fixed = ["recipe=tiny"]
    hostile = [
        'data.train_files=["a\'; echo x/../y"]',
        "+launch.env.HF_TOKEN=hf_abcdefgh12345678",
        "train.lr=" + "9" * 200,
    ]
    name = trial_dir_name([*fixed, *hostile], hostile)
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,80}-[0-9a-f]{10}", name) and "hf_abcdefgh" not in name and "/" not in name, (
        name
    )
    assert trial_dir_name([*fixed, "train.lr=0.001"], ["train.lr=0.001"]).startswith("train.lr_0.001-")
    names = {
        trial_dir_name(t, t[1:]) for t in (["recipe=tiny", "a=1"], ["recipe=tiny", "a=2"], ["recipe=other", "a=1"])
    }
    assert len(names) == 3  # other values, or other fixed overrides: another dir
    # swept alone (a=1) or beside other values (a=1,2): the same trial finds the same dir
    (tmp_path / trial_dir_name(["recipe=tiny", "a=1"], [])).mkdir()
    assert trial_dir(tmp_path, ["recipe=tiny", "a=1"], ["a=1"]) == tmp_path / trial_dir_name(["recipe=tiny", "a=1"], [])
    assert trial_dir(tmp_path, ["recipe=tiny", "a=2"], ["a=2"]) == tmp_path / trial_dir_name(
        ["recipe=tiny", "a=2"], ["a=2"]
    )


ROW = re.compile(r"^\s+(\d)\s+(\d+)\s+eval/loss=(\d+\.\d+)\s+(\d+\.\d+)\s.*train\.lr=(\S+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory):
    """`ftl train -m RECIPE train.lr=0.001` with a recipe file of 2 steps: one trial, complete."""
    work = tmp_path_factory.mktemp("sweeps")
    recipe = work / "mine.yaml"
    recipe.write_text(
        (Path(__file__).parents[2] / "recipes" / "tiny.yaml").read_text().replace("max_steps: 20", "max_steps: 2")
    )
    out = run_ftl(
        "train", "-m", str(recipe), "eval.max_batches=1", "launch.dist_timeout_s=60", "train.lr=1e-3", cwd=work
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return work, recipe


def sweep_again(work: Path, recipe: Path, lrs: str) -> subprocess.CompletedProcess[str]:
    return run_ftl(
        "train", "-m", str(recipe), "eval.max_batches=1", "launch.dist_timeout_s=60", f"train.lr={lrs}", cwd=work
    )


def test_a_sweep_with_other_values_runs_its_own_trials_and_reports_only_them(first_sweep):
    """The trial dirs used to be numbered: this sweep's trial 0 (lr 0.002) found the first
    sweep's trial 0 (lr 0.001) complete and reported its loss as lr 0.002's."""
    work, recipe = first_sweep
    out = sweep_again(work, recipe, "2e-3,1e-3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("is complete: step 2 of 2") == 1  # lr 0.001's own trial, run with these very settings
    dirs = {
        yaml.safe_load((d / "config.yaml").read_text())["train"]["lr"]: d
        for d in (work / "runs" / "mine-multirun").iterdir()
    }
    assert sorted(dirs) == [0.001, 0.002] and len(list((work / "runs" / "mine-multirun").iterdir())) == 2
    rows = ROW.findall(out.stdout)
    assert [(r[0], r[1], r[4]) for r in rows] == [("0", "0", "0.002"), ("1", "0", "0.001")], out.stdout
    for _, _, metric, loss, lr in rows:  # every number shown is its own trial's
        trained = [json.loads(x) for x in (dirs[float(lr)] / "metrics.jsonl").read_text().splitlines()]
        assert [m["lr"] for m in trained][-1] == float(lr) and f"{trained[-1]['loss']:.4f}" == loss
        assert f"{json.loads((dirs[float(lr)] / 'eval.json').read_text())['after']['loss']:.4f}" == metric


def test_a_trial_dir_holding_other_settings_is_refused_before_anything_runs(first_sweep):
    work, recipe = first_sweep
    before = {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("*") if p.is_file()}
    text = recipe.read_text()
    recipe.write_text(text.replace("max_steps: 2", "max_steps: 3"))  # the recipe edited: same overrides, other settings
    try:
        out = sweep_again(work, recipe, "1e-3,5e-4")
    finally:
        recipe.write_text(text)
    assert out.returncode == 2, out.stderr[-3000:]
    assert re.search(
        r"trial 0 \(train\.lr=0\.001\) in \S*mine-multirun/[0-9a-f]{10} holds a run with other settings", out.stderr
    ), out.stderr
    assert "train.max_steps: 2 -> 3" in out.stderr and "Nothing was run" in out.stderr
    assert "best:" not in out.stdout and "eval/loss=" not in out.stdout
    assert {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("*") if p.is_file()} == before


def test_an_optuna_study_started_in_the_same_second_gets_a_dir_of_its_own(tmp_path):
    from launcher.sweep.optuna_search import new_dir

    first = new_dir(tmp_path / "runs" / "tiny-optuna-t-20260101-000000")
    (first / "0").mkdir()
    second = new_dir(first)
    assert second.name == first.name + "-2" and list(second.iterdir()) == [] and (first / "0").is_dir()


def test_optuna_two_trials_on_the_tiny_model(tmp_path):
    spec = spec_file(
        tmp_path,
        "bayes",
        {
            "train.lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-2},
            "train.warmup_steps": {"values": [0, 2]},
        },
        ["recipe=tiny", "wandb.mode=disabled"],
    )
    out = run_ftl("sweep", "optuna", str(spec), "count=2", "seed=3", *FAST, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (study,) = (tmp_path / "runs").glob("tiny-optuna-t-*")
    assert sorted(p.name for p in study.iterdir() if p.is_dir()) == ["0", "1"]
    results = yaml.safe_load((study / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"train.lr", "train.warmup_steps"}
    rows = re.findall(
        r"^\s+(\d)\s+0\s+eval/loss=(\d+\.\d+)\s.*train\.lr=(\S+) train\.warmup_steps=(\d)$", out.stdout, re.MULTILINE
    )
    assert len(rows) == 2, out.stdout
    for i, _, lr, warmup in rows:
        cfg = yaml.safe_load((study / i / "config.yaml").read_text())
        assert (
            cfg["train"]["lr"] == float(lr)
            and 1e-3 <= float(lr) <= 1e-2
            and cfg["train"]["warmup_steps"] == int(warmup)
        )
    assert min(float(r[1]) for r in rows) == pytest.approx(results["best_value"], abs=1e-4)


# --------------------------------------------------------------------------------------------
# SLURM: trials as real jobs on the local two-node cluster


@pytest.fixture(scope="module")
def cluster():
    return local_cluster()


@pytest.mark.slurm
def test_two_trial_slurm_submission_runs_both_and_a_requeued_trial_keeps_its_run(cluster, tmp_path):
    """`ftl sweep agent --offline SPEC count=2 launch=slurm launch.nodes=2 strategy=ddp`: two jobs,
    each one trial trained by torchrun on both nodes, its parameters in the config.yaml every rank
    reads. The first trial is stopped mid-run by SIGUSR1 (what SLURM sends before the time limit):
    the job requeues, replays its recorded trial and resumes the same run dir and W&B run id.
    (The trials are drawn by W&B's search engine, not by a W&B server: see the module docstring.)"""
    spec = spec_file(tmp_path, "grid", {"train.lr": {"values": [0.001, 0.003]}}, ["recipe=tiny", "wandb.mode=offline"])
    out = cluster.run(
        *FTL,
        "sweep",
        "agent",
        "--offline",
        str(spec),
        "count=2",
        "launch=slurm",
        "train.device=cpu",
        "launch.nodes=2",
        "strategy=ddp",
        "train.max_steps=30",
        "checkpoint.every_steps=5",
        "eval.max_batches=1",
        cwd=tmp_path,
        timeout=120,
    )
    jobs = out.stdout.split()
    assert len(jobs) == 2 and all(j.isdigit() for j in jobs), out.stdout + out.stderr
    (sweep_dir,) = (tmp_path / "runs").glob(
        "tiny-slurm-sweep-offline-*"
    )  # a SLURM run's default dir: runs/<name>-slurm
    record = sweep_dir / "jobs" / f"{jobs[0]}.json"
    deadline = time.monotonic() + 120
    while not (
        record.is_file() and list(Path(json.loads(record.read_text())["run_dir"]).glob("checkpoints/step-1[05]"))
    ):
        job = cluster.job(jobs[0])
        assert job.state in ("PENDING", "RUNNING", "CONFIGURING") and time.monotonic() < deadline, job.state
        time.sleep(0.2)
    first = json.loads(record.read_text())
    cluster.run("scancel", "--batch", "--signal=USR1", jobs[0])
    done = [cluster.wait(j, timeout=180) for j in jobs]
    logs = "\n".join(p.read_text() for p in sorted((sweep_dir / "logs").glob("*.out")))
    assert [j.state for j in done] == ["COMPLETED", "COMPLETED"], logs
    assert [j.restarts for j in done] == [1, 0], logs
    lrs = []
    for job_id in jobs:
        trial = json.loads((sweep_dir / "jobs" / f"{job_id}.json").read_text())
        run_id, run_dir = trial["env"]["WANDB_RUN_ID"], Path(trial["run_dir"])
        assert run_dir == sweep_dir / run_id and (run_dir / "wandb_run_id").read_text().strip() == run_id
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        lrs.append(cfg["train"]["lr"])
        assert f"train.lr={cfg['train']['lr']}" in trial["argv"] and cfg["launch"]["nodes"] == 2
        assert (run_dir / "checkpoints" / "step-30").is_dir() and json.loads((run_dir / "eval.json").read_text())[
            "after"
        ]["loss"] > 0
        for node in (0, 1):
            assert (
                f"ftl: node {node} on n{node + 1}, job {job_id}" in (run_dir / "logs" / f"node-{node}.log").read_text()
            )
        assert len(wandb_offline_attempts(run_dir, run_id)) == (2 if job_id == jobs[0] else 1)
    assert sorted(lrs) == [0.001, 0.003]
    assert json.loads(record.read_text()) == first, "the requeued job ran the recorded trial, not a new one"
    node_log = " ".join((Path(first["run_dir"]) / "logs" / "node-0.log").read_text().split())
    stopped, resumed = (
        re.search(r"stopped by SIGTERM at step (\d+)", node_log),
        re.search(r"resuming from .*? \(step (\d+)\)", node_log),
    )
    assert stopped and resumed and stopped.group(1) == resumed.group(1), node_log
    assert "requeueing job" in logs and "(restart 1): trial" in logs
