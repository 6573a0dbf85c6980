"""Every file of a run directory, named in one place (submitit's ``JobPaths`` is the model): the
launcher, the ranks, ``ftl eval``, ``ftl export`` and the sweeps ask :class:`RunPaths` and spell
no name themselves (tests/test_layout.py checks). Pure: imports nothing but pathlib, so a rank
imports it for free.

What is inside a checkpoint's ``step-N`` dir (its marker, the engine's state, the weights) is the
checkpoint code's and the engines' business; the ``checkpoints/`` dir itself is named here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RunPaths:
    """The files of the run dir ``root``. The class attributes are the names, the properties the
    paths: ``RunPaths(run_dir).metrics`` is ``run_dir/metrics.jsonl``."""

    CONFIG = "config.yaml"  # the resolved config every rank reads (secrets blanked)
    LAUNCH_SCRIPT = "launch.sh"  # the command that made the run, and the job's commands
    JOB_SCRIPT = "job.sbatch"  # launch=slurm: the training job
    PREPROCESS_SCRIPT = "preprocess.sbatch"  # launch=slurm with launch.preprocess_job: the data job before it
    LOGS = "logs"  # launch=slurm: slurm-<job>.out and node-<index>.log
    BATCH_LOG = "slurm-%j.out"  # in logs/: the training job's batch shell (%j: SLURM's job id pattern)
    PREPROCESS_LOG = "preprocess-%j.out"  # in logs/: the data job's batch shell
    NODE_LOG = "node-{node}.log"  # in logs/: each node's torchrun and ranks ({node}: SLURM_NODEID)
    METRICS = "metrics.jsonl"  # one line per optimizer step
    EVAL = "eval.json"  # the trainer's evaluations (before, step_N, after); also ftl eval's result file
    EVAL_DIR = "eval"  # ftl eval of the run's checkpoints: eval/step-N/eval.json
    EXPORT_DIR = "export"  # ftl export of the run's checkpoints: export/step-N/
    LOSS_CURVE = "loss_curve.png"
    SIDE_BY_SIDE = "side_by_side.html"  # held-out prompts: reference, base and tuned answers (also in ftl eval's dir)
    WANDB_ID = "wandb_run_id"  # the W&B run id, so a resumed run continues the same W&B run
    CHECKPOINTS = "checkpoints"  # step-N/ dirs: ftl prunes what it finds there
    SKIPPED_ROWS = "skipped_rows.txt"  # data.on_error=skip: each skipped row, "FILE, row N: why"
    LATEST_CHECKPOINT = "latest"  # in checkpoints/: the name of the newest published step-N, for people and tools
    REFERENCE_LOGPS = "reference_logps.pt"  # DPO/SimPO: the starting model's log-probs, for a resumed run
    BASE_ROWS = "base_topk.pt"  # objective.kl_to_base, full fine-tuning: the base's top-k next tokens, for a resume
    RETAIN_BASE = "retain_base.pt"  # eval.retain, full fine-tuning: the base's top-k next tokens on the retain set
    LOCK = ".ftl-lock"  # who writes the run dir now (launcher.rundir.lock)
    MARKER = ".ftl-run"  # ftl made this dir: only this says so
    EXITS = ".ftl-exit"  # rank-N.json: each trainer rank's exit code and node
    PREFLIGHT = "preflight.json"  # the nodes' check before training: figures, slow and failed nodes
    EXCLUDED_NODES = "excluded_nodes.txt"  # launch=slurm: nodes the job left after a failure, one a line
    HANG = ".ftl-hang"  # the hang watchdog fired: which rank found it, in what (launcher.runtime.watchdog)
    STACKS_PREFIX = "stacks-rank-"  # logs/stacks-rank-N.txt: rank N's Python stacks, appended at each hang
    TRACE_PREFIX = "collectives-rank-"  # logs/collectives-rank-N.pkl: rank N's flight recorder (its recent collectives)
    NCCL_TIMEOUT_PREFIX = "nccl-timeout-rank-"  # logs/nccl-timeout-rank-N: NCCL's own dump on a collective timeout
    START_PREFIX = "start-"  # start-<digest>/: model.path=an earlier stage, made a Hugging Face dir (artifacts.stages)
    EARLIER_PREFIX = "earlier-"  # earlier-<time>/: an earlier run's outputs, moved aside by checkpoint.resume=never
    # An earlier run's outputs, moved aside whole by checkpoint.resume=never (the trainer writes the
    # files, `ftl eval` of its checkpoints the eval/ folder).
    EARLIER_RUN_FILES = (CHECKPOINTS, METRICS, EVAL, LOSS_CURVE, SIDE_BY_SIDE, EVAL_DIR, SKIPPED_ROWS)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def names(cls) -> dict[str, str]:
        """Attribute -> file name, every one (tests/test_layout.py builds its check from these)."""
        return {k: v for k, v in vars(cls).items() if k.isupper() and isinstance(v, str)}

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    def node_config(self, node_rank: int) -> Path:
        """A multi-node torchrun job: every node writes its own copy; only node_rank differs."""
        return self.config if not node_rank else self.root / f"config.node{node_rank}.yaml"

    @property
    def launch_script(self) -> Path:
        return self.root / self.LAUNCH_SCRIPT

    @property
    def job_script(self) -> Path:
        return self.root / self.JOB_SCRIPT

    @property
    def preprocess_script(self) -> Path:
        return self.root / self.PREPROCESS_SCRIPT

    @property
    def logs(self) -> Path:
        return self.root / self.LOGS

    @property
    def batch_log(self) -> Path:
        return self.logs / self.BATCH_LOG

    @property
    def preprocess_log(self) -> Path:
        return self.logs / self.PREPROCESS_LOG

    def node_log(self, node: int | str) -> Path:
        return self.logs / self.NODE_LOG.format(node=node)

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def skipped_rows(self) -> Path:
        return self.root / self.SKIPPED_ROWS

    @property
    def eval(self) -> Path:
        return self.root / self.EVAL

    @property
    def eval_dir(self) -> Path:
        return self.root / self.EVAL_DIR

    def eval_of_step(self, step: int) -> Path:
        """Where ``ftl eval`` of the run's step-N checkpoint writes its results."""
        return self.eval_dir / f"step-{step}"

    def export_of(self, checkpoint: str) -> Path:
        """Where ``ftl export`` of the run's checkpoint dir named ``checkpoint`` writes by default."""
        return self.root / self.EXPORT_DIR / checkpoint

    @property
    def loss_curve(self) -> Path:
        return self.root / self.LOSS_CURVE

    @property
    def side_by_side(self) -> Path:
        return self.root / self.SIDE_BY_SIDE

    @property
    def wandb_id(self) -> Path:
        return self.root / self.WANDB_ID

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def latest_checkpoint(self) -> Path:
        return self.checkpoints / self.LATEST_CHECKPOINT

    @property
    def reference_logps(self) -> Path:
        return self.root / self.REFERENCE_LOGPS

    @property
    def base_rows(self) -> Path:
        return self.root / self.BASE_ROWS

    @property
    def retain_base(self) -> Path:
        return self.root / self.RETAIN_BASE

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK

    @property
    def marker(self) -> Path:
        return self.root / self.MARKER

    @property
    def exits(self) -> Path:
        return self.root / self.EXITS

    @property
    def preflight(self) -> Path:
        return self.root / self.PREFLIGHT

    @property
    def excluded_nodes(self) -> Path:
        return self.root / self.EXCLUDED_NODES

    @property
    def hang(self) -> Path:
        return self.root / self.HANG

    def stacks(self, rank: int) -> Path:
        return self.logs / f"{self.STACKS_PREFIX}{rank}.txt"

    def collectives_trace(self, rank: int) -> Path:
        """What torch's flight recorder holds at a hang: ``pickle.load`` it, or torch's ``fr_trace`` tool."""
        return self.logs / f"{self.TRACE_PREFIX}{rank}.pkl"

    @property
    def nccl_timeout_trace_prefix(self) -> Path:
        """TORCH_FR_DUMP_TEMP_FILE: where NCCL's own watchdog writes its trace on a collective timeout (rank appended)."""
        return self.logs / self.NCCL_TIMEOUT_PREFIX

    def start(self, digest: str) -> Path:
        """The model this run starts from when model.path names an earlier stage (its digest: a new
        checkpoint or adapter is a new start)."""
        return self.root / f"{self.START_PREFIX}{digest[:16]}"

    def earlier(self, stamp: str) -> Path:
        """Where ``checkpoint.resume=never`` moves an earlier run's outputs."""
        return self.root / f"{self.EARLIER_PREFIX}{stamp}"


def run_dir_of(cfg: Any) -> Path:
    """The launcher chooses the run dir once and writes it into the config every rank reads."""
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / cfg.run.name
