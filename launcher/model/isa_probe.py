"""Inductor's CPU vector-ISA probe, remembered per machine so a compiled run pays it once.

Before inductor generates C++ for the CPU it checks each vector ISA the CPU's flags allow (AVX2,
AVX-512, VNNI, AMX on x86): it compiles a small test library with that ISA's flags and ``dlopen``s
it in a fresh Python. Once per process, so every compiled run pays it again: 2.0 s of a warm-cache
compiled first step on the project's 2-core machine (13 subprocesses; docs/BENCHMARKS.md).

:func:`reuse_isa_probe` keeps the verdict in inductor's cache directory, keyed by everything the
probe depends on (PyTorch's version and library path, the C++ compiler's version, the CPU's ISA
flags, the Python). When an earlier run on this key found every ISA the flags allow working, the
base probes are skipped through inductor's own switch (``torch._inductor.config.cpp.vec_isa_ok``);
inductor still runs its few cheap extra checks (BF16, VNNI, AMX tiles). The run that records a
clean pass sets the switch as well: inductor's on-disk cache keys on its config, and a switch that
differed between the first run and later ones would make the second run compile everything
again. When any ISA failed its probe, nothing is remembered and inductor probes every run, as
without ftl. A user's own ``TORCHINDUCTOR_VEC_ISA_OK`` wins. The verdict is a new file per key in
inductor's cache (``ftl-vec-isa-<key>.json``); ftl never rewrites or deletes one (a file at that
name that is not a clean verdict is left alone and the probes run), and deleting the cache forgets it.

x86-64 Linux only (the probes measured); elsewhere inductor probes as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from launcher.files import write_atomic

VERDICT_PREFIX = "ftl-vec-isa-"


def fingerprint() -> Optional[dict[str, Any]]:
    """What the probe's outcome depends on, and the ISAs the CPU's flags allow (best first);
    None where the verdict is not remembered (not x86-64 Linux, no C++ compiler, an inductor
    without these internals)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None
    try:
        from torch._inductor import cpu_vec_isa
        from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler

        flags = cpu_vec_isa.x86_isa_checker()
        compiler = get_compiler_version_info(get_cpp_compiler())
        allowed = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
    except Exception:  # private inductor API or no compiler: leave the probe to inductor
        return None
    return {
        "torch": torch.__version__,
        "torch_lib": os.path.dirname(torch.__file__),
        "compiler": compiler,
        "python": sys.executable,
        "cpu_flags": sorted(flags),
        "allowed": allowed,
    }


def verdict_path(cache_dir: Path, print_: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"{VERDICT_PREFIX}{key}.json"


def inductor_cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def reuse_isa_probe(cache_dir: Optional[Path] = None) -> str:
    """Before compiling for the CPU: skip inductor's ISA probes if this machine passed them before,
    else run them now (inductor keeps the answer for the process) and remember a clean pass.
    Returns what happened: ``reused``, ``recorded``, ``probed`` (some ISA failed, or an unusable
    file holds the verdict's name: not remembered),
    ``user`` (``vec_isa_ok`` set by the user) or ``unsupported``."""
    from torch._inductor import config

    if config.cpp.vec_isa_ok is not None:
        return "user"
    print_ = fingerprint()
    if print_ is None:
        return "unsupported"
    cache_dir = cache_dir if cache_dir is not None else inductor_cache_dir()
    path = verdict_path(cache_dir, print_)
    stored: Any = None
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = "unreadable"
    if isinstance(stored, dict) and stored.get("fingerprint") == print_ and stored.get("passed") == print_["allowed"]:
        config.cpp.vec_isa_ok = True
        return "reused"
    from torch._inductor import cpu_vec_isa

    passed = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]  # the probes (inductor's cached answer hereafter)
    if (
        passed != print_["allowed"] or stored is not None
    ):  # a failed probe, or a file there that is not a clean verdict: left alone
        return "probed"
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(
        path, json.dumps({"fingerprint": print_, "passed": passed}, indent=1)
    )  # a racing process writes the same
    config.cpp.vec_isa_ok = (
        True  # true now too: inductor's cache keys on it, so every later run hits this run's kernels
    )
    return "recorded"
