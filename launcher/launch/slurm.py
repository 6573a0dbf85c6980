"""launch=slurm: render ``job.sbatch`` into the run dir from ``slurm/job.sbatch.j2`` and submit it.

:func:`render_sbatch` is pure: config in, script text out, so ``ftl plan`` can show the script and
tests can check it (golden files, ``bash -n``, hostile strings). Every value reaches the script
through a quoting filter; a value that reaches the output unfiltered is an error at render time,
not a quietly unquoted word. ``launch.setup`` lines are the one deliberate exception: they are the
user's own shell commands (module loads, environment activation) and go in verbatim.

What the script does on the cluster (one srun task per node running torchrun, the USR1/TERM
handling, self-requeue) is documented in the template itself.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from launcher import shell
from launcher.config.errors import ConfigError, ConfigErrors
from launcher.config.schema import FtlConfig
from launcher.launch.base import LaunchPlan, python, trainer_argv
from launcher.paths import SLURM_DIR
from launcher.rundir import RunPaths

TEMPLATE = "job.sbatch.j2"
PREPROCESS_TEMPLATE = "preprocess.sbatch.j2"
PREVIOUS_JOB = "{previous_job}"  # in a plan's command: the id of the job submitted just before
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# torchrun >= 2.12 waits this long (at least) for its ranks to save after a SIGTERM of its own
# (SLURM's, to every process of the step) before it kills them; older torchruns wait 30 s.
MIN_SHUTDOWN_S = 60
# After the first node's task ends, srun ends the others this long after (--wait): enough for
# rank 0 to close W&B and the process group after the last collective; a node that died with a
# nonzero exit ends the step at once (--kill-on-bad-exit=1) instead of leaving the others in NCCL.
SRUN_WAIT_S = 300
# CPUs a GPU job asks for per rank: the rank's own thread (Python, kernel launches, NCCL's proxy)
# and its prefetch thread, which collates and pins the next batches (launcher/train/prefetch.py;
# ranks start no DataLoader workers). Without --cpus-per-task many sites give the one task on a
# node a single core, shared by all its ranks and their pinned-memory threads.
CPUS_PER_RANK = 2
# Host memory a CUDA rank holds beside any weights: the CUDA context and the loaded kernels of
# torch and NCCL, the Python heap, the prefetched batches (a few GiB each today; doubled for headroom).
RANK_HOST_BYTES = 8 * 2**30
# ftl's own variables, read on the nodes: written into the script from the submitting shell
# instead of relying on sbatch's default --export=ALL.
PASSED_ENV = ("FTL_CACHE", "HF_HOME")
# Prefixes that name storage local to each node on most clusters: a path there on the submitting
# machine is another directory, or none, on the compute nodes.
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/run/user", "/scratch/local", "/localscratch", "/lscratch")


class Quoted(str):
    """Text a filter made safe to paste into the script: the only kind the template may output."""


class UnsafeValue(ValueError):
    """A value that cannot go into an sbatch script safely; `field` names the config key."""

    def __init__(self, message: str, field: str = "launch") -> None:
        super().__init__(message)
        self.field = field


def _str(value: Any) -> str:
    import jinja2

    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined: raises UndefinedError naming the missing variable
    if isinstance(value, (bool, type(None))) or not isinstance(value, (str, int, float, Path)):
        raise UnsafeValue(f"refusing to put {value!r} ({type(value).__name__}) into the script")
    return str(value)


def _no_newline(text: str) -> str:
    """One line of plain text: sbatch's own parser of #SBATCH lines knows no escapes for the rest."""
    if shell.has_control_chars(text):
        raise UnsafeValue(
            f"{text!r}: a value in an sbatch script must not contain newlines, NUL or other control characters"
        )
    return text


def quote(value: Any) -> Quoted:
    """One shell word, whatever the value holds (:func:`launcher.shell.quote`: the one quoting rule)."""
    text = _str(value)
    if "\0" in text:
        raise UnsafeValue(f"{text!r}: NUL cannot be passed through a shell script")
    return Quoted(shell.quote(text))


def sbatch_value(value: Any) -> Quoted:
    """A value on an ``#SBATCH`` line. sbatch reads these lines with its own parser: quotes as in
    the shell, but a backslash escapes the next character even inside single quotes, so it is
    doubled; a newline would end the directive and start a new one, so it is refused."""
    return Quoted(quote(_no_newline(_str(value))).replace("\\", "\\\\"))


def qwords(values: Any) -> Quoted:
    """Shell words, each quoted."""
    return Quoted(" ".join(quote(v) for v in values))


def sbatch_words(values: Any) -> Quoted:
    """Several arguments on one ``#SBATCH`` line (sbatch reads them all), each quoted."""
    return Quoted(" ".join(sbatch_value(v) for v in values))


def log_dir(run_dir: Path) -> Path:
    """The run's logs/, which SLURM's --output takes as a filename pattern: ``%`` starts a
    replacement (and SLURM 22.05 mangles ``%%`` escapes after the first) and a backslash turns
    them all off, so a run dir holding either cannot name the job's log."""
    logs = RunPaths(run_dir).logs
    if "%" in str(logs) or "\\" in str(logs):
        raise UnsafeValue(
            f"{str(run_dir)!r}: with launch=slurm the run dir must not contain '%' or '\\' "
            "(SLURM reads the log path as a filename pattern); choose another run.name or run.dir",
            "run.dir",
        )
    return logs


def comment(value: Any) -> Quoted:
    """A value shown in a ``#`` comment: quoted, and one line, so that it stays a comment."""
    return quote(_no_newline(_str(value)))


def verbatim(value: Any) -> Quoted:
    """A shell line of the user's own (launch.setup), deliberately unquoted: one line only."""
    return Quoted(_no_newline(_str(value)))


def _finalize(value: Any) -> Any:
    if isinstance(value, Quoted):
        return value
    raise UnsafeValue(
        f"template bug: {value!r} reached the script without a quoting filter (q, sbatch, comment, verbatim)"
    )


_ENV: Any = None


def jinja_env() -> Any:
    """The one Jinja2 environment for sbatch scripts: undefined names are errors, nothing escapes
    unquoted."""
    global _ENV
    if _ENV is None:
        import jinja2

        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(SLURM_DIR)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            finalize=_finalize,
        )
        env.filters.update(
            q=quote, qwords=qwords, sbatch=sbatch_value, sbatch_words=sbatch_words, comment=comment, verbatim=verbatim
        )
        _ENV = env
    return _ENV


def warning_signal(cfg: FtlConfig) -> tuple[str, int]:
    """(signal, seconds): what SLURM sends the batch shell before the time limit, and how long
    before: ``launch.signal``, or sized for a step and a checkpoint (:mod:`launcher.plan.timing`)."""
    from launcher.plan.timing import warning_signal as planned

    try:
        return planned(cfg)
    except ValueError as e:
        raise UnsafeValue(str(e), "launch.signal") from None


def nproc_per_node(cfg: FtlConfig) -> int:
    from launcher.config.topology import procs_per_node

    return procs_per_node(cfg)


def secret_env(cfg: FtlConfig) -> dict[str, str]:
    """launch.env entries with secret-looking names (tokens, API keys) or holding a known secret.
    They are never written into job.sbatch: sbatch gets them in its environment and passes them on
    to the job."""
    from launcher.redact import secret_env_names

    names = secret_env_names({k: str(v) for k, v in cfg.launch.env.items()})
    return {k: str(v) for k, v in cfg.launch.env.items() if k in names}


def cpus_per_task(cfg: FtlConfig) -> Optional[int]:
    """--cpus-per-task of the one task on each node: launch.cpus_per_task; for a GPU job without
    launch.exclusive (which grants the node's CPUs), :data:`CPUS_PER_RANK` for each rank; a CPU
    job takes the partition's default."""
    from launcher.config.topology import gpus_per_node

    launch = cfg.launch
    if launch.cpus_per_task is not None or launch.exclusive or gpus_per_node(cfg) == 0:
        return launch.cpus_per_task
    return nproc_per_node(cfg) * CPUS_PER_RANK


def host_memory_bytes(cfg: FtlConfig) -> float:
    """Host memory a GPU job's node needs: for each rank :data:`RANK_HOST_BYTES` and what the
    memory planner puts in host memory (offloaded optimizer, parameters, activations), plus the
    weights as they are read before the engine moves or shards them, on every rank, or on one
    where the engine shards parameters (FSDP reads them on rank 0; ZeRO-3 partitions them as
    they load). An upper bound for the loading peak: not every rank holds its copy at once."""
    from launcher.config.topology import planned_device_type, resolve_precision
    from launcher.engines.traits import engine_traits
    from launcher.plan.memory import DTYPE_BYTES, FP32, frozen_base_bytes, param_counts
    from launcher.plan.report import layout_for, memory_report, workload_of

    precision = resolve_precision(cfg.train.precision, planned_device_type(cfg))
    workload, layout = workload_of(cfg, precision), layout_for(cfg)
    if cfg.peft.method != "none":
        weights = frozen_base_bytes(workload, layout)[0]
    else:
        per_param = FP32 if layout.traits.autocasts_fp32_weights else DTYPE_BYTES[precision]
        weights = per_param * param_counts(cfg.model.arch).total
    ranks = nproc_per_node(cfg)
    readers = 1 if engine_traits(cfg.strategy).shards_params else ranks
    return ranks * (RANK_HOST_BYTES + memory_report(cfg).chosen.host) + readers * weights


def mem_request(cfg: FtlConfig) -> Optional[str]:
    """--mem of each node: launch.mem; with launch.exclusive, 0 (--exclusive alone grants the
    node's CPUs and GPUs but only the partition's default memory); for a GPU job
    :func:`host_memory_bytes` in whole GiB; a CPU job takes the partition's default."""
    from launcher.config.topology import gpus_per_node

    launch = cfg.launch
    if launch.mem is not None:
        return launch.mem
    if launch.exclusive:
        return "0"
    if gpus_per_node(cfg) == 0:
        return None
    return f"{math.ceil(host_memory_bytes(cfg) / 2**30)}G"


def job_python(cfg: FtlConfig, submitting: str) -> Optional[str]:
    """The interpreter written into the script: launch.python; with launch.setup, None (the
    script takes the python3 that the setup lines put on the node's PATH); else ``submitting``,
    the interpreter running ftl, which must then exist at the same path on the nodes."""
    if cfg.launch.python is not None:
        return cfg.launch.python
    return None if cfg.launch.setup else submitting


def passed_env(cfg: FtlConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """:data:`PASSED_ENV` values of the submitting shell that the script exports, unless
    launch.env (or launch.hf_home, for HF_HOME) sets them itself."""
    launch = cfg.launch
    given = {*launch.env, *(["HF_HOME"] if launch.hf_home else [])}
    return {k: environ[k] for k in PASSED_ENV if environ.get(k) and k not in given}


def template_values(
    cfg: FtlConfig,
    run_dir: Path,
    config_path: Path,
    python: str,
    workdir: Path,
    environ: Optional[Mapping[str, str]] = None,
) -> dict[str, Any]:
    """``python``: the interpreter running ftl (:func:`job_python` decides whether the job runs
    it); ``environ``: the submitting shell's environment (default: this process's)."""
    from launcher.config.topology import gpus_per_node, planned_device_type
    from launcher.launch.local import cpu_malloc_env
    from launcher.plan.timing import io_timeout_s

    launch = cfg.launch
    signal_name, lead_s = warning_signal(cfg)
    for key in launch.env:
        if not _ENV_NAME.match(key):
            raise UnsafeValue(f"{key!r} is not a valid environment variable name", "launch.env")
    logs, paths = log_dir(run_dir), RunPaths(run_dir)
    # Around the node's index, which only the script knows ($SLURM_NODEID): RunPaths' name, split where it goes.
    node_log_prefix, node_log_suffix = str(paths.node_log("\0")).split("\0")
    secrets = secret_env(cfg)
    return {
        "run_name": cfg.run.name,
        "job_name": launch.job_name or f"ftl-{cfg.run.name}",
        "nodes": launch.nodes,
        "gpus_per_node": gpus_per_node(cfg),
        "gpu_request": launch.gpu_request,
        "cpus_per_task": cpus_per_task(cfg),
        "mem": mem_request(cfg),
        "partition": launch.partition,
        "account": launch.account,
        "qos": launch.qos,
        "time": launch.time,
        "constraint": launch.constraint,
        "exclusive": launch.exclusive,
        "sbatch_args": list(launch.sbatch_args),
        "signal_name": signal_name,
        "signal_spec": f"B:{signal_name}@{lead_s}",
        "lead_s": lead_s,
        "shutdown_s": max(lead_s, MIN_SHUTDOWN_S),
        "max_requeues": launch.max_requeues,
        "max_node_requeues": launch.max_node_requeues,
        "excluded_nodes": str(paths.excluded_nodes),
        "rdzv_port": launch.rdzv_port,
        "srun_wait_s": SRUN_WAIT_S,
        "nproc": nproc_per_node(cfg),
        "cpu_threads": planned_device_type(cfg) != "cuda" and "OMP_NUM_THREADS" not in launch.env,
        # the job's own environment is checked on the node, by the script
        "malloc_env": cpu_malloc_env(cfg, gpus_per_node(cfg), {}),
        "cuda": gpus_per_node(cfg) > 0,
        "socket_ifname": launch.socket_ifname,
        "hf_home": launch.hf_home,
        "hub_offline": launch.hub_offline,
        "step_timeout_s": launch.dist_timeout_s,
        "io_timeout_s": io_timeout_s(cfg),
        "passed_env": passed_env(cfg, os.environ if environ is None else environ),
        "env": {k: v for k, v in sorted(launch.env.items()) if k not in secrets},
        "secret_names": sorted(secrets),
        "setup": list(launch.setup),
        "run_dir": str(run_dir),
        "script_path": str(paths.job_script),
        "log_dir": str(logs),
        "batch_log": str(paths.batch_log),
        "node_log_prefix": node_log_prefix,
        "node_log_suffix": node_log_suffix,
        "node_log_pattern": str(paths.node_log("<index>")),
        "workdir": str(workdir),
        "python": job_python(cfg, python),
        "config_path": str(config_path),
        "trainer_argv": trainer_argv(config_path),
    }


def render_sbatch(
    cfg: FtlConfig,
    run_dir: Path,
    config_path: Path,
    python: str,
    workdir: Optional[Path] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> str:
    """Pure: the job script for this config. ``python`` is the interpreter running ftl (the job
    runs it when neither launch.python nor launch.setup says otherwise), ``workdir`` the job's
    working directory (default: the current one), ``environ`` the submitting shell's environment
    (default: this process's)."""
    values = template_values(cfg, run_dir, config_path, python, Path.cwd() if workdir is None else workdir, environ)
    return jinja_env().get_template(TEMPLATE).render(**values)


def render_preprocess_sbatch(
    cfg: FtlConfig,
    run_dir: Path,
    config_path: Path,
    python: str,
    workdir: Optional[Path] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> str:
    """Pure: the one-node CPU job that prepares the data cache before training: the partition's
    default CPUs and memory, unless launch.cpus_per_task or launch.mem say otherwise."""
    values = template_values(cfg, run_dir, config_path, python, Path.cwd() if workdir is None else workdir, environ)
    values.update(
        job_name=f"{values['job_name']}-prep",
        nodes=1,
        gpus_per_node=0,
        exclusive=False,
        cpus_per_task=cfg.launch.cpus_per_task,
        mem=cfg.launch.mem,
        batch_log=str(RunPaths(run_dir).preprocess_log),
        script_path=str(RunPaths(run_dir).preprocess_script),
    )
    return jinja_env().get_template(PREPROCESS_TEMPLATE).render(**values)


def staging_notes(cfg: FtlConfig) -> list[str]:
    """What a job needs in place before it starts, and why it would not run well without it."""
    from launcher.config.topology import gpus_per_node

    launch, model = cfg.launch, cfg.model
    notes = []
    on_hub = model.source == "hf" and not Path(model.path).is_dir()
    if on_hub and launch.hub_offline and not launch.preprocess_job:
        where = (
            f"launch.hf_home={launch.hf_home}" if launch.hf_home else "HF_HOME (set launch.hf_home to a shared path)"
        )
        notes.append(
            f"the ranks read {model.path} offline (HF_HUB_OFFLINE=1) from {where}: stage it first with "
            "`ftl preprocess --fetch-model <these overrides>` or launch.preprocess_job=true"
        )
    gpus = gpus_per_node(cfg)
    if gpus == 0:
        notes.append("a CPU job: no GPU requested (train.device=cpu or launch.gpus_per_node=0)")
    else:
        cpus, mem = cpus_per_task(cfg), mem_request(cfg)
        why = (
            f" ({nproc_per_node(cfg)} rank(s) × {CPUS_PER_RANK}: each rank and its prefetch thread)"
            if launch.cpus_per_task is None
            else ""
        )
        cpu_text = "all of the node's CPUs (launch.exclusive)" if cpus is None else f"{cpus} CPU(s){why}"
        mem_text = "all of the node's memory" if mem == "0" else f"{mem} of host memory"
        sized = "" if launch.mem is not None or launch.exclusive else " (sized by the planner; launch.mem sets it)"
        notes.append(f"each node: {gpus} GPU(s), {cpu_text}, {mem_text}{sized}")
    return notes


def interpreter_note(cfg: FtlConfig, submitting: str) -> str:
    python = job_python(cfg, submitting)
    if python is None:
        return "the job runs python3 from the nodes' PATH after launch.setup (launch.python names another)"
    if cfg.launch.python is not None:
        return f"the job runs launch.python={python}"
    return (
        f"the job runs {python}, the interpreter running ftl here (no launch.setup): it must exist at that path "
        "on the compute nodes; launch.setup (e.g. `source VENV/bin/activate`) or launch.python choose another"
    )


def node_local_prefix(path: str) -> Optional[str]:
    """The :data:`NODE_LOCAL` prefix ``path`` lies under, if any."""
    p = PurePosixPath(os.path.abspath(os.path.expanduser(path)))
    return next(
        (prefix for prefix in NODE_LOCAL if p == PurePosixPath(prefix) or PurePosixPath(prefix) in p.parents), None
    )


def shared_path_warnings(
    cfg: FtlConfig, run_dir: Path, workdir: Path, submitting: str, environ: Mapping[str, str]
) -> list[str]:
    """Paths every node must see that lie on storage usually local to each node: they pass on the
    submitting machine and are missing, or another directory, on the nodes."""
    from launcher.paths import cache_dir

    launch = cfg.launch
    cache = launch.env.get("FTL_CACHE") or environ.get("FTL_CACHE") or str(cache_dir())
    hf_home = launch.hf_home or launch.env.get("HF_HOME") or environ.get("HF_HOME")
    paths = [
        ("the run dir", str(run_dir)),
        ("the working directory (--chdir)", str(workdir)),
        ("ftl's cache (FTL_CACHE)", cache),
    ]
    if hf_home:
        paths.append(("HF_HOME", hf_home))
    python = job_python(cfg, submitting)
    if python is not None and "/" in python:
        paths.append(("the interpreter", python))
    out = []
    for what, path in paths:
        prefix = node_local_prefix(path)
        if prefix:
            out.append(
                f"warning: {what} {path} is under {prefix}, on most clusters local to each node: the compute nodes "
                "see another directory there, or none; use a path on a filesystem every node mounts"
            )
    return out


def export_warnings(cfg: FtlConfig, environ: Mapping[str, str]) -> list[str]:
    """An sbatch --export other than ALL (launch.sbatch_args, or SBATCH_EXPORT in this shell) drops
    the submitting shell's environment from the job: the script sets ftl's own variables itself,
    but launch.env secrets, never written into it, reach the job only that way."""
    args, value = list(cfg.launch.sbatch_args), environ.get("SBATCH_EXPORT")
    for i, arg in enumerate(args):
        if arg == "--export":
            value = args[i + 1] if i + 1 < len(args) else ""
        elif arg.startswith("--export="):
            value = arg.split("=", 1)[1]
    if value is None or value == "ALL" or value.startswith("ALL,"):
        return []
    secrets = sorted(secret_env(cfg))
    lost = (
        f"the launch.env secrets {', '.join(secrets)}"
        if secrets
        else "this shell's variables (PATH, W&B keys, module settings)"
    )
    return [
        f"warning: sbatch --export={value} keeps {lost} from the job; ftl writes {', '.join(PASSED_ENV)} and launch.env's other "
        "values into the script itself; use --export=ALL,... or set them on the nodes (launch.setup)"
    ]


class SlurmBackend:
    name = "slurm"

    def build(self, cfg: FtlConfig, run_dir: Path, config_path: Path) -> LaunchPlan:
        if any(arg == "-a" or arg.startswith(("--array", "-a")) for arg in cfg.launch.sbatch_args):
            raise ConfigErrors(
                [
                    ConfigError(
                        "launch.sbatch_args",
                        "an array job from `ftl train` would run every task in this one "
                        "run dir; submit slurm/train.sbatch with --array and e.g. "
                        "run.name='NAME-${oc.env:SLURM_ARRAY_TASK_ID}' instead",
                    )
                ]
            )
        files = {}
        try:
            if cfg.launch.preprocess_job:
                files[RunPaths.PREPROCESS_SCRIPT] = render_preprocess_sbatch(cfg, run_dir, config_path, python())
            files[RunPaths.JOB_SCRIPT] = render_sbatch(cfg, run_dir, config_path, python())
        except UnsafeValue as e:
            raise ConfigErrors([ConfigError(e.field, str(e))]) from None
        n, per = cfg.launch.nodes, nproc_per_node(cfg)
        (sig, lead), requeues = warning_signal(cfg), cfg.launch.max_requeues
        notes = [
            f"one srun task per node runs torchrun: {n} node(s) × {per} rank(s); logs in {RunPaths(run_dir).logs}",
            f"SIG{sig} {lead} s before the time limit: checkpoint, then requeue (at most {requeues} time(s)) and resume",
            f"a failure pinned on node(s): requeue without them (at most {cfg.launch.max_node_requeues} time(s), "
            f"listed in {RunPaths(run_dir).excluded_nodes}) and resume",
            *staging_notes(cfg),
            interpreter_note(cfg, python()),
            *shared_path_warnings(cfg, run_dir, Path.cwd(), python(), os.environ),
            *export_warnings(cfg, os.environ),
        ]
        commands = [["sbatch", "--parsable", str(RunPaths(run_dir).job_script)]]
        if cfg.launch.preprocess_job:
            # The training job's dependency is the first job's id, known only once it is submitted:
            # `submit` fills in the JOB placeholder.
            commands = [
                ["sbatch", "--parsable", str(RunPaths(run_dir).preprocess_script)],
                ["sbatch", "--parsable", f"--dependency=afterok:{PREVIOUS_JOB}", str(RunPaths(run_dir).job_script)],
            ]
            notes.insert(0, "data preparation first, as a one-node CPU job; training starts when it succeeds")
        return LaunchPlan(run_dir=run_dir, commands=commands, env=secret_env(cfg), files=files, notes=notes)

    def preflight(self, cfg: FtlConfig) -> list[ConfigError]:
        return []  # the job runs on the allocation's nodes, not on this one

    def submit(self, plan: LaunchPlan) -> int:
        for note in plan.notes:  # `ftl plan` shows them too
            print(f"ftl: {note}", file=sys.stderr)
        RunPaths(plan.run_dir).logs.mkdir(parents=True, exist_ok=True)  # SLURM will not create it
        code, job_id = 0, ""
        for argv in plan.commands:
            code, job_id = run_sbatch([a.replace(PREVIOUS_JOB, job_id) for a in argv], plan.env)
            if code:
                return code
            print(job_id)
            print(
                f"ftl: submitted SLURM job {job_id}; logs in {RunPaths(plan.run_dir).logs} "
                f"(squeue -j {job_id}, scancel {job_id})",
                file=sys.stderr,
            )
        return code


def run_sbatch(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run sbatch (an argument list, no shell) with `env` added to this environment, which sbatch
    hands on to the job: (0, job id) or (1, "") with the reason printed."""
    try:
        proc = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        print(
            f"ftl: `{argv[0]}` not found: launch=slurm needs the SLURM client commands on PATH "
            "(use `ftl plan` to only see the job script)",
            file=sys.stderr,
        )
        return 1, ""
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip() or f"exit code {proc.returncode}"
        print(f"ftl: {shell.join(argv)} failed: {detail}", file=sys.stderr)
        return 1, ""
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        print(f"ftl: sbatch printed no job id: {proc.stdout.strip()!r}", file=sys.stderr)
        return 1, ""
    return 0, job_id
