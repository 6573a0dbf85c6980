"""Which node a failed SLURM job blames (launcher.launch.bad_nodes), from what its run left in the
run dir. The requeue itself runs on the local SLURM cluster (tests/launch/test_slurm_cluster.py)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from launcher.launch.bad_nodes import Blame, blame, main, node_requeues, record
from launcher.rundir import RunPaths

SINCE = 1000.0


def exits(run_dir: Path, *records: tuple[int, int, str, float], world: int = 4) -> None:
    folder = RunPaths(run_dir).exits
    folder.mkdir(parents=True, exist_ok=True)
    for rank, code, node, when in records:
        (folder / f"rank-{rank}.json").write_text(
            json.dumps({"rank": rank, "world_size": world, "code": code, "time": when, "node": node})
        )


@pytest.fixture(autouse=True)
def _keep_sigterm():
    """main() ignores SIGTERM (its own process, under scontrol requeuehold); run in-process here, the
    pytest worker gets its handler back, or every later child would start with SIGTERM ignored (bash cannot trap it)."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def hung(run_dir: Path, *records: tuple[int, str, float, bool], world: int = 4) -> None:
    """Exit records of ranks the watchdog ended: (rank, node, time, in_collective)."""
    exits(run_dir, *((rank, 124, node, when) for rank, node, when, _ in records), world=world)
    for rank, _, _, waiting in records:
        path = RunPaths(run_dir).exits / f"rank-{rank}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "in_collective": waiting}))


def hung_four(run_dir: Path, waiting: tuple[bool, ...]) -> None:
    """Ranks 0-1 on n1, 2-3 on n2, all ended by the watchdog (rank 1's first), each waiting in a
    collective or not as ``waiting`` says."""
    fired = ((0, "n1", SINCE + 9.3), (1, "n1", SINCE + 9.1), (2, "n2", SINCE + 9.4), (3, "n2", SINCE + 9.2))
    hung(run_dir, *((rank, node, when, w) for (rank, node, when), w in zip(fired, waiting)))


def preflight(run_dir: Path, when: float, failed: tuple[str, ...] = ()) -> None:
    nodes = [{"host": "n1", "ranks": [0, 1]}, {"host": "n2", "ranks": [2, 3]}]
    RunPaths(run_dir).preflight.write_text(json.dumps({"time": when, "failed": list(failed), "nodes": nodes}))


def test_the_first_rank_to_fail_names_its_node(tmp_path):
    exits(
        tmp_path,
        (0, 1, "n1", SINCE + 9.2),
        (1, 1, "n1", SINCE + 9.3),
        (2, 1, "n2", SINCE + 9.1),
        (3, 1, "n2", SINCE + 9.4),
    )
    assert blame(tmp_path, SINCE) == Blame(["n2"], "rank 2 there failed first (exit code 1)")


def test_records_of_an_earlier_run_are_not_evidence(tmp_path):
    exits(tmp_path, (0, 1, "n1", SINCE - 50), (1, 0, "n1", SINCE + 5), (2, 0, "n2", SINCE + 5), (3, 0, "n2", SINCE + 5))
    assert blame(tmp_path, SINCE) is None


def test_bad_data_or_a_stop_blames_no_node(tmp_path):
    exits(
        tmp_path, (0, 2, "n1", SINCE + 1), (1, 2, "n1", SINCE + 1), (2, 130, "n2", SINCE + 1), (3, 2, "n2", SINCE + 1)
    )
    assert blame(tmp_path, SINCE) is None


def test_ranks_without_a_record_name_their_node_when_the_preflight_mapped_them(tmp_path):
    """Ranks 2 and 3 crashed (no record); ranks 0 and 1 failed after them, when their peers vanished."""
    preflight(tmp_path, SINCE + 1)
    exits(tmp_path, (0, 1, "n1", SINCE + 9), (1, 1, "n1", SINCE + 9))
    assert blame(tmp_path, SINCE) == Blame(
        ["n2"], "rank(s) 2, 3 there ended without an exit record (killed or crashed)"
    )
    preflight(tmp_path, SINCE - 100)  # an earlier run's map: not this run's
    assert blame(tmp_path, SINCE) == Blame(["n1"], "rank 0 there failed first (exit code 1)")


def test_the_preflight_names_the_failing_node_first(tmp_path):
    preflight(tmp_path, SINCE + 1, failed=("n2",))
    exits(tmp_path, (0, 1, "n1", SINCE + 2), (1, 1, "n1", SINCE + 2), (2, 1, "n2", SINCE + 3), (3, 1, "n2", SINCE + 3))
    assert blame(tmp_path, SINCE) == Blame(["n2"], "the preflight found it failing")


def test_a_hang_names_the_node_of_the_rank_in_no_collective_not_the_first_to_fire(tmp_path):
    """Rank 1's watchdog fired first, but it waited in a collective: rank 2, stuck elsewhere, is the hang."""
    hung_four(tmp_path, (True, True, False, True))
    assert blame(tmp_path, SINCE) == Blame(
        ["n2"], "the watchdog found rank(s) 2 there hung outside any collective, the others waiting in one"
    )


@pytest.mark.parametrize("waiting", [True, False], ids=["all-in-collectives", "none-in-collectives"])
def test_a_hang_that_collectives_cannot_tell_falls_back_to_the_first_rank_to_fail(tmp_path, waiting):
    hung_four(tmp_path, (waiting,) * 4)
    assert blame(tmp_path, SINCE) == Blame(["n1"], "rank 1 there failed first (exit code 124)")


def test_hung_records_without_the_collective_key_fall_back_too(tmp_path):
    """Records an older ftl wrote: the same exit records, no in_collective."""
    exits(tmp_path, (0, 124, "n1", SINCE + 9.3), (1, 124, "n2", SINCE + 9.1), world=2)
    assert blame(tmp_path, SINCE) == Blame(["n2"], "rank 1 there failed first (exit code 124)")


def test_node_requeues_are_counted_per_job_and_run(tmp_path):
    path = RunPaths(tmp_path).excluded_nodes
    assert node_requeues(path, "7") == 0
    record(path, Blame(["n1", "n3"], "why"), "7", 0)
    record(path, Blame(["n2"], "why"), "8", 0)
    assert path.read_text().splitlines()[0] == "n1\t7\t0\twhy"
    assert node_requeues(path, "7") == 1 and node_requeues(path, "8") == 1
    record(path, Blame(["n4"], "why"), "7", 1)
    assert node_requeues(path, "7") == 2


def test_no_requeue_without_a_node_to_blame_or_once_the_limit_is_spent(tmp_path, capsys):
    args = [str(tmp_path), "--job", "7", "--since", str(SINCE), "--restarts", "1"]
    assert main([*args, "--max", "1"]) == 1
    assert "cannot tell which node failed: not requeueing" in capsys.readouterr().err
    exits(tmp_path, (0, 1, "n1", SINCE + 1), world=1)
    record(RunPaths(tmp_path).excluded_nodes, Blame(["n2"], "earlier"), "7", 0)
    assert main([*args, "--max", "1"]) == 1
    assert (
        "node(s) n1 failed (rank 0 there failed first (exit code 1)); not requeueing: launch.max_node_requeues=1"
        in (capsys.readouterr().err)
    )
    assert "n1" not in RunPaths(tmp_path).excluded_nodes.read_text()


@pytest.fixture(autouse=True)
def no_scontrol(monkeypatch):
    """These tests never reach scontrol: an empty PATH makes sure a real cluster is never touched."""
    monkeypatch.setenv("PATH", "")
