"""Validate the memory planner: predicted model-state bytes per rank against what the engines hold.

For each strategy, ranks build the real engine (:mod:`launcher.engines`) on CPU around a model,
train one optimizer step, then run the next step's micro-batches and, after each backward (the
point where parameters, gradients and optimizer states are all alive and the activations are
freed), sum the bytes of every tensor storage alive in the process, found through the garbage
collector and counted once per storage (views and flat buffers share one). The input batch and the
model's non-parameter buffers (RoPE frequencies) are left out, and so is whatever an earlier case
left alive in the same process (measured before the model is built). The peak over the micro-batches is
the measured model-state size; :func:`launcher.plan.memory.estimate`'s params + grads + optimizer (+
what it puts in host memory, which is the same memory on CPU) is the prediction.

Not measured here: activations and workspace (they need a GPU's allocator to mean anything), and
tensors held only inside C++ (DDP's gradient buckets, which the planner counts as buffers).

    python bench/planner_validation.py --quick        # tiny Llama, fp32 and bf16, 2 ranks: ~1-2 min on 2 cores
    python bench/planner_validation.py                 # + SmolLM2-135M and ZeRO-3 offload: several minutes

Exit status 1 when a row is off by more than --tolerance (default 10%).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (name, strategy overrides, grad_accum): each runs on 2 ranks except single.
CASES: dict[str, tuple[list[str], int]] = {
    "single": (["strategy=single"], 1),
    "ddp": (["strategy=ddp"], 1),
    "zero1": (["strategy=zero1"], 1),
    "zero1_accum2": (["strategy=zero1"], 2),
    "zero2": (["strategy=zero2"], 1),
    "zero3": (["strategy=zero3"], 1),
    "fsdp": (["strategy=fsdp"], 1),
    "fsdp_accum2": (["strategy=fsdp"], 2),
    "zero3_offload": (["strategy=zero3_offload", "strategy.activation_checkpointing=false"], 1),
}
QUICK_CASES = ["single", "ddp", "zero1", "zero1_accum2", "zero2", "zero3", "fsdp", "fsdp_accum2"]
MODELS = {"tiny": ["recipe=tiny"], "smollm2": ["recipe=demo"]}
MICRO_BATCH, SEQ_LEN = 2, 32


def compose_cfg(model: str, case: str, precision: str, world: int) -> Any:
    from launcher.config.compose import compose
    from launcher.config.validate import validate

    overrides, accum = CASES[case]
    raw, _, errors = compose(
        [
            *MODELS[model],
            *overrides,
            f"launch.nproc_per_node={world}",
            f"train.precision={precision}",
            "train.device=cpu",
            f"train.micro_batch_size={MICRO_BATCH}",
            f"train.seq_len={SEQ_LEN}",
            f"train.grad_accum={accum}",
            "wandb.mode=disabled",
            "eval.after_training=false",
            "eval.before_training=false",
        ]
    )
    cfg, more = validate(raw)
    if errors or more:
        raise SystemExit(f"{model}/{case}: invalid config: {[str(e) for e in errors + more]}")
    return cfg


def predicted(cfg: Any, precision: str) -> dict[str, float]:
    from launcher.plan.memory import estimate
    from launcher.plan.report import layout_for, workload_of

    w, lay = workload_of(cfg, precision), layout_for(cfg)
    e = estimate(w, lay, on_gpu=False)
    # params: the partition each rank owns, wherever it lives (offload puts it in host memory)
    partition = estimate(
        w, replace(lay, traits=replace(lay.traits, offload_params=False, offload_optimizer=False)), on_gpu=False
    )
    return {"params": partition.params, "states": e.model_states + e.host}


# --------------------------------------------------------------------------------------------
# inside a rank


def live_tensor_bytes(exclude: list[Any]) -> int:
    """Bytes of every distinct tensor storage alive in this process, minus ``exclude``'s.

    The garbage collector sees every tensor Python holds; gradients autograd wrote (``.grad``) have
    no Python object until asked for, so each leaf's ``.grad`` is read too. A DTensor counts through
    its local shard."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        t = getattr(t, "_local_tensor", t)
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return  # no storage of its own (a functional or wrapper tensor): its bytes are counted where they live
        ptr = storage.data_ptr()
        if ptr and ptr not in seen and ptr not in skip and t.device.type != "meta":
            seen.add(ptr)
            total += storage.nbytes()

    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            add(obj)
            if obj.is_leaf and obj.requires_grad and obj.grad is not None:
                add(obj.grad)
    return total


def measure(cfg: Any, precision: str) -> dict[str, float]:
    import torch

    from launcher.engines import build_engine
    from launcher.model.loading import load_model_and_tokenizer
    from launcher.runtime.distributed import read_dist_env
    from launcher.train.telemetry import local_param_bytes

    torch.manual_seed(0)
    gc.collect()
    before = live_tensor_bytes([])  # what earlier cases in this process left behind
    dist = read_dist_env()
    device = torch.device("cpu")
    model, _ = load_model_and_tokenizer(cfg.model, dtype=torch.float32)
    engine = build_engine(cfg, model, dist, device)
    engine.setup(total_steps=4)
    vocab = cfg.model.arch.vocab_size
    ids = torch.randint(0, vocab, (MICRO_BATCH, SEQ_LEN))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    buffers = [b for b in engine.model.buffers()]
    accum = cfg.train.grad_accum
    peak = 0

    for i in range(accum):  # step 1 creates the optimizer states
        _micro_batch(engine, batch, last=i == accum - 1)
    engine.step()
    for i in range(accum):
        _micro_batch(engine, batch, last=i == accum - 1)
        gc.collect()
        peak = max(peak, live_tensor_bytes([ids, batch["attention_mask"], *buffers]))
    engine.step()
    params = local_param_bytes(engine.model)
    del engine, model
    gc.collect()
    return {"params": params, "states": peak - before}


def _micro_batch(engine: Any, batch: dict[str, Any], last: bool) -> None:
    from launcher.model.loss import next_token_loss

    ids = batch["input_ids"]
    with engine.grad_sync(last):
        loss = next_token_loss(engine.model, batch, ids, autocast=engine.autocast()) / ids.numel()
        engine.backward(loss)


def worker(args: argparse.Namespace) -> None:
    import torch

    from launcher.runtime.distributed import destroy, init_distributed, read_dist_env

    torch.set_num_threads(1)
    dist = read_dist_env()
    rows = []
    for case in args.cases:
        cfg = compose_cfg(args.model, case, args.precision, dist.world_size)
        init_distributed(cfg.launch, torch.device("cpu"))
        got = measure(cfg, args.precision)
        rows.append(
            {
                "model": args.model,
                "case": case,
                "precision": args.precision,
                "world": dist.world_size,
                "measured": got,
                "predicted": predicted(cfg, args.precision),
            }
        )
    if dist.is_main:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    destroy()


# --------------------------------------------------------------------------------------------
# the driver


def run_ranks(model: str, cases: list[str], precision: str, world: int, out: Path, timeout: float) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    script = [
        str(Path(__file__).resolve()),
        "--worker",
        "--model",
        model,
        "--precision",
        precision,
        "--out",
        str(out),
        "--cases",
        *cases,
    ]
    if world == 1:
        cmd = [sys.executable, *script]
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(k, None)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *script]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(
            f"{model} {precision} {cases} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )


@dataclass
class Row:
    model: str
    case: str
    precision: str
    world: int
    pred_params: float
    meas_params: float
    pred_states: float
    meas_states: float

    @property
    def error(self) -> float:
        return (self.pred_states - self.meas_states) / self.meas_states


def table(rows: list[Row]) -> str:
    mib = 2**20
    head = (
        f"{'model':<8} {'strategy':<14} {'prec':<5} {'ranks':>5} {'params pred':>12} {'params meas':>12} "
        f"{'states pred':>12} {'states meas':>12} {'error':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.model:<8} {r.case:<14} {r.precision:<5} {r.world:>5} {r.pred_params / mib:>10.3f}Mi {r.meas_params / mib:>10.3f}Mi "
            f"{r.pred_states / mib:>10.3f}Mi {r.meas_states / mib:>10.3f}Mi {r.error:>+7.1%}"
        )
    lines.append("(per rank; states = params + grads + optimizer states, measured at their peak within a step)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model only, no offload")
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="default: tiny (--quick) or tiny smollm2")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--cases", nargs="+", choices=list(CASES), help="default: all (quick: all but zero3_offload)")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    p.add_argument("--json", help="also write the rows to this file")
    # internal: one launch's ranks
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    models = args.models or (["tiny"] if args.quick else list(MODELS))
    cases = args.cases or (QUICK_CASES if args.quick else list(CASES))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        for model in models:
            for precision in args.precisions:
                if "single" in cases:
                    run_ranks(model, ["single"], precision, 1, out, args.timeout)
                multi = [c for c in cases if c != "single"]
                if multi:
                    run_ranks(model, multi, precision, 2, out, args.timeout)
        raw = [json.loads(line) for line in out.read_text().splitlines()]
    rows = [
        Row(
            r["model"],
            r["case"],
            r["precision"],
            r["world"],
            r["predicted"]["params"],
            r["measured"]["params"],
            r["predicted"]["states"],
            r["measured"]["states"],
        )
        for r in raw
    ]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    bad = [r for r in rows if abs(r.error) > args.tolerance]
    if bad:
        print(
            f"\n{len(bad)} row(s) off by more than {args.tolerance:.0%}: "
            + ", ".join(f"{r.model}/{r.case}/{r.precision}" for r in bad)
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
