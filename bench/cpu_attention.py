"""Packed attention on CPU, one layer: the short-example path and the one-operator path against SDPA
one example at a time.

    python bench/cpu_attention.py            # SmolLM2-135M's heads, 4 packs of 512 tokens (~1 min on 2 cores)
    python bench/cpu_attention.py --quick    # small shapes, 2 rounds: checks the script only

What is timed: forward + backward of one layer's packed attention under bf16 autocast, as in
training, on bf16 queries, keys and values (what ``sdpa_varlen`` gets there), 9 query heads over
3 key/value heads of 64 dims, each 512-token row packed with examples of 20-150 tokens (the demo
data's range), through

* ``SDPA one by one``: :func:`launcher.model.attention.sdpa_per_example`, SDPA's math kernel on
  each example (ftl's CPU path before the short-example path);
* ``short-example path``: :func:`launcher.model.attention.per_example`, what ``sdpa_varlen`` runs
  in eager layers (autograd records each example's ops and keeps their fp32 probabilities);
* ``one operator``: ``ftl::packed_attention_v2`` (:mod:`launcher.model.attention_op`), what compiled
  layers call: the same math with its own backward, which keeps each example's fp32 probabilities
  as autograd over the loop does; its output is in the layout the layer wants next ([b, L, heads, d]),
  so it includes the copy into that layout that the other two leave to their caller.

The three take turns, round after round; each row is the median over rounds of the mean of 3 runs,
wall time and the process's CPU time (the latter moves less when a shared machine's other
tenants take cores away). The outputs are compared first (bf16 rounding apart).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIDES = ("SDPA one by one", "short-example path", "one operator")


def packed_lengths(rows: int, width: int, longest: int = 150, seed: int = 0) -> list[int]:
    """Example lengths filling ``rows`` packs of ``width`` tokens, 20-``longest`` each (the last one fills up)."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(rows):
        row: list[int] = []
        while sum(row) < width - longest:
            row.append(rng.randint(20, longest))
        lengths += [*row, width - sum(row)]
    return lengths


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    import torch

    from launcher.model import attention, attention_op  # noqa: F401 (its operator)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds: checks the script, not a result")
    parser.add_argument("--rounds", type=int, default=None, help="rounds taking turns (default 12; quick 2)")
    args = parser.parse_args(argv)
    rows, width, heads, kv_heads, dim = (2, 128, 4, 2, 16) if args.quick else (4, 512, 9, 3, 64)
    rounds = args.rounds or (2 if args.quick else 12)
    lengths = packed_lengths(rows, width, longest=min(150, width // 3))
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (
        torch.randn(rows, h, width, dim, generator=g, dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads)
    )
    grad = torch.randn(1, heads, rows * width, dim, generator=g, dtype=torch.bfloat16)
    positions = torch.cat([torch.arange(n) for n in lengths]).view(rows, width)

    def one_operator(q: Any, k: Any, v: Any, lengths: list[int], *, scale: float, **_: Any) -> Any:
        return attention_op.packed_attention(q, k, v, positions, scale)[0]

    sides: dict[str, Callable[..., Any]] = dict(
        zip(SIDES, (attention.sdpa_per_example, attention.per_example, one_operator))
    )
    # the operator's output and its gradient are [b, L, heads, d]; the loops' [1, heads, b·L, d]
    grads = {
        f: grad[0].reshape(heads, rows, width, dim).permute(1, 2, 0, 3).contiguous() if f is one_operator else grad
        for f in sides.values()
    }

    def run(f: Callable[..., Any]) -> Any:
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = f(q, k, v, lengths, scale=dim**-0.5, dropout=0.0, window=None)
        out.backward(grads[f])
        return out.detach()

    reference, fast, operator = (run(f).float() for f in sides.values())
    torch.testing.assert_close(fast, reference, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(operator.permute(2, 0, 1, 3).reshape(reference.shape), reference, rtol=1.6e-2, atol=1e-2)
    wall: dict[str, list[float]] = {s: [] for s in SIDES}
    cpu: dict[str, list[float]] = {s: [] for s in SIDES}
    for _ in range(rounds):
        for side, f in sides.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(3):
                run(f)
            wall[side].append((time.perf_counter() - start) / 3 * 1e3)
            cpu[side].append((time.process_time() - start_cpu) / 3 * 1e3)
    result = {s: {"wall_ms": statistics.median(wall[s]), "cpu_ms": statistics.median(cpu[s])} for s in SIDES}
    print(
        f"{rows} packs of {width} tokens, {len(lengths)} examples, {heads} query / {kv_heads} key-value heads of {dim}, bf16, "
        f"bf16 autocast, forward + backward, {rounds} rounds taking turns, {torch.get_num_threads()} threads"
        + (" (QUICK: not a result)" if args.quick else "")
    )
    print(f"{'path':<20} | {'wall ms':>8} | {'CPU ms':>8}")
    print(f"{'-' * 20}-|-{'-' * 8}-|-{'-' * 8}")
    for side in SIDES:
        print(f"{side:<20} | {result[side]['wall_ms']:>8.1f} | {result[side]['cpu_ms']:>8.1f}")
    base = result[SIDES[0]]
    for side in SIDES[1:]:
        new = result[side]
        print(
            f"speed-up of {side}: {base['wall_ms'] / new['wall_ms']:.2f}x wall, {base['cpu_ms'] / new['cpu_ms']:.2f}x CPU time"
        )
    return result


if __name__ == "__main__":
    main()
