"""Compose a run's config with Hydra: conf/ groups + a recipe from recipes/ + command-line overrides,
with the user's config dirs and recipe files added (:mod:`launcher.config.search_path`) and the
architecture read from the model's own config.json (:mod:`launcher.config.hf_model`).

Composition uses plain YAML (no structured schema attached), so that *every* problem, bad types
included, is reported at once by :func:`launcher.config.validate.validate` instead of one at a time
by OmegaConf. Overrides are checked against the schema before Hydra sees them for the same reason.

Hydra opens only ftl's own conf/. Every recipe and every option of the user's config dirs is read
by :mod:`launcher.safe_read` (no FIFO, no alias bomb, no traceback) and served to Hydra from its
ConfigStore; a file that cannot be read is left out and reported only by a command that uses it,
naming the file, so one broken file breaks nothing else. A defaults list or an override that
names an option by a path (``override /model: ../../x``) is refused: options are names.
"""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.config.docs import suggest
from launcher.config.errors import ConfigError, ConfigErrors
from launcher.config.hf_model import read_model_arch
from launcher.config.local_paths import resolve_local_paths
from launcher.config.schema import UNIONS, FtlConfig
from launcher.config.search_path import (
    OPTION_GROUPS,
    check_config_dirs,
    config_dirs,
    hydra_quote,
    is_recipe_path,
    options,
    recipe_file_overrides,
    recipe_files,
)
from launcher.paths import CONF_DIR, asset
from launcher.safe_read import UnreadableFile, file_problem, read_text, read_yaml_text

GROUPS = ("model", "data", "strategy", "peft", "objective", "launch", "recipe")
DEFAULT_RECIPE = "demo"

_resolvers_registered = False


def register_resolvers() -> None:
    """`${ftl_asset:demo/train.jsonl}` → an absolute path to a file shipped in launcher/assets."""
    global _resolvers_registered
    if _resolvers_registered:
        return
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("ftl_asset", asset, replace=True)
    _resolvers_registered = True


def recipe_description(path: Path) -> tuple[str, str]:
    """(one-line description, run command) from a recipe's header comment."""
    description, command = "", ""
    try:
        text = read_text(path)
    except UnreadableFile as e:
        return f"(cannot be read: {e})", ""
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.lower().startswith("run:"):
            command = text[4:].strip()
        elif text and not text.startswith("@") and not description:
            description = text
    return description, command


def register_schema() -> None:
    """The typed schema in Hydra's ConfigStore: `ftl_schema`, and each union's variants under
    `schema/<group>/<option>`, for tools that want OmegaConf's own typed merge."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="ftl_schema", node=FtlConfig)
    for group, (_, variants) in UNIONS.items():
        for tag, cls in variants.items():
            cs.store(group=f"schema/{group}", name=tag, node=cls)


_PACKAGE = re.compile(r"^#\s*@package\s+(\S+)", re.MULTILINE)
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")  # an option's name: what a file in a group folder is called


def load_option(path: Path) -> tuple[Any, Optional[str]]:
    """One recipe or config-group option, read safely, with its defaults list checked: (the node,
    the package its ``# @package`` header names, if any). Raises UnreadableFile naming the file."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    text = read_yaml_text(path)
    try:
        node = OmegaConf.create(text)
    except OmegaConfBaseException as e:  # YAML that parses but OmegaConf refuses (a duplicate key)
        raise UnreadableFile(f"{path}: {_first_line(e)}") from None
    if not OmegaConf.is_dict(node):
        raise UnreadableFile(f"{path}: expected a mapping of config keys, got a list")
    bad = _defaults_problem(node.get("defaults"))
    if bad:
        raise UnreadableFile(f"{path}: defaults: {bad}")
    header = _PACKAGE.search(text.split("\n\n", 1)[0])
    return node, header.group(1) if header else None


def _defaults_problem(defaults: Any) -> str:
    """A defaults-list entry that names an option by a path rather than a name
    (``override /model: ../../x`` would read any YAML on disk), or ""."""
    from omegaconf import OmegaConf

    if defaults is None:
        return ""
    if not OmegaConf.is_list(defaults):
        return f"expected a list, got {defaults!r}"
    for entry in OmegaConf.to_container(defaults):
        pairs = entry.items() if isinstance(entry, dict) else [(entry, None)]  # `- name` or `- group: name(s)`
        for key, value in pairs:
            names = value if isinstance(value, list) else [value]
            if ".." in str(key).split("/") or any(n is not None and not _NAME.match(str(n)) for n in names):
                shown = str(key) if value is None else f"{key}: {value}"
                return (
                    f"{shown!r} names a file by a path; an option is named by its file's stem in the group's folder "
                    "(ftl's conf/ or a config dir), e.g. 'override /model: tiny-llama'"
                )
    return ""


def _register_options(dirs: list[Path], files: dict[str, Path]) -> dict[str, ConfigError]:
    """Serve the recipes (package _global_, honouring their defaults lists) and the config dirs'
    options of each group from Hydra's ConfigStore, read safely; rebuilt on every call (which exist
    depends on the config dirs). Returns the files that could not be read, as "group/name" -> error."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    broken: dict[str, ConfigError] = {}
    served = {"recipe": ({**recipe_files(), **files}, "_global_")}
    for group in OPTION_GROUPS:
        if group in GROUPS:  # sweep/ is read by ftl sweep, not composed
            own = {n: p for n, p in options(group, dirs).items() if not p.is_relative_to(CONF_DIR)}
            served[group] = (own, None)
    for group, (found, package) in served.items():
        cs.repo.pop(group, None)
        for name, path in found.items():
            try:
                node, header = load_option(path)
            except UnreadableFile as e:
                broken[f"{group}/{name}"] = ConfigError(group, str(e))
                continue
            cs.store(group=group, name=name, node=node, package=package or header)
    return broken


def _recipe_file(overrides: list[str]) -> tuple[list[str], dict[str, Path], list[ConfigError]]:
    """``recipe=path/to/file.yaml`` → ``recipe=file`` with that file registered under its stem
    (it wins over a recipe of the same name: the user pointed at it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    out, files, errors = [], {}, []
    for text in recipe_file_overrides(overrides):
        try:
            (ov,) = parser.parse_overrides([text])
        except OverrideParseException:
            out.append(text)  # reported by _check_override_keys
            continue
        value = ov.value()
        if ov.key_or_group == "recipe" and isinstance(value, str) and is_recipe_path(value):
            path = Path(value).expanduser().resolve()
            problem = file_problem(path)
            if problem:
                errors.append(ConfigError("recipe", f"{value}: no such recipe file" if not path.exists() else problem))
                continue
            files[path.stem] = path
            text = f"recipe={hydra_quote(path.stem)}"
        out.append(text)
    return out, files, errors


def name_key_files(errors: list[ConfigError], choices: dict[str, str], overrides: list[str]) -> list[ConfigError]:
    """validate()'s unknown-key errors with the recipe or group file that sets the key: a typo in a
    file is fixed in that file (an unknown key on the command line is _check_override_keys')."""
    from omegaconf import OmegaConf

    chosen = {"recipe": {**recipe_files(), **_recipe_file(overrides)[1]}.get(choices.get("recipe", ""))}
    chosen.update({g: options(g).get(choices.get(g, "")) for g in GROUPS if g != "recipe"})
    keys: dict[Path, Any] = {}
    out = []
    for e in errors:
        if e.message.startswith("unknown key"):
            for group, file in chosen.items():
                if file is None:
                    continue
                if file not in keys:
                    try:
                        node, package = load_option(file)
                        keys[file] = (OmegaConf.to_container(node, resolve=False), package)
                    except UnreadableFile:
                        keys[file] = ({}, None)
                data, package = keys[file]
                prefix = "" if group == "recipe" or package == "_global_" else f"{group}."
                if e.path.startswith(prefix) and _holds(data, e.path[len(prefix) :].split(".")):
                    e = ConfigError(e.path, e.message.replace("unknown key", f"unknown key in {file}", 1))
                    break
        out.append(e)
    return out


def _holds(data: Any, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


def _schema_paths(cls: type, prefix: str = "") -> dict[str, bool]:
    """All dotted paths the schema knows -> whether below it anything goes (a dict/Any field)."""
    out: dict[str, bool] = {}
    for f in fields(cls):
        path = f"{prefix}{f.name}"
        if prefix == "" and f.name in UNIONS:
            out[path] = False
            for variant in UNIONS[f.name][1].values():
                out.update(_schema_paths(variant, path + "."))
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            out[path] = False
            out.update(_schema_paths(type(default), path + "."))
        else:
            out[path] = isinstance(default, dict)
    return out


def _check_override_keys(overrides: list[str]) -> tuple[list[ConfigError], list[str]]:
    """Unknown keys in `a.b=v` overrides, each with the closest valid names, and the overrides
    that passed (composed anyway, so the rest of the config is checked in the same report)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    errors: list[ConfigError] = []
    good: list[str] = []
    known = _schema_paths(FtlConfig)
    parser = OverridesParser.create()
    for text in overrides:
        try:
            (ov,) = parser.parse_overrides([text])
        except OverrideParseException as e:
            errors.append(ConfigError(text, f"cannot parse override: {str(e).splitlines()[0]}"))
            continue
        key = ov.key_or_group
        parents = [".".join(key.split(".")[:i]) for i in range(1, key.count(".") + 1)]
        # groups are checked by Hydra; `+k=v` keys by validate()
        value = ov.value() if key in GROUPS and key != "recipe" and not ov.is_delete() else None
        if isinstance(value, str) and not _NAME.match(value):
            errors.append(
                ConfigError(
                    key,
                    f"{value!r}: an option is named by its file's stem in {key}/ (ftl's conf/ or a "
                    f"config dir), not by a path; available: {', '.join(options(key))}",
                )
            )
            continue
        if key in GROUPS or ov.is_add() or ov.is_force_add() or key in known or any(known.get(p) for p in parents):
            # A model group need not list every architecture field (head_dim, the MoE numbers):
            # setting one it leaves out is setting a schema field, not adding a key.
            plain = not (ov.is_add() or ov.is_force_add() or ov.is_delete())
            good.append(f"++{text}" if plain and key.startswith("model.arch.") and key in known else text)
        else:
            errors.append(ConfigError(key, "unknown key" + suggest(key, known, docs=True)))
    return errors, good


def compose(overrides: list[str]) -> tuple[dict[str, Any], dict[str, str], list[ConfigError]]:
    """Compose conf/ + recipe + overrides into a resolved plain dict, the chosen group options and
    the errors found in the overrides themselves (unknown keys), for validate() to report with its own.

    Raises ConfigErrors (exit 2) when Hydra cannot compose at all (unknown group option, bad syntax).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    dirs = config_dirs()
    dir_errors = check_config_dirs(dirs)
    if dir_errors:
        raise ConfigErrors(dir_errors)
    overrides, files, errors = _recipe_file(overrides)
    key_errors, overrides = _check_override_keys(overrides)
    errors += key_errors
    register_resolvers()
    register_schema()
    broken = _register_options(dirs, files)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="ftl"):
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    except HydraException as e:
        raise ConfigErrors(errors + [_hydra_error(e, broken)]) from None
    except OmegaConfBaseException as e:
        raise ConfigErrors([ConfigError(getattr(e, "full_key", "") or "config", _first_line(e))]) from None
    choices = {g: str(cfg.hydra.runtime.choices.get(g)) for g in GROUPS}
    with _open(cfg):
        del cfg["hydra"]
        cfg.recipe = choices["recipe"]
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as e:
        raise ConfigErrors([ConfigError(getattr(e, "full_key", "") or "config", _first_line(e))]) from None
    assert isinstance(resolved, dict)
    errors += read_model_arch(resolved, choices["model"], overrides)
    resolve_local_paths(resolved)  # after read_model_arch, which compares model.path with the group's as written
    return resolved, choices, errors


def _open(cfg: Any) -> Any:
    from omegaconf import open_dict

    return open_dict(cfg)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _hydra_error(e: Exception, broken: dict[str, ConfigError]) -> ConfigError:
    """Hydra's messages, reworded where a user needs the list of what is allowed; an option that
    is missing because its file could not be read is that file's error."""
    from hydra.errors import MissingConfigException

    missing = getattr(e, "missing_cfg_file", None) or ""
    if missing in broken:
        return broken[missing]
    msg = str(e).strip()
    if isinstance(e, MissingConfigException) and "recipe" in msg:
        names = ", ".join(recipe_files())
        return ConfigError("recipe", f"{msg.splitlines()[0]}\n  available recipes: {names}")
    # "In 'config': Could not find 'model/nope'\n\nAvailable options in 'model': ..." is already good.
    lines = []
    for ln in msg.splitlines():
        if ln.startswith("Config search path"):
            break  # Hydra's search-path dump helps nobody choosing a config option
        if ln.strip():
            lines.append(ln.strip())
    group = ""
    for g in GROUPS:
        if f"'{g}/" in msg or f"'{g}'" in msg:
            group = g
            break
    return ConfigError(group or "overrides", "\n  ".join(lines))
