"""Where a run's config comes from: ftl's own tree (conf/, recipes/), the user's config dirs, and
recipe files given by path.

A config dir (``--config-dir DIR``, or ``$FTL_CONFIG_DIR``, several separated by ``:``) holds
options of its own in ftl's group folders — ``recipes/``, ``model/``, ``data/``, ``strategy/``,
``peft/``, ``launch/``, ``sweep/`` — which are added to the shipped ones; a name the shipped tree
already uses is an error (which of two files a name means should never be a question of order).
A recipe file anywhere is given as ``ftl train path/to/recipe.yaml`` or ``recipe=path/to/recipe.yaml``
and composes exactly like a shipped recipe. Pure Python; imports no Hydra.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Optional

from launcher.config.errors import ConfigError
from launcher.paths import CONF_DIR, RECIPES_DIR

CONFIG_DIR_ENV = "FTL_CONFIG_DIR"
OPTION_GROUPS = ("model", "data", "strategy", "peft", "launch", "sweep")  # folders of a config dir besides recipes/
RECIPES = "recipes"
YAML_SUFFIXES = (".yaml", ".yml")


def config_dirs(environ: Optional[Mapping[str, str]] = None) -> list[Path]:
    """The user's config dirs, in order, from $FTL_CONFIG_DIR (which ``--config-dir`` sets)."""
    text = (os.environ if environ is None else environ).get(CONFIG_DIR_ENV, "")
    return [Path(p).expanduser().resolve() for p in text.split(os.pathsep) if p.strip()]


def add_config_dirs(dirs: list[str]) -> None:
    """``--config-dir``: put ``dirs`` (absolute) before those of $FTL_CONFIG_DIR, in this process's
    environment, so every process it starts (ranks, sweep trials, SLURM jobs) composes alike. An
    empty ``DIR`` is refused: it would silently mean the working directory."""
    from launcher.config.errors import ConfigErrors

    if any(not d.strip() for d in dirs):
        raise ConfigErrors(
            [
                ConfigError(
                    "--config-dir", "got an empty path; give a directory (--config-dir . for the working directory)"
                )
            ]
        )
    given = [str(Path(d).expanduser().resolve()) for d in dirs]
    known = [str(d) for d in config_dirs()]
    os.environ[CONFIG_DIR_ENV] = os.pathsep.join(dict.fromkeys(given + known))


def _options(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.glob("*.yaml"), key=lambda p: p.stem)} if folder.is_dir() else {}


def shipped_options(group: str) -> dict[str, Path]:
    """The options ftl ships for a group (``recipes`` for the recipes)."""
    return _options(RECIPES_DIR if group == RECIPES else CONF_DIR / group)


def options(group: str, dirs: Optional[list[Path]] = None) -> dict[str, Path]:
    """Every option of a group, shipped first, then each config dir's."""
    out = shipped_options(group)
    for d in config_dirs() if dirs is None else dirs:
        for name, path in _options(d / group).items():
            out.setdefault(name, path)
    return out


def recipe_files() -> dict[str, Path]:
    return options(RECIPES)


def check_config_dirs(dirs: list[Path]) -> list[ConfigError]:
    """A config dir that does not exist or holds none of ftl's folders, and option names that are
    taken already (by ftl or by an earlier config dir)."""
    errors: list[ConfigError] = []
    folders = (RECIPES, *OPTION_GROUPS)
    seen = {g: {n: p for n, p in shipped_options(g).items()} for g in folders}
    for d in dirs:
        if not d.is_dir():
            errors.append(
                ConfigError(CONFIG_DIR_ENV, f"{d}: no such directory (from --config-dir or ${CONFIG_DIR_ENV})")
            )
            continue
        if not any((d / g).is_dir() for g in folders):
            errors.append(
                ConfigError(
                    CONFIG_DIR_ENV, f"{d} holds none of ftl's config folders ({', '.join(f + '/' for f in folders)})"
                )
            )
        for group in folders:
            for name, path in _options(d / group).items():
                if name in seen[group]:
                    errors.append(
                        ConfigError(
                            CONFIG_DIR_ENV,
                            f"{path} is named like {seen[group][name]}; option names must be unique: "
                            f"rename it (e.g. {group}/my-{name}.yaml)",
                        )
                    )
                else:
                    seen[group][name] = path
    return errors


# --------------------------------------------------------------------------------------------
# recipe files given by path


def is_recipe_path(value: str) -> bool:
    """``recipe=VALUE`` names a file rather than a recipe (recipe names hold no '/' and no suffix)."""
    return "/" in value or value.endswith(YAML_SUFFIXES)


def recipe_file_overrides(overrides: list[str]) -> list[str]:
    """``ftl train path/to/recipe.yaml a=b`` → ``recipe='/abs/path/to/recipe.yaml' a=b``: a bare
    YAML path becomes the recipe override, with an absolute path (trials and jobs may run elsewhere)."""
    out = []
    for text in overrides:
        if "=" not in text and text.endswith(YAML_SUFFIXES) and not text.startswith(("+", "~")):
            text = f"recipe={hydra_quote(str(Path(text).expanduser().resolve()))}"
        out.append(text)
    return out


def hydra_word(value: str) -> str:
    """A value as a Hydra override value: bare where Hydra reads it back as the same string (a path
    of plain characters), else :func:`hydra_quote`-d."""
    return value if re.fullmatch(r"[\w.-]*/[\w./-]*", value, re.ASCII) else hydra_quote(value)


def hydra_quote(value: str) -> str:
    """A value as one quoted Hydra override value: any path, spaces and quotes included."""
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + escaped.replace("'", "\\'") + "'"
