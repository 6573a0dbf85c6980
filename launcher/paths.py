"""Where ftl's own files live. Imports nothing heavy."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parent
CONF_DIR = ROOT / "conf"
RECIPES_DIR = ROOT / "recipes"
SLURM_DIR = ROOT / "slurm"
ASSETS_DIR = PACKAGE_DIR / "assets"


def cache_dir() -> Path:
    """ftl's cache (converted models, tokenized data): $FTL_CACHE, else ~/.cache/ftl."""
    return Path(os.environ.get("FTL_CACHE") or Path.home() / ".cache" / "ftl")


def asset(name: str) -> str:
    return str(ASSETS_DIR / name)
