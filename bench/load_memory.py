"""Host memory of loading a model on 2 ranks: every rank loading it whole, against FSDP's
``load_on_rank0`` and ZeRO-3's ``zero3_init``.

    python bench/load_memory.py            # SmolLM2-135M-Instruct (513 MB in fp32), 2 gloo ranks (~1 min)
    python bench/load_memory.py --quick    # the tiny random model: checks the script only

The model is saved first as hub checkpoints come: bf16, in shards (SmolLM2 in 40 MB shards). For
each configuration, two ranks started by torchrun build the model as ``ftl train`` does
(:func:`launcher.train.trainer.build_model`) and hand it to the engine. Each rank reports its peak
resident memory (``VmHWM``) above what it held before building (imports and process group done),
after the build and after the engine took the model (sharded it, or received its shards). The model
size is its parameter count × 4 bytes (fp32 master weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = [
    ("fsdp, every rank loads", ["strategy=fsdp", "strategy.load_on_rank0=false"]),
    ("fsdp, load_on_rank0 (default)", ["strategy=fsdp", "strategy.load_on_rank0=true"]),
    ("zero3, every rank loads", ["strategy=zero3", "strategy.zero3_init=false"]),
    ("zero3, zero3_init (default)", ["strategy=zero3", "strategy.zero3_init=true"]),
]

WORKER = """
import json, os, sys
import torch
from launcher.session import load_config
from launcher.runtime.distributed import init_distributed
from launcher.engines import build_engine
from launcher.train.trainer import build_model, seed_everything

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

out, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config([*overrides, "launch.nproc_per_node=2", "wandb.mode=disabled"]).cfg
cpu = torch.device("cpu")
info = init_distributed(cfg.launch, cpu)
seed_everything(0)
before = peak_mb()
model, _ = build_model(cfg, cpu, info)
built = peak_mb()
engine = build_engine(cfg, model, info, cpu)
engine.setup(10)
ready = peak_mb()
n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) if info.rank == 0 else None
with open(f"{out}/rank{info.rank}.json", "w") as f:
    json.dump({"rank": info.rank, "build_mb": built - before, "ready_mb": ready - before, "params": n}, f)
torch.distributed.barrier()
os._exit(0)  # as launcher.train does: DeepSpeed's C++ teardown can abort a finished rank
"""


def measure(model_overrides: list[str], overrides: list[str], tmp: Path) -> list[dict[str, Any]]:
    tmp.mkdir(parents=True, exist_ok=True)
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp),
        *model_overrides,
        *overrides,
    ]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(overrides)} failed:\n{done.stderr[-4000:]}")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny random model: checks the script, not a result")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftl-load-") as tmp:
        # As hub checkpoints come: bf16 (ftl trains fp32 master weights, so each loaded tensor is
        # converted, not mapped from the file) and in shards (8 of SmolLM2's size, a 70B has 30).
        import torch

        from launcher.model.loading import load_model_and_tokenizer
        from launcher.session import load_config

        recipe = "tiny" if args.quick else "demo"
        model, tokenizer = load_model_and_tokenizer(load_config([f"recipe={recipe}"]).cfg.model, dtype=torch.bfloat16)
        shard = "100KB" if args.quick else "40MB"
        model.save_pretrained(f"{tmp}/model", max_shard_size=shard)
        tokenizer.save_pretrained(f"{tmp}/model")
        shards = len(list(Path(f"{tmp}/model").glob("*.safetensors")))
        del model
        model_overrides = [f"recipe={recipe}", "model.source=hf", f"model.path={tmp}/model"]
        for i, (name, overrides) in enumerate(CONFIGS):
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            ranks = measure(model_overrides, overrides, Path(tmp) / f"run{i}")
            rows.append({"config": name, "ranks": ranks, "model_mb": ranks[0]["params"] * 4 / 2**20})
    print(
        ("QUICK (tiny model): not a result\n" if args.quick else "") + f"model: {rows[0]['model_mb']:.0f} MB in fp32, "
        f"read from a bf16 checkpoint in {shards} shards; 2 gloo ranks"
    )
    print(f"{'configuration':<32} | {'rank 0 build MB':>15} | {'rank 1 build MB':>15} | {'rank 1 ready MB':>15}")
    print(f"{'-' * 32}-|-{'-' * 15}-|-{'-' * 15}-|-{'-' * 15}")
    for r in rows:
        r0, r1 = r["ranks"]
        print(f"{r['config']:<32} | {r0['build_mb']:>15.0f} | {r1['build_mb']:>15.0f} | {r1['ready_mb']:>15.0f}")
    return rows


if __name__ == "__main__":
    main()
