"""How long training waits for a checkpoint, synchronous against async (checkpoint.async_save).

    python bench/checkpoint_bench.py            # SmolLM2-135M (recipe=demo) and a 190M random Llama, single and fsdp
    python bench/checkpoint_bench.py --quick    # the tiny random Llama: checks the script only

For each model and engine (one CPU process; fsdp unsharded, through torch.distributed.checkpoint),
one optimizer step gives AdamW its moments, so the checkpoint has a real run's size. Then
``--rounds`` saves each way through :class:`launcher.train.checkpoint.Checkpointer`, all in the
same run: "blocking" is what the trainer waits (sync: the whole save, with fsync, sha256 and the
marker; async: the host copy, then training goes on), "published" is until the save is published
(async: written by the background thread while nothing else runs here). Medians; the ratio is sync
blocking over async blocking.
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
from launcher.quiet import install  # noqa: E402
from launcher.runtime.distributed import DistInfo  # noqa: E402
from launcher.train.checkpoint import Checkpointer, TrainerState  # noqa: E402
from launcher.train.trainer import build_model  # noqa: E402

# A Llama of about 190M parameters, randomly initialised (recipe=tiny's tokenizer: a 512-token vocabulary).
LARGER = [
    "recipe=tiny",
    "model.name=random-190m",
    "model.arch.hidden_size=1024",
    "model.arch.intermediate_size=4096",
    "model.arch.num_layers=12",
    "model.arch.num_heads=16",
    "model.arch.num_kv_heads=8",
]
MODELS = {"SmolLM2-135M (recipe=demo)": ["recipe=demo"], "random Llama 190M": LARGER}
QUICK_MODELS = {"tiny-llama (recipe=tiny)": ["recipe=tiny"]}
ENGINES = ("single", "fsdp")
COLUMNS = ("sync blocking", "async blocking", "async published", "sync / async")


def measure(overrides: list[str], engine_name: str, rounds: int, where: str) -> tuple[float, dict[str, float]]:
    """(checkpoint GB, median seconds per column) for one model and engine."""
    raw, _, _ = compose([*overrides, "train.precision=fp32", f"strategy={engine_name}"])
    cfg, errors = validate(raw)
    assert not errors, errors
    device = torch.device("cpu")
    model, _ = build_model(cfg, device)
    engine = build_engine(cfg, model, DistInfo(), device)
    engine.setup(total_steps=10)
    ids = torch.randint(0, 100, (1, 32))
    engine.backward(engine.model(input_ids=ids, labels=ids).loss)
    engine.step()
    times: dict[str, list[float]] = {"sync": [], "async": [], "published": []}
    size = 0.0
    for background in (False, True):
        with tempfile.TemporaryDirectory(dir=where) as run_dir:
            saver = Checkpointer(Path(run_dir), engine, DistInfo(), keep=1, background=background, barrier=lambda: None)
            for step in range(1, rounds + 1):
                start = time.perf_counter()
                path = saver.save(TrainerState(step=step))
                blocked = time.perf_counter() - start
                saver.wait()
                times["async" if background else "sync"].append(blocked)
                if background:
                    times["published"].append(time.perf_counter() - start)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9
    sync, staged, published = (statistics.median(times[k]) for k in ("sync", "async", "published"))
    return size, dict(zip(COLUMNS, (sync, staged, published, sync / staged)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: the temp dir)")
    args = parser.parse_args()
    install()
    torch.manual_seed(0)
    models = QUICK_MODELS if args.quick else MODELS
    rounds = 1 if args.quick else args.rounds
    quick = "  QUICK (tiny model): not a result" if args.quick else ""
    print(f"checkpoint blocking time on CPU, {rounds} round(s) each, medians, seconds{quick}")
    print(f"{'model':28} {'engine':7} {'GB':>6} " + " ".join(f"{c:>16}" for c in COLUMNS))
    for label, overrides in models.items():
        for engine_name in ENGINES:
            size, row = measure(overrides, engine_name, rounds, args.dir or tempfile.gettempdir())
            cells = [f"{row[c]:16.3f}" for c in COLUMNS[:-1]] + [f"{row[COLUMNS[-1]]:15.1f}x"]
            print(f"{label:28} {engine_name:7} {size:6.2f} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
