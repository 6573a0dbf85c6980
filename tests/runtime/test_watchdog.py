"""The hang watchdog, a stop signal that reaches one rank, and what an interrupted job prints: the
limits as arithmetic, then real 2-rank gloo runs under `ftl train`."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.config.compose import compose
from launcher.config.schema import WatchdogConfig
from launcher.config.validate import validate
from launcher.paths import ROOT
from launcher.rundir import RunPaths
from launcher.rundir.outcome import read_exits, summarize
from launcher.runtime.watchdog import (
    EXIT_HUNG,
    TEST_HANG_ENV,
    Limits,
    Watchdog,
    hangs_here,
    in_collective,
    limits_of,
)
from tests.helpers import TINY, TWO_RANKS, ftl, ftl_env, metrics

DDP = [*TINY, *TWO_RANKS, "strategy=ddp", "checkpoint.resume=never", "eval.after_training=false"]


def test_limits_default_to_half_the_collective_timeout_and_to_the_io_timeout() -> None:
    assert limits_of(WatchdogConfig(), 600, 1800) == Limits(10.0, 300.0, 1800.0, 1800.0)
    assert limits_of(WatchdogConfig(floor_s=20.0, phase_s=50.0), 600, 1800) == Limits(10.0, 20.0, 1800.0, 50.0)
    assert limits_of(WatchdogConfig(enabled=False), 600, 1800) is None


def test_a_step_may_take_a_multiple_of_the_median_step_and_never_less_than_the_floor(tmp_path: Path) -> None:
    dog = Watchdog(Limits(step_multiple=10.0, floor_s=5.0, first_step_s=100.0, phase_s=50.0), tmp_path, 0, 1)
    dog.enter("model")
    assert dog.current() == ("model", 50.0)
    dog.training()
    assert dog.current() == ("step 1", 100.0)
    dog.step_done(1, 30.0)  # the first step compiles and warms up: no measure of a step
    assert dog.current() == ("step 2", 100.0)
    dog.step_done(2, 0.1)
    assert dog.current() == ("step 3", 5.0)  # 10 x 0.1 s is below the floor
    dog.step_done(3, 2.0)
    dog.step_done(4, 3.0)
    assert dog.current() == ("step 5", 20.0)  # 10 x the median of 0.1, 2, 3
    with dog.during("checkpoint of step 4"):
        assert dog.current() == ("checkpoint of step 4", 50.0)
    assert dog.current() == ("step 5", 20.0)


def test_a_floor_at_or_above_the_collective_timeout_is_refused() -> None:
    raw, _, errors = compose(["recipe=tiny", "launch.dist_timeout_s=60", "train.watchdog.floor_s=60"])
    assert errors == []
    _, errors = validate(raw)
    assert [e.path for e in errors] == ["train.watchdog.floor_s"]
    assert "not below launch.dist_timeout_s=60" in errors[0].message
    raw, _, _ = compose(
        ["recipe=tiny", "launch.dist_timeout_s=60", "train.watchdog.floor_s=60", "train.watchdog.enabled=false"]
    )
    assert validate(raw)[1] == []


def test_a_hung_summary_names_the_ranks_and_the_logs(tmp_path: Path) -> None:
    RunPaths(tmp_path).exits.mkdir()
    for rank in (0, 1):
        (RunPaths(tmp_path).exits / f"rank-{rank}.json").write_text(
            json.dumps({"rank": rank, "world_size": 2, "code": 124})
        )
    code, message = summarize(1, tmp_path, None)
    assert code == EXIT_HUNG and "rank(s) 0, 1" in message and str(RunPaths(tmp_path).logs) in message


PEER = """
import json, os, sys, time
from pathlib import Path
from launcher.rundir import RunPaths
from launcher.runtime.watchdog import Limits, Watchdog
paths = RunPaths(sys.argv[1])
Watchdog(Limits(10.0, 100.0, 100.0, 100.0), paths.root, rank=1, world=2, poll_s=0.05).start().enter("data")
time.sleep(0.5)
print("an earlier run's marker changes nothing", flush=True)
paths.stacks(0).write_text("rank 0's stacks")
paths.hang.write_text(json.dumps({"rank": 0}))
time.sleep(60)
"""


def test_a_marker_from_this_run_fires_every_rank_and_an_earlier_runs_does_not(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    paths.logs.mkdir()
    paths.hang.write_text(json.dumps({"rank": 3}))
    os.utime(paths.hang, (time.time() - 60, time.time() - 60))
    proc = subprocess.run(
        [sys.executable, "-c", PEER, str(tmp_path)], cwd=ROOT, env=ftl_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == EXIT_HUNG, proc.stderr
    assert "an earlier run's marker changes nothing" in proc.stdout
    assert "rank 0 found a hang; this rank was in data for" in paths.stacks(1).read_text()
    assert "File " in paths.stacks(1).read_text() and "in <module>" in paths.stacks(1).read_text()


def test_the_test_hang_names_a_rank_a_point_and_maybe_a_host_and_holds_on_the_first_run_only() -> None:
    env = {TEST_HANG_ENV: "1@step-3", "SLURMD_NODENAME": "n1"}
    assert hangs_here(1, "step-3", env)
    assert not hangs_here(0, "step-3", env) and not hangs_here(1, "step-4", env)
    assert hangs_here(1, "step-3", {**env, TEST_HANG_ENV: "1@step-3@n1"})
    assert not hangs_here(1, "step-3", {**env, TEST_HANG_ENV: "1@step-3@n2"})
    assert not hangs_here(1, "step-3", {**env, "SLURM_RESTART_COUNT": "1"})  # the requeued run goes on
    assert not hangs_here(1, "step-3", {"SLURMD_NODENAME": "n1"})


def test_a_thread_outside_torch_distributed_is_in_no_collective() -> None:
    """The other side, a thread inside a collective, is shown by the 2-rank runs below (their exit records)."""
    assert not in_collective(sys._getframe())
    assert not in_collective(None)


def assert_hung_with_every_ranks_stacks(proc: subprocess.CompletedProcess[str], run_dir: Path, hung_in: str) -> None:
    """Rank 1 hung outside any collective (the test hook's sleep); rank 0 waited in one, and each
    exit record says so (what picks the node to exclude under SLURM)."""
    paths = RunPaths(run_dir)
    assert proc.returncode == EXIT_HUNG, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert read_exits(run_dir) == ({0: EXIT_HUNG, 1: EXIT_HUNG}, 2)
    records = {r: json.loads((paths.exits / f"rank-{r}.json").read_text()) for r in (0, 1)}
    assert (records[0]["in_collective"], records[1]["in_collective"]) == (True, False), records
    assert "its main thread is in no collective" in paths.stacks(1).read_text()
    assert json.loads(paths.hang.read_text())["rank"] in (0, 1)
    stacks = {rank: paths.stacks(rank).read_text() for rank in (0, 1)}
    assert "_test_hang" in stacks[1] and hung_in in stacks[1]  # where the hung rank stopped
    assert "_test_hang" not in stacks[0] and "(most recent call first)" in stacks[0]
    for rank in (0, 1):  # gloo's flight recorder: this rank's recent collectives
        assert pickle.loads(paths.collectives_trace(rank).read_bytes())["entries"], rank
    assert "hung: the watchdog found no progress" in proc.stderr


def test_a_rank_that_stops_stepping_ends_the_job_with_every_ranks_stacks(tmp_path: Path) -> None:
    """Rank 1 stops after step 3; rank 0 waits in step 4's collective. Both watchdogs fire (or the
    marker fires rank 0's), both dump, and the job exits 124 long before the collective timeout."""
    started = time.monotonic()
    proc = ftl(
        "train",
        *DDP,
        "train.max_steps=200",
        "train.watchdog.floor_s=5",
        f"run.dir={tmp_path}",
        check=False,
        env=ftl_env(**{TEST_HANG_ENV: "1@step-3"}),
    )
    assert_hung_with_every_ranks_stacks(proc, tmp_path, "step_done")
    assert "all_reduce" in RunPaths(tmp_path).stacks(0).read_text()  # rank 0 waits in a collective
    assert max(r["step"] for r in metrics(tmp_path)) == 3
    assert time.monotonic() - started < 200  # the collective timeout (60 s) never fired


@pytest.mark.heavy  # over a minute on the 2-core VM
def test_a_phase_before_step_1_that_never_ends_is_caught_and_each_phase_says_its_time(tmp_path: Path) -> None:
    proc = ftl(
        "train",
        *DDP,
        "train.max_steps=3",
        "train.watchdog.phase_s=45",
        f"run.dir={tmp_path}",
        check=False,
        env=ftl_env(**{TEST_HANG_ENV: "1@data"}),
    )
    assert_hung_with_every_ranks_stacks(proc, tmp_path, "enter")
    for phase in ("imports", "process group", "model"):  # rank 0 alone says what each took
        assert proc.stderr.count(f"ftl: {phase}: ") == 1, proc.stderr[-3000:]
    assert "ftl: rank 1: hang: data has taken" in proc.stderr


def worker_pids(run_dir: Path) -> dict[int, int]:
    """{rank: pid} of the trainer ranks running this run dir's config (not the torchrun agent)."""
    config = str(RunPaths(run_dir).config).encode()
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if config in argv and b"launcher.train" in argv:
            rank = next((e[5:] for e in environ if e.startswith(b"RANK=")), None)
            if rank is not None:
                found[int(rank)] = int(proc.name)
    return found


class Train:
    """`ftl train` running in the background, its output in files the test can read as it runs."""

    def __init__(self, tmp_path: Path, *overrides: str) -> None:
        self.run_dir, self.out, self.err = tmp_path / "run", tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "launcher", "train", *DDP, f"run.dir={self.run_dir}", *overrides],
                cwd=ROOT,
                env=ftl_env(),
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_for(self, condition, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the run ended or never got there\n{self.output()[-5000:]}")
            time.sleep(0.2)

    def stepped(self, step: int) -> bool:
        path = RunPaths(self.run_dir).metrics
        return path.exists() and len(path.read_text().splitlines()) >= step

    def finish(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the run did not stop\n{self.output()[-5000:]}")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def test_sigterm_to_one_rank_stops_both_at_the_same_step_after_one_checkpoint(tmp_path: Path) -> None:
    """SLURM signals unevenly: the flag is all-reduced at the step boundary, so the save is collective."""
    run = Train(tmp_path, "train.max_steps=5000")
    run.wait_for(lambda: run.stepped(3))
    os.kill(worker_pids(run.run_dir)[1], signal.SIGTERM)
    assert run.finish() == 130, run.output()[-4000:]
    assert read_exits(run.run_dir) == ({0: 130, 1: 130}, 2)
    last = max(r["step"] for r in metrics(run.run_dir))
    assert sorted(p.name for p in RunPaths(run.run_dir).checkpoints.iterdir()) == ["latest", f"step-{last}"]
    assert f"stopped by a signal to another rank at step {last}" in run.output()  # rank 0 speaks; rank 1 got it


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_ftl_train_prints_ftls_message_and_no_traceback(sig: signal.Signals, tmp_path: Path) -> None:
    run = Train(tmp_path, "train.max_steps=5000")
    run.wait_for(lambda: run.stepped(2))
    run.proc.send_signal(sig)
    assert run.finish() == 130, run.output()[-4000:]
    err = run.err.read_text()
    assert "Traceback" not in err and "SignalException" not in err, err
    assert f"ftl: stopped by {sig.name} after a checkpoint" in err


def test_ctrl_c_during_the_evaluation_before_training_stops_between_eval_batches(tmp_path: Path) -> None:
    """Issue 35: Ctrl-C in the long evaluation before step 1 ends it at the next eval batch, with
    the usual 130; it used to wait for the whole evaluation and then train and save a step."""
    run = Train(
        tmp_path,
        "train.max_steps=5",
        "eval.before_training=true",
        "eval.max_batches=null",
        "eval.batch_size=1",
        "eval.generate=true",
        "eval.num_generate=1000",
        "eval.max_new_tokens=200",
    )
    run.wait_for(lambda: "answers for ROUGE/BLEU:" in run.output())  # its progress line, after 5 s of generating
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.output()[-4000:]
    assert "ftl: evaluation (before) stopped by SIGINT at step 0" in run.output()
    assert not RunPaths(run.run_dir).metrics.exists() or not metrics(run.run_dir)  # no step trained
    assert not RunPaths(run.run_dir).checkpoints.exists() or not list(RunPaths(run.run_dir).checkpoints.iterdir())
    assert "Traceback" not in run.err.read_text()


NCCL_DUMP = """
import os, pickle, sys
from pathlib import Path
import torch, torch.distributed as dist
from launcher.rundir import RunPaths
from launcher.runtime.watchdog import collective_trace_env, dump_collectives
collective_trace_env(os.environ, RunPaths(sys.argv[1]))
torch.cuda.set_device(0)
dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
t = torch.ones(4, device="cuda")
dist.all_reduce(t)
torch.cuda.synchronize()
path = dump_collectives(Path(sys.argv[1]) / "collectives.pkl")
print("ENTRIES", [e["profiling_name"] for e in pickle.loads(path.read_bytes())["entries"]])
dist.destroy_process_group()
"""


@pytest.mark.gpu
def test_on_a_gpu_the_dump_holds_nccls_recent_collectives(tmp_path: Path) -> None:
    """What the watchdog writes to logs/collectives-rank-N.pkl on a NCCL group: NCCL's flight recorder."""
    from tests.helpers import need_gpus

    need_gpus(1)
    proc = subprocess.run(
        [sys.executable, "-c", NCCL_DUMP, str(tmp_path)],
        cwd=ROOT,
        env=ftl_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nccl:all_reduce" in proc.stdout, proc.stdout


RANK_SCRIPT = """
import os, signal, sys, time
open(os.path.join(os.path.dirname(__file__), "started-" + os.environ["RANK"]), "w").close()
if os.environ["RANK"] == "1":
    sys.exit(124)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
time.sleep(120)
"""


def test_torchrun_through_ftl_ends_in_an_exit_status_without_a_traceback(tmp_path: Path) -> None:
    """A rank the watchdog ended makes torchrun exit 124 (a job script can tell a hang from a crash);
    a SIGTERM to torchrun ends it as 128 + 15 once its ranks have stopped; neither prints a traceback."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    argv = [sys.executable, "-m", "launcher.launch.torchrun", "--standalone", "--nproc_per_node=2", str(script)]
    hung = subprocess.run(argv, cwd=ROOT, env=ftl_env(), capture_output=True, text=True, timeout=120)
    assert hung.returncode == EXIT_HUNG and "Traceback" not in hung.stderr, hung.stderr
    script.write_text(RANK_SCRIPT.replace("sys.exit(124)", "time.sleep(120)"))
    for rank in (0, 1):
        (tmp_path / f"started-{rank}").unlink()
    agent = subprocess.Popen(argv, cwd=ROOT, env=ftl_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"started-{rank}").exists() for rank in (0, 1)):
        assert agent.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    agent.send_signal(signal.SIGTERM)
    _, err = agent.communicate(timeout=120)
    assert agent.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
