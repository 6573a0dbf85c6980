"""ftl's DPO against TRL's ``DPOTrainer`` on CPU: same model, same pairs, same batch budget, the
sides taking turns in one run.

    python bench/dpo_throughput.py            # SmolLM2-135M-Instruct on the demo preference pairs, 3 rounds
    python bench/dpo_throughput.py --quick    # tiny random Llama, a few steps (what the test suite runs)

* **ftl**: ``ftl train recipe=demo-dpo`` in a subprocess: pairs packed whole into ``seq_len`` rows,
  bf16 autocast over fp32 weights, the reference log-probs computed once before training
  (``objective.reference=precomputed``, ftl's default for a full fine-tune); no eval, no checkpoints.
* **TRL**: ``DPOTrainer`` as a user would write it on CPU (``use_cpu=True``, ``bf16=True``), fed the
  same conversational pairs, ``max_length=seq_len``; twice: with ``precompute_ref_log_probs=True``
  (the same reference strategy as ftl: the fairest opponent) and with TRL's default (a frozen
  reference model run beside the policy at every step). Each in its own process (``--trl-worker``).

**Batch budget**: real (non-pad) tokens per optimizer step are matched, not rows: ftl's step is
``micro_batch_size`` packs of pairs; TRL's batch is that many tokens divided by the mean tokens of a
pair, rounded. Both budgets are printed.

**Real tokens/s** counts the chosen and rejected tokens the policy trains on, over steps 2..N
(step 1 excluded); the reference pass before training is outside it for both, and inside **time to
the first optimizer step** (imports, loading, tokenization and the pass, from process start).

Goal: ftl ≥ 1.5× TRL's real tokens/s (the precomputing TRL). Quick mode only checks that it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from throughput import ROOT, bench_env, combine, compose, model_dir_for, render  # noqa: E402

GOAL_RATIO = 1.5
SIDES = {
    "ftl": "ftl (pairs packed, bf16, precomputed reference)",
    "trl_pre": "TRL DPOTrainer (precompute_ref_log_probs)",
    "trl": "TRL DPOTrainer (default: reference model each step)",
}


def settings(quick: bool, steps: int | None, rounds: int | None) -> dict[str, Any]:
    s = (
        {"recipe": "tiny", "micro_batch_size": 4, "seq_len": 512, "steps": 3, "pairs": 48}
        if quick
        else {"recipe": "demo-dpo", "micro_batch_size": 2, "seq_len": 512, "steps": 10, "pairs": None}
    )
    s["rounds"] = rounds or (1 if quick else 3)
    s["steps"] = steps or s["steps"]
    if s["steps"] < 2:
        raise SystemExit("--steps must be at least 2: step 1 is excluded from the rates")
    return s


def overrides(s: dict[str, Any]) -> list[str]:
    """Both sides train on ``s["data"]``: the demo pairs (quick: the first ``pairs`` of them)."""
    return [
        f"recipe={s['recipe']}",
        "objective=dpo",
        "data=demo_preferences",
        "data.packing=true",
        f"train.seq_len={s['seq_len']}",
        f"data.train_files=[{s['data']}]",
        "data.eval_files=[]",
        "eval.before_training=false",
        "eval.after_training=false",
    ]


def training_pairs(s: dict[str, Any], tmp: Path) -> str:
    from launcher.paths import asset

    path = Path(asset("demo/preferences/train.jsonl"))
    if s["pairs"] is None:
        return str(path)
    subset = tmp / "pairs.jsonl"
    subset.write_text("".join(path.read_text().splitlines(keepends=True)[: s["pairs"]]))
    return str(subset)


def batch_budget(cfg: Any, model_dir: Path, s: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from launcher.data.build import build_datasets
    from launcher.data.packing import pack_dataset
    from launcher.model.loading import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ensure_pad_token(tokenizer)
    train, _ = build_datasets(cfg.data, tokenizer, s["seq_len"], seed=0)
    packs = len(pack_dataset(train, s["seq_len"]))
    tokens = sum(len(e["input_ids"]) for e in train.examples)
    ftl_tokens = s["micro_batch_size"] * tokens / packs
    pair = tokens / len(train)
    return {
        "ftl_tokens_per_step": ftl_tokens,
        "pairs": len(train),
        "pair_tokens": pair,
        "trl_batch_size": max(1, round(ftl_tokens / pair)),
        "packing_efficiency": tokens / (packs * s["seq_len"]),
    }


def run_ftl(s: dict[str, Any], tmp: Path) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="ftl-dpo-", dir=tmp))
    args = [
        *overrides(s),
        f"run.dir={run_dir}",
        f"train.max_steps={s['steps']}",
        "train.precision=bf16",
        "train.grad_accum=1",
        f"train.micro_batch_size={s['micro_batch_size']}",
        "eval.before_training=false",
        "eval.after_training=false",
        "checkpoint.every_steps=0",
        "checkpoint.save_final=false",
        "wandb.mode=disabled",
        "train.log_every=1",
    ]
    env = {**bench_env(), "FTL_CACHE": str(run_dir / "cache")}  # its own cache: the reference pass runs every round
    metrics_path, log = run_dir / "metrics.jsonl", run_dir.with_suffix(".log")
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "train", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        first: float | None = None
        while proc.poll() is None:
            if first is None and metrics_path.is_file() and metrics_path.read_text().strip():
                first = time.time() - start
            time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"ftl train exited {proc.returncode}:\n{log.read_text()[-4000:]}")
    rates = [json.loads(line)["tokens_per_s"] for line in metrics_path.read_text().splitlines()[1:] if line.strip()]
    return {
        "tokens_per_s": len(rates) / sum(1 / r for r in rates),
        "first_step_s": first or float("nan"),
        "steps": len(rates) + 1,
    }


def run_trl(
    s: dict[str, Any], budget: dict[str, Any], model_dir: Path, data: str, precompute: bool, tmp: Path
) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="trl-", dir=tmp)) / "result.json"
    args = {
        "model_dir": str(model_dir),
        "data": data,
        "batch_size": budget["trl_batch_size"],
        "seq_len": s["seq_len"],
        "steps": s["steps"],
        "precompute": precompute,
        "out": str(out),
        "output_dir": str(out.parent / "out"),
    }
    start = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, "--trl-worker", json.dumps(args)],
        cwd=ROOT,
        env=bench_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"TRL worker exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    ends, tokens = result["step_ends"], result["tokens"]
    return {
        "tokens_per_s": sum(tokens[1 : len(ends)]) / (ends[-1] - ends[0]),
        "first_step_s": ends[0] - start,
        "steps": len(ends),
        "tokens_per_step": statistics.mean(tokens[: len(ends)]),
    }


def trl_worker(args: dict[str, Any]) -> None:
    """DPOTrainer as a user would write it, plus a step clock and a token-counting collator."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.float32)
    rows = [json.loads(line) for line in Path(args["data"]).read_text().splitlines() if line.strip()]
    config = DPOConfig(
        output_dir=args["output_dir"],
        per_device_train_batch_size=args["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=args["steps"],
        learning_rate=5e-6,
        beta=0.1,
        bf16=True,
        use_cpu=True,
        max_length=args["seq_len"],
        precompute_ref_log_probs=args["precompute"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    step_ends: list[float] = []
    tokens: list[int] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            tokens.clear()  # the reference pass (precompute) collated batches too

        def on_step_end(self, *_: Any, **__: Any) -> None:
            step_ends.append(time.time())

    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    collate = trainer.data_collator

    def counting(batch: list[Any]) -> Any:
        out = collate(batch)
        tokens.append(sum(int(v.sum()) for k, v in out.items() if k.endswith("attention_mask")))
        return out

    trainer.data_collator = counting
    trainer.train()
    Path(args["out"]).write_text(json.dumps({"step_ends": step_ends, "tokens": tokens}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, 3 steps, one round")
    parser.add_argument("--steps", type=int, help="optimizer steps per training run (>= 2)")
    parser.add_argument(
        "--rounds", type=int, help="training runs per side, taking turns (default 3; quick 1); the median counts"
    )
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return {}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    s = settings(args.quick, args.steps, args.rounds)
    with tempfile.TemporaryDirectory(prefix="ftl-dpo-bench-") as tmp_name:
        tmp = Path(tmp_name)
        s["data"] = training_pairs(s, tmp)
        cfg = compose([*overrides(s), f"run.dir={tmp / 'plan'}"])
        model_dir = model_dir_for(cfg, tmp)
        budget = batch_budget(cfg, model_dir, s)
        runs: dict[str, list[dict[str, Any]]] = {key: [] for key in SIDES}
        for r in range(1, s["rounds"] + 1):  # the sides take turns, so a slow spell of the machine hits them alike
            print(f"bench: round {r}/{s['rounds']}: ftl ...", file=sys.stderr)
            runs["ftl"].append(run_ftl(s, tmp))
            for key, precompute in (("trl_pre", True), ("trl", False)):
                print(f"bench: round {r}/{s['rounds']}: {SIDES[key]} ...", file=sys.stderr)
                runs[key].append(run_trl(s, budget, model_dir, cfg.data.train_files[0], precompute, tmp))
        results = {key: combine(side) for key, side in runs.items()}
    ftl = results["ftl"]
    rows = [
        [
            SIDES["ftl"],
            f"{ftl['tokens_per_s']:,.0f}",
            f"{budget['ftl_tokens_per_step']:,.0f}",
            f"{s['micro_batch_size']} packs",
            f"{ftl['first_step_s']:.1f}",
            ", ".join(f"{x:.0f}" for x in ftl["round_rates"]),
        ]
    ]
    for key in ("trl_pre", "trl"):
        r = results[key]
        rows.append(
            [
                SIDES[key],
                f"{r['tokens_per_s']:,.0f}",
                f"{r['tokens_per_step']:,.0f}",
                f"{budget['trl_batch_size']} pairs",
                f"{r['first_step_s']:.1f}",
                ", ".join(f"{x:.0f}" for x in r["round_rates"]),
            ]
        )
    ratios = [
        [
            f"real tokens/s ftl / {SIDES[k]}",
            f"{ftl['tokens_per_s'] / results[k]['tokens_per_s']:.2f}x",
            f">= {GOAL_RATIO}x",
            "yes" if ftl["tokens_per_s"] / results[k]["tokens_per_s"] >= GOAL_RATIO else "NO",
        ]
        for k in ("trl_pre", "trl")
    ]
    print(
        f"model {cfg.model.name}, {budget['pairs']} pairs (mean {budget['pair_tokens']:.0f} tokens), seq_len {s['seq_len']}, "
        f"{s['steps']} steps (rates over steps 2..{s['steps']}), packing efficiency {budget['packing_efficiency']:.1%}; "
        f"{os.cpu_count()} CPU(s); median of {s['rounds']} round(s)\n"
    )
    print(render(["run", "real tok/s", "real tok/step", "batch", "1st step s", "per round"], rows))
    print()
    print(render(["measure", "value", "goal", "met"], ratios))
    if args.quick:
        print("\nquick mode: tiny model and few steps; these numbers are no result.")
    return results


if __name__ == "__main__":
    main()
