"""launch=slurm against a real SLURM cluster: the local two-node one from slurm/local-cluster.sh
(munged, slurmctld, slurmd n1 and n2, each with its own hostname). Skipped, with the reason, when
no cluster runs; failed instead under FTL_REQUIRE_SLURM=1 (.ci/run).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from helpers import wandb_offline_attempts
from slurm_cluster import FINAL_STATES, REPO, LocalCluster, local_cluster

from launcher.config.compose import compose
from launcher.config.validate import validate
from launcher.launch.slurm import render_sbatch

pytestmark = pytest.mark.slurm

FTL = [sys.executable, "-m", "launcher"]
# No '/' (run.name), '%' or '\' (SLURM log patterns): those are refused before anything runs.
HOSTILE_NAME = "x y'z\";$(touch CANARY)`touch CANARY`#"
# Distributed engines may not be built yet: a topology whose engine is missing is skipped, by name.
TOPOLOGIES = [pytest.param(1, "single", id="1node-single"), pytest.param(2, "ddp", id="2node-ddp")]


@pytest.fixture(scope="module")
def cluster() -> LocalCluster:
    return local_cluster()


def hydra_quoted(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def assert_trained(run_dir: Path, nodes: int, steps: int) -> None:
    """Each node's rank ran on its own emulated host. A one-node job may land on n1 or n2 (a job
    just before it, still completing, can hold n1: the preprocessing job ahead of its training
    job did in one CI run); SLURM's node list is sorted, so node 0 of a two-node job is on n1."""
    logs = run_dir / "logs"
    hosts = []
    for node in range(nodes):
        found = re.search(rf"^ftl: node {node} on (n[12]),", (logs / f"node-{node}.log").read_text(), re.M)
        assert found, f"node {node}"
        hosts.append(found.group(1))
    if nodes == 2:
        assert hosts == ["n1", "n2"], hosts
    assert not (logs / f"node-{nodes}.log").exists()
    assert (run_dir / "checkpoints" / f"step-{steps}").is_dir(), sorted((run_dir / "checkpoints").glob("*"))


def dump(run_dir: Path) -> str:
    return "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*")))


def test_sbatch_reads_hostile_directives_back_exactly(cluster, tmp_path):
    """The #SBATCH lines go through sbatch's own parser (quotes, and backslashes even inside
    single quotes): the job name, a --comment and the working directory must come back as given."""
    h = "a b'c\"d;$(touch CANARY)`touch CANARY`%j\\x #y"
    raw, _, errors = compose(["recipe=tiny", "launch=slurm", "train.device=cpu"])
    cfg, more = validate(raw)
    assert not errors + more
    cfg.launch.job_name = h
    cfg.launch.sbatch_args = ["--comment", h]
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    workdir = tmp_path / h
    workdir.mkdir()
    script = run_dir / "job.sbatch"
    script.write_text(render_sbatch(cfg, run_dir, run_dir / "config.yaml", sys.executable, workdir=workdir))
    job_id = cluster.run("sbatch", "--parsable", "--hold", str(script)).stdout.strip()
    try:
        job = cluster.job(job_id)
    finally:
        cluster.run("scancel", job_id, check=False)
    assert job.fields["JobName"] == h
    assert job.fields["Comment"] == h
    assert job.fields["WorkDir"] == str(workdir)
    assert job.fields["StdOut"] == f"{run_dir}/logs/slurm-{job_id}.out"
    assert job.fields["TimeLimit"] == "04:00:00" and job.fields["Requeue"] == "1"
    assert not list(tmp_path.rglob("CANARY"))


@pytest.mark.parametrize("nodes,strategy", TOPOLOGIES)
def test_ftl_train_submits_a_job_that_runs_to_completion(cluster, tmp_path, nodes, strategy):
    out = cluster.run(
        *FTL,
        "train",
        "recipe=tiny",
        "launch=slurm",
        "train.device=cpu",
        f"launch.nodes={nodes}",
        f"strategy={strategy}",
        "train.max_steps=5",
        "eval.after_training=false",
        f"run.name={hydra_quoted(HOSTILE_NAME)}",
        cwd=tmp_path,
        timeout=120,
    )
    job_id = out.stdout.strip()
    assert job_id.isdigit(), out.stdout + out.stderr
    job = cluster.wait(job_id, timeout=150)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name == f"{HOSTILE_NAME}-slurm"
    assert job.state == "COMPLETED", dump(run_dir)
    assert_trained(run_dir, nodes, steps=5)
    batch_log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert f"on {nodes} node(s)" in batch_log and "srun exited with code 0" in batch_log
    if nodes > 1:
        assert f"rendezvous n1:{20000 + int(job_id) % 10000}" in batch_log  # the first host; a port of this job's own
    assert job.fields["JobName"] == f"ftl-{HOSTILE_NAME}"
    assert not list(tmp_path.rglob("CANARY"))


@pytest.mark.parametrize("nodes,strategy", TOPOLOGIES)
def test_plain_sbatch_of_train_sbatch_runs_to_completion(cluster, tmp_path, nodes, strategy):
    run_dir = tmp_path / "plain run"
    out = cluster.run(
        "sbatch",
        "--parsable",
        f"--nodes={nodes}",
        f"--output={tmp_path}/batch-%j.out",
        "slurm/train.sbatch",
        "recipe=tiny",
        "train.device=cpu",
        f"strategy={strategy}",
        f"run.dir={hydra_quoted(str(run_dir))}",
        "train.max_steps=5",
        "eval.after_training=false",
        cwd=REPO,
    )
    job_id = out.stdout.strip()
    job = cluster.wait(job_id, timeout=150)
    batch_log = (tmp_path / f"batch-{job_id}.out").read_text()
    assert job.state == "COMPLETED", batch_log + dump(run_dir)
    assert_trained(run_dir, nodes, steps=5)
    assert f"#SBATCH --nodes={nodes}\n" in (run_dir / "job.sbatch").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["plain run"], "one run dir"


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@N sends before the time limit) mid-run:
    the ranks on both nodes save and exit, the job requeues itself, resumes at the saved step and
    finishes, with the same W&B run id. (One node, single engine: the array test below.)"""
    nodes, strategy = 2, "ddp"
    out = cluster.run(
        *FTL,
        "train",
        "recipe=tiny",
        "launch=slurm",
        "train.device=cpu",
        f"launch.nodes={nodes}",
        f"strategy={strategy}",
        "train.max_steps=40",
        "checkpoint.every_steps=5",
        "eval.after_training=false",
        "wandb.mode=offline",
        "run.name=preempt",
        cwd=tmp_path,
        timeout=120,
    )
    job_id = out.stdout.strip()
    run_dir = tmp_path / "runs" / "preempt-slurm"
    ckpts = run_dir / "checkpoints"
    deadline = time.monotonic() + 120
    while not any(int(p.name.split("-")[1]) >= 10 for p in ckpts.glob("step-*") if p.name.split("-")[1].isdigit()):
        job = cluster.job(job_id)
        assert job.state in ("PENDING", "RUNNING", "CONFIGURING") and time.monotonic() < deadline, (
            job.state,
            dump(run_dir) if run_dir.exists() else "",
        )
        time.sleep(0.2)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    job = cluster.wait(job_id, timeout=150)
    node_log = (run_dir / "logs" / "node-0.log").read_text()
    batch_log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert job.state == "COMPLETED" and job.restarts == 1, batch_log + node_log
    assert "SIGUSR1: the ranks finish their step" in batch_log
    assert "requeueing job" in batch_log and "requeued 1 of at most 3 times" in batch_log
    words = " ".join(node_log.split())  # the console wraps long lines
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", words)
    resumed = re.search(r"resuming from .*? \(step (\d+)\)", words)
    assert stopped and resumed, node_log
    assert 10 <= int(stopped.group(1)) < 40 and resumed.group(1) == stopped.group(1)
    assert (ckpts / "step-40").is_dir()
    for node in range(nodes):
        restarts = re.findall(
            rf"ftl: node {node} on n{node + 1}, job {job_id}, restart (\d)",
            (run_dir / "logs" / f"node-{node}.log").read_text(),
        )
        assert restarts == ["0", "1"], f"node {node} ran {restarts}"
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    assert len(wandb_offline_attempts(run_dir, run_id)) == 2


def test_array_tasks_get_their_own_runs_and_keep_their_task_id_when_requeued(cluster, tmp_path):
    """`sbatch --array=0-1 slurm/train.sbatch ... run.name='arr-${oc.env:SLURM_ARRAY_TASK_ID}'`: one
    run per task; task 1, stopped mid-run, requeues as task 1 and resumes its own run."""
    out = cluster.run(
        "sbatch",
        "--parsable",
        "--array=0-1",
        "--nodes=1",
        f"--output={tmp_path}/batch-%A_%a.out",
        "slurm/train.sbatch",
        "recipe=tiny",
        "train.device=cpu",
        f"run.dir='{tmp_path}/arr-${{oc.env:SLURM_ARRAY_TASK_ID}}'",
        "train.max_steps=40",
        "checkpoint.every_steps=5",
        "eval.after_training=false",
        cwd=REPO,
    )
    array_id = out.stdout.strip()
    ckpts = tmp_path / "arr-1" / "checkpoints"
    deadline = time.monotonic() + 120
    while not any(int(p.name.split("-")[1]) >= 10 for p in ckpts.glob("step-*") if p.name.split("-")[1].isdigit()):
        job = cluster.job(f"{array_id}_1")
        logs = "".join(p.read_text() for p in sorted(tmp_path.glob("batch-*.out")))
        assert job.state in ("PENDING", "RUNNING", "CONFIGURING") and time.monotonic() < deadline, (job.state, logs)
        time.sleep(0.2)
    cluster.run("scancel", "--batch", "--signal=USR1", f"{array_id}_1")
    tasks = [cluster.wait(f"{array_id}_{i}", timeout=150) for i in (0, 1)]
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("batch-*.out")))
    assert [t.state for t in tasks] == ["COMPLETED", "COMPLETED"], logs
    assert [t.fields["ArrayTaskId"] for t in tasks] == ["0", "1"]
    assert [t.restarts for t in tasks] == [0, 1], logs
    for i in (0, 1):
        assert (tmp_path / f"arr-{i}" / "checkpoints" / "step-40").is_dir()
    assert "resuming from" in (tmp_path / "arr-1" / "logs" / "node-0.log").read_text()


def test_preprocessing_runs_as_its_own_job_before_training(cluster, tmp_path):
    """launch.preprocess_job=true: `ftl preprocess` runs first as a one-node CPU job filling the
    data cache; the training job, submitted with --dependency=afterok on it, starts after it ends."""
    cache = tmp_path / "cache"
    out = cluster.run(
        *FTL,
        "train",
        "recipe=tiny",
        "launch=slurm",
        "train.device=cpu",
        "launch.preprocess_job=true",
        "train.max_steps=3",
        "eval.after_training=false",
        f"+launch.env.FTL_CACHE={cache}",
        "run.name=prep",
        cwd=tmp_path,
        timeout=120,
    )
    prep_id, train_id = out.stdout.split()
    prep, train = cluster.wait(prep_id, timeout=120), cluster.wait(train_id, timeout=150)
    run_dir = tmp_path / "runs" / "prep-slurm"
    assert (prep.state, train.state) == ("COMPLETED", "COMPLETED"), dump(run_dir)
    assert "data cache  built" in (run_dir / "logs" / f"preprocess-{prep_id}.out").read_text()
    assert prep.fields["EndTime"] <= train.fields["StartTime"]  # ISO timestamps sort as strings
    assert any((cache / "data").iterdir())
    assert_trained(run_dir, 1, steps=3)


def _requeued_once(cluster, tmp_path, fault_env, name, *overrides):
    """A one-node, 20-step tiny job with a fault on its first run only (``fault_env``), waited for:
    it must complete after exactly one requeue. Returns its id, its sacct record, run dir, batch
    log, node log and (the node of the first run, the node of the second)."""
    out = LocalCluster({**cluster.env, **fault_env}).run(
        *FTL,
        "train",
        "recipe=tiny",
        "launch=slurm",
        "train.device=cpu",
        *overrides,
        "train.max_steps=20",
        "checkpoint.every_steps=5",
        "eval.after_training=false",
        f"run.name={name}",
        cwd=tmp_path,
        timeout=120,
    )
    job_id = out.stdout.strip()
    assert job_id.isdigit(), out.stdout + out.stderr
    job = cluster.wait(job_id, timeout=300)
    run_dir = tmp_path / "runs" / f"{name}-slurm"
    batch_log = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    node_log = (run_dir / "logs" / "node-0.log").read_text()
    assert job.state == "COMPLETED" and job.restarts == 1, batch_log + node_log
    runs = re.findall(rf"^ftl: node 0 on (n[12]), job {job_id}, restart (\d)", node_log, re.M)
    assert [r for _, r in runs] == ["0", "1"], runs
    (bad, _), (good, _) = runs
    return job_id, job, run_dir, batch_log, node_log, (bad, good)


def test_a_node_failure_requeues_the_job_without_that_node_and_it_resumes(cluster, tmp_path):
    """A rank fails mid-run (FTL_TEST_FAIL_AT, on the job's first run only) on whichever node the
    one-node job got: the job names that node from the ranks' exit records, requeues itself with
    the node in its ExcNodeList, runs on the other node and resumes from its last checkpoint. (A
    two-node job could not run again here: excluding one node leaves one.)"""
    job_id, job, run_dir, batch_log, node_log, (bad, good) = _requeued_once(
        cluster, tmp_path, {"FTL_TEST_FAIL_AT": "12"}, "badnode"
    )
    assert bad != good
    assert (run_dir / "excluded_nodes.txt").read_text() == (
        f"{bad}\t{job_id}\t0\trank 0 there failed first (exit code 1)\n"
    )
    assert job.fields["ExcNodeList"] == bad and job.fields["NodeList"] == good
    assert f"ftl: node(s) {bad} failed (rank 0 there failed first (exit code 1)): requeueing job {job_id}" in batch_log
    words = " ".join(node_log.split())
    assert f"InjectedFault: FTL_TEST_FAIL_AT=12: a rank on {bad} fails after step 12" in words
    resumed = re.search(r"resuming from .*? \(step (\d+)\)", words)
    assert resumed and resumed.group(1) == "10", node_log
    assert (run_dir / "checkpoints" / "step-20").is_dir()


def test_a_node_the_preflight_finds_failing_stops_the_job_and_is_excluded(cluster, tmp_path):
    """Two nodes, n2's device check fails (FTL_TEST_FAIL_NODE): the preflight's table names it on
    both nodes' ranks before training, the job requeues itself without n2, and then waits, since
    this cluster has one node left for a two-node job (the test cancels it there)."""
    failing = LocalCluster({**cluster.env, "FTL_TEST_FAIL_NODE": "n2"})
    out = failing.run(
        *FTL,
        "train",
        "recipe=tiny",
        "launch=slurm",
        "train.device=cpu",
        "launch.nodes=2",
        "strategy=ddp",
        "train.max_steps=5",
        "eval.after_training=false",
        "run.name=preflight",
        cwd=tmp_path,
        timeout=120,
    )
    job_id = out.stdout.strip()
    run_dir = tmp_path / "runs" / "preflight-slurm"
    deadline = time.monotonic() + 150
    try:
        while (job := cluster.job(job_id)).restarts < 1 or job.state != "PENDING":
            assert job.state not in FINAL_STATES and time.monotonic() < deadline, (job.state, dump(run_dir))
            time.sleep(0.5)
    finally:
        cluster.run("scancel", job_id, check=False)
    assert job.fields["ExcNodeList"] == "n2", job.fields
    report = json.loads((run_dir / "preflight.json").read_text())
    assert report["failed"] == ["n2"] and [n["host"] for n in report["nodes"]] == ["n1", "n2"]
    assert (run_dir / "excluded_nodes.txt").read_text() == f"n2\t{job_id}\t0\tthe preflight found it failing\n"
    console = (run_dir / "logs" / "node-0.log").read_text()
    assert "ftl: preflight of 2 nodes (2 ranks):" in console
    assert re.search(r"^1\s+n2\s.*failed device check on rank 1: InjectedFault", console, re.M), console
    assert "ftl: the preflight found failing node(s) n2" in console
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_hung_rank_ends_the_job_by_the_watchdog_and_it_requeues_without_that_node(cluster, tmp_path):
    """Issue 31: rank 1 of a one-node, two-rank job stops after step 12 (FTL_TEST_HANG, on the job's
    first run only) while rank 0 waits for it in a collective. The watchdog (5 s floor) ends both
    with their stacks in logs/, the job names the node of the rank in no collective, requeues
    itself with that node in its ExcNodeList, runs on the other node and resumes from step 10."""
    job_id, job, run_dir, batch_log, node_log, (bad, good) = _requeued_once(
        cluster,
        tmp_path,
        {"FTL_TEST_HANG": "1@step-12"},
        "hang",
        "strategy=ddp",
        "launch.nproc_per_node=2",
        "train.watchdog.floor_s=5",
    )
    logs = run_dir / "logs"
    assert bad != good
    assert "srun exited with code 124" in batch_log  # the watchdog ended the ranks, not a crash
    why = "the watchdog found rank(s) 1 there hung outside any collective, the others waiting in one"
    assert (run_dir / "excluded_nodes.txt").read_text() == f"{bad}\t{job_id}\t0\t{why}\n"
    assert job.fields["ExcNodeList"] == bad and job.fields["NodeList"] == good
    assert f"ftl: node(s) {bad} failed ({why}): requeueing job {job_id}" in batch_log
    stacks = [(logs / f"stacks-rank-{rank}.txt").read_text() for rank in (0, 1)]
    assert "its main thread waits in a collective" in stacks[0] and "all_reduce" in stacks[0], stacks[0]
    assert "its main thread is in no collective" in stacks[1] and "_test_hang" in stacks[1], stacks[1]
    words = " ".join(node_log.split())
    assert "hang: stopping the job (exit code 124)" in words, node_log
    resumed = re.search(r"resuming from .*? \(step (\d+)\)", words)
    assert resumed and resumed.group(1) == "10", node_log
    assert (run_dir / "checkpoints" / "step-20").is_dir()
