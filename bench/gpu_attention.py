"""Attention over packed rows on a CUDA GPU: transformers' sdpa with its block-diagonal mask against
ftl's ``sdpa_varlen`` as a per-example loop and as one flash varlen call.

    python bench/gpu_attention.py            # Llama-3-8B attention shapes, 4096-token packs, bf16
    python bench/gpu_attention.py --quick    # small and few repeats (the suite's GPU test)
    python bench/gpu_attention.py --mean-len 600

One attention layer, forward + backward, on packs of ``--rows`` × ``--seq-len`` tokens filled with
examples whose lengths are drawn around ``--mean-len`` (the demo data's examples average 85 tokens;
instruction data runs to several hundred). The three sides take turns over ``--rounds`` rounds on
the same tensors and the table prints the median milliseconds per call, each side's speed-up
against transformers' sdpa measured in the same run, and how far its output is from sdpa's (exit 1
beyond bf16 rounding). Without CUDA it prints ``no GPU: skipped`` and
exits 0 (``--require-gpu`` makes that exit 3).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NO_GPU_EXIT = 3
DIFF_LIMIT = 0.02  # max |out - sdpa out| / max |sdpa out|: bf16's rounding step is 2^-7 of the value at most
SIDES = ("sdpa, block-diagonal mask", "sdpa_varlen, loop per example", "sdpa_varlen, one flash varlen call")


def example_lengths(rows: int, seq_len: int, mean_len: int, seed: int = 0) -> list[list[int]]:
    """Per row, lengths filling ``seq_len`` exactly: uniform in [mean/2, 3·mean/2], the last cut to fit."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        row, left = [], seq_len
        while left:
            n = min(left, rng.randint(max(1, mean_len // 2), max(1, 3 * mean_len // 2)))
            row.append(n)
            left -= n
        out.append(row)
    return out


def measure(fn: Callable[[], Any], repeats: int) -> float:
    """Milliseconds per call (CUDA events) after one untimed call."""
    import torch

    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1024-token packs, 2 rounds of 2 calls: checks the path, measures nothing"
    )
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=2, help="packs per micro-batch")
    parser.add_argument("--mean-len", type=int, default=85, help="mean example length in tokens")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="calls per side per round")
    parser.add_argument(
        "--require-gpu", action="store_true", help=f"exit {NO_GPU_EXIT} instead of 0 when there is no GPU"
    )
    parser.add_argument(
        "--require-flash", action="store_true", help="exit 1 when torch's flash varlen kernel is not there"
    )
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no GPU: skipped (bench/gpu_attention.py times attention kernels on a CUDA GPU; torch sees none here)")
        return NO_GPU_EXIT if args.require_gpu else 0
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from launcher.model import attention

    seq_len, rounds, repeats = (1024, 2, 2) if args.quick else (args.seq_len, args.rounds, args.repeats)
    lengths = example_lengths(args.rows, seq_len, args.mean_len)
    position_ids = torch.cat([torch.arange(n) for row in lengths for n in row]).view(args.rows, seq_len).cuda()
    owner = (
        torch.cat([torch.full((n,), i) for row in lengths for i, n in enumerate(row)]).view(args.rows, seq_len).cuda()
    )
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device="cuda").tril()
    block_mask = ((owner[:, :, None] == owner[:, None, :]) & causal)[
        :, None
    ]  # [rows, 1, L, L], as transformers builds it
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = args.heads // args.kv_heads, True
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(
            args.rows, h, seq_len, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=g
        ).requires_grad_()
        for h in (args.heads, args.kv_heads, args.kv_heads)
    )
    grad = torch.randn(args.rows, seq_len, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    kernel = attention.varlen_attn
    no_flash = kernel is None or not attention.one_kernel(q, 0.0)
    if no_flash:
        print(
            f"gpu_attention: no flash varlen kernel here (torch {torch.__version__}, {torch.cuda.get_device_name(0)}); "
            "the one-call side runs the loop",
            file=sys.stderr,
        )

    def step(side: int) -> torch.Tensor:
        q.grad = k.grad = v.grad = None
        if side == 0:
            out, _ = sdpa_attention_forward(module, q, k, v, block_mask, scaling=args.head_dim**-0.5)
        else:
            attention.varlen_attn = None if side == 1 else kernel
            out, _ = attention.varlen_attention_forward(
                module, q, k, v, None, scaling=args.head_dim**-0.5, position_ids=position_ids
            )
        out.backward(grad)
        return out.detach()

    times: list[list[float]] = [[] for _ in SIDES]
    try:
        reference = step(0)  # the sides compute the same attention (bf16 rounding apart)
        diffs = [float((step(side) - reference).abs().max() / reference.abs().max()) for side in range(len(SIDES))]
        for _ in range(rounds):
            for side in range(len(SIDES)):
                times[side].append(measure(lambda side=side: step(side), repeats))
    finally:
        attention.varlen_attn = kernel
    examples = sum(len(row) for row in lengths)
    print(
        f"gpu_attention: {torch.cuda.get_device_name(0)}, {args.rows} x {seq_len} tokens in {examples} examples "
        f"(mean {args.rows * seq_len / examples:.0f}), {args.heads}/{args.kv_heads} heads x {args.head_dim}, bf16, "
        f"forward + backward, median of {rounds} rounds x {repeats} calls"
    )
    base = statistics.median(times[0])
    width = max(map(len, SIDES))
    print(f"{'attention'.ljust(width)} | ms/call | vs sdpa | max |out - sdpa out| / max |sdpa out|")
    print(f"{'-' * width}-|---------|---------|-------------------------------------")
    for name, ts, diff in zip(SIDES, times, diffs):
        ms = statistics.median(ts)
        print(f"{name.ljust(width)} | {ms:7.2f} | {base / ms:6.2f}x | {diff:.2e}")
    if args.quick:
        print("quick mode: small packs and few calls; these numbers are no result.")
    speedups = ", ".join(
        f"{name.split(', ')[-1]} {base / statistics.median(ts):.2f}x" for name, ts in zip(SIDES[1:], times[1:])
    )
    print(f"SUMMARY vs sdpa's mask: {speedups}; max output difference {max(diffs):.1e} (limit {DIFF_LIMIT})")
    if max(diffs) > DIFF_LIMIT:
        print(
            f"gpu_attention: outputs differ by more than {DIFF_LIMIT:.0%} of their largest value (bf16 rounding): "
            "not the same attention",
            file=sys.stderr,
        )
        return 1
    if no_flash and args.require_flash:
        print("gpu_attention: --require-flash, and the one flash varlen call did not run", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
