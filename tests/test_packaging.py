"""ftl as an installed package: the sdist and the wheel built from it carry the config tree, the
recipes and the SLURM templates (kept at the repository's top level), and the wheel installed with
no checkout in sight gives a working `ftl` from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import metrics

from launcher.paths import ROOT

SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "launcher", "conf", "recipes", "slurm")


def run(
    *argv: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(argv)} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist from a copy of the sources → wheel from that sdist → `pip install --no-deps --target`."""
    work = tmp_path_factory.mktemp("packaging")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building writes build/ and *.egg-info next to the sources
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(
            ROOT / name,
            src / name,
            **({"ignore": shutil.ignore_patterns("__pycache__", "_shipped")} if (ROOT / name).is_dir() else {}),
        )
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run(
        sys.executable,
        "-c",
        "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
        str(work / "sdist"),
        cwd=src,
        env=env,
    )
    (sdist,) = (work / "sdist").glob("ftl-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    for shipped in (
        "conf/config.yaml",
        "conf/launch/slurm.yaml",
        "recipes/tiny.yaml",
        "slurm/job.sbatch.j2",
        "launcher/assets/tiny-tokenizer/tokenizer.json",
    ):
        assert any(n.endswith(f"/{shipped}") for n in names), shipped
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        str(sdist),
        "-w",
        str(work / "wheel"),
        cwd=work,
        env=env,
    )
    (wheel,) = (work / "wheel").glob("ftl-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
    for shipped in (
        "launcher/_shipped/conf/config.yaml",
        "launcher/_shipped/conf/model/tiny-llama.yaml",
        "launcher/_shipped/recipes/tiny.yaml",
        "launcher/_shipped/slurm/job.sbatch.j2",
        "launcher/_shipped/slurm/sweep.sbatch.j2",
        "launcher/assets/demo/train.jsonl",
    ):
        assert shipped in names, shipped
    target = work / "site"
    run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--target",
        str(target),
        str(wheel),
        cwd=work,
        env=env,
    )
    return target


def test_installed_ftl_works_from_any_directory(installed: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    # Only the installed copy on the path: not the checkout (PYTHONPATH of the test run), not its editable install's finder.
    env = {
        **os.environ,
        "PYTHONPATH": str(installed),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "FTL_CACHE": str(tmp_path / "cache"),
    }
    env.pop("FTL_CONFIG_DIR", None)
    ftl = (
        [str(installed / "bin" / "ftl")]
        if (installed / "bin" / "ftl").is_file()
        else [sys.executable, "-m", "launcher"]
    )
    where = run(
        sys.executable,
        "-c",
        "import launcher.paths as p; print(p.CONF_DIR); print(p.SLURM_DIR)",
        cwd=elsewhere,
        env=env,
    ).stdout
    assert where.split() == [
        str(installed / "launcher" / "_shipped" / "conf"),
        str(installed / "launcher" / "_shipped" / "slurm"),
    ]

    listing = run(*ftl, "recipes", cwd=elsewhere, env=env).stdout
    assert {line.split()[0] for line in listing.splitlines()} >= {"tiny", "demo", "llama3-70b-full-zero3-multinode"}

    plan = run(
        *ftl, "plan", "recipe=llama3-70b-full-zero3-multinode", "launch.partition=gpu", cwd=elsewhere, env=env
    ).stdout
    assert (
        "#SBATCH --nodes=4" in plan and "#SBATCH --partition=gpu" in plan and "srun" in plan
    )  # rendered from the installed templates

    run_dir = elsewhere / "runs" / "tiny"
    run(
        *ftl,
        "train",
        "recipe=tiny",
        "train.max_steps=3",
        "train.seq_len=128",
        "checkpoint.every_steps=0",
        "eval.after_training=false",
        cwd=elsewhere,
        env=env,
    )
    assert [row["step"] for row in metrics(run_dir)] == [1, 2, 3]
    config = (run_dir / "config.yaml").read_text()
    assert str(installed / "launcher" / "assets" / "tiny-tokenizer") in config  # the installed package's own assets
    assert str(ROOT) not in config
