"""bench/gpu_check.sh's first step: the versions, the GPU, and every import the later steps make,
each tried on its own so one missing package names itself and the rest are still tried.

    python bench/gpu_env.py

Exits 1 when an import fails or torch sees no CUDA GPU; prints one ``SUMMARY`` line.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PACKAGES = (
    "torch",
    "transformers",
    "deepspeed",
    "peft",
    "hydra-core",
    "omegaconf",
    "liger-kernel",
    "bitsandbytes",
    "triton",
    "safetensors",
    "datasets",
    "rouge_score",
    "sacrebleu",
    "pytest",
)
IMPORTS = (  # the packages, then ftl's modules the check's steps load (engines, model paths, objectives, eval, planner)
    "torch",
    "transformers",
    "deepspeed",
    "peft",
    "hydra",
    "omegaconf",
    "liger_kernel.transformers",
    "bitsandbytes",
    "triton",
    "safetensors",
    "datasets",
    "rouge_score.rouge_scorer",
    "sacrebleu",
    "pytest",
    "launcher.train.trainer",
    "launcher.engines.single",
    "launcher.engines.ddp",
    "launcher.engines.deepspeed",
    "launcher.engines.fsdp",
    "launcher.model.attention",
    "launcher.model.adapters",
    "launcher.model.compile",
    "launcher.model.loss",
    "launcher.objectives.preference",
    "launcher.objectives.reference",
    "launcher.eval.metrics",
    "launcher.plan.report",
)


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def main() -> int:
    print(
        "versions: "
        + ", ".join(f"{name} {package_version(name)}" for name in PACKAGES)
        + f", python {sys.version.split()[0]}"
    )
    failed = []
    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as e:  # a broken install raises more than ImportError
            failed.append(module)
            print(f"import {module}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    import torch

    from launcher.model import attention

    gpu = "no CUDA GPU"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} {props.total_memory / 2**30:.0f} GiB sm_{props.major}{props.minor}"
    varlen = "available" if attention.varlen_attn is not None else "MISSING"
    print(
        f"torch {torch.__version__} cuda {torch.version.cuda}; {gpu}; varlen_attn {varlen}, native GQA {attention.VARLEN_GQA}"
    )
    missing = f" (failed: {', '.join(failed)})" if failed else ""
    print(
        f"SUMMARY torch {torch.__version__}, {gpu}, varlen_attn {varlen}; imports {len(IMPORTS) - len(failed)}/{len(IMPORTS)}{missing}"
    )
    return 1 if failed or not torch.cuda.is_available() else 0


if __name__ == "__main__":
    sys.exit(main())
