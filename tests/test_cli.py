"""The `ftl` command line as a user runs it: exit codes, messages, and no heavy imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config.compose import recipe_files

# An HTTP client among them: huggingface_hub's cache lookup brings one, and a model that is not in
# the local cache (the empty one below) must not pay for it.
HEAVY = (
    "torch",
    "transformers",
    "deepspeed",
    "peft",
    "bitsandbytes",
    "wandb",
    "datasets",
    "httpx",
    "httpx2",
    "requests",
    "huggingface_hub.file_download",
)


def ftl(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize("recipe", ["llama3-70b-full-zero3-multinode", "llama3-8b-full-zero3", "demo"])
def test_plan_imports_no_heavy_module(recipe, tmp_path):
    """`ftl plan` is a config tool. How long it takes is bench/throughput.py's to measure, against
    `import torch` in the same run: a timed test would measure a shared CI machine's neighbours."""
    code = (
        "import sys; from launcher.cli import main; rc = main(['plan', 'recipe=%s']); "
        "heavy = [m for m in %r if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(rc or (3 if heavy else 0))"
    ) % (recipe, HEAVY)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "HEAVY []" in out.stdout


def test_plan_launches_nothing(tmp_path):
    out = ftl("plan", "recipe=tiny", f"run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr
    assert "global batch 4 sequences" in out.stdout
    assert "launcher.train --config" in out.stdout and "nothing launched" in out.stdout
    assert not (tmp_path / "run").exists(), "ftl plan must write nothing"


def test_plan_shows_distributed_command():
    out = ftl("plan", "recipe=tiny", "strategy=zero3", "launch.nproc_per_node=2")
    assert out.returncode == 0, out.stderr
    assert "launcher.launch.torchrun --standalone --nproc_per_node=2" in out.stdout
    assert "world size 2" in out.stdout


def test_recipes_lists_each_with_description():
    out = ftl("recipes")
    assert out.returncode == 0
    lines = out.stdout.strip().splitlines()
    assert len(lines) >= 6 and len(lines) == len(recipe_files())
    for name, line in zip(sorted(recipe_files()), lines):
        assert line.startswith(name) and len(line.split(None, 1)[1]) > 20


@pytest.mark.parametrize(
    "args, needle",
    [
        (["plan", "recipe=nope"], "available recipes: demo"),
        (["plan", "train.lr=abc"], "train.lr: expected a number"),
        (["plan", "train.lrr=1"], "did you mean train.lr"),
        (["train", "recipe=tiny", "train.lr=abc"], "train.lr"),
        (["plan", "recipe=tiny", "data.train_files=[/nope.jsonl]"], "data.train_files[0]: file not found"),
    ],
)
def test_bad_input_exits_2_naming_the_field(args, needle, tmp_path):
    out = ftl(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert needle in out.stderr
    assert not (tmp_path / "runs").exists(), "nothing may be written for invalid input"


def test_cfg_job_prints_composed_config():
    out = ftl("train", "--cfg", "job", "recipe=tiny", "train.lr=0.5")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.5" in out.stdout and "source: random" in out.stdout


def test_console_script_matches_module():
    script = Path(sys.executable).with_name("ftl")  # installed beside the interpreter by `pip install -e .`
    assert script.exists()
    out = subprocess.run([str(script), "recipes"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == ftl("recipes").stdout


def test_a_reader_that_stops_early_gets_no_traceback():
    """`ftl recipes | head -1`: the reader closes the pipe; ftl ends quietly as SIGPIPE would (141)."""
    import os

    read, write = os.pipe()
    os.close(read)  # a reader that is already gone: every write fails with EPIPE
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "recipes"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60
    )
    os.close(write)
    assert out.returncode == 141, out.stderr
    assert out.stderr == ""
    shell = subprocess.run(
        f"{sys.executable} -m launcher recipes | head -n 1", shell=True, capture_output=True, text=True, timeout=60
    )
    assert shell.stdout.startswith("demo ") and len(shell.stdout.splitlines()) == 1 and "Traceback" not in shell.stderr


def test_options_and_overrides_mix_in_any_order(tmp_path):
    out = ftl("eval", str(tmp_path / "nope"), "--out", str(tmp_path / "e"), "eval.max_batches=1", cwd=tmp_path)
    assert out.returncode == 2 and "unrecognized arguments" not in out.stderr
    assert f"{tmp_path / 'nope'}: no such directory" in out.stderr  # parsed, then refused for what it is
    out = ftl(
        "sweep", "create", "lr", "--offline", "wandb.project=mine", "--out", str(tmp_path / "s.yaml"), cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "project: mine" in (tmp_path / "s.yaml").read_text()
    out = ftl(
        "plan", "train.lr=1e-3", f"run.dir={tmp_path / 'r'}", "--config-dir", str(tmp_path), "recipe=tiny", cwd=tmp_path
    )
    assert (
        out.returncode == 2 and "holds none of ftl's config folders" in out.stderr
    )  # the option was read where it stood


def test_plan_explain_prints_a_keys_doc_and_imports_no_heavy_module():
    from dataclasses import fields

    from launcher.config.schema import TrainConfig

    code = (
        "import sys; from launcher.cli import main; rc = main(['plan', '--explain', 'train']); "
        "heavy = [m for m in %r if m in sys.modules]; print('HEAVY', heavy); sys.exit(rc or (3 if heavy else 0))"
    ) % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "HEAVY []" in out.stdout
    assert all(f"train.{f.name}: " in out.stdout and f.metadata["doc"] in out.stdout for f in fields(TrainConfig))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["plan", "--explain", "train.lrr"], "train.lrr: unknown config key; did you mean train.lr"),
        (
            ["plan", "--explain", "train.lr", "recipe=tiny"],
            "--explain: shows the schema, not a composed config, and takes no overrides",
        ),
    ],
)
def test_plan_explain_bad_input_exits_2(args, needle):
    out = ftl(*args)
    assert out.returncode == 2 and needle in out.stderr, out.stdout + out.stderr
    assert out.stdout == ""
