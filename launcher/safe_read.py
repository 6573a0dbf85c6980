"""Reading a file the user named: data files, recipes and config-group YAML, a model's config.json.

Every such read goes through here, so that no file ftl is given can hang it, exhaust its memory or
end it with a traceback:

* only regular files are opened: a FIFO, a device, a socket or a directory is refused after an
  ``os.stat`` and before any ``open`` (which is itself non-blocking, so a file swapped for a FIFO
  in between cannot block either);
* whole-file reads are capped (:data:`MAX_CONFIG_BYTES` for YAML and config.json,
  :data:`MAX_DATA_BYTES` for a data file read at once, :data:`MAX_ROW_BYTES` for one JSONL row);
* nesting is bounded: JSON deeper than Python's recursion allows is reported, not raised, and a
  YAML file whose aliases would expand past :data:`MAX_YAML_NODES` nodes (a "billion laughs") is
  refused before anything expands it;
* every problem is an :class:`UnreadableFile` whose message names the file and, where there is
  one, the line and column. Callers turn it into their own error (exit 2).

Imports nothing heavy (PyYAML inside the YAML reader).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, Union

MAX_CONFIG_BYTES = 16 << 20  # a recipe, a config-group option or a config.json: real ones are a few KB
MAX_DATA_BYTES = 4 << 30  # a .json or .csv data file is parsed whole in memory; JSONL and Parquet stream
MAX_ROW_BYTES = 256 << 20  # one JSONL row
MAX_YAML_NODES = 100_000  # nodes of a YAML document with every alias expanded; recipes have a few hundred

PathLike = Union[str, Path]


class UnreadableFile(ValueError):
    """A file ftl cannot or will not read; the message names it."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def file_problem(path: PathLike) -> str | None:
    """Why ``path`` is not a regular file ftl can open (it does not exist, it is a FIFO, a device,
    a socket or a directory), or None. Stats only; never opens."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path}: no such file"
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is {_kind(st.st_mode)}, not a regular file"
    return None


def open_regular(path: PathLike) -> BinaryIO:
    """``path`` opened for binary reading, once it is known to be a regular file."""
    problem = file_problem(path)
    if problem:
        raise UnreadableFile(problem)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UnreadableFile(f"{path}: cannot be read ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced between the stat and the open
        os.close(fd)
        raise UnreadableFile(f"{path} is {_kind(st.st_mode)}, not a regular file")
    return os.fdopen(fd, "rb")


def read_bytes(path: PathLike, limit: int) -> bytes:
    """A regular file's bytes, refused when it is larger than ``limit``."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnreadableFile(f"{path} is larger than {_size(limit)}, more than ftl reads from such a file")
    return data


def decode_utf8(data: bytes, path: PathLike) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UnreadableFile(f"{path}, line {line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def read_text(path: PathLike, limit: int = MAX_CONFIG_BYTES) -> str:
    return decode_utf8(read_bytes(path, limit), path)


def parse_json(text: Union[str, bytes]) -> Any:
    """``json.loads``, with nesting too deep for Python reported as a ValueError like any other
    syntax problem (``json.JSONDecodeError`` carries line and column; the depth error has none).
    Text that ends too early is placed where its last character is, not past a final newline
    (json puts the end of a JSONL row, read with its newline, at line 2 column 1)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        end = len(e.doc.rstrip())
        if e.pos <= end:
            raise
        raise json.JSONDecodeError(f"{e.msg}; the text ends there", e.doc, end) from None
    except RecursionError:
        raise ValueError(
            "nested too deeply (arrays or objects within each other past Python's recursion limit)"
        ) from None


def json_problem(e: ValueError) -> str:
    """A parse_json error as ``line L: invalid JSON (...)`` text."""
    if isinstance(e, json.JSONDecodeError):
        return f"line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
    return f"invalid JSON ({e})"


def load_json(path: PathLike, limit: int = MAX_CONFIG_BYTES) -> Any:
    """A JSON file (a config.json), read under ``limit`` bytes."""
    text = read_text(path, limit)
    try:
        return parse_json(text)
    except ValueError as e:
        raise UnreadableFile(f"{path}, {json_problem(e)}") from None


def read_yaml_text(path: PathLike) -> str:
    """A YAML file's text, once it is known to parse and to expand to at most
    :data:`MAX_YAML_NODES` nodes; the caller parses it again with its own loader (OmegaConf)."""
    import yaml

    text = read_text(path)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        # Counted as the parser streams, before any node is built: a file of millions of plain
        # nodes (a 12 MB list) took a minute and a GB to compose only to be refused.
        nodes = 0
        for event in yaml.parse(text, Loader=loader):
            nodes += isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.CollectionStartEvent))
            if nodes > MAX_YAML_NODES:
                raise UnreadableFile(f"{path}: more than {MAX_YAML_NODES:,} YAML nodes; ftl reads no YAML that large")
        node = yaml.compose(text, Loader=loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UnreadableFile(f"{path}{where}: invalid YAML ({problem})") from None
    except RecursionError:
        raise UnreadableFile(f"{path}: invalid YAML (nested too deeply)") from None
    if node is not None and _expanded_nodes(node, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise UnreadableFile(
            f"{path}: its aliases (*name) expand to more than {MAX_YAML_NODES:,} YAML nodes; "
            "ftl reads no YAML that large (a 'billion laughs' file?)"
        )
    return text


def _expanded_nodes(root: Any, limit: int) -> int:
    """How many nodes the document has with every alias expanded, counted once per distinct node
    (an alias is the same node object again), so a file of exponential expansion costs linear time.
    Stops counting past ``limit``; a node that contains itself counts as past it."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if not children_done and id(node) in open_nodes:
            return limit + 1
        children = _children(node)
        if children_done or not children:
            sizes[id(node)] = min(limit + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: Any) -> list[Any]:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _size(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):g} MiB"
