"""How ranks build the model (``Engine.model_loading``): under FSDP with ``load_on_rank0`` only rank 0
reads the weights; the other rank builds the model on the meta device and gets its shards, and the
non-persistent buffers, from rank 0. Under ZeRO-3 with ``zero3_init`` every tensor is partitioned
as it is made. Either way the engine ends up with exactly the weights and buffers a plain load
gives. Two gloo ranks started by torchrun."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ftl_env

from launcher.paths import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = """
import os
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from launcher.session import load_config
from launcher.runtime.distributed import init_distributed
from launcher.engines import build_engine
from launcher.model.loading import load_model_and_tokenizer
from launcher.model.adapters import apply_peft
from launcher.train.trainer import build_model, seed_everything

out, overrides = Path(sys.argv[1]), sys.argv[2:]
cfg = load_config(["recipe=tiny", "launch.nproc_per_node=2", "wandb.mode=disabled", *overrides]).cfg
cpu = torch.device("cpu")
info = init_distributed(cfg.launch, cpu)
seed_everything(cfg.train.seed)
model, _ = build_model(cfg, cpu, info)
base = [p for name, p in model.named_parameters() if "lora_" not in name]
if cfg.strategy.engine == "fsdp":  # rank 0 loads, the other rank's model is on the meta device
    on_meta = [p.is_meta for p in base]
    expect_meta = cfg.strategy.load_on_rank0 and info.rank != 0
    assert all(on_meta) if expect_meta else not any(on_meta), (info.rank, sum(on_meta), len(on_meta))
else:  # ZeRO-3: every tensor partitioned as it was made; a rank holds its partition only
    partitioned = [hasattr(p, "ds_id") and p.numel() < p.ds_numel for p in base]
    assert all(partitioned) if cfg.strategy.zero3_init else not any(partitioned), (info.rank, sum(partitioned), len(partitioned))

engine = build_engine(cfg, model, info, cpu)
engine.setup(10)
full = engine.consolidated_state_dict()
buffers = {name: b.clone() for name, b in model.named_buffers()}
gathered = [None, None]
dist.all_gather_object(gathered, buffers)
if info.rank == 0:
    seed_everything(cfg.train.seed)  # what every rank loaded before: the reference
    reference, _ = load_model_and_tokenizer(cfg.model)
    reference = apply_peft(reference, cfg.peft)
    want = reference.state_dict()
    assert sorted(full) == sorted(want), sorted(set(full) ^ set(want))
    for name, tensor in want.items():
        assert torch.equal(full[name], tensor), (name, full[name].shape, tensor.shape)
    ref_buffers = dict(reference.named_buffers())
    assert ref_buffers and all(sorted(g) == sorted(ref_buffers) for g in gathered)
    for g in gathered:
        for name, b in ref_buffers.items():
            assert torch.equal(g[name], b), name
(out / f"rank{info.rank}.ok").write_text("ok")
dist.barrier()
os._exit(0)  # as launcher.train does: DeepSpeed's C++ teardown can abort a finished rank
"""


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe's random model, saved as a Hugging Face directory."""
    from launcher.model.loading import load_model_and_tokenizer
    from launcher.session import load_config

    out = tmp_path_factory.mktemp("tiny-hf")
    model, tokenizer = load_model_and_tokenizer(load_config(["recipe=tiny"]).cfg.model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=fsdp", "strategy.load_on_rank0=true"],
        ["strategy=fsdp", "strategy.load_on_rank0=true", "peft=lora", "peft.r=4"],
        ["strategy=fsdp", "strategy.load_on_rank0=false"],
        ["strategy=zero3", "strategy.zero3_init=true"],
        ["strategy=zero3", "strategy.zero3_init=true", "peft=lora", "peft.r=4"],
        ["strategy=zero3", "strategy.zero3_init=false"],
        ["strategy=zero3", "strategy.zero3_init=false", "peft=lora", "peft.r=4"],
    ],
    ids=[
        "fsdp-rank0-loads",
        "fsdp-rank0-loads-lora",
        "fsdp-every-rank-loads",
        "zero3-init",
        "zero3-init-lora",
        "zero3-every-rank-loads",
        "zero3-every-rank-loads-lora",
    ],
)
def test_ranks_build_partial_models_that_end_with_the_full_weights_and_buffers(
    overrides: list[str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    overrides = [
        "model.source=hf",
        f"model.path={tiny_model_dir}",
        *overrides,
    ]  # weights read from files, as users' are
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path),
        *overrides,
    ]
    done = subprocess.run(
        argv, cwd=ROOT, env=ftl_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["rank0.ok", "rank1.ok"]
