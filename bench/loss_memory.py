"""Peak memory of one training step with the whole logits (``train.loss=logits``) and in chunks
(``train.loss=chunked``), measured against what the memory planner charges for each.

    python bench/loss_memory.py           # SmolLM2-135M, 4 rows of 512 tokens labelled everywhere, bf16 autocast (~2 min)
    python bench/loss_memory.py --quick   # tiny random Llama: checks the script only

Each loss runs in its own process (the allocator's state does not carry over): the model, fused
AdamW and two warm-up steps, then the peak resident memory (``VmHWM``, reset through
``/proc/self/clear_refs``) over one more forward + backward, minus the resident memory just before
it, and the highest resident memory of each phase (the layers' forward, the head and loss, the
rest of the forward, backward), sampled every 0.5 ms. Every position is labelled (``labels =
input_ids``, as completion data), which is what the planner assumes, so its loss term applies as
it stands. The planner's figure is
:func:`launcher.plan.memory.estimate`'s activations for the same workload: layers + head input +
the loss's buffers. Printed: both peaks, both estimates, and the drop measured against the drop
estimated (goal: within 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GOAL = 0.10
# glibc keeps freed heap resident (and raises its mmap threshold up to 32 MiB as large blocks are
# freed), so resident memory would count buffers long dead; with a fixed 128 KiB mmap threshold and
# no trim threshold every tensor's memory goes back when it is freed and VmRSS follows live tensors.
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(recipe: str, impl: str, rows: int, seq_len: int) -> dict[str, Any]:
    import torch

    from launcher.data.types import IGNORE_INDEX
    from launcher.engines.common import build_param_groups
    from launcher.model.loss import next_token_loss
    from launcher.session import load_config
    from launcher.train.trainer import build_model

    torch.set_num_threads(2)
    cfg = load_config([f"recipe={recipe}", "train.precision=bf16", "train.compile=false"]).cfg
    torch.manual_seed(0)
    model, _ = build_model(cfg, torch.device("cpu"))  # as ftl trains it: fp32 weights, the residual stream in bf16
    model.train()
    opt = torch.optim.AdamW(build_param_groups(model, 0.0), lr=1e-5, fused=True)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    assert IGNORE_INDEX not in labels

    phase = ["forward, layers"]
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda *_: phase.__setitem__(0, "forward, head and loss"))
    head.register_forward_hook(lambda *_: phase.__setitem__(0, "forward, after the head"))

    def step(update: bool) -> None:
        phase[0] = "forward, layers"
        loss = next_token_loss(
            model, {"input_ids": ids}, labels, autocast=torch.autocast("cpu", dtype=torch.bfloat16), impl=impl
        )
        phase[0] = "backward"
        loss.backward()
        if update:
            opt.step()
        opt.zero_grad(set_to_none=False)  # the gradients stay allocated: the measured step starts where a real one does

    for _ in range(2):
        step(update=True)
    before = rss_kib("VmRSS")
    phases: dict[str, float] = {}
    sampling = threading.Event()

    def sample() -> None:  # where the peak is: resident memory every 0.5 ms, the highest per phase
        while not sampling.is_set():
            kib = rss_kib("VmRSS")
            phases[phase[0]] = max(phases.get(phase[0], 0.0), (kib - before) / 1024)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    sampler.start()
    step(update=False)
    sampling.set()
    sampler.join()
    return {"peak_mib": (rss_kib("VmHWM") - before) / 1024, "vocab": vocab, "phases": phases}


def planned(recipe: str, impl: str, rows: int, seq_len: int) -> float:
    from dataclasses import replace

    from launcher.plan.memory import Workload, estimate, layout_named
    from launcher.session import load_config

    cfg = load_config([f"recipe={recipe}"]).cfg
    w = Workload(cfg.model.arch, micro_batch=rows, seq_len=seq_len, precision="bf16", loss=impl)
    return (
        estimate(replace(w), layout_named("single", 1), on_gpu=False).activations / 2**20
    )  # measured on CPU: its chunks


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model: checks the script, not a result")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return []
    recipe, rows, seq_len = ("tiny", 4, 256) if args.quick else ("demo", 4, 512)
    results = []
    for impl in ("logits", "chunked"):
        print(f"bench: train.loss={impl} ...", file=sys.stderr, flush=True)
        spec = json.dumps({"recipe": recipe, "impl": impl, "rows": rows, "seq_len": seq_len})
        out = subprocess.run(
            [sys.executable, __file__, "--worker", spec],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=MALLOC_ENV,
        )
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(
            {
                "loss": impl,
                "measured_mib": measured["peak_mib"],
                "planned_mib": planned(recipe, impl, rows, seq_len),
                "phases": measured["phases"],
            }
        )
    logits, chunked = results
    drop_measured = logits["measured_mib"] - chunked["measured_mib"]
    drop_planned = logits["planned_mib"] - chunked["planned_mib"]
    off = abs(drop_measured - drop_planned) / drop_planned
    print(
        f"recipe={recipe}, {rows} rows × {seq_len} tokens, every position labelled, bf16 autocast"
        + (" (QUICK: not a result)" if args.quick else "")
    )
    print(f"{'train.loss':<10} | {'step peak MiB (measured)':>24} | {'activations MiB (planner)':>25}")
    print(f"{'-' * 10}-|-{'-' * 24}-|-{'-' * 25}")
    for r in results:
        print(f"{r['loss']:<10} | {r['measured_mib']:>24,.0f} | {r['planned_mib']:>25,.0f}")
    names = list(dict.fromkeys(name for r in results for name in r["phases"]))
    print(
        "where the peak is (resident MiB above the step's start, sampled every 0.5 ms): "
        + "; ".join(
            f"{r['loss']}: " + ", ".join(f"{n} {r['phases'][n]:,.0f}" for n in names if n in r["phases"])
            for r in results
        )
    )
    print(
        f"drop: measured {drop_measured:,.0f} MiB, planned {drop_planned:,.0f} MiB: {off:.1%} apart "
        f"(goal <= {GOAL:.0%}: {'yes' if off <= GOAL else 'NO'})"
    )
    return results


if __name__ == "__main__":
    main()
