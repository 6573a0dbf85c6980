"""What a run reports, and where: rank 0's sinks behind one object.

:func:`build_telemetry` returns a :class:`Telemetry` whose sinks are ``metrics.jsonl`` (one JSON
per step), ``eval.json``, the console (a rich progress bar, or plain lines when not a terminal,
and the before/after eval report) and W&B. On other ranks it returns a Telemetry with no sinks,
so the training loop calls it unconditionally and never tests the rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import resource
import secrets
import string
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from launcher.config.schema import FtlConfig
from launcher.files import write_atomic
from launcher.progress import attach, clock_text
from launcher.redact import known_secrets, redact, redact_overrides
from launcher.rundir import RunPaths
from launcher.runtime.distributed import DistInfo
from launcher.wandb_auth import resolve_wandb_mode

CLEAR_REFS, PROC_STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")
STEP_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb", "elapsed")


class Sink(Protocol):
    def log_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_eval(self, name: str, step: int, results: dict[str, Any]) -> None: ...
    def close(self, exit_code: int) -> None: ...


class Telemetry:
    """Fans every report out to its sinks; with no sinks (ranks other than 0) it does nothing."""

    def __init__(self, sinks: list[Sink], console: Any = None) -> None:
        self.sinks = sinks
        self.console = console  # a rich Console on rank 0, else None

    def info(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log_step(step, metrics)

    def log_eval(self, name: str, step: int, results: dict[str, Any]) -> None:
        results = redact(results, known_secrets())  # generated samples may quote a secret from the eval data
        for sink in self.sinks:
            sink.log_eval(name, step, results)

    def close(self, exit_code: int = 0) -> None:
        """Close every sink even when one fails: under SLURM's SIGTERM the W&B service process may
        already be gone, and that must not turn a clean, checkpointed stop into a failed run."""
        for sink in self.sinks:
            try:
                sink.close(exit_code)
            except Exception as e:  # noqa: BLE001 - reporting must never fail the run
                self.info(f"ftl: closing {type(sink).__name__} failed: {e}")
        self.sinks = []


def build_telemetry(cfg: FtlConfig, run_dir: Path, dist: DistInfo, total_steps: int, start_step: int) -> Telemetry:
    if not dist.is_main:
        return Telemetry([])
    from launcher.progress import make_console

    console = make_console()  # plain, unwrapped lines in a log file (SLURM)
    evals = EvalFileSink(RunPaths(run_dir).eval, start_step, RunPaths(run_dir).side_by_side)
    sinks: list[Sink] = [
        JsonlSink(RunPaths(run_dir).metrics, start_step, RunPaths(run_dir).loss_curve),
        evals,
        ConsoleSink(console, total_steps, start_step, cfg.train.log_every, cfg.eval.show_samples, evals.results),
    ]
    mode = resolve_wandb_mode(cfg.wandb.mode)
    if mode != "disabled":
        sinks.append(WandbSink(cfg, run_dir, mode, cfg.train.log_every, before=evals.results.get("before")))
    return Telemetry(sinks, console)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new window for :func:`peak_memory_gb`, so a step's value is that step's peak, not
    the peak of everything before it (the reference pass, an eval, an earlier, larger step).

    CUDA: the allocator's peak. CPU: the process's resident high-water mark (VmHWM), which Linux
    resets when a process writes 5 to /proc/self/clear_refs; where that fails (not Linux, or a
    kernel without it) the CPU value stays the peak since the process started."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_memory_gb(device: torch.device) -> float:
    """The peak since :func:`reset_peak_memory`: CUDA memory allocated by tensors, or on CPU the
    process's resident memory (VmHWM; ru_maxrss, the lifetime peak, where /proc has no VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resident_high_water_kib()
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20  # both in KiB


def resident_high_water_kib() -> Optional[int]:
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", PROC_STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def local_param_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes this rank holds: its shards under FSDP (DTensor) or ZeRO-3 (``ds_tensor``)."""
    total = 0
    for p in model.parameters():
        local = getattr(p, "ds_tensor", None)
        if local is None:
            local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


RETAIN_PREFIX = "retain_"  # launcher.train.retain's figures


def scalar_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The numbers of an eval result (drops samples and anything else that is not a number)."""
    return {k: float(v) for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------------------------
# files


class JsonlSink:
    """metrics.jsonl, one line per optimizer step. On resume, lines past the checkpoint's step
    (written by the attempt that was killed) are dropped, so the file matches one clean run."""

    def __init__(self, path: Path, start_step: int, curve_path: Path) -> None:
        self.path, self.curve_path = path, curve_path
        keep = [row for row in read_metrics(path) if row.get("step", 0) <= start_step] if start_step else []
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in keep))
        self.file = open(path, "a")

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def log_eval(self, name: str, step: int, results: dict[str, Any]) -> None:
        """The retain set's figures join the line of the step they were measured at (the base's, at
        step 0, are in eval.json): the file stays one line per step, rewritten whole, as evals are rare."""
        figures = {k: v for k, v in scalar_metrics(results).items() if k.startswith(RETAIN_PREFIX)}
        rows = read_metrics(self.path) if figures else []
        if not any(row.get("step") == step for row in rows):
            return
        self.file.close()
        write_atomic(
            self.path,
            "".join(json.dumps({**row, **figures} if row.get("step") == step else row) + "\n" for row in rows),
        )
        self.file = open(self.path, "a")

    def close(self, exit_code: int) -> None:
        self.file.close()
        try:
            write_loss_curve(self.path, self.curve_path)
        except OSError as e:  # a full disk: no curve (never a 0-byte one), and the run's own error stays the one told
            print(f"ftl: {self.curve_path} not written ({e})", file=sys.stderr, flush=True)


class EvalFileSink:
    """eval.json: {"before": ..., "step_N": ..., "after": ..., "best": ...}; kept across restarts, so a resumed
    run still has the base model's scores for its before/after report. An eval that generated also
    writes the side-by-side page (its answers beside the base's; :mod:`launcher.eval.side_by_side`)."""

    def __init__(self, path: Path, start_step: int, side_by_side: Optional[Path] = None) -> None:
        self.path = path
        self.side_by_side = side_by_side
        old: dict[str, Any] = json.loads(path.read_text()) if path.is_file() and start_step else {}
        self.results = {k: v for k, v in old.items() if k == "before" or v.get("step", 0) <= start_step}

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_eval(self, name: str, step: int, results: dict[str, Any]) -> None:
        self.results[name] = {"step": step, **results}
        write_atomic(self.path, json.dumps(self.results, indent=2) + "\n")
        if self.side_by_side is not None and name != "before":
            from launcher.eval.side_by_side import write_side_by_side

            title = f"Base vs fine-tuned on held-out prompts (eval {name}, step {step})"
            write_side_by_side(self.side_by_side, self.results.get("before"), results, title)

    def close(self, exit_code: int) -> None:
        pass


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return rows


def write_loss_curve(metrics_path: Path, out_path: Path) -> Optional[Path]:
    rows = [
        r for r in read_metrics(metrics_path) if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])
    ]
    if not rows:
        return None
    # The object API with an explicit Agg canvas: no pyplot, no global backend, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_atomic(out_path, png.getvalue())
    return out_path


# --------------------------------------------------------------------------------------------
# console


def _preference_line(metrics: dict[str, float]) -> str:
    """A preference objective's reward margin and accuracy, when the step logged them."""
    if "rewards/margin" not in metrics:
        return ""
    return f"  margin {metrics['rewards/margin']:.3g}  accuracy {metrics['rewards/accuracy']:.2f}"


class ConsoleSink:
    def __init__(
        self, console: Any, total: int, start: int, log_every: int, show_samples: int, evals: dict[str, Any]
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console, self.log_every, self.show_samples, self.evals = console, log_every, show_samples, evals
        self.total, self.last_line = total, None  # (step, clock) of the last plain line
        self.progress: Optional[Progress] = None
        if console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self.task = self.progress.add_task("train", total=total, completed=start, detail="loss -")
            self.progress.start()
            attach(self.progress)  # evaluation shows its progress in this display

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        loss, tok_s = f"{metrics['loss']:.4f}", f"{metrics['tokens_per_s']:,.0f}"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, detail=f"loss {loss}  {tok_s} tok/s")
        elif step % self.log_every == 0:
            self.console.print(
                f"step {step}/{self.total}  loss {loss}  lr {metrics['lr']:.3g}  grad_norm {metrics['grad_norm']:.3g}  "
                f"{tok_s} tok/s  {metrics['peak_mem_gb']:.2f} GB"
                + _preference_line(metrics)
                + self._pace(step, metrics["step_s"]),
                highlight=False,
            )

    def _pace(self, step: int, step_s: float) -> str:
        """'  1.52 s/step  ETA 3:51': wall time per step since the last line (evals and checkpoints
        included, as they will be in the rest of the run; the first line: its step's own time, the
        eval before training and the setup being no part of the pace), and the rest of the run at that pace."""
        now = time.monotonic()
        per_step = step_s if self.last_line is None else (now - self.last_line[1]) / max(1, step - self.last_line[0])
        self.last_line = (step, now)
        return f"  {per_step:.3g} s/step  ETA {clock_text(per_step * (self.total - step))}"

    def log_eval(self, name: str, step: int, results: dict[str, Any]) -> None:
        numbers = "  ".join(f"{k} {v:.4g}" for k, v in scalar_metrics(results).items())
        self.console.print(f"eval {name} (step {step}): {numbers}", highlight=False)
        if name == "after" and "before" in self.evals:
            for renderable in render_eval_report(self.evals["before"], results, self.show_samples):
                self.console.print(renderable)

    def close(self, exit_code: int) -> None:
        if self.progress is not None:
            attach(None)
            self.progress.stop()


REPORT_METRICS = (
    ("loss", ("loss",), False),
    ("perplexity", ("perplexity",), False),
    ("general-text loss (retain set)", ("retain_loss",), False),
    ("KL to the base (retain set)", ("retain_kl",), False),
    ("reward accuracy", ("rewards/accuracy",), True),
    ("reward margin", ("rewards/margin",), True),
    ("prefers chosen (log-prob/token)", ("logp_accuracy",), True),
    ("ROUGE-L", ("rougeL", "rouge_l", "rougeLsum"), True),
    ("BLEU", ("bleu",), True),
)


def _shown(value: float) -> float:
    """A figure below rounding noise shown as 0: the retain KL of the base to itself is 0, measured
    in other batches than the base's pass ~1e-17."""
    return 0.0 if abs(value) < 1e-9 else value


def render_eval_report(before: dict[str, Any], after: dict[str, Any], show_samples: int) -> list[Any]:
    """A before/after table of the headline metrics, then held-out questions answered by the base
    and by the fine-tuned model side by side."""
    from rich.table import Table

    table = Table(title="Base vs fine-tuned (held-out eval)")
    for column in ("metric", "base", "fine-tuned", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for label, keys, higher_is_better in REPORT_METRICS:
        key = next((k for k in keys if k in before and k in after), None)
        if key is None:
            continue
        a, b = (_shown(float(x[key])) for x in (before, after))
        better = (b > a) if higher_is_better else (b < a)
        change = f"[{'green' if better else 'red'}]{b - a:+.4g}[/]"
        table.add_row(label, f"{a:.4g}", f"{b:.4g}", change)
    out: list[Any] = [table]
    pairs = list(zip(before.get("samples") or [], after.get("samples") or [], strict=False))[:show_samples]
    for i, (base, tuned) in enumerate(pairs, start=1):
        sample = Table(title=f"Held-out question {i}: {tuned.get('question', '')}", show_lines=True, expand=True)
        sample.add_column("reference")
        sample.add_column("base model")
        sample.add_column("fine-tuned")
        sample.add_row(
            str(tuned.get("reference", "")), str(base.get("prediction", "")), str(tuned.get("prediction", ""))
        )
        out.append(sample)
    return out


# --------------------------------------------------------------------------------------------
# W&B


def read_or_create_run_id(run_dir: Path, fresh: bool) -> str:
    """The W&B run id lives in the run dir, so a restart of the same command resumes the same run."""
    path = RunPaths(run_dir).wandb_id
    if path.is_file() and not fresh:
        return path.read_text().strip()
    # W&B ids are [a-z0-9]; made here so that choosing one imports nothing from wandb.
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
    write_atomic(path, run_id + "\n")
    return run_id


@contextlib.contextmanager
def _argv_for_wandb() -> Iterator[None]:
    """W&B records the process's command line (``sys.argv``) in the run's metadata, in the .wandb
    file and online: while it starts, the line has its secrets cut out (``ftl eval`` runs in
    process with the user's overrides, ``+launch.env.HF_TOKEN=...`` among them)."""
    saved = sys.argv
    sys.argv = redact_overrides(list(saved), known_secrets())
    try:
        yield
    finally:
        sys.argv = saved


class WandbSink:
    """``before``: the base model's eval (a resumed run's, from eval.json), whose answers the side-by-side
    table of each later eval that generated shows beside the tuned model's."""

    def __init__(
        self, cfg: FtlConfig, run_dir: Path, mode: str, log_every: int, before: Optional[dict[str, Any]] = None
    ) -> None:
        import wandb

        self.log_every = log_every
        self.before = before
        os.environ["WANDB_DIR"] = str(run_dir)
        run_id = read_or_create_run_id(run_dir, fresh=cfg.checkpoint.resume == "never")
        config = redact(dataclasses.asdict(cfg), known_secrets())
        # A sweep trial: W&B takes the sweep's project and the agent's run id (WANDB_RUN_ID, the same id
        # the trial's run dir records) from the environment, and warns about any passed in.
        in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
        with _argv_for_wandb():
            self.run = wandb.init(
                project=None if in_sweep else cfg.wandb.project,
                entity=cfg.wandb.entity,
                group=cfg.wandb.group,
                tags=list(cfg.wandb.tags),
                name=cfg.run.name,
                id=None if in_sweep else run_id,
                resume="allow",
                mode=mode,
                dir=str(run_dir),
                config=config,  # type: ignore[arg-type]
                # console capture would wrap stdout (and the progress bar); code saving copies files.
                settings=wandb.Settings(console="off", save_code=False),
            )
        # Our step, not W&B's internal counter, is the x axis: after a resume the steps repeat.
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")
        self.run.define_metric("eval/*", step_metric="train/step")

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.log_every == 0:
            self.run.log({"train/step": step, **{f"train/{k}": v for k, v in metrics.items()}})

    def log_eval(self, name: str, step: int, results: dict[str, Any]) -> None:
        if name == "best":  # the best periodic eval, logged already at its step
            self.run.summary.update({"best/step": step, **{f"best/{k}": v for k, v in scalar_metrics(results).items()}})
            return
        self.run.log({"train/step": step, **{f"eval/{k}": v for k, v in scalar_metrics(results).items()}})
        if name == "before":
            self.before = results
        elif results.get("samples"):
            from launcher.eval.side_by_side import side_by_side_rows, wandb_table

            table = wandb_table(side_by_side_rows(self.before, results))
            self.run.log({"train/step": step, "eval/side_by_side": table})
        if name in ("before", "after"):
            self.run.summary.update({f"eval_{name}/{k}": v for k, v in scalar_metrics(results).items()})

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)
