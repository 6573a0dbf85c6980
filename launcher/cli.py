"""`ftl`: the command line. Imports no torch, transformers, deepspeed or peft: `ftl plan` runs on
login nodes and must be instant. Exit codes: 0 ok, 2 invalid input, 1 failure during a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from launcher.config.errors import EXIT_INVALID, ConfigErrors
from launcher.config.search_path import CONFIG_DIR_ENV

OVERRIDES_HELP = "Hydra overrides: recipe=NAME, key=value, +key=value, ~key, group=option"


# --------------------------------------------------------------------------------------------
# commands


def cmd_plan(args: argparse.Namespace) -> int:
    from launcher.plan.report import memory_report, memory_verdict
    from launcher.plan.scale import scale_plan
    from launcher.rundir.lock import check_free
    from launcher.rundir.resume import refusal
    from launcher.session import prepare_run, resume_verdict_for, train_argv, writes_run_dir
    from launcher.shell import ftl_command

    if args.explain is not None:
        return _explain(args.explain, args.overrides)
    run = prepare_run(args.overrides)  # a recipe file given as a bare path is composed as recipe=PATH
    cfg, plan = run.cfg, run.plan
    report = memory_report(cfg)
    scale = scale_plan(cfg)
    verdict = resume_verdict_for(run)
    if args.json:
        _print_plan_json(run, report, scale)
    else:
        _print_plan(run, report, scale, verdict)
    busy = check_free(plan.run_dir) if writes_run_dir(cfg) else None
    if busy:
        print(f"ftl plan: {busy}", file=sys.stderr)
        return EXIT_INVALID
    if report.checked and not report.fits:
        print(f"ftl plan: {memory_verdict(report)} (launch.check_memory=false skips this check)", file=sys.stderr)
        return EXIT_INVALID
    if verdict is not None and verdict.refused:
        print(f"ftl plan: {refusal(verdict, run.run_dir, train_argv(args.overrides))}", file=sys.stderr)
        return EXIT_INVALID
    if not args.json:
        print("\nnothing launched (ftl plan). To run: " + ftl_command(["ftl", *train_argv([])], args.overrides))
    return 0


def _print_plan(run: Any, report: Any, scale: Any, verdict: Any) -> None:
    from launcher.plan.report import deepspeed_lines, memory_lines, memory_verdict, summary_lines
    from launcher.plan.scale import scale_lines
    from launcher.rundir.resume import finished_message
    from launcher.session import launch_notes

    cfg, plan = run.cfg, run.plan
    width = 11
    for label, text in summary_lines(cfg, run.choices):
        print(f"{label:<{width}} {text}")
    print(f"{'memory':<{width}} {memory_verdict(report)}")
    print(f"{'run dir':<{width}} {plan.run_dir}")
    if verdict is not None and verdict.finished:
        print(f"{'resume':<{width}} {finished_message(verdict, run.run_dir).splitlines()[0]}")
    elif verdict is None or not verdict.refused:
        for line in launch_notes(run, verdict):
            print(f"{'note':<{width}} {line}")
    for name, text in plan.files.items():
        print(f"\n--- {plan.run_dir / name} ---\n{text.rstrip()}\n---")
    if deepspeed_lines(cfg):
        print("\n" + "\n".join(deepspeed_lines(cfg)))
    print("\n" + "\n".join(memory_lines(report)) + "\n")
    if scale is not None and scale.nodes > 1:
        print("\n".join(scale_lines(scale, cfg)) + "\n")
    for i, line in enumerate(plan.shell_lines()):
        print(f"{'command' if i == 0 else '':<{width}} {line}")
    for note in plan.notes:
        print(f"{'note':<{width}} {note}")


def _print_plan_json(run: Any, report: Any, scale: Any) -> None:
    """`ftl plan --json`: the summary, the layout, the memory estimate and the scale figures as one
    JSON document on stdout (bytes, seconds and fractions, unrounded); refusals still exit 2."""
    import json

    from launcher.plan.report import layout_json, memory_json, summary_lines

    doc = {
        "summary": dict(summary_lines(run.cfg, run.choices)),
        "run_dir": str(run.plan.run_dir),
        "layout": layout_json(run.cfg),
        "memory": memory_json(report),
        "scale": None if scale is None else scale.as_dict(),
        "command": run.plan.shell_lines(),
        "files": sorted(run.plan.files),
        "notes": list(run.plan.notes),
    }
    print(json.dumps(doc, indent=1))


def _explain(key: str, overrides: list[str]) -> int:
    """`ftl plan --explain KEY`: the schema's type, default, allowed values and doc of a key, or of
    every field of a group; nothing composed."""
    from launcher.config.docs import explain
    from launcher.config.errors import ConfigError

    if overrides:
        raise ConfigErrors(
            [
                ConfigError(
                    "--explain",
                    "shows the schema, not a composed config, and takes no overrides; "
                    "`ftl train --cfg job OVERRIDES` prints the values a run would use",
                )
            ]
        )
    print(explain(key))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from launcher.config.search_path import recipe_file_overrides

    args.overrides = recipe_file_overrides(args.overrides)
    if args.multirun:
        from launcher.sweep.multirun import run_multirun

        return run_multirun(args.overrides, lambda ov: _train_once(ov, args))
    import os

    if not (os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID")):  # a plain `ftl train`
        return _train_once(args.overrides, args)
    from launcher.sweep.trial import run_trial, sweep_trial

    trial = sweep_trial(args.overrides, os.environ)  # started by a W&B sweep agent: its run dir, its run id
    if trial is not None and not args.cfg:
        return run_trial(trial, lambda ov: _train_once(ov, args), os.environ)
    return _train_once(trial.overrides if trial else args.overrides, args)


def _train_once(overrides: list[str], args: argparse.Namespace) -> int:
    if args.cfg:
        return _print_cfg(overrides, args.cfg)
    from launcher.session import launch

    return launch(overrides)


def _print_cfg(overrides: list[str], which: str) -> int:
    """Hydra's `--cfg job`: the composed config, validated, printed, nothing launched."""
    from omegaconf import OmegaConf

    from launcher.redact import known_secrets, redact
    from launcher.session import load_config

    print(OmegaConf.to_yaml(OmegaConf.create(redact(load_config(overrides).raw, known_secrets()))), end="")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from launcher.sweep import agents, wandb_config

    if args.action == "create":
        return wandb_config.create(args.target, args.overrides, args.out, args.offline)
    if args.action == "agent":
        return (agents.offline_agent if args.offline else agents.agent)(args.target, args.overrides)
    from launcher.sweep.optuna_search import run_optuna

    return run_optuna(args.target, args.overrides, lambda ov: _train_once(ov, argparse.Namespace(cfg=None)))


def cmd_recipes(args: argparse.Namespace) -> int:
    from launcher.config.compose import recipe_description
    from launcher.config.search_path import recipe_files
    from launcher.paths import RECIPES_DIR

    if args.copy:
        return _copy_option(*args.copy)
    files = recipe_files()
    width = max(map(len, files), default=0)
    for name, path in files.items():
        description, command = recipe_description(path)
        where = "" if path.parent == RECIPES_DIR else f"  [{path}]"
        print(f"{name:<{width}}  {description}{where}")
        if args.verbose and command:
            print(f"{'':<{width}}  $ {command}")
    return 0


def _path(text: str) -> str:
    """A path argument. An empty one (an unset $RUN_DIR) would mean the working directory; a control
    character would reach the terminal raw in every message naming the path."""
    from launcher.shell import has_control_chars

    if not text:
        raise argparse.ArgumentTypeError("got an empty path (an unset variable?); give a path, . for this directory")
    if has_control_chars(text):
        raise argparse.ArgumentTypeError(f"got {text!r}; newlines and other control characters are not allowed")
    return text


def _copy_option(name: str, dest: str) -> int:
    """`ftl recipes --copy NAME DEST`: a recipe, or a config group's option (GROUP/OPTION, e.g.
    strategy/zero3), as a starting point of one's own. Never overwrites."""
    import os
    import re

    from launcher.config.errors import ConfigError
    from launcher.config.search_path import OPTION_GROUPS, RECIPES, options

    group, _, option = name.rpartition("/")
    group = group or RECIPES
    if group not in (RECIPES, *OPTION_GROUPS):
        raise ConfigErrors(
            [
                ConfigError(
                    "NAME",
                    f"{name!r}: a config dir holds no {group}/ options; copy a recipe or one of "
                    + ", ".join(f"{g}/OPTION" for g in OPTION_GROUPS),
                )
            ]
        )
    files = options(group)
    what = "recipe" if group == RECIPES else f"{group} option"
    if option not in files:
        raise ConfigErrors([ConfigError(name, f"no such {what}; available: {', '.join(files)}")])
    from launcher.shell import has_control_chars, quote

    if not dest or has_control_chars(dest):  # "" is Path("."); a newline makes a file `ftl train` refuses to read
        problem = (
            "got an empty path" if not dest else f"got {dest!r}; newlines and other control characters are not allowed"
        )
        raise ConfigErrors([ConfigError("DEST", f"{problem}: name a .yaml file or a directory (. for this one)")])
    target = Path(dest).expanduser()
    if target.is_dir() and group == RECIPES:
        target = target / f"{option}.yaml"
    elif target.is_dir():  # a config dir, or its group folder: a name no option has yet
        folder = target if target.name == group else target / group
        target = folder / f"my-{option}.yaml"
    if target.suffix not in (".yaml", ".yml"):
        raise ConfigErrors(
            [ConfigError("DEST", f"{dest}: a {what} file ends in .yaml (or name an existing directory)")]
        )
    if os.path.lexists(target):  # a dangling symlink too: open(.., "x") would fail on it
        raise ConfigErrors(
            [ConfigError("DEST", f"{target} exists; ftl does not overwrite it: choose another name or remove it")]
        )
    if group != RECIPES and target.stem in files:
        raise ConfigErrors(
            [
                ConfigError(
                    "DEST",
                    f"{target.name} is named like {files[target.stem]}; option names must be unique: "
                    f"choose another (e.g. my-{option}.yaml)",
                )
            ]
        )
    if group != RECIPES and target.parent.name == group and target.parent.parent.is_dir():
        target.parent.mkdir(exist_ok=True)  # the config dir's group folder; nothing in it is touched
    if not target.parent.is_dir():
        raise ConfigErrors([ConfigError("DEST", f"{target.parent}: no such directory")])
    from launcher.safe_read import UnreadableFile, read_text

    try:
        text = read_text(files[option])
    except UnreadableFile as e:
        raise ConfigErrors([ConfigError(name, str(e))]) from None
    if group == RECIPES:  # the header's command names the shipped recipe; the copy runs as a file
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if not line.startswith("#"):
                break
            if line.lstrip("# ").lower().startswith("run:"):
                lines[i] = re.sub(rf"recipe={re.escape(option)}(?=\s|$)", lambda _: quote(str(target)), line)
        text = "".join(lines)
    with open(target, "x") as f:  # "x": never replaces a file that appeared meanwhile
        f.write(text)
    if group == RECIPES:
        how = f"run it with: ftl train {quote(str(target))}"
    elif target.parent.name == group:
        config_dir = quote(f"--config-dir={target.parent.parent}")
        how = f"use it with: ftl train {config_dir} {group}={quote(target.stem)} [recipe=NAME ...]"
    else:
        how = (
            f"ftl reads {group} options from a config dir: move it to CONFIG_DIR/{group}/, then "
            f"ftl train --config-dir=CONFIG_DIR {group}={quote(target.stem)}"
        )
    print(f"ftl recipes: wrote {target} (a copy of {what} {option}); {how}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from launcher.data.preprocess import ModelStagingError, run_preprocess, stage_model
    from launcher.data.types import DataError

    staged: list[str] = []
    try:
        if args.config:  # the run's own config, as the SLURM preparation job runs it
            from launcher.config.validate import load_run_config

            cfg = load_run_config(args.config)
        else:
            from launcher.session import load_config

            if args.fetch_model:  # first: validation reads the architecture from the staged config.json
                staged = [stage_model(composed_model(args.overrides))]
            cfg = load_config(args.overrides).cfg
        lines = staged + run_preprocess(
            cfg, fetch_model=args.fetch_model and not staged, show=args.show, color=sys.stdout.isatty()
        )
    except DataError as e:
        print(f"ftl preprocess: training data error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except ModelStagingError as e:
        print(f"ftl preprocess: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def composed_model(overrides: list[str]) -> Any:
    """model.source, path and revision as the overrides compose them, before validation."""
    from types import SimpleNamespace

    from launcher.config.compose import compose

    model = compose(overrides)[0].get("model") or {}
    return SimpleNamespace(
        source=model.get("source"),
        path=str(model.get("path") or ""),
        revision=model.get("revision"),
        trust_remote_code=bool(model.get("trust_remote_code")),
    )


def _flag_settings(tokens: list[str], known: dict[str, bool]) -> dict[str, bool]:
    """``merge_lora=true``-style settings after a command's path (the form `ftl train` overrides
    take), for the boolean options in ``known``."""
    from launcher.config.errors import ConfigError

    values = dict(known)
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or key not in known or value.lower() not in ("true", "false"):
            raise ConfigErrors([ConfigError(token, f"expected one of {', '.join(f'{k}=true|false' for k in known)}")])
        values[key] = value.lower() == "true"
    return values


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.artifacts.export import choose_checkpoint, export_checkpoint
    from launcher.artifacts.weights import ArtifactInputError
    from launcher.config.local_paths import MissingLocalPath

    merge = _flag_settings(args.settings, {"merge_lora": False})["merge_lora"] or args.merge_lora
    try:
        export_checkpoint(
            choose_checkpoint(Path(args.path), args.best),
            Path(args.out) if args.out else None,
            max_shard_size=args.max_shard_size,
            dtype=args.dtype,
            overwrite=args.overwrite,
            config=Path(args.config) if args.config else None,
            merge_lora=merge,
        )
    except (ArtifactInputError, MissingLocalPath) as e:
        print(f"ftl export: {e}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as e:  # a checkpoint that does not load, a model that does not match it, a full disk
        print(f"ftl export: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from launcher.artifacts.weights import ArtifactInputError
    from launcher.config.validate import validated
    from launcher.eval.job import (
        EvalInputError,
        as_eval_config,
        check_baseline,
        default_out,
        eval_config,
        launch,
        write_job,
    )

    try:
        raw, run_dir, step = eval_config(Path(args.model), args.overrides)
        check_baseline(args.baseline)
        raw = as_eval_config(raw)
        if args.judge:
            raw["eval"] = {**raw.get("eval", {}), "judge": {"path": str(Path(args.judge).expanduser().resolve())}}
        cfg = validated(raw)
        out = Path(args.out).expanduser().resolve() if args.out else default_out(Path(args.model), run_dir, step)
        baseline = args.baseline or ("auto" if cfg.eval.judge.path else None)  # the judge compares with the base
        job = write_job(out, Path(args.model), raw, baseline, run_dir, step)
        return launch(job, cfg)
    except (EvalInputError, ArtifactInputError) as e:
        print(f"ftl eval: {e}", file=sys.stderr)
        return EXIT_INVALID


def _load_for_generation(args: argparse.Namespace) -> Any:
    import torch

    from launcher.artifacts.inference import load_model
    from launcher.progress import phase

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    with phase(f"loading {args.model}"):
        return load_model(Path(args.model), device=device)


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings, checked before any model loads (nan passes every comparison)."""
    import math

    from launcher.config.errors import ConfigError

    errors = []
    if args.max_new_tokens < 1:
        errors.append(
            ConfigError("--max-new-tokens", f"got {args.max_new_tokens}; expected a positive number of tokens")
        )
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        errors.append(
            ConfigError("--temperature", f"got {args.temperature}; expected a finite number >= 0 (0: greedy)")
        )
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        errors.append(ConfigError("--top-p", f"got {args.top_p}; expected a number in (0, 1]"))
    if args.seed is not None and not 0 <= args.seed < 2**32:
        errors.append(ConfigError("--seed", f"got {args.seed}; expected an integer in [0, 2^32)"))
    if errors:
        raise ConfigErrors(errors)
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def cmd_generate(args: argparse.Namespace) -> int:
    from launcher.artifacts.inference import stream_reply
    from launcher.artifacts.weights import ArtifactInputError
    from launcher.config.local_paths import MissingLocalPath

    settings = _generation_kwargs(args)
    try:
        loaded = _load_for_generation(args)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        stream_reply(loaded, messages, **settings)
    except (ArtifactInputError, MissingLocalPath) as e:
        print(f"ftl generate: {e}", file=sys.stderr)
        return EXIT_INVALID
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from launcher.artifacts.inference import chat_loop
    from launcher.artifacts.weights import ArtifactInputError
    from launcher.config.local_paths import MissingLocalPath

    settings = _generation_kwargs(args)
    try:
        loaded = _load_for_generation(args)
    except (ArtifactInputError, MissingLocalPath) as e:
        print(f"ftl chat: {e}", file=sys.stderr)
        return EXIT_INVALID
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"ftl chat: {loaded.description}\nType a message. /help lists commands; Ctrl-C stops a reply; "
            "Ctrl-D or /exit ends.",
            file=sys.stderr,
        )

    def read_line() -> str | None:
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n(Ctrl-D or /exit ends the chat)", file=sys.stderr)
            return ""
        if line.strip() and not interactive:  # piped turns: the transcript shows what was asked
            print(f"you> {line.strip()}", flush=True)
        return line if line else None

    def prompt() -> None:
        print("you> " if interactive else "", end="", file=sys.stderr, flush=True)

    chat_loop(loaded, system=args.system, read_line=read_line, prompt=prompt, **settings)
    return 0


def _count(text: str) -> int:
    """A number of things to show: 0 or more (argparse's error, exit 2, for anything else)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of examples (0 or more), got {text!r}")
    return int(text)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature > 0)")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when present)")


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftl", description="Distributed fine-tuning of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help: str, overrides: bool = True, config_dir: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if overrides:
            p.add_argument(
                "overrides",
                nargs="*",
                help=OVERRIDES_HELP + "; or a recipe file: ftl train path/to/recipe.yaml [overrides]",
            )
        if config_dir:
            p.add_argument(
                "--config-dir",
                action="append",
                default=[],
                metavar="DIR",
                help="a project config dir whose recipes/, model/, data/, strategy/, peft/, launch/, sweep/ options "
                f"are added to ftl's (repeatable; also ${CONFIG_DIR_ENV}, several separated by ':')",
            )
        p.set_defaults(fn=fn)
        subparsers[name] = p
        return p

    subparsers: dict[str, argparse.ArgumentParser] = {}

    p = add("train", cmd_train, "compose, validate and launch a training run")
    p.add_argument("--cfg", choices=["job"], help="print the composed config and exit (as Hydra's --cfg job)")
    p.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="sweep comma-separated values, one run each (Hydra's basic sweeper)",
    )
    p = add("plan", cmd_plan, "validate and show what `train` would run; launches nothing, imports no torch")
    p.add_argument(
        "--explain",
        nargs="?",
        const="",
        metavar="KEY",
        help="print a config key's type, default, allowed values "
        "and doc (a group: each of its fields; no KEY: the groups) and exit; docs/CONFIG.md lists them all",
    )
    p.add_argument(
        "--json", action="store_true", help="print the whole plan (summary, layout, memory, scale) as JSON instead"
    )
    p = add(
        "preprocess", cmd_preprocess, "tokenize (and pack) the data into the cache `train` reads, and print the counts"
    )
    p.add_argument("--config", help="a run dir's resolved config.yaml instead of overrides")
    p.add_argument(
        "--show",
        type=_count,
        default=0,
        metavar="N",
        help="also print the first N training examples decoded as the model reads them (chat template included), "
        "the tokens it trains on marked: green on a terminal, [[bracketed]] in a pipe or file",
    )
    p.add_argument(
        "--fetch-model",
        action="store_true",
        help="also stage the model: download a hub model into HF_HOME "
        "(the training job reads it offline), convert SmolLM2 into ftl's cache",
    )
    p = add(
        "export",
        cmd_export,
        "consolidate a run's checkpoint (any engine) into a Hugging Face directory, on CPU",
        overrides=False,
        config_dir=False,
    )
    p.add_argument(
        "path",
        type=_path,
        metavar="RUN_DIR_OR_CKPT_DIR",
        help="a run dir (its latest checkpoint) or a checkpoints/step-N dir",
    )
    p.add_argument("--out", type=_path, help="output directory (default: RUN_DIR/export/step-N)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--best",
        action="store_true",
        default=None,
        help="a run dir's checkpoint of its best eval during training (the default for a run with "
        "train.early_stopping on)",
    )
    which.add_argument(
        "--latest", dest="best", action="store_false", default=None, help="a run dir's latest checkpoint"
    )
    p.add_argument(
        "--max-shard-size", default="2GB", help="largest safetensors file, e.g. 2GB, 500MB, 4GiB (default: 2GB)"
    )
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="weights dtype (auto: as trained)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--config", type=_path, help="the run's config.yaml, for a checkpoint dir moved out of its run dir")
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="LoRA/QLoRA runs: merge the adapter into the base weights "
        "(default: export the adapter with a reference to its base)",
    )
    p.add_argument("settings", nargs="*", metavar="merge_lora=true", help="the same as --merge-lora, in override form")
    p = add(
        "eval",
        cmd_eval,
        "perplexity, ROUGE and BLEU of a run, checkpoint or export on held-out data (optionally vs its base)",
        overrides=False,
    )
    p.add_argument(
        "model",
        type=_path,
        metavar="RUN_OR_EXPORT",
        help="a run dir, a checkpoints/step-N dir, or an `ftl export` output",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides of the run's config (eval.max_batches=4, launch.nproc_per_node=2); "
        "for an export, " + OVERRIDES_HELP,
    )
    p.add_argument(
        "--baseline",
        nargs="?",
        const="auto",
        type=_path,
        metavar="PATH",
        help="evaluate the base too and print a before/after table: the run's starting model or adapter-free "
        "base by default, or the model at PATH",
    )
    p.add_argument(
        "--judge",
        type=_path,
        metavar="PATH",
        help="a local model dir that judges base vs tuned answers pairwise, both orders (eval.judge.path; implies "
        "--baseline): the tuned model's win rate in eval.json",
    )
    p.add_argument("--out", type=_path, help="where eval.json goes (default: RUN_DIR/eval/step-N, or EXPORT/eval)")
    p = add(
        "generate",
        cmd_generate,
        "answer one prompt with a run, checkpoint or export, streaming tokens",
        overrides=False,
        config_dir=False,
    )
    p.add_argument(
        "model",
        type=_path,
        metavar="RUN_OR_EXPORT",
        help="a run dir, a checkpoints/step-N dir, or an `ftl export` output",
    )
    p.add_argument("prompt", help="the user message")
    _add_generation_args(p)
    p = add(
        "chat",
        cmd_chat,
        "chat with a run, checkpoint or export: one user turn per line of stdin",
        overrides=False,
        config_dir=False,
    )
    p.add_argument(
        "model",
        type=_path,
        metavar="RUN_OR_EXPORT",
        help="a run dir, a checkpoints/step-N dir, or an `ftl export` output",
    )
    _add_generation_args(p)
    p = add("recipes", cmd_recipes, "list the recipes (shipped, and those of the config dirs)", overrides=False)
    p.add_argument("-v", "--verbose", action="store_true", help="show each recipe's command")
    p.add_argument(
        "--copy",
        nargs=2,
        metavar=("NAME", "DEST"),
        help="write recipe NAME, or a config group's option GROUP/NAME (strategy/zero3, model/llama3-8b, "
        "launch/slurm), to the file DEST (or into the directory DEST: a config dir gets GROUP/my-NAME.yaml) "
        "as a starting point of your own; never overwrites",
    )
    p = add(
        "sweep",
        cmd_sweep,
        "hyperparameter sweeps: W&B (create, agent; trials as SLURM jobs) or offline (agent --offline, optuna)",
        overrides=False,
    )
    p.add_argument(
        "action",
        choices=["create", "agent", "optuna"],
        help="create SPEC | agent SWEEP_ID count=K | agent --offline SPEC count=K | optuna SPEC count=K",
    )
    p.add_argument(
        "target", metavar="SPEC_OR_SWEEP_ID", help="a sweep in conf/sweep/ or a spec file; for `agent`, a W&B sweep id"
    )
    p.add_argument(
        "overrides", nargs="*", help="count=K (agent, optuna), seed=N (optuna), and Hydra overrides every trial adds"
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="create: only write the config; agent: draw trials with W&B's search engine, no server",
    )
    p.add_argument(
        "--out", type=_path, help="create: where to write the W&B sweep config (default: runs/sweep-<name>.yaml)"
    )
    parser.set_defaults(subparsers=subparsers)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options and positional arguments (overrides) mix in any order after the command, as users
    type them (`ftl eval RUN --out DIR key=value`): the command's own parser reads them intermixed."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    subparsers = parser.get_default("subparsers")
    if argv and argv[0] in subparsers:
        args = subparsers[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # --help, a missing or unknown command: argparse's own messages


def main(argv: Sequence[str] | None = None) -> int:
    """Everything ftl prints passes through the redactor: a secret known to this process (from the
    environment, the overrides, launch.env) never reaches the console, whichever message holds it."""
    from launcher.quiet import install
    from launcher.redact import RedactingStream, declare, override_secrets
    from launcher.shell import UnsafeText

    install()
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(stdout), RedactingStream(stderr)  # type: ignore[assignment]
    try:
        args = parse_args(argv)
        declare(override_secrets([*(getattr(args, "overrides", None) or []), *(getattr(args, "settings", None) or [])]))
        try:
            if getattr(args, "config_dir", None):
                from launcher.config.search_path import add_config_dirs

                add_config_dirs(args.config_dir)
            code = args.fn(args)
            sys.stdout.flush()  # inside the try: a reader that went away (`ftl recipes | head`) is handled below
            return code
        except (ConfigErrors, UnsafeText) as e:
            print(f"ftl {args.command}: {e}", file=sys.stderr)
            return EXIT_INVALID
        except KeyboardInterrupt:
            print(f"ftl {args.command}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # The reader of stdout stopped (`| head`): no traceback, and no second error when Python
            # flushes stdout at exit. 141 is what a shell reports for a process killed by SIGPIPE.
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
            return 141
        except OSError as e:  # a full disk, a permission the checks could not foresee: the reason, not a traceback
            print(f"ftl {args.command}: {e.strerror or type(e).__name__}: {e.filename or e}", file=sys.stderr)
            return 1
    finally:
        sys.stdout, sys.stderr = stdout, stderr


if __name__ == "__main__":
    sys.exit(main())
