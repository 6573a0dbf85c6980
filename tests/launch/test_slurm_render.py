"""launch=slurm without a cluster: the rendered job script (golden files, `bash -n`, quoting), and
the script *run* with sbatch/srun/scontrol/scancel replaced by recorders on PATH, so hostile
strings are shown to arrive as data and never execute, and the signal/requeue logic is exercised.
"""

from __future__ import annotations

import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.config.compose import compose
from launcher.config.errors import ConfigErrors
from launcher.config.schema import FtlConfig
from launcher.config.validate import validate
from launcher.launch.slurm import SlurmBackend, UnsafeValue, jinja_env, render_sbatch
from launcher.launch.slurm_job import allocation_overrides

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
FTL = [sys.executable, "-m", "launcher"]
# submitit's fixture, plus command substitution, backticks, a comment and a trailing backslash-free
# mix; CANARY is relative, so an executed one lands in the script's working directory.
HOSTILE = [
    "a 0",
    'a"=0"',
    "a'; echo foo",
    "a\n0",
    "$(touch CANARY)",
    "`touch CANARY`",
    "x; touch CANARY #",
    "'\"; touch CANARY; echo \"'",
    "a && touch CANARY || touch CANARY",
]
SBATCH_FIELDS = ["job_name", "partition", "account", "qos", "constraint", "mem", "time"]


def config(*overrides: str) -> FtlConfig:
    """The tiny recipe as a SLURM CPU job (the scripts here run with recorders, on no GPU)."""
    raw, _, errors = compose(["recipe=tiny", "launch=slurm", "train.device=cpu", *overrides])
    cfg, more = validate(raw)
    assert not errors + more, errors + more
    return cfg


def bash_n(text: str, tmp_path: Path) -> None:
    path = tmp_path / "check.sbatch"
    path.write_text(text)
    out = subprocess.run(["bash", "-n", str(path)], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# --------------------------------------------------------------------------------------------
# golden scripts


GOLDEN_CASES = {
    "slurm-1node.sbatch": ["recipe=tiny", "launch=slurm", "train.device=cpu"],
    # What a login node with no GPU plans for `launch=slurm` with train.device=auto: a GPU job.
    "slurm-gpu-2node.sbatch": [
        "recipe=tiny",
        "launch=slurm",
        "launch.nodes=2",
        "launch.nproc_per_node=8",
        "strategy=ddp",
    ],
    "slurm-4node.sbatch": [
        "recipe=llama3-70b-full-zero3-multinode",
        "launch.partition=gpu",
        "launch.account=myproj",
        "launch.qos=high",
        "launch.constraint=h100",
        "launch.mem=0",
        "launch.io_gb_per_s=10",
        "launch.signal=USR1@300",
        "launch.socket_ifname=ib0",
        "launch.max_requeues=5",
        "launch.sbatch_args=[--mail-type,END]",
        "launch.setup=['module load cuda/12.4','source /opt/venvs/ftl/bin/activate']",
        "+launch.env.NCCL_DEBUG=WARN",
        "launch.hf_home='/scratch/hf cache'",
    ],
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_script(name, tmp_path):
    raw, _, errors = compose(GOLDEN_CASES[name])
    cfg, more = validate(raw)
    assert not errors + more
    run_dir = Path("/runs/golden")
    environ = {"FTL_CACHE": "/shared/ftl cache", "HF_HOME": "/shared/hf"}  # the submitting shell's
    text = render_sbatch(
        cfg, run_dir, run_dir / "config.yaml", "/opt/ftl/.venv/bin/python", workdir=Path("/work/ftl"), environ=environ
    )
    bash_n(text, tmp_path)
    path = GOLDEN / name
    if os.environ.get("FTL_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), (
        f"{name} changed; if on purpose, rerun with FTL_UPDATE_GOLDEN=1 and review the diff"
    )


def test_golden_nodes_and_gpus():
    one, four = ((GOLDEN / n).read_text() for n in ("slurm-1node.sbatch", "slurm-4node.sbatch"))
    assert "#SBATCH --nodes=1\n" in one and "--gpus-per-node" not in one and "OMP_NUM_THREADS" in one
    assert "#SBATCH --nodes=4\n" in four and "#SBATCH --gpus-per-node=8\n" in four and "#SBATCH --exclusive\n" in four
    assert "#SBATCH --signal=B:USR1@300\n" in four and "max_requeues=5\n" in four
    assert "export MALLOC_MMAP_MAX_=0\n" in one and "MALLOC_MMAP_MAX_" not in four  # CPU training only
    from launcher.launch.local import MALLOC_KEYS

    guard = next(line for line in one.splitlines() if line.startswith('if [ -z "${GLIBC_TUNABLES'))
    assert all(f"${{{key}:-}}" in guard for key in MALLOC_KEYS), guard  # the job's own malloc settings win
    assert "\nmodule load cuda/12.4\nsource /opt/venvs/ftl/bin/activate\n" in four
    assert "export HF_HOME='/scratch/hf cache'\n" in four
    for text in (one, four):
        sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
        body = text[text.index(sbatch[-1]) :]
        assert "#SBATCH" not in body.split("\n", 1)[1], "sbatch stops reading #SBATCH at the first command"


def test_plan_for_the_multinode_recipe_shows_the_script_it_would_submit(tmp_path):
    """What it imports is tests/test_cli.py's; how long it takes, bench/throughput.py's."""
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "plan", "recipe=llama3-70b-full-zero3-multinode"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    script = out.stdout.split("/job.sbatch ---\n", 1)[1].split("\n---\n", 1)[0]
    assert "#SBATCH --nodes=4\n" in script
    bash_n(script, tmp_path)
    assert "command     sbatch --parsable " in out.stdout
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# the template's own guarantees


def test_undefined_names_and_unquoted_values_fail_the_render():
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        jinja_env().from_string("{{ nope | q }}").render()
    with pytest.raises(UnsafeValue, match="without a quoting filter"):
        jinja_env().from_string("echo {{ value }}").render(value="x")
    assert jinja_env().from_string("echo {{ value | q }}").render(value="a b") == "echo 'a b'"


@pytest.mark.parametrize("field", SBATCH_FIELDS + ["sbatch_args", "setup"])
def test_newline_in_a_directive_or_setup_line_is_refused(field, tmp_path):
    cfg = config()
    setattr(cfg.launch, field, ["ok", "a\nb"] if field in ("sbatch_args", "setup") else "a\nb")
    with pytest.raises(UnsafeValue, match="newline"):
        render_sbatch(cfg, tmp_path, tmp_path / "config.yaml", "/bin/python", workdir=tmp_path)


@pytest.mark.parametrize("where", ["run_dir", "workdir"])
def test_newline_in_a_path_is_refused(where, tmp_path):
    odd = tmp_path / "a\nb"
    paths: dict[str, Any] = {"run_dir": tmp_path, "workdir": tmp_path, where: odd}
    with pytest.raises(UnsafeValue, match="newline"):
        render_sbatch(config(), paths["run_dir"], tmp_path / "config.yaml", "/bin/python", workdir=paths["workdir"])


@pytest.mark.parametrize("name", ["50%", "a\\b"])
def test_run_dir_slurm_reads_as_a_pattern_is_a_config_error(name, tmp_path):
    run_dir = tmp_path / name
    with pytest.raises(ConfigErrors, match="run.dir: .*must not contain"):
        SlurmBackend().build(config(), run_dir, run_dir / "config.yaml")


def test_bad_env_name_and_signal_are_config_errors(tmp_path):
    cfg = config()
    cfg.launch.env = {"A B": "1"}
    with pytest.raises(ConfigErrors, match="launch.env"):
        SlurmBackend().build(cfg, tmp_path, tmp_path / "config.yaml")
    cfg = config()
    cfg.launch.signal = "USR1; touch CANARY"
    with pytest.raises(ConfigErrors, match="launch.signal"):
        SlurmBackend().build(cfg, tmp_path, tmp_path / "config.yaml")


def test_array_jobs_go_through_train_sbatch(tmp_path):
    cfg = config()
    cfg.launch.sbatch_args = ["--array=0-3"]
    with pytest.raises(ConfigErrors, match="launch.sbatch_args: an array job"):
        SlurmBackend().build(cfg, tmp_path, tmp_path / "config.yaml")


def test_build_is_pure_and_names_the_sbatch_command(tmp_path):
    run_dir = tmp_path / "run"
    plan = SlurmBackend().build(config("launch.nodes=2", "strategy=ddp"), run_dir, run_dir / "config.yaml")
    assert plan.commands == [["sbatch", "--parsable", str(run_dir / "job.sbatch")]]
    assert set(plan.files) == {"job.sbatch"} and "#SBATCH --nodes=2\n" in plan.files["job.sbatch"]
    assert f"--config {run_dir / 'config.yaml'}" in plan.files["job.sbatch"]
    assert not run_dir.exists()


# --------------------------------------------------------------------------------------------
# running the script with recorders in place of the SLURM commands

SHIMS = {
    # srun: record, then (like SLURM) run the task with SLURM_NODEID set, past srun's own options.
    "srun": r"""#!/usr/bin/env bash
printf '%s\0' "$@" > "$REC/srun.args"
printf '%s' "${WANDB_API_KEY-unset}" > "$REC/srun.secret"
echo $$ > "$REC/srun.pid"
[[ -n ${SHIM_NO_EXEC:-} ]] && exit 0
while [[ $1 == -* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
""",
    "scontrol": r"""#!/usr/bin/env bash
printf '%s\0' "$@" >> "$REC/scontrol.args"
if [[ $1 == show && $2 == hostnames ]]; then printf 'n1\nn2\n'; fi
""",
    # scancel --signal=URG JOB: SLURM would signal every process of the step; the task will do.
    "scancel": r"""#!/usr/bin/env bash
printf '%s\0' "$@" >> "$REC/scancel.args"
if [[ " $* " == *" --signal=URG "* ]]; then kill -URG "$(cat "$REC/srun.pid")"; fi
""",
    "sbatch": r"""#!/usr/bin/env bash
printf '%s\0' "$@" > "$REC/sbatch.args"
printf '%s' "${WANDB_API_KEY-unset}" > "$REC/sbatch.secret"
if [[ -n ${SHIM_SBATCH_FAIL:-} ]]; then echo "sbatch: error: $SHIM_SBATCH_FAIL" >&2; exit 1; fi
echo 4242
""",
}
# The "python" every node runs, standing in for torchrun: records its argv and one environment
# variable. With SHIM_WAIT it starts a rank that runs until SIGTERM, then takes a while to save and
# exits 0, as the trainer does; and like torchrun before 2.12 it kills that rank (here at once,
# not after 30 s) when it gets a SIGTERM itself, then exits 1.
FAKE_PYTHON = r"""#!/usr/bin/env bash
[[ $1 == -c ]] && exit 0  # the job script's check that this interpreter imports ftl
printf '%s\0' "$@" > "$REC/python.args"
printf '%s' "${HOSTILE-unset}" > "$REC/python.env"
echo "rank output"
if [[ -n ${SHIM_WAIT:-} ]]; then
    bash -c 'trap "echo TERM >> \"$REC/rank.signals\"; sleep 0.3; touch \"$REC/rank.saved\"; exit 0" TERM
             touch "$REC/python.started"; while :; do sleep 0.05; done' &
    rank=$!
    trap 'echo TERM >> "$REC/python.signals"; kill -KILL "$rank"; exit 1' TERM
    wait "$rank"
    exit $?
fi
"""


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _args(path: Path) -> list[str]:
    return path.read_text().split("\0")[:-1] if path.exists() else []


class Recorder:
    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.rec = root / "rec"
        self.rec.mkdir(parents=True)
        for name, text in SHIMS.items():
            _executable(self.bin / name, text)

    def env(self, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SHIM_")) and k != "WANDB_API_KEY"}
        return {
            **base,
            "PATH": f"{self.bin}:{base['PATH']}",
            "REC": str(self.rec),
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "n[1-2]",
            "SLURM_JOB_NUM_NODES": "2",
            **extra,
        }

    def args(self, name: str) -> list[str]:
        return _args(self.rec / f"{name}.args")


def _no_canary(root: Path) -> None:
    assert not list(root.rglob("CANARY")), "a hostile string was executed"


def hostile_setup(tmp_path: Path, h: str) -> tuple[FtlConfig, Path, Path, Path, Path]:
    """Every templated value set to h: launch fields, env, run dir, config path, python, workdir."""
    cfg = config()
    for field in SBATCH_FIELDS:
        setattr(cfg.launch, field, h)
    cfg.launch.exclusive = True
    cfg.launch.sbatch_args = ["--comment", h]
    cfg.launch.env = {"HOSTILE": h}
    cfg.run.name = h
    run_dir = tmp_path / f"run {h}"
    workdir = tmp_path / f"work {h}"
    workdir.mkdir(parents=True)
    python = _executable(tmp_path / f"py {h}" / "python", FAKE_PYTHON)
    return cfg, run_dir, run_dir / f"config {h}.yaml", python, workdir


@pytest.mark.parametrize("h", HOSTILE, ids=repr)
def test_hostile_strings_are_data_never_code(h, tmp_path):
    cfg, run_dir, config_path, python, workdir = hostile_setup(tmp_path, h)
    if "\n" in h:  # no line of an sbatch script may hold one: #SBATCH values and comments refuse it
        with pytest.raises(UnsafeValue, match="newline"):
            render_sbatch(cfg, run_dir, config_path, str(python), workdir=workdir)
        return
    text = render_sbatch(cfg, run_dir, config_path, str(python), workdir=workdir)
    bash_n(text, tmp_path)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    rec = Recorder(tmp_path / "shim")
    out = subprocess.run(
        ["bash", str(script)], env=rec.env(), cwd=workdir, check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    _no_canary(tmp_path)

    srun = rec.args("srun")
    task = srun[srun.index("bash") :]
    assert task[:6] == ["bash", "-c", 'ftl_node "$@"', "ftl_node", f"{run_dir / 'logs'}/node-", ".log"]
    assert task[6:] == [
        str(python),
        "-m",
        "launcher.launch.torchrun",
        "--nnodes=2",
        "--nproc_per_node=1",
        # the rendezvous port: 20000 + job id 4242 % 20000
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=n1:24242",
        "--rdzv_id=4242",
        "--max_restarts=0",
        "-m",
        "launcher.train",
        "--config",
        str(config_path),
    ]
    assert rec.args("python")[-1] == str(config_path), "the rank got the config path intact"
    assert (rec.rec / "python.env").read_text() == h, "launch.env reached the rank intact"
    assert (run_dir / "logs" / "node-0.log").read_text().endswith(", job 4242, restart 0\nrank output\n")
    assert rec.args("scontrol") == ["show", "hostnames", "n[1-2]"]
    assert not rec.args("scancel") and not rec.args("sbatch")


def test_setup_lines_run_verbatim_in_order_and_choose_the_interpreter(tmp_path):
    """With launch.setup the job runs the python3 the setup lines put on the node's PATH (an
    activated environment), not the interpreter that ran ftl on the login node."""
    from launcher.shell import quote

    cfg = config()
    venv = tmp_path / "node venv" / "bin"
    _executable(venv / "python3", FAKE_PYTHON)
    cfg.launch.setup = ["echo one > setup.log", 'echo "$SLURM_JOB_ID" >> setup.log', f"PATH={quote(str(venv))}:$PATH"]
    script = tmp_path / "job.sbatch"
    login_python = "/login/only/python"
    script.write_text(
        render_sbatch(cfg, tmp_path / "run", tmp_path / "run" / "config.yaml", login_python, workdir=tmp_path)
    )
    assert login_python not in script.read_text()
    rec = Recorder(tmp_path / "shim")
    out = subprocess.run(
        ["bash", str(script)], env=rec.env(), cwd=tmp_path, check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "setup.log").read_text() == "one\n4242\n"
    srun = rec.args("srun")
    assert srun[srun.index("ftl_node") + 3 :][:3] == [str(venv / "python3"), "-m", "launcher.launch.torchrun"]


@pytest.mark.parametrize("named", [False, True], ids=["setup's-python3", "launch.python"])
def test_an_interpreter_without_ftl_stops_the_job_before_srun(named, tmp_path):
    """One clear line in the batch log instead of every rank failing on every node."""
    cfg = config()
    no_ftl = _executable(tmp_path / "bin" / "python3", "#!/usr/bin/env bash\nexit 1\n")
    cfg.launch.setup = [f"PATH={tmp_path / 'bin'}:$PATH"]
    if named:
        cfg.launch.python = str(no_ftl)
    script = tmp_path / "job.sbatch"
    script.write_text(
        render_sbatch(cfg, tmp_path / "run", tmp_path / "run" / "config.yaml", sys.executable, workdir=tmp_path)
    )
    rec = Recorder(tmp_path / "shim")
    out = subprocess.run(
        ["bash", str(script)], env=rec.env(), cwd=tmp_path, check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and f"ftl: {no_ftl} cannot import ftl's launcher package on " in out.stderr, out.stderr
    assert not rec.args("srun")


# --------------------------------------------------------------------------------------------
# signals and requeue, with the recorders


def _run_until_signal(
    tmp_path: Path, sig: int, restarts: int, max_requeues: int, **env: str
) -> tuple[subprocess.CompletedProcess, Recorder]:
    cfg = config(f"launch.max_requeues={max_requeues}")
    python = _executable(tmp_path / "python", FAKE_PYTHON)
    script = tmp_path / "job.sbatch"
    script.write_text(
        render_sbatch(cfg, tmp_path / "run", tmp_path / "run" / "config.yaml", str(python), workdir=tmp_path)
    )
    rec = Recorder(tmp_path / "shim")
    env = rec.env(SHIM_WAIT="1", SLURM_RESTART_COUNT=str(restarts), **env)
    proc = subprocess.Popen(
        ["bash", str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while not (rec.rec / "python.started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), rec


def test_warning_signal_stops_the_ranks_then_requeues(tmp_path):
    out, rec = _run_until_signal(tmp_path, signal.SIGUSR1, restarts=1, max_requeues=3)
    assert out.returncode == 0, out.stdout + out.stderr
    assert rec.args("scancel") == ["--signal=URG", "4242"], "the step is told, not this shell"
    assert (rec.rec / "rank.signals").read_text() == "TERM\n", "the rank got exactly one SIGTERM"
    assert not (rec.rec / "python.signals").exists(), "torchrun got none: an old one would kill its ranks 30 s later"
    assert (rec.rec / "rank.saved").exists(), "the rank finished saving"
    assert rec.args("scontrol")[-2:] == ["requeue", "4242"]
    assert "requeueing job 4242 (2 of 3)" in out.stdout


def test_an_array_task_is_signalled_and_requeued_by_its_own_task_id(tmp_path):
    # The task that holds the array's own job id: `scancel 4242` would reach every task.
    out, rec = _run_until_signal(
        tmp_path, signal.SIGUSR1, restarts=0, max_requeues=3, SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID="1"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert rec.args("scancel") == ["--signal=URG", "4242_1"]
    assert rec.args("scontrol")[-2:] == ["requeue", "4242_1"]


def test_no_requeue_once_the_budget_is_spent(tmp_path):
    out, rec = _run_until_signal(tmp_path, signal.SIGUSR1, restarts=3, max_requeues=3)
    assert out.returncode == 1, "stopped before the end: not a completed job" + out.stdout + out.stderr
    assert "requeue" not in rec.args("scontrol")
    assert "launch.max_requeues=3 spent" in out.stderr


def test_sigterm_from_slurm_waits_for_the_ranks_and_does_not_requeue(tmp_path):
    # SLURM's own SIGTERM reaches every process; here the batch shell gets it, then the rank.
    cfg = config()
    python = _executable(tmp_path / "python", FAKE_PYTHON)
    script = tmp_path / "job.sbatch"
    script.write_text(
        render_sbatch(cfg, tmp_path / "run", tmp_path / "run" / "config.yaml", str(python), workdir=tmp_path)
    )
    rec = Recorder(tmp_path / "shim")
    proc = subprocess.Popen(
        ["bash", str(script)],
        env=rec.env(SHIM_WAIT="1"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (rec.rec / "python.started").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None, "the batch shell must outlive its ranks while they save"
    os.kill(int((rec.rec / "srun.pid").read_text()), signal.SIGURG)  # stands in for SLURM's TERM to the step
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and (rec.rec / "rank.saved").exists()
    assert "requeue" not in rec.args("scontrol") and not rec.args("scancel")
    assert "SIGTERM from SLURM" in stdout


# --------------------------------------------------------------------------------------------
# submit (ftl train launch=slurm) with a recording sbatch


def test_ftl_train_renders_and_submits_with_an_argument_list(tmp_path):
    rec = Recorder(tmp_path / "shim")
    name = "x y'z;$(touch CANARY)"
    out = subprocess.run(
        [*FTL, "train", "recipe=tiny", "launch=slurm", f"run.name='{name.replace(chr(39), chr(92) + chr(39))}'"],
        env=rec.env(),
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / f"{name}-slurm"
    assert out.stdout.strip() == "4242", "the job id, alone on stdout"
    assert "submitted SLURM job 4242" in out.stderr
    assert rec.args("sbatch") == ["--parsable", str(run_dir / "job.sbatch")]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "logs").is_dir()
    assert "#SBATCH --job-name='ftl-x y'\"'\"'z;$(touch CANARY)'" in (run_dir / "job.sbatch").read_text()
    _no_canary(tmp_path)


def test_submit_reports_a_missing_or_failing_sbatch(tmp_path):
    rec = Recorder(tmp_path / "shim")
    args = [*FTL, "train", "recipe=tiny", "launch=slurm", f"run.dir={tmp_path / 'run'}"]
    failing = subprocess.run(
        args,
        env=rec.env(SHIM_SBATCH_FAIL="invalid partition specified: nope"),
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failing.returncode == 1 and "invalid partition specified: nope" in failing.stderr
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    missing = subprocess.run(
        args,
        env={**rec.env(), "PATH": str(empty)},
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "`sbatch` not found" in missing.stderr


# --------------------------------------------------------------------------------------------
# plain sbatch: slurm/train.sbatch and launcher.launch.slurm_job


def test_allocation_overrides():
    assert allocation_overrides(["recipe=tiny"], {"SLURM_JOB_NUM_NODES": "2"}) == [
        "launch=slurm",
        "recipe=tiny",
        "launch.nodes=2",
        "launch.gpus_per_node=0",
    ], "an allocation without GPUs is a CPU job"
    assert allocation_overrides(
        ["launch=slurm", "launch.nodes=8"], {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "h100:4"}
    ) == [
        "launch=slurm",
        "launch.nodes=8",
        "launch.nodes=2",
        "launch.gpus_per_node=4",
    ]
    with pytest.raises(ConfigErrors, match="runs launch=slurm"):
        allocation_overrides(["launch=local"], {})


def test_slurm_job_outside_slurm_says_how_to_use_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(
        [sys.executable, "-m", "launcher.launch.slurm_job", "recipe=tiny"],
        env=env,
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "sbatch --nodes=N slurm/train.sbatch" in out.stderr


def test_train_sbatch_composes_writes_the_run_dir_and_runs_the_same_script(tmp_path):
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "train.sbatch")], check=False).returncode == 0
    rec = Recorder(tmp_path / "shim")
    run_dir = tmp_path / "plain run"
    env = rec.env(FTL_PYTHON=sys.executable, SHIM_NO_EXEC="1")  # nodes n1/n2 are fiction here
    out = subprocess.run(
        [
            "bash",
            str(REPO / "slurm" / "train.sbatch"),
            "recipe=tiny",
            "strategy=ddp",
            f"run.dir='{run_dir}'",
            "train.max_steps=3",
        ],
        env=env,
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    srun = rec.args("srun")
    assert srun[srun.index("ftl_node") + 1 :][:5] == [
        f"{run_dir / 'logs'}/node-",
        ".log",
        sys.executable,
        "-m",
        "launcher.launch.torchrun",
    ]
    assert "--nnodes=2" in srun and f"{run_dir / 'config.yaml'}" in srun
    text = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2\n" in text, "launch.nodes came from the allocation"
    assert "max_steps: 3" in (run_dir / "config.yaml").read_text()


# --------------------------------------------------------------------------------------------
# secrets in launch.env


SECRET = "wandb-secret-0123456789"


def test_secrets_in_launch_env_never_reach_the_script_but_reach_the_job(tmp_path):
    rec = Recorder(tmp_path / "shim")
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [
            *FTL,
            "train",
            "recipe=tiny",
            "launch=slurm",
            f"run.dir={run_dir}",
            f"+launch.env.WANDB_API_KEY={SECRET}",
            "+launch.env.PLAIN=visible",
        ],
        env=rec.env(),
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    script = (run_dir / "job.sbatch").read_text()
    assert "export PLAIN=visible\n" in script and "# WANDB_API_KEY: a secret, never written" in script
    assert SECRET not in script and SECRET not in out.stderr + out.stdout
    assert SECRET not in (run_dir / "config.yaml").read_text()
    assert (rec.rec / "sbatch.secret").read_text() == SECRET, "sbatch passes it on to the job"


def test_train_sbatch_hands_secrets_to_the_job_script_without_a_file(tmp_path):
    rec = Recorder(tmp_path / "shim")
    run_dir = tmp_path / "run"
    env = rec.env(FTL_PYTHON=sys.executable, SHIM_NO_EXEC="1", SLURM_JOB_NUM_NODES="1")
    out = subprocess.run(
        [
            "bash",
            str(REPO / "slurm" / "train.sbatch"),
            "recipe=tiny",
            f"run.dir={run_dir}",
            f"+launch.env.WANDB_API_KEY={SECRET}",
        ],
        env=env,
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (rec.rec / "srun.secret").read_text() == SECRET
    assert not [p for p in run_dir.rglob("*") if p.is_file() and SECRET in p.read_text()]


def test_preprocess_job_is_one_cpu_node_and_training_depends_on_it(tmp_path):
    raw, _, errors = compose(["recipe=llama3-70b-full-zero3-multinode", "launch.preprocess_job=true"])
    cfg, more = validate(raw)
    assert errors == [] and more == []
    plan = SlurmBackend().build(cfg, tmp_path, tmp_path / "config.yaml")
    prep = plan.files["preprocess.sbatch"]
    assert "#SBATCH --nodes=1\n" in prep and "--gpus-per-node" not in prep and "--exclusive" not in prep
    assert f"-m launcher preprocess --fetch-model --config {tmp_path / 'config.yaml'}" in prep
    assert "HF_HUB_OFFLINE" not in prep and "export HF_HUB_OFFLINE=1\n" in plan.files["job.sbatch"], (
        "it fetches; training reads offline"
    )
    assert "#SBATCH --nodes=4" in plan.files["job.sbatch"]
    assert [c[-1] for c in plan.commands] == [str(tmp_path / "preprocess.sbatch"), str(tmp_path / "job.sbatch")]
    assert "--dependency=afterok:{previous_job}" in plan.commands[1]
    subprocess.run(["bash", "-n", "-c", prep], check=True)


# --------------------------------------------------------------------------------------------
# GPU jobs: what the first real multi-node GPU job needs in its script


def slurm_errors(*overrides: str) -> list[str]:
    raw, _, errors = compose(["launch=slurm", *overrides])
    _, more = validate(raw)
    return [str(e) for e in errors + more]


def job_script(*overrides: str) -> str:
    raw, _, errors = compose(["launch=slurm", *overrides])
    cfg, more = validate(raw)
    assert not errors + more, errors + more
    run_dir = Path("/runs/gpu")
    return SlurmBackend().build(cfg, run_dir, run_dir / "config.yaml").files["job.sbatch"]


def test_the_8b_recipe_on_two_slurm_nodes_asks_for_8_gpus_per_node(tmp_path):
    """The recipe's CUDA run with 8 ranks per node: the job asks for 8 GPUs on each of its 2 nodes
    (it asked for none while launch.gpus_per_node defaulted to 0)."""
    out = subprocess.run(
        [*FTL, "plan", "recipe=llama3-8b-full-zero3", "launch=slurm", "launch.nodes=2"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert (
        "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --cpus-per-task=16\n#SBATCH --gpus-per-node=8\n"
        in out.stdout
    )
    assert "2 node(s) × 8 process(es) = world size 16" in out.stdout and "export PYTORCH_CUDA_ALLOC_CONF=" in out.stdout
    assert "CPU training" not in out.stdout and "OMP_NUM_THREADS" not in out.stdout


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["train.device=cuda", "launch.gpus_per_node=0"], "launch.gpus_per_node: 0 but train.device=cuda"),
        (["train.device=cpu", "launch.gpus_per_node=8"], "launch.gpus_per_node: 8 but train.device=cpu"),
        (
            ["train.device=cuda", "launch.gpus_per_node=8", "launch.nproc_per_node=4"],
            "launch.nproc_per_node: 4 but launch.gpus_per_node=8",
        ),
        (["launch.rdzv_port=40000"], "launch.rdzv_port: 40000 is in Linux's ephemeral port range"),
        (["launch.python=' '"], "launch.python: got ' '; name the interpreter"),
    ],
)
def test_gpus_asked_for_must_match_the_device_and_the_ranks(overrides, field):
    errors = slurm_errors("recipe=tiny", *overrides)
    assert any(e.startswith(field) for e in errors), errors


def test_a_gpu_mismatch_exits_2_before_anything_is_written(tmp_path):
    out = subprocess.run(
        [*FTL, "train", "recipe=tiny", "launch=slurm", "train.device=cuda", "launch.gpus_per_node=0"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "launch.gpus_per_node: 0 but train.device=cuda" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_gres_exclusive_memory_and_network_directives():
    gres = job_script("recipe=llama3-70b-full-zero3-multinode", "launch.gpu_request=gres", "launch.socket_ifname=ib0")
    assert "#SBATCH --gres=gpu:8\n" in gres and "--gpus-per-node" not in gres
    assert "#SBATCH --exclusive\n" in gres and "#SBATCH --mem=0\n" in gres, (
        "--exclusive alone grants the default memory"
    )
    assert "export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0\n" in gres
    sized = job_script("recipe=llama3-70b-full-zero3-multinode", "launch.mem=900G")
    assert "#SBATCH --mem=900G\n" in sized and "#SBATCH --mem=0\n" not in sized
    cpu = job_script("recipe=tiny", "train.device=cpu")
    assert (
        "--gres" not in cpu
        and "--gpus-per-node" not in cpu
        and "--mem" not in cpu
        and "PYTORCH_CUDA_ALLOC_CONF" not in cpu
    )


def test_hub_staging_settings():
    staged = job_script("recipe=tiny", "launch.hf_home=/shared/hf")
    assert "export HF_HOME=/shared/hf\n" in staged and "export HF_HUB_OFFLINE=1\n" in staged
    online = job_script("recipe=tiny", "launch.hub_offline=false")
    assert "HF_HUB_OFFLINE" not in online and "HF_HOME" not in online
    raw, _, _ = compose(["recipe=llama3-70b-full-zero3-multinode"])
    cfg, _ = validate(raw)
    notes = SlurmBackend().build(cfg, Path("/runs/x"), Path("/runs/x/config.yaml")).notes
    assert any(
        "meta-llama/Meta-Llama-3-70B offline (HF_HUB_OFFLINE=1)" in n and "ftl preprocess --fetch-model" in n
        for n in notes
    ), notes


def test_timeouts_in_the_job_step_and_io_phases():
    from launcher.plan.memory import param_counts

    tiny = job_script("recipe=tiny")
    assert "\nstep_timeout_s=600  #" in tiny and "\nio_timeout_s=1800\n" in tiny, (
        "at least 30 min while loading or checkpointing"
    )
    raw, _, _ = compose(["recipe=llama3-70b-full-zero3-multinode"])
    cfg, _ = validate(raw)
    # ZeRO-3 writes 12 bytes per parameter (fp32 master + moments); a resume on another world size reads and
    # rewrites that (universal checkpoint): twice, at 1 GB/s, with a factor 2 of margin.
    checkpoint_gb = 12 * param_counts(cfg.model.arch).total / 1e9
    big = job_script("recipe=llama3-70b-full-zero3-multinode")
    assert f"\nio_timeout_s={math.ceil(4 * checkpoint_gb)}\n" in big
    assert "\nio_timeout_s=7200\n" in job_script("recipe=llama3-70b-full-zero3-multinode", "launch.io_timeout_s=7200")
    assert "--kill-on-bad-exit=1 --wait=300" in big


def test_the_warning_before_the_time_limit_covers_a_step_and_a_checkpoint():
    """A 70B ZeRO-3 checkpoint is ~1 TB: at 1 GB/s the 120 s warning cannot save it. Given, it is
    refused with the lead that would do; unset, it is sized; a time limit shorter than it is refused."""
    short = slurm_errors("recipe=llama3-70b-full-zero3-multinode", "launch.signal=USR1@120")
    assert any(
        e.startswith(
            "launch.signal: 'USR1@120' warns 120 s before the time limit, but finishing a step and writing "
            "a checkpoint takes about"
        )
        and "launch.signal=USR1@1200" in e
        for e in short
    ), short
    assert slurm_errors("recipe=llama3-70b-full-zero3-multinode", "launch.signal=USR1@1200") == []
    assert "#SBATCH --signal=B:USR1@1200\n" in job_script("recipe=llama3-70b-full-zero3-multinode")
    fast_storage = job_script("recipe=llama3-70b-full-zero3-multinode", "launch.io_gb_per_s=20")
    assert "#SBATCH --signal=B:USR1@180\n" in fast_storage
    assert "#SBATCH --signal=B:USR1@120\n" in job_script("recipe=tiny"), "a small CPU job keeps the 2-minute minimum"
    too_short = slurm_errors("recipe=llama3-70b-full-zero3-multinode", "launch.time=00:20:00")
    assert any(e.startswith("launch.time: '00:20:00' is no longer than the 1200 s warning") for e in too_short), (
        too_short
    )


def test_rendezvous_port_of_a_job_stays_below_the_ephemeral_range(tmp_path):
    python = _executable(tmp_path / "python", FAKE_PYTHON)
    script = tmp_path / "job.sbatch"
    script.write_text(
        render_sbatch(config(), tmp_path / "run", tmp_path / "run" / "config.yaml", str(python), workdir=tmp_path)
    )
    rec = Recorder(tmp_path / "shim")
    out = subprocess.run(
        ["bash", str(script)],
        env=rec.env(SLURM_JOB_ID="1239999"),
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "--rdzv_endpoint=n1:29999" in rec.args("srun"), "20000 + 1239999 % 10000"
    assert "--kill-on-bad-exit=1" in rec.args("srun") and "--wait=300" in rec.args("srun")


def test_train_sbatch_reads_gpus_given_as_gres():
    assert (
        allocation_overrides(["recipe=tiny"], {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"})[-1]
        == "launch.gpus_per_node=4"
    )
    assert (
        allocation_overrides(["recipe=tiny"], {"SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "0"})[-1]
        == "launch.gpus_per_node=0"
    )


# --------------------------------------------------------------------------------------------
# a job planned on a login node: its resources, interpreter and paths are the compute nodes'


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH ")]


def test_a_login_node_without_a_gpu_plans_a_gpu_job(tmp_path):
    """train.device=auto under launch=slurm: one GPU per rank, whatever the submitting machine
    has (this one has none), with CPUs for the ranks and a memory request; a CPU job only when
    train.device=cpu says so."""
    assert not Path("/proc/driver/nvidia/version").exists(), "this test shows a GPU-less submitting machine"
    args = [*FTL, "plan", "recipe=tiny", "launch=slurm", "launch.nodes=2", "launch.nproc_per_node=8", "strategy=ddp"]
    out = subprocess.run(args, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    script = directives(out.stdout.split("/job.sbatch ---\n", 1)[1])
    assert "#SBATCH --gpus-per-node=8" in script and "#SBATCH --cpus-per-task=16" in script, script
    assert any(line.startswith("#SBATCH --mem=") for line in script), script
    assert "memory      fits: " in out.stdout and "per GPU" in out.stdout, (
        "the planner checks the GPUs the job asks for"
    )
    cpu = subprocess.run(
        [*args, "train.device=cpu"], cwd=tmp_path, check=False, capture_output=True, text=True, timeout=60
    )
    assert cpu.returncode == 0, cpu.stderr
    cpu_script = cpu.stdout.split("/job.sbatch ---\n", 1)[1].split("\n---\n", 1)[0]
    assert not [
        line
        for line in directives(cpu_script)
        if line.startswith(("#SBATCH --gpus", "#SBATCH --gres", "#SBATCH --mem"))
    ]
    assert "export OMP_NUM_THREADS=" in cpu_script and "a CPU job: no GPU requested" in cpu.stdout


@pytest.mark.parametrize("driver", [False, True], ids=["no-gpu-here", "gpu-here"])
def test_gpus_follow_the_launch_group_not_this_machine(driver, monkeypatch):
    from launcher.config import topology

    auto = config("train.device=auto", "launch.nproc_per_node=4", "strategy=ddp")
    two = config("train.device=auto", "launch.gpus_per_node=2", "strategy=ddp")
    none = config("train.device=auto", "launch.gpus_per_node=0")
    cpu = config("launch.nproc_per_node=4", "strategy=ddp")  # train.device=cpu
    exists = topology.os.path.exists
    monkeypatch.setattr(
        topology.os.path, "exists", lambda path: driver if path == "/proc/driver/nvidia/version" else exists(path)
    )
    assert topology.gpus_per_node(auto) == 4 and topology.planned_device_type(auto) == "cuda"
    assert topology.gpus_per_node(two) == 2
    assert topology.gpus_per_node(none) == 0 and topology.planned_device_type(none) == "cpu"
    assert topology.gpus_per_node(cpu) == 0 and topology.planned_device_type(cpu) == "cpu"


def test_cpus_and_memory_of_a_gpu_job():
    """--cpus-per-task: CPUS_PER_RANK for each rank; --mem: per rank RANK_HOST_BYTES and what the
    planner offloads to host memory, plus the weights as read; launch.* and exclusive override."""
    from launcher.launch.slurm import CPUS_PER_RANK, RANK_HOST_BYTES, host_memory_bytes
    from launcher.plan.report import memory_report

    def mem_gib(text: str) -> int:
        (line,) = [line for line in directives(text) if line.startswith("#SBATCH --mem=")]
        return int(line.removeprefix("#SBATCH --mem=").removesuffix("G"))

    base = ["recipe=llama3-8b-full-zero3", "launch.nodes=2"]
    zero3 = job_script(*base)
    assert f"#SBATCH --cpus-per-task={8 * CPUS_PER_RANK}\n" in zero3
    assert mem_gib(zero3) * 2**30 >= 8 * RANK_HOST_BYTES
    raw, _, _ = compose(["launch=slurm", *base, "strategy=zero3_offload"])
    offload_cfg, errors = validate(raw)
    assert not errors
    host = memory_report(offload_cfg).chosen.host
    assert host > 0
    offload = job_script(*base, "strategy=zero3_offload")
    assert (
        mem_gib(offload) * 2**30 >= host_memory_bytes(offload_cfg) > (mem_gib(zero3) - 1) * 2**30 + 8 * host * 0.99
    ), "8 ranks' offloaded states come on top"
    assert "#SBATCH --cpus-per-task=4\n" in job_script(*base, "launch.cpus_per_task=4")
    assert "#SBATCH --mem=500G\n" in job_script(*base, "launch.mem=500G")
    whole = job_script(*base, "launch.exclusive=true")
    assert "#SBATCH --mem=0" in directives(whole) and not [d for d in directives(whole) if "--cpus-per-task" in d], (
        "--exclusive grants the node's CPUs"
    )


def test_the_plan_names_the_interpreter_the_nodes_run(tmp_path):
    plan = SlurmBackend().build(config(), tmp_path / "run", tmp_path / "run" / "config.yaml")
    assert (
        "#SBATCH --nodes=1" in plan.files["job.sbatch"] and f"\npython={sys.executable}\n" in plan.files["job.sbatch"]
    )
    assert any(n.startswith(f"the job runs {sys.executable}, the interpreter running ftl here") for n in plan.notes), (
        plan.notes
    )
    cfg = config()
    cfg.launch.setup = ["source /shared/venv/bin/activate"]
    plan = SlurmBackend().build(cfg, tmp_path / "run", tmp_path / "run" / "config.yaml")
    assert sys.executable not in plan.files["job.sbatch"] and "python=$(command -v python3)" in plan.files["job.sbatch"]
    assert any(n.startswith("the job runs python3 from the nodes' PATH after launch.setup") for n in plan.notes)
    cfg.launch.python = "/shared/venv 2/bin/python"
    named = SlurmBackend().build(cfg, tmp_path / "run", tmp_path / "run" / "config.yaml")
    assert "\npython='/shared/venv 2/bin/python'\n" in named.files["job.sbatch"]


def test_node_local_paths_are_warned_about(tmp_path, monkeypatch):
    monkeypatch.chdir("/")  # the job's --chdir: a checkout under /tmp (as CI's may be) would be warned about too
    monkeypatch.setenv("FTL_CACHE", "/dev/shm/ftl-cache")
    monkeypatch.setenv("HF_HOME", "/shared/hf")
    cfg = config()
    cfg.launch.python = "/var/tmp/venv/bin/python"
    shared = Path("/shared/runs/x")
    notes = [n for n in SlurmBackend().build(cfg, shared, shared / "config.yaml").notes if n.startswith("warning:")]
    assert [n.split(" is under ")[0] for n in notes] == [
        "warning: ftl's cache (FTL_CACHE) /dev/shm/ftl-cache",
        "warning: the interpreter /var/tmp/venv/bin/python",
    ], notes
    cfg.launch.hf_home = "/tmp/hf"
    local = Path("/tmp/runs/x")
    notes = [n for n in SlurmBackend().build(cfg, local, local / "config.yaml").notes if n.startswith("warning:")]
    assert any(n.startswith("warning: the run dir /tmp/runs/x is under /tmp") for n in notes) and any(
        "HF_HOME /tmp/hf" in n for n in notes
    )
    monkeypatch.setenv("FTL_CACHE", "/shared/cache")
    monkeypatch.setenv("HF_HOME", "/tmpfoo/hf")  # a prefix of a name is not its directory
    cfg = config()
    cfg.launch.python = "/shared/venv/bin/python"  # not this test's own interpreter, which may live under /tmp
    assert not [n for n in SlurmBackend().build(cfg, shared, shared / "config.yaml").notes if n.startswith("warning:")]


@pytest.mark.parametrize(
    "args,warned",
    [
        (["--export=NONE"], "--export=NONE"),
        (["--export", "FOO=1"], "--export=FOO=1"),
        (["--export=ALL,FOO=1"], None),
        (["--mail-type=END"], None),
    ],
)
def test_an_export_that_drops_the_environment_is_warned_about(args, warned, tmp_path, monkeypatch):
    monkeypatch.delenv("SBATCH_EXPORT", raising=False)
    monkeypatch.setenv("FTL_CACHE", "/shared/cache")
    cfg = config()
    cfg.launch.sbatch_args = args
    cfg.launch.env = {"WANDB_API_KEY": SECRET}
    notes = [
        n for n in SlurmBackend().build(cfg, Path("/shared/r"), Path("/shared/r/config.yaml")).notes if "--export" in n
    ]
    if warned is None:
        assert notes == []
    else:
        assert (
            len(notes) == 1 and f"sbatch {warned} keeps the launch.env secrets WANDB_API_KEY from the job" in notes[0]
        ), notes


def test_ftl_variables_are_written_into_the_script_not_left_to_export(tmp_path):
    """FTL_CACHE and HF_HOME of the submitting shell reach the ranks even when the job's own
    environment lacks them (sbatch --export=NONE); launch.env and launch.hf_home win."""
    cache = "/shared/ftl cache; $(touch CANARY)"
    python = _executable(
        tmp_path / "python", FAKE_PYTHON.replace('"${HOSTILE-unset}"', '"${FTL_CACHE-unset}|${HF_HOME-unset}"')
    )
    script = tmp_path / "job.sbatch"
    text = render_sbatch(
        config(),
        tmp_path / "run",
        tmp_path / "run" / "config.yaml",
        str(python),
        workdir=tmp_path,
        environ={"FTL_CACHE": cache, "HF_HOME": "/shared/hf", "OTHER": "x"},
    )
    script.write_text(text)
    rec = Recorder(tmp_path / "shim")
    env = {k: v for k, v in rec.env().items() if k not in ("FTL_CACHE", "HF_HOME")}
    out = subprocess.run(
        ["bash", str(script)], env=env, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert (rec.rec / "python.env").read_text() == f"{cache}|/shared/hf"
    _no_canary(tmp_path)
    cfg = config("+launch.env.FTL_CACHE=/mine", "launch.hf_home=/hub")
    given = render_sbatch(
        cfg,
        tmp_path / "run",
        tmp_path / "run" / "config.yaml",
        "/py",
        workdir=tmp_path,
        environ={"FTL_CACHE": "/x", "HF_HOME": "/y"},
    )
    assert (
        "export FTL_CACHE=/mine\n" in given
        and "export HF_HOME=/hub\n" in given
        and "/x" not in given
        and "/y" not in given
    )


def test_a_slurm_run_never_lands_in_the_local_run_of_the_same_recipe(tmp_path, monkeypatch):
    """The default run dir of a SLURM job is runs/<name>-slurm: `ftl train recipe=tiny` here and
    the same recipe submitted with launch=slurm are two runs, never one continued by the other."""
    from launcher.session import prepare_run

    monkeypatch.chdir(tmp_path)
    local = prepare_run(["recipe=tiny"]).run_dir
    slurm = prepare_run(["recipe=tiny", "launch=slurm"]).run_dir
    assert local == tmp_path / "runs" / "tiny" and slurm == tmp_path / "runs" / "tiny-slurm"
    assert prepare_run(["recipe=tiny", "launch=slurm", f"run.dir={local}"]).run_dir == local, (
        "an explicit run.dir is kept"
    )


def test_the_log_names_in_the_script_come_from_run_paths(tmp_path, monkeypatch):
    """The node logs and the batch shell's log are named by RunPaths alone: renamed there, the
    script follows (issue 33: no file name spelled in the template)."""
    from launcher.rundir import RunPaths

    monkeypatch.setattr(RunPaths, "NODE_LOG", "host{node}.txt")
    monkeypatch.setattr(RunPaths, "BATCH_LOG", "batch-%j.txt")
    run_dir = tmp_path / "run"
    text = render_sbatch(config(), run_dir, run_dir / "config.yaml", sys.executable)
    bash_n(text, tmp_path)
    assert f"#SBATCH --output={run_dir}/logs/batch-%j.txt\n" in text
    assert f"ftl_node {run_dir}/logs/host .txt " in text
    assert "node-" not in text and "slurm-" not in text
