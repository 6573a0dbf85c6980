"""``model.source=hf``: the architecture read from the model's own config.json, at composition.

A model group (conf/model/*.yaml) carries architecture numbers so that a run can be planned with no
weights in reach. When ``model.path`` is a local directory with a config.json, or a hub id already
in the local Hugging Face cache, that file is the truth instead: ftl reads ``model.arch`` from it
(JSON only: `ftl plan` imports no torch), and — when the path is not the one the model group was
written for — the model's name from the path and its tokenizer from the same place. Explicit
``model.arch.*`` overrides on the command line still win; one that contradicts the weights' shapes
is an error naming both. A path the model group does not describe and whose config.json cannot be
read is an error too: the numbers of some other model would plan it. A path naming an earlier stage
(an ftl run, or a PEFT adapter: :mod:`launcher.config.stage`) gives the architecture of the model it
starts from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.config.errors import ConfigError
from launcher.config.search_path import options
from launcher.shell import quote


def _explicit(overrides: list[str], prefix: str) -> set[str]:
    """The keys under ``prefix`` that command-line overrides set (``model.arch.x=1`` → ``x``)."""
    keys = set()
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~")
        if key.startswith(prefix):
            keys.add(key[len(prefix) :])
    return keys


def _group_values(model_choice: str) -> dict[str, Any]:
    """The model group's own file, resolved where it can be (``${ftl_asset:...}``): what
    ``model.*`` holds when nothing else set it."""
    from omegaconf import OmegaConf

    from launcher.safe_read import read_yaml_text

    file = options("model").get(model_choice)
    if file is None:
        return {}
    try:
        node = OmegaConf.create(read_yaml_text(file))
        try:
            data = OmegaConf.to_container(node, resolve=True)
        except Exception:  # an interpolation of the whole config: compare the text as written
            data = OmegaConf.to_container(node, resolve=False)
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def read_model_arch(raw: dict[str, Any], model_choice: str, overrides: list[str]) -> list[ConfigError]:
    """Fill ``raw["model"]`` from the model's config.json, in place; the errors found."""
    from launcher.model.families import (
        UnsupportedModel,
        arch_differences,
        arch_from_hf_config,
        has_tokenizer,
        name_from_path,
        read_hf_config,
    )

    model = raw.get("model")
    if (
        not isinstance(model, dict)
        or model.get("source") != "hf"
        or not isinstance(model.get("path"), str)
        or not model["path"]
    ):
        return []
    from launcher.config.stage import StageError, earlier_stage

    path = model["path"]
    group = _group_values(model_choice)
    ours = path == group.get("path")  # the path the model group's numbers were written for
    where = path
    try:
        stage = earlier_stage(path)
    except StageError as e:
        return [ConfigError("model.path", str(e))]
    if stage is not None and stage.kind == "run":
        return _earlier_run_model(model, stage.model, overrides)
    try:
        if stage is not None:  # an adapter: its base's architecture
            where = f"{stage.base} (the base of the adapter {path})"
        config, where = read_hf_config(stage.base if stage else path, None if stage else model.get("revision"))
        arch = arch_from_hf_config(config) if config is not None else None
    except UnsupportedModel as e:  # each bad value of the file, named
        return [ConfigError("model.path", f"{where}: {problem}") for problem in e.problems]
    if arch is None:
        if ours:
            return []  # the model group's own numbers describe it
        fix = (
            f"download it first (huggingface-cli download {quote(path)})"
            if where.startswith("hub id")
            else "check model.path"
        )
        return [
            ConfigError(
                "model.path",
                f"cannot read the architecture of {path!r}: {where}. ftl plans and checks a run "
                f"with the model's own numbers: {fix}, or describe the model in a model group of your config dir "
                "(model/NAME.yaml with source, path and arch, as conf/model/llama3-8b.yaml)",
            )
        ]
    given = model.get("arch") if isinstance(model.get("arch"), dict) else {}
    explicit = {k: given[k] for k in _explicit(overrides, "model.arch.") if k in given}
    shapes, _ = arch_differences(explicit, arch)
    if shapes:
        return [
            ConfigError(
                "model.arch",
                f"overrides contradict the weights in {path} ({where}), override vs config.json: "
                f"{'; '.join(shapes)}; drop them, or point model.path at the model they describe",
            )
        ]
    model["arch"] = {**arch, **explicit}
    if not ours:  # the model group's name and tokenizer belong to its own model, unless set again
        explicit_model = _explicit(overrides, "model.")
        if "name" not in explicit_model and model.get("name") == group.get("name"):
            model["name"] = name_from_path(path)
        if "tokenizer" not in explicit_model and model.get("tokenizer") == group.get("tokenizer"):
            model["tokenizer"] = ""  # the model's own, from model.path
        local = Path(path).expanduser()
        if stage is not None and not model.get("tokenizer") and not has_tokenizer(local):
            model["tokenizer"] = stage.base  # the adapter's base's own
        elif not model.get("tokenizer") and local.is_dir() and not has_tokenizer(local):
            return [
                ConfigError(
                    "model.tokenizer",
                    f"{local} holds no tokenizer (tokenizer.json, tokenizer_config.json, ...); "
                    "set model.tokenizer to a directory or hub id that has one",
                )
            ]
    return []


def _earlier_run_model(model: dict[str, Any], earlier: dict[str, Any], overrides: list[str]) -> list[ConfigError]:
    """``model.path`` is an earlier ftl run: its architecture (what the start will be: a merged
    adapter keeps the base's shapes) and name; the tokenizer comes with the start, made on the rank."""
    from launcher.model.families import name_from_path

    arch = earlier.get("arch") if isinstance(earlier.get("arch"), dict) else None
    if arch is None:
        return [ConfigError("model.path", f"{model['path']}: the earlier run's config records no model.arch")]
    explicit = _explicit(overrides, "model.")
    given = model.get("arch") if isinstance(model.get("arch"), dict) else {}
    model["arch"] = {**arch, **{k: given[k] for k in _explicit(overrides, "model.arch.") if k in given}}
    if "name" not in explicit:
        model["name"] = f"{earlier.get('name') or 'model'} from {name_from_path(model['path'])}"
    if "tokenizer" not in explicit:
        model["tokenizer"] = ""
    return []
