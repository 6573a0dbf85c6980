"""Data pipeline benchmark: tokenization throughput and packing efficiency, on the demo data and
on a synthetic 100k-example set generated here (no network, no downloads).

    python bench/data_bench.py            # demo + 100k synthetic rows (a few minutes on 2 cores)
    python bench/data_bench.py --quick    # demo + 2k synthetic rows (what the test suite runs)

Tokenization goes through the real formats (chat template rendering, assistant-only masks) with
the tiny BPE tokenizer in launcher/assets, each data set twice in the same run: without the
privacy scan (data.privacy=off: "ex/s") and with it (warn: "ex/s scanned"; "scan cost" is the
extra time). Packing is best-fit decreasing into ``seq_len``;
efficiency is real tokens / (packs x seq_len); "bound" is the best any packer that keeps examples
whole could reach, total tokens / (ceil(total / seq_len) x seq_len). Goal: >= 99.5% on the
synthetic set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.config.schema import DataConfig  # noqa: E402
from launcher.data.build import build_datasets  # noqa: E402
from launcher.data.packing import pack_lengths, packing_efficiency  # noqa: E402
from launcher.paths import asset  # noqa: E402

GOAL = 0.995
WORDS = (
    "the model trains on every rank and saves a checkpoint after each epoch while the launcher "
    "writes metrics shards gradients across nodes with zero stage three offload optimizer states "
    "to host memory learning rate warmup cosine schedule tokens per second packing efficiency"
).split()


def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Instruction rows with long-tailed lengths (log-normal word counts), like real SFT data."""
    rng = random.Random(seed)

    def text(mu: float, sigma: float) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.lognormvariate(mu, sigma)))))

    return [
        {"instruction": text(3.0, 0.7), "input": text(2.0, 1.0) if rng.random() < 0.3 else "", "output": text(4.0, 0.8)}
        for _ in range(n)
    ]


def measure(name: str, cfg: DataConfig, tokenizer: Any, seq_lens: list[int], max_len: int) -> list[dict[str, Any]]:
    """Tokenized without the privacy scan (data.privacy=off), then again with it (warn), after a
    warm-up build of 20 rows (the chat template compiles once; the scan's libraries load once, ~1 s)."""
    build_datasets(replace(cfg, privacy="warn", max_train_examples=20), tokenizer, max_len, seed=0)
    start = time.perf_counter()
    train, _ = build_datasets(replace(cfg, privacy="off"), tokenizer, max_len, seed=0)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    scanned, _ = build_datasets(replace(cfg, privacy="warn"), tokenizer, max_len, seed=0)
    scan_seconds = time.perf_counter() - start
    assert scanned.examples == train.examples and not scanned.stats["privacy"]  # clean text: the same tokens
    lengths = [len(e["input_ids"]) for e in train.examples]
    tokens = sum(lengths)
    rows = []
    for seq_len in seq_lens:
        fits = [n for n in lengths if n <= seq_len]  # longer ones would be clipped at this seq_len
        fitted = [min(n, seq_len) for n in lengths]
        start = time.perf_counter()
        packs = pack_lengths(fitted, seq_len)
        pack_seconds = time.perf_counter() - start
        total = sum(fitted)
        rows.append(
            {
                "data": name,
                "format": cfg.format,
                "examples": len(lengths),
                "tokens": tokens,
                "tokenize_s": seconds,
                "examples_per_s": len(lengths) / seconds,
                "scan_examples_per_s": len(lengths) / scan_seconds,
                "scan_cost": scan_seconds / seconds - 1,
                "tokens_per_s": tokens / seconds,
                "seq_len": seq_len,
                "clipped": len(lengths) - len(fits),
                "packs": len(packs),
                "efficiency": packing_efficiency(total, len(packs), seq_len),
                "bound": total / (math.ceil(total / seq_len) * seq_len),
                "pack_ms": pack_seconds * 1e3,
            }
        )
    return rows


def run(quick: bool, n_synthetic: Optional[int] = None) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))
    tokenizer.model_max_length = 1 << 30  # long rows are clipped by seq_len, not warned about
    n = n_synthetic or (2_000 if quick else 100_000)
    rows = measure("demo", DataConfig(train_files=[asset("demo/train.jsonl")]), tokenizer, [256, 512, 1024, 2048], 2048)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(n)))
        rows += measure(
            f"synthetic {n // 1000}k",
            DataConfig(format="instruction", train_files=[str(path)]),
            tokenizer,
            [2048, 4096],
            4096,
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    columns = [
        ("data", "data", "{}"),
        ("format", "format", "{}"),
        ("examples", "examples", "{:,}"),
        ("tokens", "tokens", "{:,}"),
        ("examples_per_s", "ex/s", "{:,.0f}"),
        ("scan_examples_per_s", "ex/s scanned", "{:,.0f}"),
        ("scan_cost", "scan cost", "{:+.0%}"),
        ("tokens_per_s", "tok/s", "{:,.0f}"),
        ("seq_len", "seq_len", "{}"),
        ("packs", "packs", "{:,}"),
        ("efficiency", "efficiency", "{:.2%}"),
        ("bound", "bound", "{:.2%}"),
        ("pack_ms", "pack ms", "{:,.0f}"),
    ]
    cells = [[title for _, title, _ in columns]] + [[fmt.format(r[key]) for key, _, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells
    ]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2k synthetic rows instead of 100k")
    parser.add_argument("--synthetic", type=int, help="number of synthetic rows (overrides --quick)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = run(args.quick, args.synthetic)
    print(table(rows))
    synthetic = [r for r in rows if r["data"].startswith("synthetic")]
    worst = min(r["efficiency"] for r in synthetic)
    print(f"\nsynthetic packing efficiency >= {GOAL:.1%}: {'yes' if worst >= GOAL else 'NO'} (worst {worst:.2%})")
    return rows


if __name__ == "__main__":
    main()
