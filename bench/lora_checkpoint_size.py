"""What a LoRA checkpoint weighs beside its base: the demo model (SmolLM2-135M, peft=lora) trained
``--steps`` steps on the demo's own conversations, saved as a run saves it, against the base model's
weight files, against a checkpoint that would copy the whole model (what ftl saved before: the
frozen base in every checkpoint), and against the raw size of what an exact resume needs: the fp32
adapter and AdamW's two fp32 moments, 12 bytes per trainable parameter (the moments are packed
losslessly: launcher/engines/lossless.py). The moments' top bytes compress less after many steps
than after one, so the default trains 30.

    python bench/lora_checkpoint_size.py            # SmolLM2-135M, recipe=demo peft=lora, strategy=single
    python bench/lora_checkpoint_size.py --quick    # the tiny random Llama: checks the script only

Also timed: naming and hashing the base (:func:`launcher.model.adapters.base_record`), which a LoRA run
does once at start and ``ftl export`` once more.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.config.compose import compose  # noqa: E402
from launcher.config.validate import validate  # noqa: E402
from launcher.engines import build_engine  # noqa: E402
from launcher.model.adapters import _base_dir, base_record  # noqa: E402
from launcher.runtime.device import autocast_dtype  # noqa: E402
from launcher.runtime.distributed import DistInfo  # noqa: E402
from launcher.train.checkpoint import TrainerState, save_checkpoint  # noqa: E402
from launcher.train.trainer import build_model, load_dtype  # noqa: E402

ROWS = (
    "base model weight files",
    "LoRA checkpoint, base copied (before)",
    "LoRA checkpoint, base named and hashed (now)",
    "fp32 adapter + 2 AdamW moments, raw (12 B/param)",
)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def demo_batches(tokenizer: object, steps: int, seq_len: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of two demo conversations each (user and assistant turns as plain text)."""
    from launcher.paths import ROOT

    rows = [
        json.loads(line) for line in (ROOT / "launcher" / "assets" / "demo" / "train.jsonl").read_text().splitlines()
    ]
    texts = ["\n".join(f"{m['role']}: {m['content']}" for m in row["messages"]) for row in rows]
    batches = []
    for i in range(steps):
        pair = [texts[(2 * i) % len(texts)], texts[(2 * i + 1) % len(texts)]]
        enc = tokenizer(pair, return_tensors="pt", padding="max_length", truncation=True, max_length=seq_len)  # type: ignore[operator]
        batches.append((enc["input_ids"], enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)))
    return batches


def measure(quick: bool, steps: int = 30) -> dict[str, Any]:
    raw, _, _ = compose(["recipe=tiny" if quick else "recipe=demo", "peft=lora"])
    cfg, errors = validate(raw)
    assert not errors, errors
    device = torch.device("cpu")
    model, tokenizer = build_model(cfg, device)
    start = time.perf_counter()
    base = base_record(cfg, load_dtype(cfg, autocast_dtype(cfg.train.precision, device)))
    hash_s = time.perf_counter() - start
    engine = build_engine(cfg, model, DistInfo(), device)
    engine.setup(total_steps=max(steps, 10))
    for ids, labels in demo_batches(tokenizer, steps):
        engine.backward(engine.model(input_ids=ids, labels=labels).loss)
        engine.step()
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        path = save_checkpoint(
            Path(run_dir), TrainerState(step=1, base=base), engine, DistInfo(), keep=1, barrier=lambda: None
        )
        save_s = time.perf_counter() - start
        ckpt = dir_bytes(path)
        files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
        from safetensors.torch import save_model

        whole = Path(run_dir) / "whole.safetensors"
        save_model(engine.model, str(whole))  # the model as a checkpoint held it before: base + adapter
        before = ckpt + whole.stat().st_size
    base_dir = _base_dir(cfg.model) if cfg.model.source != "random" else None
    base_bytes = (
        sum(f.stat().st_size for f in base_dir.iterdir() if f.suffix == ".safetensors")
        if base_dir
        else sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "checkpoint": ckpt,
        "before": before,
        "base": base_bytes,
        "floor": 12 * trainable,
        "hash_s": hash_s,
        "save_s": save_s,
        "files": files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=30, help="training steps before the save (default 30)")
    args = parser.parse_args()
    m = measure(args.quick, args.steps)
    if args.quick:
        print("QUICK (tiny model): not a result")
    print(f"{'what':<52} {'MB':>10}")
    for row, key in zip(ROWS, ("base", "before", "checkpoint", "floor")):
        print(f"{row:<52} {m[key] / 1e6:>10.2f}")
    for name, size in m["files"].items():
        print(f"  {name:<50} {size / 1e6:>10.2f}")
    print(
        f"checkpoint / base model: {m['checkpoint'] / m['base']:.4f}   before / now: {m['before'] / m['checkpoint']:.1f}x"
    )
    print(
        f"naming and hashing the base: {m['hash_s']:.2f} s   the save: {m['save_s']:.2f} s ({args.steps} steps trained)"
    )


if __name__ == "__main__":
    main()
