"""FSDP2 and DDP really wrapping the model at one rank: ftl's engines under a one-rank process group
(nccl on CUDA, gloo on CPU), a few steps each.

    python bench/gpu_engines.py                       # every variant on the GPU (bench/gpu_check.sh)
    python bench/gpu_engines.py --device cpu --variants fsdp,ddp   # the CPU path, gloo (the suite's test)

``ftl train`` at one process wraps nothing: :class:`launcher.engines.fsdp.FSDPEngine` skips
sharding and :class:`launcher.engines.ddp.DDPEngine` its wrapper when no process group exists, so a
one-GPU machine never runs FSDP2's or DDP's code through the trainer. Here each variant runs in its
own process, which makes ftl's one-rank group (:func:`launcher.engines.deepspeed.ensure_process_group`),
builds the model as the trainer does (:func:`launcher.train.trainer.build_model`: LoRA, QLoRA's 4-bit
weights, compiled layers), and the engine as the trainer does (:func:`launcher.engines.build_engine`:
activation checkpointing). DDPEngine then wraps (a group exists). FSDPEngine at world size 1 keeps
the model whole, so the harness applies the engine's own :func:`launcher.engines.fsdp.apply_fully_shard`
with the arguments its ``__init__`` passes at more ranks and marks the engine ``sharded``, as that
``__init__`` does; the steps then go through the engine's ``grad_sync``/``backward``/``step``
(the global grad norm over DTensor shards, the clip) and the SFT objective's loss.

The model: bench/gpu_runs.py's narrow Llama (GQA 4:1, head_dim 128, vocab 128,256, 2 layers),
bf16, random token ids, ``--seq-len`` × 2 per step; on CPU ``recipe=tiny``'s model in fp32.
A variant passes when the model is wrapped as claimed, every loss and gradient norm is finite and
the norm positive, and (adapters) the gathered adapter holds non-zero ``lora_B``; across variants on
the same weights (all but QLoRA) step 1's loss agrees within bench/gpu_runs.py's ``LOSS_TOLERANCE``.
Without CUDA (and without ``--device cpu``) it prints ``no GPU: skipped`` and exits 3.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from gpu_runs import LOSS_TOLERANCE, NARROW_LLAMA, Job, run_jobs

NO_GPU_EXIT = 3
VARIANTS: dict[str, list[str]] = {  # name: overrides on top of the model's
    "fsdp": ["strategy=fsdp"],
    "fsdp-compiled": ["strategy=fsdp", "train.compile=true"],
    "fsdp-ac": ["strategy=fsdp", "strategy.activation_checkpointing=true"],
    "fsdp-lora": ["strategy=fsdp", "peft=lora"],
    "fsdp-qlora": ["strategy=fsdp", "peft=qlora"],
    "ddp": ["strategy=ddp"],
}
GPU_ONLY = {"fsdp-compiled", "fsdp-qlora"}  # inductor's CPU compile takes minutes; bitsandbytes' 4-bit layers need CUDA
MICRO_BATCH = 2


def variant_overrides(variant: str, device: str, seq_len: int) -> list[str]:
    model = [*NARROW_LLAMA, "train.precision=bf16"] if device == "cuda" else ["recipe=tiny", "train.precision=fp32"]
    run = [
        f"train.device={device}",
        f"train.seq_len={seq_len}",
        f"train.micro_batch_size={MICRO_BATCH}",
        "train.compile=false",
        "wandb.mode=disabled",
    ]
    return [*model, *run, *VARIANTS[variant]]


def worker(variant: str, device_type: str, seq_len: int, steps: int) -> dict[str, Any]:
    import torch

    from launcher.engines import build_engine
    from launcher.engines.deepspeed import ensure_process_group
    from launcher.engines.fsdp import FSDPEngine, apply_fully_shard
    from launcher.model.compile import decoder_layers
    from launcher.objectives import build_objective
    from launcher.runtime.distributed import DistInfo
    from launcher.session import load_config
    from launcher.train.trainer import build_model, seed_everything

    with tempfile.TemporaryDirectory(prefix="ftl-engines-") as tmp:
        cfg = load_config([*variant_overrides(variant, device_type, seq_len), f"run.dir={tmp}/run"]).cfg
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ensure_process_group(device)
    dist = DistInfo()
    seed_everything(cfg.train.seed)
    model, _ = build_model(cfg, device, dist)
    engine = build_engine(cfg, model, dist, device)
    if isinstance(engine, FSDPEngine):
        apply_fully_shard(
            model, dist, device, cfg.strategy.reshard_after_forward, cfg.strategy.hybrid_shard, engine.compute_dtype
        )
        engine.sharded = (
            True  # as FSDPEngine.__init__ sets it at more ranks: FSDP's MixedPrecisionPolicy casts, no autocast
        )
    engine.setup(steps)
    wrapped = describe_wrapping(engine.model, model)
    objective = build_objective(cfg)
    ids = torch.randint(
        0, cfg.model.arch.vocab_size, (MICRO_BATCH, seq_len), generator=torch.Generator().manual_seed(0)
    ).to(device)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    units = objective.weight(batch)
    losses, norms = [], []
    for _ in range(steps):
        with engine.grad_sync(True):
            loss, _ = objective.loss(engine, batch)
            engine.backward(loss / units)
        norms.append(engine.step())
        losses.append(float(loss) / units)
    adapter = {}
    if engine.peft_model is not None:
        tensors = engine.trainable_state_dict()  # gathered from the shards, as a checkpoint's adapter/ is written
        adapter = {
            "tensors": len(tensors),
            "lora_B_nonzero": any(bool(t.abs().sum() > 0) for k, t in tensors.items() if "lora_B" in k),
        }
    return {
        "variant": variant,
        "wrapped": wrapped,
        "losses": losses,
        "grad_norms": norms,
        "adapter": adapter,
        "compiled_layers": sum("forward" in vars(layer) for layer in decoder_layers(model)),
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def describe_wrapping(outer: Any, model: Any) -> str:
    """What wraps the model, found on the objects themselves: '' when nothing does."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from launcher.model.compile import decoder_layers

    if isinstance(outer, DistributedDataParallel):
        return "DistributedDataParallel"
    if isinstance(model, FSDPModule):
        layers = sum(isinstance(layer, FSDPModule) for layer in decoder_layers(model))
        dtensors = sum(isinstance(p, DTensor) for p in model.parameters())
        return f"fully_shard: root + {layers} layers, {dtensors} DTensor parameters"
    return ""


def problems(result: dict[str, Any]) -> list[str]:
    if "error" in result:
        return [result["error"]]
    out = [] if result["wrapped"] else ["the model is not wrapped"]
    if not all(math.isfinite(x) for x in result["losses"]):
        out.append(f"losses not finite: {result['losses']}")
    if not all(math.isfinite(x) and x > 0 for x in result["grad_norms"]):
        out.append(f"gradient norms not finite and positive: {result['grad_norms']}")
    if result["variant"] in ("fsdp-lora", "fsdp-qlora") and not result["adapter"].get("lora_B_nonzero"):
        out.append(f"the gathered adapter has no non-zero lora_B: {result['adapter']}")
    if result["variant"] == "fsdp-compiled" and not result["compiled_layers"]:
        out.append("no decoder layer was compiled")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, help="tokens per row (default: cuda 1024, cpu 64)")
    parser.add_argument("--parallel", type=int, default=3, help="variants at a time")
    parser.add_argument("--timeout", type=float, default=90, help="seconds per variant")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print("RESULT " + json.dumps(worker(job["variant"], job["device"], job["seq_len"], job["steps"])), flush=True)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.device == "cpu" and set(variants) & GPU_ONLY:
        parser.error(f"{', '.join(sorted(set(variants) & GPU_ONLY))} need CUDA")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "no GPU: skipped (bench/gpu_engines.py wraps FSDP2 and DDP on a CUDA GPU; torch sees none here; --device cpu runs gloo)"
        )
        return NO_GPU_EXIT
    seq_len = args.seq_len or (1024 if args.device == "cuda" else 64)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory(prefix="ftl-engines-") as tmp:
        jobs = [
            Job(
                v,
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    json.dumps({"variant": v, "device": args.device, "seq_len": seq_len, "steps": args.steps}),
                ],
                Path(tmp) / f"{v}.log",
                env,
            )
            for v in variants
        ]
        exits = run_jobs(jobs, args.parallel, args.timeout)
        results = {}
        for job in jobs:
            text = job.log.read_text(errors="replace")
            lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
            if exits[job.name][0] != 0 or not lines:
                print(
                    f"--- {job.name} (exit {exits[job.name][0]}), the end of its output:\n{text[-3000:]}",
                    file=sys.stderr,
                )
                results[job.name] = {"variant": job.name, "error": f"exit {exits[job.name][0]}"}
            else:
                results[job.name] = json.loads(lines[-1][len("RESULT ") :])
    failures = []
    print(f"{'variant':<14} {'loss 1':>8} {'loss N':>8} {'grad norm 1':>11} {'peak GiB':>9}  wrapping / problems")
    for name, r in results.items():
        found = problems(r)
        failures += [f"{name}: {p}" for p in found]
        losses = r.get("losses") or [math.nan]
        peak = f"{r['peak_mem_gb']:.2f}" if r.get("peak_mem_gb") is not None else "-"
        norm = f"{r['grad_norms'][0]:.3g}" if r.get("grad_norms") else "-"
        print(
            f"{name:<14} {losses[0]:>8.4f} {losses[-1]:>8.4f} {norm:>11} {peak:>9}  {r.get('wrapped') or '-'}; {'; '.join(found) or 'ok'}"
        )
    same = {n: r["losses"][0] for n, r in results.items() if r.get("losses") and n != "fsdp-qlora"}
    spread = max(same.values()) - min(same.values()) if same else math.nan
    if same and spread > LOSS_TOLERANCE:
        failures.append(f"step-1 losses differ by {spread:.4f} > {LOSS_TOLERANCE}: {same}")
    ok = sum(not problems(r) for r in results.values())
    print(
        f"SUMMARY {ok}/{len(results)} variants wrap and train on {args.device}; step-1 loss spread {spread:.4f} over {len(same)}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
