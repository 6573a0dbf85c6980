"""Local paths made absolute once, at composition, so a run can be read from anywhere.

A run's config.yaml is read again later from other directories: by every rank of a SLURM job, by
`ftl eval RUN` and `ftl generate RUN` run elsewhere, by a run that starts from another run's export.
A relative ``data.train_files`` entry or ``model.path`` would then name nothing, or — for a model —
be taken for a hub id and sent to the network. :func:`resolve_local_paths` rewrites every path
value of the composed tree against the directory ftl was started in; :func:`hub_or_local` is the
one rule that tells a local model path from a hub id, and refuses a local path that is not there
before anything asks a hub for it. Imports nothing heavy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

HUB_PREFIX = "hub:"  # a data source on the Hugging Face Hub (data.sources[].path=hub:ORG/NAME)


def is_hub(path: str) -> bool:
    return path.startswith(HUB_PREFIX)


RESUME_WORDS = ("auto", "never")  # checkpoint.resume values that are not a checkpoint directory


class MissingLocalPath(ValueError):
    """A model or tokenizer value written as a local path names nothing on this machine."""


def absolute(value: str) -> str:
    """``value`` against the current directory, ``~`` expanded; symlinks and ``..`` kept as the user
    wrote them (folding ``link/..`` by text would name another directory than the system does)."""
    return str(Path.cwd() / os.path.expanduser(value))


def is_local_path(value: str) -> bool:
    """Whether a model or tokenizer value names a path on this machine rather than a hub id (NAME or
    ORG/NAME): it exists here; it is written as a path (absolute, ``./``, ``../``, ``~``, a trailing
    slash, more than one ``/``); or its first folder exists here (``exports/sft`` beside an
    ``exports/`` folder is a typo in a local path, not a model of a hub user called exports)."""
    if not value:
        return False
    if value.startswith(("/", "./", "../", "~")) or value in (".", "..") or value.endswith("/") or "\\" in value:
        return True
    if Path(value).exists():
        return True
    parts = value.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def hub_or_local(value: str, what: str = "model") -> str:
    """``value`` as transformers should be given it: an existing local path made absolute, or a hub
    id unchanged. A local path that does not exist raises MissingLocalPath naming it: it is never
    looked up on the hub (that costs a network timeout and then says the wrong thing)."""
    if not is_local_path(value):
        return value
    path = absolute(value)
    if not Path(path).exists():
        where = "" if path == value else f" (from {os.getcwd()})"
        raise MissingLocalPath(
            f"{what} {value!r}: no such directory {path}{where}; a local path is never looked up on the hub"
        )
    return path


def resolve_local_paths(raw: dict[str, Any]) -> None:
    """Every local path of a composed config made absolute, in place: model.path and
    model.tokenizer when they name local paths (hub ids stay), the data files and local data
    sources, a checkpoint directory in checkpoint.resume, run.dir and launch.hf_home."""
    model = raw.get("model")
    if isinstance(model, dict):
        for key in ("path", "tokenizer"):
            if isinstance(model.get(key), str) and is_local_path(model[key]):
                model[key] = absolute(model[key])
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train_files", "eval_files"):
            if isinstance(data.get(key), list):
                data[key] = [_data_path(p) for p in data[key]]
        for source in data.get("sources") or []:
            if isinstance(source, dict) and "path" in source:
                source["path"] = _data_path(source["path"])
    checkpoint = raw.get("checkpoint")
    if isinstance(checkpoint, dict):
        resume = checkpoint.get("resume")
        if isinstance(resume, str) and resume and resume not in RESUME_WORDS:
            checkpoint["resume"] = absolute(resume)
    run = raw.get("run")
    if isinstance(run, dict) and isinstance(run.get("dir"), str) and run["dir"]:
        run["dir"] = absolute(run["dir"])
    launch = raw.get("launch")
    if isinstance(launch, dict) and isinstance(launch.get("hf_home"), str):
        launch["hf_home"] = _unless_variable(launch["hf_home"])


def _data_path(value: Any) -> Any:
    if not isinstance(value, str) or not value or is_hub(value):
        return value
    return absolute(value)


def _unless_variable(value: str) -> Optional[str]:
    """A path the job's shell expands itself (``$SCRATCH/hf``) stays as written."""
    return value if not value or value.startswith("$") else absolute(value)
