"""The user's own configs: a project config dir (``--config-dir DIR`` / ``$FTL_CONFIG_DIR``) whose
options are added to ftl's, recipe files anywhere (``ftl train my.yaml``), ``ftl recipes --copy``,
and a run dir that needs none of them afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import ftl_env

from launcher.config.compose import compose
from launcher.config.errors import ConfigErrors
from launcher.config.search_path import CONFIG_DIR_ENV
from launcher.config.validate import validate
from launcher.paths import ROOT, asset

MYCLUSTER = """\
# Our cluster: ftl's slurm launch with our partition, account, setup lines and NCCL settings.
defaults:
  - slurm
  - _self_
partition: gpu-a100
account: proj-42
setup:
  - module load cuda/12.4
env:
  NCCL_SOCKET_IFNAME: ib0
  NCCL_IB_HCA: mlx5
"""
MY_RECIPE = """\
# Our tiny experiment: the tiny model on the demo data, our learning rate.
# Run: ftl train --config-dir DIR recipe=my-tiny
defaults:
  - override /model: tiny-llama
  - override /data: demo
  - override /strategy: single
  - override /peft: none
  - override /launch: local
train:
  lr: 7.0e-3
  max_steps: 2
  micro_batch_size: 2
  seq_len: 128
  precision: fp32
checkpoint:
  every_steps: 1
eval:
  batch_size: 2
  max_batches: 1
  generate: false
wandb:
  mode: disabled
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project config dir with a recipe and a cluster launch file."""
    conf = tmp_path / "myconf"
    (conf / "launch").mkdir(parents=True)
    (conf / "recipes").mkdir()
    (conf / "launch" / "mycluster.yaml").write_text(MYCLUSTER)
    (conf / "recipes" / "my-tiny.yaml").write_text(MY_RECIPE)
    return conf


def ftl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=cwd,
        env={**(env or ftl_env()), "PYTHONPATH": str(ROOT)},  # this checkout's launcher, from any cwd
        capture_output=True,
        text=True,
        timeout=300,
    )


def composed(*overrides: str):
    raw, choices, errors = compose(list(overrides))
    cfg, more = validate(raw)
    assert errors + more == []
    return cfg, choices


def test_config_dir_adds_its_recipes_and_options(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_DIR_ENV, str(project))
    cfg, choices = composed("recipe=my-tiny", "launch=mycluster")
    assert choices["recipe"] == "my-tiny" and choices["launch"] == "mycluster"
    assert cfg.train.lr == 7e-3 and cfg.run.name == "my-tiny"
    launch = cfg.launch  # the user's file on top of ftl's slurm option
    assert (launch.backend, launch.partition, launch.account, launch.time) == (
        "slurm",
        "gpu-a100",
        "proj-42",
        "04:00:00",
    )
    assert launch.setup == ["module load cuda/12.4"] and launch.env == {
        "NCCL_SOCKET_IFNAME": "ib0",
        "NCCL_IB_HCA": "mlx5",
    }
    cfg, _ = composed("recipe=tiny")  # ftl's own options are all still there
    assert cfg.launch.backend == "local" and cfg.train.lr == 3e-3
    monkeypatch.delenv(CONFIG_DIR_ENV)
    with pytest.raises(
        ConfigErrors, match="my-tiny"
    ):  # without the dir the recipe is unknown (and not cached from before)
        composed("recipe=my-tiny")


def test_plan_with_config_dir_renders_the_cluster_script(project: Path, tmp_path: Path) -> None:
    out = ftl(
        "plan",
        "recipe=my-tiny",
        "--config-dir",
        str(project),
        "launch=mycluster",
        f"run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    for line in (
        "#SBATCH --partition=gpu-a100",
        "#SBATCH --account=proj-42",
        "module load cuda/12.4",
        "export NCCL_SOCKET_IFNAME=ib0",
    ):
        assert line in out.stdout
    assert f"To run: ftl train --config-dir={project} recipe=my-tiny launch=mycluster" in out.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "layout, needle",
    [
        ({}, "no such directory"),
        ({"notes.txt": "x"}, "holds none of ftl's config folders"),
        ({"launch/slurm.yaml": "backend: slurm\n"}, "is named like"),
        ({"recipes/tiny.yaml": "train: {lr: 1.0}\n"}, "option names must be unique"),
    ],
)
def test_config_dir_problems_exit_2(layout: dict[str, str], needle: str, tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    for name, text in layout.items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(text)
    out = ftl("plan", "--config-dir", str(conf), "recipe=tiny", cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{CONFIG_DIR_ENV}: {conf}" in out.stderr and needle in out.stderr
    if "named like" in needle:  # both files are named
        assert str(conf / "launch" / "slurm.yaml") in out.stderr and "conf/launch/slurm.yaml" in out.stderr


def test_recipe_file_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "exp" / "tiny.yaml"  # named like a shipped recipe: the file given is the one used
    mine.parent.mkdir()
    mine.write_text(MY_RECIPE)
    monkeypatch.chdir(tmp_path)
    for given in ("exp/tiny.yaml", "recipe=exp/tiny.yaml", f"recipe={mine}"):
        cfg, choices = composed(given, "train.seed=7")
        assert choices["recipe"] == "tiny" and cfg.recipe == "tiny" and cfg.run.name == "tiny"
        assert (
            cfg.train.lr == 7e-3 and cfg.train.max_steps == 2 and cfg.train.seed == 7
        )  # the file's values, then the overrides'
    assert composed("recipe=tiny")[0].train.lr == 3e-3  # the shipped one is untouched
    assert "recipe: exp/nope.yaml: no such recipe file" in map(str, compose(["recipe=exp/nope.yaml"])[2])


def test_recipes_copy_writes_a_starting_point_and_never_overwrites(tmp_path: Path, project: Path) -> None:
    out = ftl("recipes", "--copy", "tiny", "my.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "my.yaml").read_text()
    assert text.splitlines()[1] == "# Run: ftl train my.yaml"  # the header's command runs the copy
    assert text.split("\n", 2)[2] == (ROOT / "recipes" / "tiny.yaml").read_text().split("\n", 2)[2]
    mine = yaml.safe_load(text)
    assert mine["train"]["lr"] == 3e-3
    (tmp_path / "my.yaml").write_text(text.replace("lr: 3.0e-3", "lr: 5.0e-3"))
    again = ftl("recipes", "--copy", "demo", "my.yaml", cwd=tmp_path)
    assert again.returncode == 2 and "exists; ftl does not overwrite it" in again.stderr
    assert "lr: 5.0e-3" in (tmp_path / "my.yaml").read_text()
    # into a directory, from a config dir's recipe; the listing shows both kinds
    out = ftl("recipes", "--config-dir", str(project), "--copy", "my-tiny", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    copied = (tmp_path / "my-tiny.yaml").read_text()
    assert copied == MY_RECIPE.replace("recipe=my-tiny", str(tmp_path / "my-tiny.yaml"))
    listing = ftl("recipes", "--config-dir", str(project), cwd=tmp_path).stdout.splitlines()
    assert any(line.startswith("tiny ") for line in listing)
    assert any(line.startswith("my-tiny ") and str(project / "recipes" / "my-tiny.yaml") in line for line in listing)
    assert ftl("recipes", "--copy", "nope", "x.yaml", cwd=tmp_path).returncode == 2


def test_recipes_copy_copies_a_group_option_into_a_config_dir(tmp_path: Path, project: Path) -> None:
    """`tune cp`'s reach: any option of a config group, not only recipes, into the user's config dir
    under a name no option has; it composes from there, and nothing is overwritten."""
    out = ftl("recipes", "--copy", "strategy/zero3", str(project), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    copy = project / "strategy" / "my-zero3.yaml"
    assert copy.read_text() == (ROOT / "conf" / "strategy" / "zero3.yaml").read_text()
    assert f"wrote {copy}" in out.stdout and f"--config-dir={project} strategy=my-zero3" in out.stdout
    copy.write_text(copy.read_text().replace("offload_optimizer: false", "offload_optimizer: true"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv(CONFIG_DIR_ENV, str(project))
        cfg, choices = composed("recipe=tiny", "strategy=my-zero3")
    assert choices["strategy"] == "my-zero3" and cfg.strategy.zero_stage == 3 and cfg.strategy.offload_optimizer
    again = ftl("recipes", "--copy", "strategy/zero3", str(project), cwd=tmp_path)
    assert again.returncode == 2 and "exists; ftl does not overwrite it" in again.stderr
    assert "offload_optimizer: true" in copy.read_text()
    (tmp_path / "model").mkdir()  # a group folder by its own path, and a file name given
    out = ftl("recipes", "--copy", "model/llama3-8b", str(tmp_path / "model" / "ours.yaml"), cwd=tmp_path)
    assert out.returncode == 0 and (tmp_path / "model" / "ours.yaml").is_file(), out.stderr
    taken = ftl("recipes", "--copy", "model/llama3-8b", str(tmp_path / "model" / "tiny-llama.yaml"), cwd=tmp_path)
    assert taken.returncode == 2 and "option names must be unique" in taken.stderr
    assert not (tmp_path / "model" / "tiny-llama.yaml").exists()
    for bad, says in (("strategy/nope", "no such strategy option"), ("objective/dpo", "holds no objective/")):
        refused = ftl("recipes", "--copy", bad, str(project), cwd=tmp_path)
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr


def test_a_typo_in_a_group_or_recipe_file_names_the_file(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launcher.session import load_config

    (project / "strategy").mkdir()
    (project / "strategy" / "mine.yaml").write_text("engine: deepspeed\nzero_stag: 3\n")
    (project / "recipes" / "typo.yaml").write_text(MY_RECIPE.replace("  lr: 7.0e-3", "  lrr: 7.0e-3"))
    loose = tmp_path / "loose.yaml"
    loose.write_text(MY_RECIPE.replace("  max_steps: 2", "  max_step: 2"))
    monkeypatch.setenv(CONFIG_DIR_ENV, str(project))
    for overrides, key, file in (
        (["recipe=tiny", "strategy=mine"], "strategy.zero_stag", project / "strategy" / "mine.yaml"),
        (["recipe=typo"], "train.lrr", project / "recipes" / "typo.yaml"),
        ([str(loose)], "train.max_step", loose),
    ):
        with pytest.raises(ConfigErrors) as info:
            load_config(overrides)
        assert f"{key}: unknown key in {file}; did you mean" in str(info.value), str(info.value)
    with pytest.raises(ConfigErrors) as info:  # on the command line: the override is named, no file
        load_config(["recipe=tiny", "train.lrr=1"])
    assert "train.lrr: unknown key; did you mean train.lr" in str(info.value)


def test_multirun_and_sweep_and_preprocess_take_the_config_dir(project: Path, tmp_path: Path) -> None:
    env = ftl_env(FTL_CACHE=str(tmp_path / "cache"))
    env.pop(CONFIG_DIR_ENV, None)
    out = ftl(
        "train",
        "-m",
        "--cfg",
        "job",
        "--config-dir",
        str(project),
        "recipe=my-tiny",
        "train.lr=1e-3,2e-3",
        f"run.dir={tmp_path / 'm'}",
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("recipe: my-tiny") == 2 and "lr: 0.001" in out.stdout and "lr: 0.002" in out.stdout
    (project / "sweep").mkdir()
    (project / "sweep" / "ours.yaml").write_text(
        textwrap.dedent("""\
        method: random
        metric: {name: train/loss, goal: minimize}
        overrides: [recipe=my-tiny, wandb.mode=offline]
        parameters:
          train.lr: {values: [1.0e-3, 3.0e-3]}
        """)
    )
    out = ftl(
        "sweep",
        "create",
        "ours",
        "--offline",
        "--out",
        str(tmp_path / "sweep.yaml"),
        "--config-dir",
        str(project),
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "recipe=my-tiny" in (tmp_path / "sweep.yaml").read_text()
    out = ftl("preprocess", "--config-dir", str(project), "recipe=my-tiny", "data.packing=true", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout and (tmp_path / "cache").is_dir()


@pytest.mark.slow  # five processes: train, resume, export, eval and its job
def test_a_run_needs_no_config_dir_afterwards(project: Path, tmp_path: Path) -> None:
    """Trained from a config-dir recipe, the run resumes, exports and evaluates with the dir gone."""
    env = ftl_env(FTL_CACHE=str(tmp_path / "cache"))
    env.pop(CONFIG_DIR_ENV, None)
    run = tmp_path / "run"
    out = ftl(
        "train",
        "--config-dir",
        str(project),
        "recipe=my-tiny",
        f"run.dir={run}",
        "eval.after_training=false",
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert f"# ftl train --config-dir={project} recipe=my-tiny" in (run / "launch.sh").read_text()
    project.rename(tmp_path / "gone")
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (
        config["recipe"] == "my-tiny"
        and config["train"]["lr"] == 7e-3
        and config["model"]["tokenizer"] == asset("tiny-tokenizer")
    )
    again = subprocess.run(
        ["bash", str(run / "launch.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout + again.stderr and "(step 2)" in again.stdout + again.stderr
    out = ftl("export", str(run), "--out", str(tmp_path / "export"), cwd=tmp_path, env=env)
    assert out.returncode == 0 and (tmp_path / "export" / "config.json").is_file(), out.stderr
    out = ftl(
        "eval", str(run), "--out", str(tmp_path / "eval"), "eval.max_batches=1", cwd=tmp_path, env=env
    )  # an override after an option
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "eval" / "eval.json").is_file()
    assert not os.path.exists(project)
