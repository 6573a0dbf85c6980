"""The wheels carried to a lent GPU machine (bench/gpu_wheels.sh): the guards of
bench/gpu_wheels_check.py, and a CPU rehearsal of the machine's Python environment.

The rehearsal builds a venv (cached under .cache/gpu-rehearsal/, rebuilt when the pins change)
holding the image's versions of what ftl needs from it (gpu_wheels_check.IMAGE), installed without
their dependencies so that a package the image lacks is missing here too, then installs the carried
wheels as bench/gpu_check.sh does (--no-index --no-deps --target, then PYTHONPATH), and makes the
check's imports and a 2-step `ftl train`. Where this machine cannot hold the image's version:
torch is this venv's CPU build (the image's 2.11.0+cu130 is a CUDA build), numpy the newest for this
Python 3.11 (the image's 2.5.2 needs 3.12), triton is left out (liger_kernel is checked by its
requirements only: importing it needs triton and a GPU), and the one binary carried wheel
(pydantic_core, cp312) and the one tagged py312 (multiprocess) are fetched at the same version for
this Python."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from launcher.paths import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_wheels_check as check  # noqa: E402

REHEARSAL = ROOT / ".cache" / "gpu-rehearsal"


def fake_wheel(folder: Path, name: str, version: str, *requires: str, size: int = 0) -> Path:
    """A wheel holding only its METADATA, and `size` bytes of padding."""
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    meta = "".join(
        [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", *(f"Requires-Dist: {r}\n" for r in requires)]
    )
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        if size:
            z.writestr("padding", bytes(size))
    return wheel


def test_requirements_guard_passes_a_met_set_and_names_each_unmet_requirement(tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    fake_wheel(
        good, "peft", "0.21.2", "torch>=2.4", "transformers", "huggingface-hub>=0.25", "tomli; python_version < '3.11'"
    )
    fake_wheel(good, "lib", "1.0", "peft==0.21.2", "nosuch; extra == 'unasked'", "pyyaml")
    assert check.unmet(good) == []
    fake_wheel(bad, "needs-newer-torch", "1.0", "torch>=2.12")  # the image has 2.11.0
    fake_wheel(bad, "needs-missing", "1.0", "nosuchpkg>=1")
    fake_wheel(bad, "asks-extra", "1.0", "extras-owner[fast]")
    fake_wheel(bad, "extras-owner", "1.0", "fastlib; extra == 'fast'")
    fake_wheel(bad, "transformers", "5.25.0")  # would shadow the image's
    fake_wheel(bad, "wants-old-carried", "1.0", "extras-owner<1")
    problems = check.unmet(bad)
    assert len(problems) == 5, problems
    assert any("requires torch>=2.12, in the image is torch 2.11.0" in p for p in problems)
    assert any("requires nosuchpkg>=1, neither carried nor in the image" in p for p in problems)
    assert any(p.startswith("extras-owner-1.0") and "fastlib" in p for p in problems)
    assert any("the image has transformers 5.17.0" in p for p in problems)
    assert any("requires extras-owner<1, carried is extras-owner 1.0" in p for p in problems)


def test_size_guard_fails_naming_the_sizes_when_over_60_mib(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_wheel(tmp_path, "small", "1.0", size=50 * 2**20)
    assert check.main([str(tmp_path)]) == 0
    fake_wheel(tmp_path, "big", "1.0", size=9 * 2**20)  # 59 MiB of wheels + the tracked files (~2 MiB)
    assert check.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "over 60 MiB; largest wheels: small-1.0-py3-none-any.whl 50.0 MiB, big-1.0" in out, out


def _key(*parts: object) -> str:
    """A cache stamp's name: what a cached folder was built from."""
    return ".built-" + hashlib.sha256(repr((sys.version, *parts)).encode()).hexdigest()[:16]


def _image_venv(pip_env: dict[str, str]) -> Path:
    """A venv holding the image's packages from gpu_wheels_check.IMAGE, each alone (--no-deps)."""
    venv = REHEARSAL / "venv"
    torch = importlib.metadata.version("torch")  # this machine's CPU build
    stamp = venv / _key(torch, check.IMAGE)
    if stamp.exists():
        return venv
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    skip = {"torch", "numpy", "triton"}
    pins = [f"torch=={torch}", "numpy<2.5", *(f"{n}=={v}" if v else n for n, v in check.IMAGE.items() if n not in skip)]
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", *pins], check=True, env=pip_env)
    stamp.touch()
    return venv


def _carried_site(py: Path, pip_env: dict[str, str]) -> Path:
    """bench/gpu_wheels.sh's wheels, installed the way bench/gpu_check.sh installs them."""
    wheels, site = REHEARSAL / "whl", REHEARSAL / "site"
    stamp = site / _key((ROOT / "bench" / "gpu_wheels.sh").read_text())
    if stamp.exists():
        return site
    proc = subprocess.run(
        ["bash", "bench/gpu_wheels.sh"],
        cwd=ROOT,
        env={**pip_env, "PYTHON": sys.executable, "FTL_WHEELS": str(wheels)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "requirements: every Requires-Dist" in proc.stdout and "(at most 60 MiB)" in proc.stdout, proc.stdout
    # Wheels only the image's Python 3.12 can install: the same versions for this Python.
    here = REHEARSAL / "whl-here"
    for folder in (here, site):
        shutil.rmtree(folder, ignore_errors=True)
    here.mkdir()
    carried = []
    for wheel in sorted(wheels.glob("*.whl")):
        if "-cp312-" in wheel.name or "-py312-" in wheel.name:
            name, version = wheel.name.split("-")[:2]
            subprocess.run(
                [
                    py,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--only-binary=:all:",
                    "-d",
                    str(here),
                    f"{name}=={version}",
                ],
                check=True,
                env=pip_env,
            )
        else:
            carried.append(wheel)
    carried += sorted(here.glob("*.whl"))
    subprocess.run(
        [
            py,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(site),
            *map(str, carried),
        ],
        check=True,
    )
    stamp.touch()
    return site


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.timeout(1800)  # the first run builds the venv: ~8 minutes on the 2-core dev machine; later runs ~4
def test_cpu_rehearsal_of_the_gpu_machines_environment(tmp_path: Path) -> None:
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    py = _image_venv(pip_env) / "bin" / "python"
    site = _carried_site(py, pip_env)
    assert check.main([str(REHEARSAL / "whl")]) == 0  # bench/gpu_wheels.sh's set passes both guards
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
    }
    env.pop("VIRTUAL_ENV", None)
    imports = """
import importlib, pkgutil, launcher
mods = [m.name for m in pkgutil.walk_packages(launcher.__path__, "launcher.") if not m.name.endswith(".__main__")]
for m in mods:
    importlib.import_module(m)
import deepspeed, deepspeed.ops.adam, peft, hydra, omegaconf, datasets, bitsandbytes, rouge_score.rouge_scorer, nltk, gguf, pydantic
import detect_secrets.plugins.aws, phonenumbers, stdnum  # data.privacy's scan
from importlib.metadata import version
print("imported", len(mods), "launcher modules;", *(f"{p} {version(p)}" for p in ("torch", "transformers", "huggingface_hub", "peft", "deepspeed")))
"""
    proc = subprocess.run([py, "-c", imports], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    assert "transformers 5.17.0 huggingface_hub 1.33.0 peft 0.21.2" in proc.stdout, proc.stdout

    # The gpu-marked tests (bench/gpu_check.sh runs them there), skipping here: their modules import under the image's versions.
    gpu_files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if "mark.gpu" in p.read_text() and p.name != Path(__file__).name
    )
    proc = subprocess.run(
        [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *gpu_files],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and " skipped" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]

    # A 2-step run like gpu_check.sh's train-zero3 (DeepSpeed, packed rows, generation and its metrics), on the tiny model.
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            py,
            "-m",
            "launcher",
            "train",
            "recipe=tiny",
            "strategy=zero3",
            "data.packing=true",
            "train.max_steps=2",
            "checkpoint.every_steps=0",
            "checkpoint.save_final=false",
            "eval.max_batches=1",
            "eval.generate=true",
            "eval.num_generate=2",
            "eval.max_new_tokens=8",
            "wandb.mode=disabled",
            "launch.dist_timeout_s=60",
            f"run.dir={run}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "engine deepspeed" in proc.stdout and "step 2/" in proc.stdout and " rougeL " in proc.stdout, proc.stdout[
        -3000:
    ]
