"""What hashing a checkpoint's files costs: the demo model's checkpoint saved, then hashed, then verified.

    python bench/checkpoint_hash.py            # SmolLM2-135M full fine-tune (weights + AdamW moments), strategy=single
    python bench/checkpoint_hash.py --quick    # the tiny random Llama: checks the script only

One optimizer step on one short batch gives the optimizer its moments, so the checkpoint has the
size a demo run's has. Then, ``--rounds`` times: :func:`launcher.train.checkpoint.save_checkpoint`
(engine files, fsync, sha256 of every file, marker), the hashing alone (the files were just written:
read back from the page cache, as in a save), and :func:`launcher.train.checkpoint.verify` (what a
resume or an export reads first). Medians are printed with the hashing's share of the save.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.config.compose import compose  # noqa: E402
from launcher.config.validate import validate  # noqa: E402
from launcher.engines import build_engine  # noqa: E402
from launcher.files import file_hashes  # noqa: E402
from launcher.runtime.distributed import DistInfo  # noqa: E402
from launcher.train.checkpoint import TrainerState, save_checkpoint, verify  # noqa: E402
from launcher.train.trainer import build_model  # noqa: E402

ROWS = ("save (engine files, fsync, sha256, marker)", "sha256 of every file (threads)", "verify (sizes, steps, sha256)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    raw, _, _ = compose(["recipe=tiny" if args.quick else "recipe=demo", "train.precision=fp32"])
    cfg, errors = validate(raw)
    assert not errors, errors
    device = torch.device("cpu")
    model, _ = build_model(cfg, device)
    engine = build_engine(cfg, model, DistInfo(), device)
    engine.setup(total_steps=10)
    ids = torch.randint(0, 100, (1, 32))
    engine.backward(engine.model(input_ids=ids, labels=ids).loss)
    engine.step()
    saves, hashes, verifies = [], [], []
    with tempfile.TemporaryDirectory() as run_dir:
        for step in range(1, args.rounds + 1):
            start = time.perf_counter()
            path = save_checkpoint(
                Path(run_dir), TrainerState(step=step), engine, DistInfo(), keep=1, barrier=lambda: None
            )
            saves.append(time.perf_counter() - start)
            files = [f for f in sorted(path.rglob("*")) if f.is_file()]
            start = time.perf_counter()
            file_hashes(files)
            hashes.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert verify(path) is None
            verifies.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in files)
    save, hashed, verified = (statistics.median(x) for x in (saves, hashes, verifies))
    quick = " QUICK (tiny model): not a result" if args.quick else ""
    print(
        f"checkpoint: {len(files)} files, {size / 1e9:.2f} GB ({cfg.model.name}, {args.rounds} rounds, medians){quick}"
    )
    print(f"{ROWS[0]:45} {save:7.2f} s")
    print(
        f"{ROWS[1]:45} {hashed:7.2f} s  {hashed / save:5.1%} of the save (which includes it), {size / max(hashed, 1e-9) / 1e9:.2f} GB/s"
    )
    print(f"{ROWS[2]:45} {verified:7.2f} s")


if __name__ == "__main__":
    main()
