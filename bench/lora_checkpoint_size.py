"""What a LoRA checkpoint weighs beside its base: the demo model (SmolLM2-135M, peft=lora) trained
one step, saved as a run saves it, against the base model's weight files and against a checkpoint
that would copy the whole model (what ftl saved before: the frozen base in every checkpoint), and
against the floor of an exact resume: the fp32 adapter and AdamW's two fp32 moments, 12 bytes per
trainable parameter.

    python bench/lora_checkpoint_size.py            # SmolLM2-135M, recipe=demo peft=lora, strategy=single
    python bench/lora_checkpoint_size.py --quick    # the tiny random Llama: checks the script only

Also timed: naming and hashing the base (:func:`launcher.model.adapters.base_record`), which a LoRA run
does once at start and ``ftl export`` once more.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

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
    "floor: fp32 adapter + 2 AdamW moments (12 B/param)",
)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(quick: bool) -> dict[str, float]:
    raw, _, _ = compose(["recipe=tiny" if quick else "recipe=demo", "peft=lora"])
    cfg, errors = validate(raw)
    assert not errors, errors
    device = torch.device("cpu")
    model, _ = build_model(cfg, device)
    start = time.perf_counter()
    base = base_record(cfg, load_dtype(cfg, autocast_dtype(cfg.train.precision, device)))
    hash_s = time.perf_counter() - start
    engine = build_engine(cfg, model, DistInfo(), device)
    engine.setup(total_steps=10)
    ids = torch.randint(0, 100, (1, 32))
    engine.backward(engine.model(input_ids=ids, labels=ids).loss)
    engine.step()
    with tempfile.TemporaryDirectory() as run_dir:
        path = save_checkpoint(
            Path(run_dir), TrainerState(step=1, base=base), engine, DistInfo(), keep=1, barrier=lambda: None
        )
        ckpt = dir_bytes(path)
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
    return {"checkpoint": ckpt, "before": before, "base": base_bytes, "floor": 12 * trainable, "hash_s": hash_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    m = measure(args.quick)
    if args.quick:
        print("QUICK (tiny model): not a result")
    print(f"{'what':<52} {'MB':>10}")
    for row, key in zip(ROWS, ("base", "before", "checkpoint", "floor")):
        print(f"{row:<52} {m[key] / 1e6:>10.2f}")
    print(
        f"checkpoint / base model: {m['checkpoint'] / m['base']:.4f}   before / now: {m['before'] / m['checkpoint']:.1f}x"
    )
    print(f"naming and hashing the base: {m['hash_s']:.2f} s")


if __name__ == "__main__":
    main()
