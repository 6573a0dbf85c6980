"""`ftl eval`: evaluate a fine-tuned model (and optionally its base) on held-out data.

``ftl eval MODEL [overrides]`` where MODEL is a run dir, a checkpoint dir or an export (see
:mod:`launcher.artifacts.inference`). The config is the run's own ``config.yaml`` for a run or checkpoint
(so the held-out split is the one training held out), with ``key=value`` overrides; for an export,
conf/ composed with Hydra overrides as ``ftl train`` does (``recipe=...``, ``data.eval_files=[...]``).

Each rank holds the whole model; perplexity batches and generated answers are shared among the
ranks (``launch.nproc_per_node``, started with torchrun) and summed/gathered, so N ranks report
what one process does. Rank 0 writes ``eval.json`` (``after``: the model; ``before``: the base with
``--baseline``; ``judge``: a judge model's win rate of the model over the base, :mod:`launcher.eval.judge`)
and the side-by-side page, prints a base-vs-fine-tuned table or a few samples, and logs to W&B (the
training run's W&B run for a run dir).

Per-rank entry point: ``python -m launcher.eval.job --job OUT/eval_job.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from launcher.files import write_atomic
from launcher.rundir import RunPaths

JOB_FILE = "eval_job.json"
ENTRY = "launcher.eval.job"


class EvalInputError(ValueError):
    """Arguments that name nothing to evaluate, or a config that cannot evaluate it (exit 2)."""


# --------------------------------------------------------------------------------------------
# preparing the job (on the launching machine; no torch)


def eval_config(model_path: Path, overrides: list[str]) -> tuple[dict[str, Any], Optional[Path], int]:
    """(raw config, the run dir when MODEL is a run or checkpoint, its checkpoint step)."""
    from launcher.config.compose import compose
    from launcher.config.errors import ConfigError, ConfigErrors
    from launcher.config.local_paths import resolve_local_paths

    path = Path(model_path).expanduser().resolve()
    if not path.is_dir():
        raise EvalInputError(f"{path}: no such directory (give a run dir, a checkpoint dir or an export)")
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        raw, _, errors = compose(overrides)
        if errors:
            raise ConfigErrors(errors)
        return raw, None, 0
    from omegaconf import OmegaConf

    from launcher.artifacts.weights import ArtifactInputError, resolve_source

    try:
        source = resolve_source(path)
    except ArtifactInputError as e:
        raise EvalInputError(str(e)) from None
    base = OmegaConf.load(source.config_path)
    bad = [o for o in overrides if "=" not in o or "." not in o.split("=", 1)[0].lstrip("+~")]
    if bad:
        raise ConfigErrors(
            [
                ConfigError(
                    o,
                    "a run's config takes key=value overrides (e.g. eval.max_batches=4); "
                    "group choices such as data=NAME apply to exports only",
                )
                for o in bad
            ]
        )
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
        raw = OmegaConf.to_container(merged, resolve=True)
    except Exception as e:  # an override OmegaConf cannot parse or merge
        raise ConfigErrors([ConfigError("overrides", str(e).splitlines()[0])]) from None
    assert isinstance(raw, dict)
    resolve_local_paths(raw)  # the overrides' paths, as the run's own were at launch
    return raw, source.run_dir, source.step


def check_baseline(which: Optional[str]) -> None:
    """--baseline PATH names an export, a run dir or a checkpoint dir: checked before the eval's
    out dir is written and its model loaded, as MODEL is."""
    if which in (None, "auto"):
        return
    from launcher.artifacts.weights import ArtifactInputError, resolve_source

    path = Path(which).expanduser().resolve()
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return
    try:
        resolve_source(path)
    except ArtifactInputError as e:
        raise EvalInputError(f"--baseline: {e}") from None


def as_eval_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The config an eval runs with: every rank holds the whole model, whatever engine trained it
    (the engine's checks, e.g. 'single' with several ranks, do not apply)."""
    return {**raw, "strategy": {"engine": "ddp"}}


def default_out(model_path: Path, run_dir: Optional[Path], step: int) -> Path:
    path = Path(model_path).expanduser().resolve()
    return RunPaths(run_dir).eval_of_step(step) if run_dir is not None else path / RunPaths.EVAL_DIR


def write_job(
    out: Path, model: Path, raw: dict[str, Any], baseline: Optional[str], run_dir: Optional[Path], step: int
) -> Path:
    """The job every rank reads, in ``out``: a new or empty directory, or an earlier ftl eval's
    (see :func:`launcher.files.output_dir_problems`). Its config holds no secret."""
    from launcher.files import mark_dir, output_dir_problems
    from launcher.redact import known_secrets, redact

    protect = {"the evaluated model": Path(model).expanduser().resolve()}
    if run_dir is not None:
        protect["the evaluated run"] = run_dir
    problems = output_dir_problems(out, "eval", protect=protect)
    if problems:
        raise EvalInputError(f"--out {out} " + "; ".join(problems))
    mark_dir(out, "eval")
    job = {
        "model": str(Path(model).expanduser().resolve()),
        "baseline": baseline,
        "out": str(out),
        "run_dir": str(run_dir) if run_dir else None,
        "step": step,
        "config": redact(raw, known_secrets()),
    }
    path = out / JOB_FILE
    path.write_text(json.dumps(job, indent=2) + "\n")
    return path


def eval_argv(argv: list[str], job_path: Path) -> list[str]:
    """A launch backend's command with the trainer's entry point swapped for this one."""
    i = argv.index("launcher.train")
    if i == 0 or argv[i - 1] != "-m":
        raise ValueError(f"no `-m launcher.train` in {argv}")
    return [*argv[: i - 1], "-m", ENTRY, "--job", str(job_path)]


def launch(job_path: Path, cfg: Any) -> int:
    """One process, or the launch backend's torchrun for ``launch.nproc_per_node`` > 1."""
    from dataclasses import replace

    from launcher.config.topology import world_size

    if world_size(cfg) == 1:
        from launcher.launch.local import cpu_threads

        threads = cpu_threads(cfg)
        if threads is not None:  # as training's ranks had (launcher.launch.local)
            import torch

            torch.set_num_threads(threads)
        return run_job(job_path)
    if cfg.launch.backend == "slurm":
        raise EvalInputError(
            "ftl eval runs on this machine: inside a SLURM allocation use launch=local launch.nproc_per_node=N"
        )
    from launcher.launch import get_backend
    from launcher.launch.local import run_foreground

    plan = get_backend(cfg.launch.backend).build(cfg, job_path.parent, job_path)
    plan = replace(plan, commands=[eval_argv(argv, job_path) for argv in plan.commands])
    for line in plan.shell_lines():
        print(f"ftl eval: launching {line}", file=sys.stderr)
    return run_foreground(plan, records=False)


# --------------------------------------------------------------------------------------------
# one rank


def run_job(job_path: Path) -> int:
    import torch

    from launcher.artifacts.inference import load_model
    from launcher.config.validate import validated
    from launcher.plan.timing import io_timeout_s
    from launcher.progress import phase
    from launcher.runtime.device import autocast_dtype, select_device, set_residual_stream
    from launcher.runtime.distributed import all_reduce_sum, barrier, destroy, init_distributed

    job = json.loads(Path(job_path).read_text())
    cfg = validated(job["config"])
    device = select_device(cfg.train)
    # Every rank loads the model before the first collective: the I/O timeout, not a step's.
    dist = init_distributed(cfg.launch, device, timeout_s=io_timeout_s(cfg))
    clean = False
    try:
        torch.manual_seed(cfg.train.seed)
        with phase(f"eval: loading {job['model']}"):
            loaded = load_model(job["model"], device=device)
        compute = autocast_dtype(cfg.train.precision, device)
        set_residual_stream(loaded.model, cfg.train, compute)
        eval_ds = _eval_split(cfg, loaded, dist)
        kwargs = dict(
            device=device,
            autocast_dtype=compute,
            reduce_fn=all_reduce_sum,
            rank=dist.rank,
            world_size=dist.world_size,
            gather_fn=_all_gather if dist.world_size > 1 else None,
        )
        from launcher.eval.metrics import evaluate

        pairs = _preference_metrics(cfg, eval_ds, loaded, device, dist) if cfg.objective.method != "sft" else None
        results = {
            "after": evaluate(
                loaded.model,
                loaded.tokenizer,
                eval_ds,
                cfg.eval,
                **kwargs,
                loss_metrics=pairs and (lambda: pairs(loaded.model)),
            )
        }
        if job["baseline"]:
            with phase("eval: loading the baseline"):
                model, context = _baseline(job["baseline"], loaded, cfg, device)
                set_residual_stream(model, cfg.train, compute)
            with context:
                results["before"] = evaluate(
                    model, loaded.tokenizer, eval_ds, cfg.eval, **kwargs, loss_metrics=pairs and (lambda: pairs(model))
                )
        barrier()  # every rank is past its last collective before any leaves the group
        clean = True
        if dist.is_main:
            if cfg.eval.judge.path is not None:
                from launcher.eval.judge import run_judge

                results["judge"] = run_judge(cfg.eval.judge.path, results, device)
            report(job, cfg, loaded.description, results)
    finally:
        destroy(clean)
    return 0


def _preference_metrics(cfg: Any, eval_ds: Any, loaded: Any, device: Any, dist: Any) -> Any:
    """For a DPO/SimPO run: model -> its preference metrics on the eval pairs, against the run's
    reference (the base with the adapters off, or the run's starting model; SimPO needs none)."""
    import contextlib

    import torch

    from launcher.data.packing import flattens_packs
    from launcher.eval.preference import preference_metrics
    from launcher.objectives.losses import sequence_logps
    from launcher.objectives.preference import reference_mode
    from launcher.runtime.device import autocast_dtype
    from launcher.runtime.distributed import all_reduce_sum

    dtype = autocast_dtype(cfg.train.precision, device)

    def autocast() -> Any:
        return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    reference_model, context = (None, contextlib.nullcontext())
    if reference_mode(cfg) != "none":
        reference_model, context = _baseline("auto", loaded, cfg, device)

    def reference(batch: dict[str, Any]) -> Any:
        if reference_model is None:
            return None
        with torch.no_grad(), context:
            return sequence_logps(reference_model, batch, autocast())[0]

    def metrics(model: Any) -> dict[str, float]:
        return preference_metrics(
            model,
            eval_ds,
            cfg.objective,
            reference,
            batch_size=cfg.eval.batch_size,
            pad_id=loaded.tokenizer.pad_token_id,
            device=device,
            autocast=autocast,
            max_batches=cfg.eval.max_batches,
            rank=dist.rank,
            world_size=dist.world_size,
            reduce_fn=all_reduce_sum,
            flatten=flattens_packs(cfg.model.attn_implementation),
        )

    return metrics


def _eval_split(cfg: Any, loaded: Any, dist: Any) -> Any:
    from launcher.data.cache import prepare_datasets

    _, eval_ds = prepare_datasets(cfg.data, loaded.tokenizer, cfg.train.seq_len, cfg.train.seed, dist)
    if eval_ds is None or len(eval_ds) == 0:
        raise EvalInputError("no eval data: set data.eval_files=[...] (or data.eval_fraction)")
    if loaded.chat_template and not eval_ds.chat_template:
        eval_ds.chat_template = loaded.chat_template
    return eval_ds


def _baseline(which: str, loaded: Any, cfg: Any, device: Any) -> tuple[Any, Any]:
    """(model, context to evaluate it in) for --baseline: the adapter switched off, the run's
    starting model, or the model at PATH."""
    import contextlib

    from launcher.artifacts.inference import load_model
    from launcher.artifacts.weights import build_base_from_config
    from launcher.model.adapters import is_peft_model

    if which != "auto":
        return load_model(which, device=device).model, contextlib.nullcontext()
    if is_peft_model(loaded.model):
        return loaded.model, loaded.base()
    if loaded.kind == "checkpoint":
        model, _ = build_base_from_config(cfg, device=device)
        return model.eval(), contextlib.nullcontext()
    raise EvalInputError(f"{loaded.description}: no base model is recorded; give it with --baseline PATH")


def _all_gather(items: list[Any]) -> list[list[Any]]:
    import torch.distributed as torch_dist

    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, items)
    return out


def report(job: dict[str, Any], cfg: Any, description: str, results: dict[str, Any]) -> None:
    """eval.json, the console and W&B (rank 0)."""
    from launcher.eval.side_by_side import write_side_by_side
    from launcher.progress import make_console
    from launcher.redact import known_secrets, redact
    from launcher.train.telemetry import render_eval_report, scalar_metrics
    from launcher.wandb_auth import resolve_wandb_mode

    results = redact(results, known_secrets())  # generated samples may quote a secret from the eval data
    out = Path(job["out"])
    payload = {
        "model": job["model"],
        "step": job["step"],
        **{k: results[k] for k in ("before", "after", "judge") if k in results},
    }
    write_atomic(out / RunPaths.EVAL, json.dumps(payload, indent=2) + "\n")
    title = f"Base vs fine-tuned on held-out prompts ({Path(job['model']).name})"
    paged = write_side_by_side(out / RunPaths.SIDE_BY_SIDE, results.get("before"), results["after"], title)
    console = make_console()
    console.print(f"ftl eval: {description}", highlight=False)
    for name in ("before", "after"):
        if name in results:
            numbers = "  ".join(f"{k} {v:.4g}" for k, v in scalar_metrics(results[name]).items())
            console.print(f"{'base' if name == 'before' else 'model'}: {numbers}", highlight=False)
    if "before" in results:
        for renderable in render_eval_report(results["before"], results["after"], cfg.eval.show_samples):
            console.print(renderable)
    else:
        for sample in results["after"]["samples"][: cfg.eval.show_samples]:
            console.print(
                f"\nQ: {sample['question']}\nreference: {sample['reference']}\nmodel:     {sample['prediction']}",
                highlight=False,
            )
    if "judge" in results:
        verdict = results["judge"]
        console.print(
            f"judge: the tuned model wins {verdict['win_rate']:.0%} of {verdict['pairs']} pairs against the base "
            f"(both orders; P(first answer) {verdict['position_bias']:.2f} on average)",
            highlight=False,
        )
    console.print(f"ftl eval: wrote {out / RunPaths.EVAL}", highlight=False)
    if paged:
        console.print(f"ftl eval: wrote {out / RunPaths.SIDE_BY_SIDE}", highlight=False)
    mode = resolve_wandb_mode(cfg.wandb.mode)
    if mode != "disabled":
        from launcher.train.telemetry import WandbSink

        sink = WandbSink(cfg, Path(job["run_dir"] or job["out"]), mode, 1)
        for name in ("before", "after"):
            if name in results:
                sink.log_eval(name, job["step"], results[name])
        sink.close(0)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {ENTRY}", description="one rank of `ftl eval`")
    parser.add_argument("--job", required=True, help="the eval_job.json `ftl eval` wrote")
    args = parser.parse_args(argv)
    from launcher.artifacts.weights import ArtifactInputError
    from launcher.quiet import install
    from launcher.redact import redact_output

    install()
    redact_output()
    try:
        return run_job(Path(args.job))
    except (EvalInputError, ArtifactInputError) as e:
        print(f"ftl eval: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
