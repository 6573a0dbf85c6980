"""What a run dir's checkpoint can continue, decided before anything starts. Pure Python, no torch:
`ftl train` runs :func:`resume_verdict` on the submitting machine before it writes the run dir or
launches a rank, and the trainer runs it again on the checkpoint it resolved (the backstop for
runs started by a user's own torchrun, plain sbatch, or a SLURM requeue).

A checkpoint records the config it was written with (``trainer_state.json``'s ``config``; older
checkpoints: the run dir's ``config.yaml``), the run length it was written under and how many
training samples an epoch had. Against the new config:

* **refused** (exit 2, nothing written or launched), with the choices: another model, other
  adapters, other training data (files, format, template, masking, ``seq_len``, packing, seed):
  the weights or the position in the data mean nothing for it;
* **refused**: a run length (``train.max_steps``, or ``train.epochs``) that ends before the step
  the checkpoint is at;
* **finished**: the checkpoint is the run's last step and the evaluation after training is in
  ``eval.json``: nothing to do, exit 0, naming every setting that differs from the checkpoint's
  (nothing trains, so none of them is applied) and how to apply them;
* **resumed exactly** (weights, optimizer, schedule, RNG, data position): the same checkpoint format
  (single and ddp share one; fsdp; deepspeed with the same stage, offload and precision), on any
  world size, with any other setting changed (lr, batch, accumulation, evaluation, ...). The LR
  schedule is the new config's at the checkpoint's step (a changed lr, warmup, run length,
  schedule kind or floor applies from the first resumed step), never the one the checkpoint saved;
* **resumed across engines**: another checkpoint format. The weights carry over (the old engine
  consolidates its checkpoint offline, the new one loads it; LoRA/QLoRA: the adapter), as do the
  step and LR schedule, the position in the data, the RNG and the W&B run; the optimizer state
  (AdamW moments) restarts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from launcher.config.errors import ConfigError
from launcher.config.search_path import hydra_word
from launcher.engines.traits import FAMILY_TITLES, STAGE_BOUND_FAMILIES, checkpoint_family
from launcher.files import CHECKPOINT_MARKER as MARKER
from launcher.files import REPLACED, TMP_PREFIX, TRAINER_STATE, checkpoint_problem, step_of
from launcher.rundir import RunPaths
from launcher.shell import join, quote

# What the weights are: another model or other adapters cannot continue them.
MODEL_KEYS = ("model.source", "model.path", "model.revision", "model.tokenizer", "model.arch")
PEFT_KEYS = (
    "peft.method",
    "peft.r",
    "peft.alpha",
    "peft.target_modules",
    "peft.modules_to_save",
    "peft.quant_type",
    "peft.double_quant",
)
# What the training examples are and the order they come in: the data position counts into them.
DATA_KEYS = (
    "data.format",
    "data.train_files",
    "data.chat_template",
    "data.assistant_only_loss",
    "data.text_field",
    "data.truncation",
    "data.on_error",
    "data.max_train_examples",
    "data.shuffle",
    "data.packing",
    "train.seq_len",
    "train.seed",
)


# --------------------------------------------------------------------------------------------
# reading a run dir (no torch)


def checkpoints_dir(run_dir: Path) -> Path:
    return RunPaths(run_dir).checkpoints


def is_complete(path: Path) -> bool:
    return step_of(path.name) is not None and (path / MARKER).is_file()


def list_complete(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first: ``step-N``, or the ``.replaced-step-N`` a save of the
    same step moved aside, while the new ``step-N`` is not complete yet."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in sorted(root.iterdir(), key=lambda p: p.name.startswith(REPLACED)):  # step-N before .replaced-step-N
        step = step_of(path.name)
        if step is not None and step not in found and path.is_dir() and is_complete(path):
            found[step] = path
    return sorted(found.items())


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    world_size: int
    engine: str  # the Engine's name: single, ddp, deepspeed, fsdp ("" when the marker does not say)
    total_steps: int  # the run length it was saved under (0: not recorded)
    train_samples: int  # training samples (examples, or packs) per epoch (0: not recorded)
    config: dict[str, Any]  # the config it was written with ({} when unknown)
    best_step: Optional[int] = None  # the best periodic eval so far (launcher.train.early_stop)
    stopped_early: bool = False  # the run ended here by early stopping
    base: dict[str, Any] = field(default_factory=dict)  # LoRA/QLoRA: the base it trained on (adapters.base_record)


def read_checkpoint_info(path: Path) -> CheckpointInfo:
    path = Path(path)
    marker = _read_json(path / MARKER)
    state = _read_json(path / TRAINER_STATE)
    config = state.get("config") or {}
    if not config:  # written before checkpoints recorded their config: the run dir's, if this is its own
        run_config = RunPaths(path.parent.parent).config
        if path.parent.name == RunPaths.CHECKPOINTS and run_config.is_file():
            config = _read_yaml(run_config)
    return CheckpointInfo(
        path=path,
        step=int(state.get("step", marker.get("step", 0))),
        world_size=int(state.get("world_size", marker.get("world_size", 1))),
        engine=engine_name(str(marker.get("engine", ""))),
        total_steps=int(state.get("total_steps", 0)),
        train_samples=int(state.get("train_samples", 0)),
        config=config,
        best_step=(state.get("early_stopping") or {}).get("best", {}).get("step"),
        stopped_early=bool(state.get("stopped_early", False)),
        base=state.get("base") or {},
    )


def engine_name(marker_engine: str) -> str:
    """The marker holds the engine's ``name`` ("fsdp") or its class name ("FSDPEngine")."""
    name = marker_engine.strip().lower()
    return name[: -len("engine")] if name.endswith("engine") and name != "engine" else name


def latest_sound(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint whose files are whole (:func:`launcher.files.checkpoint_problem`):
    what ``checkpoint.resume=auto`` continues. A damaged newer one is set aside by the trainer, with a warning."""
    return next((path for _, path in reversed(list_complete(run_dir)) if checkpoint_problem(path) is None), None)


def latest_checkpoint(run_dir: Path) -> Optional[CheckpointInfo]:
    path = latest_sound(run_dir)
    return read_checkpoint_info(path) if path is not None else None


def unpublished_note(run_dir: Path, resuming: Optional[Path]) -> str:
    """What to say about saves a stopped job left unpublished (``.tmp-step-N``), or ""."""
    root = checkpoints_dir(run_dir)
    left = sorted(p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX)) if root.is_dir() else []
    if not left:
        return ""
    where = f"resuming from {resuming.name}, the newest published one" if resuming else "starting from step 0"
    return (
        f"{', '.join(left)} in {root}: a save never published (its job stopped while writing it); {where}. "
        "ftl removes it at the next save if it made it"
    )


def evaluated_after(run_dir: Path, step: int) -> bool:
    """eval.json holds the evaluation after training, made at ``step``."""
    after = _read_json(RunPaths(run_dir).eval).get("after")
    return isinstance(after, dict) and after.get("step") == step


def earlier_run_files(run_dir: Path) -> list[str]:
    """What an earlier run left in ``run_dir`` that a new one would replace, prune or append to:
    its checkpoints (any step, or one being saved), metrics.jsonl, eval.json, the loss curve and
    its ``ftl eval`` results."""
    root = checkpoints_dir(run_dir)
    found = []
    for name in RunPaths.EARLIER_RUN_FILES:
        path = Path(run_dir) / name
        if name == RunPaths.CHECKPOINTS:
            if root.is_dir() and any(
                step_of(p.name) is not None or p.name.startswith(TMP_PREFIX) for p in root.iterdir()
            ):
                found.append(name)
        elif path.exists():
            found.append(name)
    return found


def set_aside_earlier_run(run_dir: Path) -> Optional[tuple[Path, list[str]]]:
    """``checkpoint.resume=never`` in a run dir that holds an earlier run: move its files
    (:func:`earlier_run_files`) into ``earlier-<time>/``, whole. Nothing is deleted or truncated,
    the new run starts with no checkpoint to prune in favour of older steps, and a later
    ``resume=auto`` continues the new run. Returns where they went and what moved (None: there
    was nothing to move)."""
    import os
    import time

    names = earlier_run_files(run_dir)
    if not names:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = RunPaths(run_dir).earlier(stamp)
    n = 1
    while aside.exists():
        n += 1
        aside = RunPaths(run_dir).earlier(f"{stamp}-{n}")
    aside.mkdir()
    for name in names:
        os.rename(Path(run_dir) / name, aside / name)
    return aside, names


# --------------------------------------------------------------------------------------------
# the verdict (pure)


@dataclass
class Verdict:
    checkpoint: CheckpointInfo
    total_steps: Optional[int]  # the new config's run length (None: cannot be known before the data is built)
    changes: list[tuple[str, Any, Any]] = field(
        default_factory=list
    )  # (key, old, new): the checkpoint cannot continue them
    errors: list[ConfigError] = field(default_factory=list)  # refused; changes included
    cross_engine: Optional[tuple[str, str]] = None  # (checkpoint format, this run's) when they differ
    finished: bool = False
    ignored: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, old, new): finished, so not applied

    @property
    def refused(self) -> bool:
        return bool(self.errors)


class ResumeError(ValueError):
    """A checkpoint the config cannot continue (exit 2); the message offers the ways on."""


def resume_verdict(
    ckpt: CheckpointInfo, new: dict[str, Any], world: int, *, evaluated: bool = False, total: Optional[int] = None
) -> Verdict:
    """``new``: the new config as a plain dict (``dataclasses.asdict`` of FtlConfig); ``world``: its
    data-parallel size; ``evaluated``: eval.json holds the evaluation after training at the
    checkpoint's step; ``total``: the run length when the caller knows it (the trainer, which has
    built the data), else computed from the samples per epoch the checkpoint recorded."""
    old = ckpt.config
    verdict = Verdict(ckpt, total if total is not None else total_steps(new, ckpt.train_samples, world))
    if old:
        same_method = get(old, "peft.method") == get(new, "peft.method") != "none"
        keys = MODEL_KEYS + (PEFT_KEYS if same_method else ("peft.method",)) + DATA_KEYS
        verdict.changes = [(k, get(old, k), get(new, k)) for k in keys if _norm(get(old, k)) != _norm(get(new, k))]
        if _norm(train_sources(old)) != _norm(train_sources(new)):
            verdict.changes.append(("data.sources", train_sources(old), train_sources(new)))
        if not has_eval_sources(new) and old_carved(old) != new_eval_fraction(new):
            verdict.changes.append(("data.eval_fraction", old_carved(old), new_eval_fraction(new)))
        old_format, new_format = checkpoint_format(old), checkpoint_format(new)
        if old_format != new_format:
            verdict.cross_engine = (describe_format(old_format), describe_format(new_format))
    elif ckpt.engine and checkpoint_family(ckpt.engine) != checkpoint_family(get(new, "strategy.engine")):
        verdict.cross_engine = (ckpt.engine, str(get(new, "strategy.engine")))
    for key, a, b in verdict.changes:
        verdict.errors.append(ConfigError(key, f"{_show(a)} -> {_show(b)}"))
    total = verdict.total_steps
    if total is not None and ckpt.step > total:
        max_steps = int(get(new, "train.max_steps"))
        if max_steps > 0:
            verdict.errors.append(
                ConfigError(
                    "train.max_steps",
                    f"{max_steps} is below checkpoint step {ckpt.step}; "
                    f"allowed: {ckpt.step} or more, or -1 (train.epochs)",
                )
            )
        else:
            verdict.errors.append(
                ConfigError(
                    "train.epochs",
                    f"{get(new, 'train.epochs')} ends at step {total}, before checkpoint "
                    f"step {ckpt.step}; allowed: a run of {ckpt.step} steps or more",
                )
            )
    eval_after = bool(get(new, "eval.after_training"))
    # a run that stopped early is finished while early stopping is still on
    ended = total == ckpt.step or (ckpt.stopped_early and int(get(new, "train.early_stopping.patience") or 0) > 0)
    verdict.finished = not verdict.errors and ended and (evaluated or not eval_after)
    if verdict.finished and old:
        verdict.ignored = changed_settings(old, new)
    return verdict


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Every key whose value differs between the checkpoint's config (stored redacted) and the new one."""
    from launcher.redact import known_secrets, redact

    return config_diff(_norm(old), _norm(redact(new, known_secrets())), "")


def total_steps(cfg: dict[str, Any], train_samples: int, world: int) -> Optional[int]:
    """The run length the trainer computes (:func:`launcher.train.trainer.compute_total_steps`),
    from the samples per epoch a checkpoint recorded."""
    max_steps = int(get(cfg, "train.max_steps"))
    if max_steps > 0:
        return max_steps
    if train_samples <= 0:
        return None
    per_rank = train_samples // max(1, world)
    batches = math.ceil(per_rank / int(get(cfg, "train.micro_batch_size")))
    return max(1, math.ceil(float(get(cfg, "train.epochs")) * batches / int(get(cfg, "train.grad_accum"))))


def checkpoint_format(cfg: dict[str, Any]) -> dict[str, Any]:
    """What decides whether an engine reads a checkpoint as its own: its format family
    (:data:`launcher.engines.traits.CHECKPOINT_FAMILIES`), and for DeepSpeed also the stage,
    offloading and precision."""
    family = checkpoint_family(get(cfg, "strategy.engine"))
    if family not in STAGE_BOUND_FAMILIES:
        return {"engine": family}
    return {
        "engine": family,
        "zero_stage": get(cfg, "strategy.zero_stage"),
        "offload_optimizer": bool(get(cfg, "strategy.offload_optimizer")),
        "offload_params": bool(get(cfg, "strategy.offload_params")),
        "precision": get(cfg, "train.precision"),
    }


def describe_format(fmt: dict[str, Any]) -> str:
    if fmt["engine"] not in STAGE_BOUND_FAMILIES:
        return FAMILY_TITLES.get(fmt["engine"], str(fmt["engine"]))
    offload = [k for k in ("offload_optimizer", "offload_params") if fmt.get(k)]
    return (
        f"deepspeed ZeRO-{fmt.get('zero_stage')}"
        + (f" ({', '.join(offload)})" if offload else "")
        + f", precision {fmt.get('precision')}"
    )


def train_sources(cfg: dict[str, Any]) -> list[Any]:
    return [s for s in (get(cfg, "data.sources") or []) if isinstance(s, dict) and s.get("split", "train") == "train"]


def has_eval_sources(cfg: dict[str, Any]) -> bool:
    return bool(get(cfg, "data.eval_files")) or any(
        isinstance(s, dict) and s.get("split") == "eval" for s in get(cfg, "data.sources") or []
    )


def new_eval_fraction(cfg: dict[str, Any]) -> float:
    return float(get(cfg, "data.eval_fraction") or 0.0)


def old_carved(cfg: dict[str, Any]) -> float:
    """The eval fraction carved out of the training rows (none when there were eval sources)."""
    return 0.0 if has_eval_sources(cfg) else new_eval_fraction(cfg)


def get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _norm(value: Any) -> Any:
    """Paths to the files ftl ships (launcher/assets/...) compare equal from any checkout."""
    if isinstance(value, str) and ASSETS_MARK in value:
        return "<assets>/" + value.split(ASSETS_MARK, 1)[1]
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


ASSETS_MARK = "/launcher/assets/"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------------------------
# what the user is told


def refusal(verdict: Verdict, run_dir: Path, argv: Optional[list[str]] = None) -> str:
    """The message for a refused resume, with the ways on; ``argv`` (``["train", *overrides]``):
    the command to show them as."""
    ckpt = verdict.checkpoint

    def command(*extra: str) -> str:
        if argv is None:
            return join(extra)
        kept = [a for a in argv if not a.startswith(("run.dir=", "checkpoint.resume="))]
        return join(["ftl", *kept, *extra])

    lines = [f"{run_dir} holds checkpoint {ckpt.path.name}, which this config cannot continue:"]
    lines += [f"  - {e}" for e in verdict.errors]
    lines += [
        "Choose one:",
        f"  a new run:          {command(_new_run(run_dir))}",
        f"  start over here:    {command('checkpoint.resume=never')}   "
        f"(moves the earlier run's files into {RunPaths.EARLIER_PREFIX}<time>/ first, deleting nothing)",
    ]
    if all(e.path in ("train.max_steps", "train.epochs") for e in verdict.errors):
        lines.append(f"  continue this run:  train.max_steps={ckpt.step} or more, or the run length it had")
    else:
        lines.append(
            f"  keep its weights:   ftl export {quote(str(run_dir))} --out DIR, then a new run.name with model.source=hf model.path=DIR"
        )
    return "\n".join(lines)


def moved_message(aside: Path, names: list[str]) -> str:
    return f"checkpoint.resume=never: moved the earlier run's {', '.join(names)} to {aside} (nothing deleted)"


def finished_message(verdict: Verdict, run_dir: Path) -> str:
    ckpt = verdict.checkpoint
    other = (
        f" (this config's strategy, {verdict.cross_engine[1]}, would continue it from there)"
        if verdict.cross_engine
        else ""
    )
    lines = [
        f"{run_dir} is complete: step {ckpt.step} of {verdict.total_steps}"
        + (" (stopped early: train.early_stopping.patience=0 trains on)" if ckpt.stopped_early else "")
        + (", evaluated after training (eval.json)" if evaluated_after(run_dir, ckpt.step) else "")
        + ". Nothing to do."
    ]
    if verdict.ignored:
        lines.append(
            "  not applied, the run being complete (a longer run applies them from its next step, a new run from step 0):"
        )
        lines += [f"    {key}: {_show(a)} -> {_show(b)}" for key, a, b in verdict.ignored]
    new_run = quote(_new_run(run_dir))
    lines += [
        f"  train longer:    train.max_steps=N with N > {ckpt.step}{other}",
        f"  evaluate again:  ftl eval {quote(str(run_dir))}",
        f"  a new run:       {new_run}, or checkpoint.resume=never to start over here (its files are moved aside, not deleted)",
    ]
    return "\n".join(lines)


def cross_engine_notice(verdict: Verdict) -> str:
    old, new = verdict.cross_engine or ("?", "?")
    peft = get(verdict.checkpoint.config, "peft.method") or "none"
    weights = "the adapter weights" if peft != "none" else "the weights"
    return (
        f"checkpoint step {verdict.checkpoint.step} was written by {old}; this run uses {new}: resuming across engines. "
        f"Kept: {weights} (consolidated from the old checkpoint), the step and LR schedule, the position in the data, "
        f"the RNG and the W&B run. Restarts: the optimizer state (AdamW moments). "
        f"checkpoint.resume=never or a new run.name starts over instead."
    )


def _new_run(run_dir: Path) -> str:
    """The override of a new run beside this one: run.dir, not run.name, which neither moves a run
    given by run.dir nor names the dir of a SLURM run (runs/<name>-slurm)."""
    base = Path(run_dir).name
    n = 2
    while (Path(run_dir).parent / f"{base}-{n}").exists():
        n += 1
    return f"run.dir={hydra_word(os.path.join(os.path.dirname(run_dir) or '.', f'{base}-{n}'))}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - an unreadable old config only means nothing to compare against
        return {}
    return value if isinstance(value, dict) else {}


def config_diff(a: Any, b: Any, path: str) -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += config_diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if a == b else [(path, a, b)]
