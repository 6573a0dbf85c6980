"""Noise from other libraries is silenced at its source (launcher/quiet.py), and only that: the same
libraries' other messages, and real warnings, still reach the user. Each check runs in a fresh
interpreter, first without ftl's filters (the message is there), then with them (it is gone)."""

from __future__ import annotations

import subprocess
import sys

from helpers import ftl_env

from launcher.paths import ROOT

SCRIPT = r"""
import logging, sys, warnings
if sys.argv[1] == "quiet":
    from launcher.quiet import install
    install()
import deepspeed.accelerator
deepspeed.accelerator.get_accelerator()
from deepspeed.utils import logger
logger.warning("a real DeepSpeed warning")
import bitsandbytes  # imports its CPU backend, which looks for the `kernels` package
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real bitsandbytes warning")
warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                       "modeling_utils.py", 1, module="transformers.modeling_utils")
warnings.warn_explicit("a real transformers FutureWarning", FutureWarning, "modeling_utils.py", 2, module="transformers.modeling_utils")
warnings.warn_explicit("lbfgs failed to converge (status=1)", UserWarning, "_logistic.py", 1, module="sklearn.linear_model._logistic")
warnings.warn_explicit("The optimal value found for dimension 0 of parameter length_scale is close to the specified upper bound",
                       UserWarning, "kernels.py", 1, module="sklearn.gaussian_process.kernels")
warnings.warn_explicit("a real sklearn warning", UserWarning, "base.py", 1, module="sklearn.base")
warnings.warn_explicit("Could not find a config file in /tmp/ftl-random-x1 - will assume that the vocabulary was not modified.",
                       UserWarning, "save_and_load.py", 1, module="peft.utils.save_and_load")
warnings.warn_explicit("Could not find a config file in /home/me/my-base - will assume that the vocabulary was not modified.",
                       UserWarning, "save_and_load.py", 2, module="peft.utils.save_and_load")
warnings.warn("an ftl user's own warning")
"""

NOISE = (
    "Setting accelerator to CPU",
    "Failed to load CPU gemm_4bit_forward",
    "`is_gradient_checkpointing` is deprecated",
    "lbfgs failed to converge",
    "The optimal value found",
    "config file in /tmp/ftl-random-",
)
REAL = (
    "a real DeepSpeed warning",
    "a real bitsandbytes warning",
    "a real transformers FutureWarning",
    "a real sklearn warning",
    "an ftl user's own warning",
    "config file in /home/me/my-base",
)


def run(mode: str) -> str:
    env = ftl_env()
    env.pop("PYTHONWARNINGS", None)  # Python's default filters, as a user's shell has them
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_noise_is_silenced_at_its_source_and_real_warnings_stay() -> None:
    import torch

    loud, quiet = run("loud"), run("quiet")
    expected_noise = [n for n in NOISE if n != "Setting accelerator to CPU" or not torch.cuda.is_available()]
    expected_noise = [
        n for n in expected_noise if n != "Failed to load CPU gemm_4bit_forward" or n in loud
    ]  # AVX512-BF16 CPUs only
    assert all(n in loud for n in expected_noise), loud
    assert not [n for n in NOISE if n in quiet], quiet
    assert all(r in quiet for r in REAL), quiet
