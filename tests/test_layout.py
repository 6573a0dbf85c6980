"""The package's shape: no import cycles (function-level imports count too), and the command line
is a leaf that nothing imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.paths import PACKAGE_DIR

PACKAGE = PACKAGE_DIR.name


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of the package that ``path`` imports, at any depth of its code. ``from pkg
    import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_command_line_is_a_leaf() -> None:
    importers = sorted(m for m, targets in graph().items() if f"{PACKAGE}.cli" in targets)
    assert importers == [f"{PACKAGE}.__main__"], importers


def test_the_rank_runtime_and_the_engines_import_nothing_above_them() -> None:
    """Floors: the rank runtime (device, process groups, collectives, schedule) sits below the
    engines, and both below the training loop and the launcher: neither imports from train/,
    launch/ or sweep/ (the engines may use the runtime, never the reverse)."""
    above = {"runtime": ("train", "engines", "launch", "sweep", "cli"), "engines": ("train", "launch", "sweep", "cli")}
    offenders = []
    for name, targets in graph().items():
        for floor, higher in above.items():
            if name == f"{PACKAGE}.{floor}" or name.startswith(f"{PACKAGE}.{floor}."):
                offenders += [
                    f"{name} -> {t}"
                    for t in sorted(targets)
                    if any(t == f"{PACKAGE}.{h}" or t.startswith(f"{PACKAGE}.{h}.") for h in higher)
                ]
    assert not offenders, "\n".join(offenders)


# The floors, bottom first: a module may import from its own floor and the floors below, never
# from one above. A package sits on one floor; the few modules that stand on another say why.
FLOORS: list[tuple[str, dict[str, str]]] = [
    (
        "foundation",
        {
            "files": "atomic writes, the dirs ftl made",
            "paths": "ftl's own files",
            "shell": "the one quoting rule",
            "redact": "secrets kept out of output",
            "safe_read": "the one reader of user files",
            "progress": "progress bars and log lines",
            "quiet": "other libraries' noise",
            "wandb_auth": "the W&B key",
            "rundir": "RunPaths names every file of a run dir, for every floor",
            "rundir.paths": "as above",
            "rundir.outcome": "the exit records every rank writes and the launcher reads",
            "runtime.nodes": "node names and the preflight's verdict (pure Python): exit records and the launcher read them",
        },
    ),
    (
        "config",  # torch-free: what a run is and what it needs
        {
            "config": "schema, composition, validation",
            "plan": "the memory and time model the validation checks against",
            "engines.traits": "engine facts (torch-free) the config checks and the planner read; kept beside the engines",
            "model.families": "decoder families and config.json -> arch (torch-free); kept beside the model code",
            "rundir.resume": "what a checkpoint can continue (torch-free): the launcher asks before launch, each rank at start",
        },
    ),
    ("runtime", {"runtime": "device, process groups, collectives, schedule"}),
    ("model and data", {"model": "loading, adapters, attention, the head and loss", "data": "rows to token ids"}),
    ("engines", {"engines": "single, ddp, deepspeed, fsdp"}),
    (
        "objectives and metrics",
        {"objectives": "what the trainer minimises", "eval": "perplexity, BLEU, ROUGE, rewards"},
    ),
    ("train", {"train": "the loop, checkpoints, telemetry"}),
    ("artifacts", {"artifacts": "weights, export, generate"}),
    (
        "launcher",
        {
            "launch": "backends: local, torchrun, slurm",
            "rundir.write": "writes launch.sh from the launch plan",
            "rundir.lock": "one writer per run dir, held by the launcher",
            "session": "preparing a run for every entry",
            "eval.job": "`ftl eval`: a command that launches like `ftl train`",
            "eval.judge": "`ftl eval --judge`: loads its judge as `ftl generate` loads a model",
            "launch.slurm_job": "the job's side of the slurm backend (`sbatch slurm/train.sbatch`, a sweep's job)",
        },
    ),
    ("sweep", {"sweep": "W&B and offline sweeps, `ftl train -m`: they run sessions"}),
    (
        "entries",  # a process starts here; nothing imports them
        {
            "cli": "`ftl`",
            "__main__": "`python -m launcher`",
            "train.entry": "one rank (`python -m launcher.train`): prepares its run as `ftl train` would",
            "train.__main__": "as above",
        },
    ),
]


def floor_of(module: str) -> int:
    """The floor of a module of the package: its longest entry in :data:`FLOORS`."""
    parts = module.split(".")[1:] or ["__init__"]
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        for level, (_, members) in enumerate(FLOORS):
            if key in members:
                return level
    raise AssertionError(f"{module} stands on no floor: add it to FLOORS in tests/test_layout.py")


# Upward imports kept, each with its reason: (importer, imported) -> why.
UPWARD_FOR_NOW = {
    ("launcher.train.trainer", "launcher.artifacts.stages"): "model.path=an earlier run: rank 0 exports its start "
    "(the run's weights, adapters merged) before the ranks load it",
}


def test_imports_point_down_the_floors() -> None:
    upward = [
        f"{name} ({FLOORS[floor_of(name)][0]}) -> {t} ({FLOORS[floor_of(t)][0]})"
        for name, targets in sorted(graph().items())
        if name != PACKAGE
        for t in sorted(targets)
        if t != PACKAGE and floor_of(t) > floor_of(name) and (name, t) not in UPWARD_FOR_NOW
    ]
    assert not upward, "imports from a lower floor to a higher one:\n" + "\n".join(upward)


def test_the_floor_check_finds_an_upward_import() -> None:
    assert floor_of(f"{PACKAGE}.config.validate") < floor_of(f"{PACKAGE}.train.trainer")
    assert floor_of(f"{PACKAGE}.engines.traits") < floor_of(f"{PACKAGE}.engines.fsdp")
    assert floor_of(f"{PACKAGE}.train.entry") == len(FLOORS) - 1


def test_only_the_engine_traits_name_engines() -> None:
    """Engine-specific facts come from launcher.engines.traits, not from comparing names elsewhere."""
    offenders = []
    for name, path in modules().items():
        if name.startswith(f"{PACKAGE}.engines."):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ".engine ==" in line or ".engine !=" in line or ".engine in (" in line:
                offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# A run-dir file name spelled outside launcher/rundir, allowed where it names something else:
# (module, name) -> why.
RUN_DIR_NAME_ELSEWHERE = {
    ("launcher.paths", "config.yaml"): "conf/config.yaml, the root of the shipped config tree, not a run dir's file",
}


def run_dir_name_literals(source: str) -> list[tuple[int, str]]:
    """(line, name) for each run-dir file name that ``source`` spells (:class:`RunPaths`' names): a
    string or f-string piece that is a file-like name (config.yaml, .ftl-lock, earlier-), or any
    name, plain words included, joined onto a path (``run_dir / "logs"``) or made a constant
    (``LOG_DIR = "logs"``). A plain word elsewhere (the eval split, the `ftl eval` command) and
    prose in messages and docstrings are not names."""
    from launcher.rundir import RunPaths

    names = set(RunPaths.names().values())
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value in names and any(c in node.value for c in "._-"):
            out.append((node.lineno, node.value))
        joined = node.value if isinstance(node, ast.Assign) else None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            joined = node.right
        if isinstance(joined, ast.Constant) and joined.value in names and not any(c in joined.value for c in "._-"):
            out.append((node.lineno, joined.value))
    return sorted(out)


def test_the_run_dir_name_finder_finds_names() -> None:
    source = (
        'a = run_dir / "metrics.jsonl"\nb = run_dir / "logs"\nc = x == "eval"\nLOG_DIR = "logs"\n'
        'd = "see eval.json"\ne = f"{x}.ftl-lock"\nf = ".ftl-run"\n'
    )
    assert run_dir_name_literals(source) == [
        (1, "metrics.jsonl"),
        (2, "logs"),
        (4, "logs"),
        (6, ".ftl-lock"),
        (7, ".ftl-run"),
    ]


def test_only_the_run_dir_package_spells_run_dir_file_names() -> None:
    """One owner per on-disk layout (submitit's JobPaths): every other module asks
    launcher.rundir.RunPaths for a run dir's files."""
    offenders = []
    for name, path in modules().items():
        if name == f"{PACKAGE}.rundir" or name.startswith(f"{PACKAGE}.rundir."):
            continue
        for line, found in run_dir_name_literals(path.read_text()):
            if (name, found) not in RUN_DIR_NAME_ELSEWHERE:
                offenders.append(
                    f"{path.relative_to(PACKAGE_DIR.parent)}:{line}: {found!r} (use launcher.rundir.RunPaths)"
                )
    assert not offenders, "\n".join(offenders)


def test_the_run_dir_package_imports_nothing_heavy() -> None:
    """The ranks and the CLI import it: it imports no torch (and nothing else heavy)."""
    code = (
        "import sys, launcher.rundir, launcher.rundir.lock, launcher.rundir.write; "
        "print('HEAVY', [m for m in ('torch', 'transformers', 'deepspeed', 'peft') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE_DIR.parent
    )
    assert out.returncode == 0 and "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_make_tests_workers_get_whole_files_and_the_slurm_files_together(request: pytest.FixtureRequest) -> None:
    """tests/conftest.py groups the collected tests for ``make test``'s two xdist workers: one group
    per file, except that every file with a ``slurm`` test joins the group ``slurm``."""
    groups: dict[Path, set[str]] = {}
    for item in request.session.items:
        mark = item.get_closest_marker("xdist_group")
        assert mark is not None, f"{item.nodeid} has no xdist group"
        groups.setdefault(item.path, set()).add(mark.args[0])
    assert all(len(g) == 1 for g in groups.values()), "a file's tests split across groups"
    assert groups[request.node.path] == {"tests/test_layout.py"}
    slurm_files = {item.path for item in request.session.items if item.get_closest_marker("slurm")}
    assert all(groups[f] == {"slurm"} for f in slurm_files)
    if request.config.getoption("loadgroup", default=False):  # an xdist worker under --dist loadgroup
        # xdist passes a test's group to its scheduler as a nodeid suffix; where pytest ignores that
        # (pytest 9.2 with xdist 3.8: pytest-dev/pytest-xdist#1386) every test is scheduled alone.
        assert request.node.nodeid.endswith("@tests/test_layout.py"), (
            f"{request.node.nodeid}: xdist did not get the group"
        )
