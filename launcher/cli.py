"""`ftl`: the command line. Imports no torch, transformers, deepspeed or peft: `ftl plan` runs on
login nodes and must be instant. Exit codes: 0 ok, 2 invalid input, 1 failure during a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from launcher.config.errors import EXIT_INVALID, ConfigErrors

OVERRIDES_HELP = "Hydra overrides: recipe=NAME, key=value, +key=value, ~key, group=option"


def _load(overrides: list[str]) -> tuple[dict[str, Any], Any, dict[str, str]]:
    """Compose and validate; raises ConfigErrors with every problem at once."""
    from launcher.config.compose import compose
    from launcher.config.validate import validate

    raw, choices, errors = compose(overrides)
    cfg, more = validate(raw)
    errors += more
    if errors:
        raise ConfigErrors(errors)
    return raw, cfg, choices


def prepare_run(overrides: list[str]) -> tuple[dict[str, Any], Any, dict[str, str], Any, Path]:
    from launcher.launch import get_backend
    from launcher.runs import choose_run_dir, config_path_for

    raw, cfg, choices = _load(overrides)
    run_dir = choose_run_dir(raw)
    raw["run"]["dir"] = str(run_dir)
    cfg.run.dir = str(run_dir)
    config_path = config_path_for(raw, run_dir)
    plan = get_backend(cfg.launch.backend).build(cfg, run_dir, config_path)
    return raw, cfg, choices, plan, config_path


# --------------------------------------------------------------------------------------------
# commands


def cmd_plan(args: argparse.Namespace) -> int:
    from launcher.planner import memory_lines, memory_report, memory_verdict, summary_lines

    raw, cfg, choices, plan, config_path = prepare_run(args.overrides)
    report = memory_report(cfg)
    width = 11
    for label, text in summary_lines(cfg, choices):
        print(f"{label:<{width}} {text}")
    print(f"{'memory':<{width}} {memory_verdict(report)}")
    print(f"{'run dir':<{width}} {plan.run_dir}")
    for name, text in plan.files.items():
        print(f"\n--- {plan.run_dir / name} ---\n{text.rstrip()}\n---")
    if cfg.strategy.engine == "deepspeed":
        _print_deepspeed_config(cfg)
    print("\n" + "\n".join(memory_lines(report)) + "\n")
    for i, line in enumerate(plan.shell_lines()):
        print(f"{'command' if i == 0 else '':<{width}} {line}")
    for note in plan.notes:
        print(f"{'note':<{width}} {note}")
    if report.checked and not report.fits:
        print(f"ftl plan: {memory_verdict(report)} (launch.check_memory=false skips this check)", file=sys.stderr)
        return EXIT_INVALID
    print("\nnothing launched (ftl plan). To run: ftl train " + " ".join(args.overrides))
    return 0


def _print_deepspeed_config(cfg: Any) -> None:
    import json

    from launcher.config.deepspeed_config import build_deepspeed_config, planned_device_type, resolve_precision
    from launcher.config.validate import world_size

    device = planned_device_type(cfg)
    precision = resolve_precision(cfg.train.precision, device)
    print(f"\n--- DeepSpeed config (generated; train.precision={cfg.train.precision} -> {precision} on {device}) ---")
    print(json.dumps(build_deepspeed_config(cfg, world_size(cfg), precision), indent=2))
    print("---")


def cmd_train(args: argparse.Namespace) -> int:
    if args.multirun:
        from launcher.multirun import run_multirun

        return run_multirun(args.overrides, lambda ov: _train_once(ov, args))
    return _train_once(args.overrides, args)


def _train_once(overrides: list[str], args: argparse.Namespace) -> int:
    if args.cfg:
        return _print_cfg(overrides, args.cfg)
    from launcher.launch import get_backend
    from launcher.runs import write_run_dir

    from launcher.planner import memory_report, memory_verdict

    raw, cfg, _, plan, config_path = prepare_run(overrides)
    report = memory_report(cfg)
    if report.checked and not report.fits:  # before anything is written or queued
        print(f"ftl train: {memory_verdict(report)}; `ftl plan` shows the estimate "
              "(launch.check_memory=false skips this check)", file=sys.stderr)  # fmt: skip
        return EXIT_INVALID
    changes = write_run_dir(raw, plan, config_path, ["train", *overrides])
    if changes:
        print(f"ftl: {plan.run_dir} holds an earlier run; config changes since then:", file=sys.stderr)
        for c in changes:
            print(f"  {c}", file=sys.stderr)
    print(f"ftl: run dir {plan.run_dir}", file=sys.stderr)
    for line in plan.shell_lines():
        print(f"ftl: launching {line}", file=sys.stderr)
    return get_backend(cfg.launch.backend).submit(plan)


def _print_cfg(overrides: list[str], which: str) -> int:
    """Hydra's `--cfg job`: the composed config, validated, printed, nothing launched."""
    from omegaconf import OmegaConf

    raw, _, _ = _load(overrides)
    print(OmegaConf.to_yaml(OmegaConf.create(raw)), end="")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from launcher.config.compose import recipe_description, recipe_files

    files = recipe_files()
    width = max(map(len, files), default=0)
    for name, path in files.items():
        description, command = recipe_description(path)
        print(f"{name:<{width}}  {description}")
        if args.verbose and command:
            print(f"{'':<{width}}  $ {command}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from launcher.data import DataError
    from launcher.data.preprocess import run_preprocess

    _, cfg, _ = _load(args.overrides)
    try:
        lines = run_preprocess(cfg)
    except DataError as e:
        print(f"ftl preprocess: training data error: {e}", file=sys.stderr)
        return EXIT_INVALID
    print("\n".join(lines))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.export import ExportInputError, export_checkpoint

    try:
        export_checkpoint(
            Path(args.path), Path(args.out) if args.out else None, max_shard_size=args.max_shard_size,
            dtype=args.dtype, overwrite=args.overwrite, config=Path(args.config) if args.config else None,
        )  # fmt: skip
    except ExportInputError as e:
        print(f"ftl export: {e}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as e:  # a checkpoint that does not load, a model that does not match it, a full disk
        print(f"ftl export: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftl", description="Distributed fine-tuning of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, overrides: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if overrides:
            p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
        p.set_defaults(fn=fn)
        return p

    p = add("train", cmd_train, "compose, validate and launch a training run")
    p.add_argument("--cfg", choices=["job"], help="print the composed config and exit (as Hydra's --cfg job)")
    p.add_argument("-m", "--multirun", action="store_true", help="sweep comma-separated values, one run each (Hydra's basic sweeper)")
    add("plan", cmd_plan, "validate and show what `train` would run; launches nothing, imports no torch")
    add("preprocess", cmd_preprocess, "tokenize (and pack) the data into the cache `train` reads, and print the counts")
    p = add("export", cmd_export, "consolidate a run's checkpoint (any engine) into a Hugging Face directory, on CPU", overrides=False)
    p.add_argument("path", metavar="RUN_DIR_OR_CKPT_DIR", help="a run dir (its latest checkpoint) or a checkpoints/step-N dir")
    p.add_argument("--out", help="output directory (default: RUN_DIR/export/step-N)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 2GB, 500MB, 4GiB (default: 2GB)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="weights dtype (auto: as trained)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--config", help="the run's config.yaml, for a checkpoint dir moved out of its run dir")
    p = add("recipes", cmd_recipes, "list the shipped recipes", overrides=False)
    p.add_argument("-v", "--verbose", action="store_true", help="show each recipe's command")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigErrors as e:
        print(f"ftl {args.command}: {e}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
