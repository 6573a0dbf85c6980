"""Where ftl's own files live. Imports nothing heavy.

In a checkout the config tree, the recipes and the SLURM templates sit at the repository's top
level (``conf/``, ``recipes/``, ``slurm/``); a built wheel or sdist carries them inside the
package as ``launcher/_shipped/`` (setup.py copies them there), so an installed ftl finds them
with no checkout at all.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parent  # the checkout (or, for an installed ftl, site-packages)
SHIPPED = "_shipped"  # launcher/_shipped/{conf,recipes,slurm} in a wheel
ASSETS_DIR = PACKAGE_DIR / "assets"


def _shipped_dir(name: str, marker: str) -> Path:
    """The installed copy when there is one, else the checkout's top-level folder. ``marker``, a
    file that must be there, keeps an unrelated ``site-packages/conf`` from being taken for ftl's."""
    inside = PACKAGE_DIR / SHIPPED / name
    if (inside / marker).is_file():
        return inside
    return ROOT / name


CONF_DIR = _shipped_dir("conf", "config.yaml")
RECIPES_DIR = _shipped_dir("recipes", "tiny.yaml")
SLURM_DIR = _shipped_dir("slurm", "job.sbatch.j2")


def cache_dir() -> Path:
    """ftl's cache (converted models, tokenized data): $FTL_CACHE, else ~/.cache/ftl."""
    return Path(os.environ.get("FTL_CACHE") or Path.home() / ".cache" / "ftl")


def asset(name: str) -> str:
    return str(ASSETS_DIR / name)
