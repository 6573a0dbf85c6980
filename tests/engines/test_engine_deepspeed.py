"""DeepSpeed ZeRO end to end through the real CLI, 2 gloo ranks on CPU with the tiny random Llama
(fp32): stages 1-3 train the same numbers, ZeRO-3 shards the parameters, exact resume, resume on
another world size through the universal checkpoint, offline consolidation of every stage, a
contradicting `strategy.extra` key refused before anything starts, and ZeRO-3 offload.

DeepSpeed JIT-compiles its shared-memory comm op (~60 s) and DeepSpeedCPUAdam (~100 s, offload
only) the first time; they are cached in $TORCH_EXTENSIONS_DIR (the Makefile points it at .cache/).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    TEN_STEPS,
    TWO_RANKS,
    assert_losses_close,
    copy_interrupted,
    ftl,
    ftl_env,
    max_abs_diff,
    metrics,
    plain_transformers_logits,
    reference_run,
    step_dir,
)

from launcher.paths import ROOT
from launcher.train.checkpoint import MARKER, checkpoints_dir

pytest.importorskip("deepspeed")

from launcher.engines.deepspeed import META_FILE, TAG, UNIVERSAL_TAG, DeepSpeedEngine  # noqa: E402

consolidate_checkpoint = DeepSpeedEngine.consolidate_checkpoint

RUN_TIMEOUT_S = 300  # generous: a first run compiles DeepSpeed's shm comm op


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_run(tmp_path_factory, "zero3")


# --------------------------------------------------------------------------------------------


def test_zero3_trains_10_steps_into_deepspeed_checkpoints(zero3_run: Path) -> None:
    rows = metrics(zero3_run)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    ckpt = step_dir(zero3_run, 10)
    assert json.loads((ckpt / MARKER).read_text())["world_size"] == 2
    assert json.loads((ckpt / META_FILE).read_text()) == {
        "tag": TAG,
        "zero_stage": 3,
        "world_size": 2,
        "precision": "fp32",
        "frozen_excluded": False,  # a full fine-tune saves every parameter
    }
    assert (ckpt / "latest").read_text().strip() == TAG  # DeepSpeed's own tools work on the step dir
    files = sorted(p.name for p in (ckpt / TAG).iterdir())
    assert files == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]


def test_zero3_holds_half_the_parameter_bytes(zero3_run: Path) -> None:
    total = sum(t.numel() * t.element_size() for t in consolidate_checkpoint(step_dir(zero3_run, 10)).values())
    local = metrics(zero3_run)[-1].get("param_bytes_local")
    assert local is not None, "the trainer logs no param_bytes_local (telemetry.local_param_bytes) per step"
    assert local <= 1.05 * total / 2, (local, total)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero1_and_zero2_train_the_numbers_of_zero3(stage: int, zero3_run: Path, tmp_path: Path) -> None:
    ftl("train", *TEN_STEPS, *TWO_RANKS, f"strategy=zero{stage}", "checkpoint.every_steps=0", f"run.dir={tmp_path}")
    rows, reference = metrics(tmp_path), metrics(zero3_run)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert_losses_close(rows, reference, rel=1e-4)
    for a, b in zip(rows, reference):  # the global gradient norm, not one partition's
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    weights = consolidate_checkpoint(step_dir(tmp_path, 10))
    assert max_abs_diff(weights, consolidate_checkpoint(step_dir(zero3_run, 10))) <= 1e-5


def test_zero3_exact_resume(zero3_run: Path, tmp_path: Path) -> None:
    run_dir = copy_interrupted(zero3_run, tmp_path / "resumed")
    out = ftl("train", *TEN_STEPS, *TWO_RANKS, "strategy=zero3", f"run.dir={run_dir}")
    assert "resuming from" in out.stdout
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [6, 7, 8, 9, 10]
    assert_losses_close(rows, metrics(zero3_run), rel=1e-6)
    weights = consolidate_checkpoint(step_dir(run_dir, 10))
    assert max_abs_diff(weights, consolidate_checkpoint(step_dir(zero3_run, 10))) <= 1e-6


def test_zero3_resumes_on_one_rank_through_the_universal_checkpoint(zero3_run: Path, tmp_path: Path) -> None:
    """2 ranks → 1: rank 0 converts the step-5 checkpoint into DeepSpeed's universal format once,
    then loads weights, Adam moments and schedule from it. With micro_batch_size 8 the one rank
    reads the 8 samples per step the two ranks did; the losses differ only by how tokens are
    averaged (per rank, or over the 8 samples)."""
    run_dir = copy_interrupted(zero3_run, tmp_path / "one-rank")
    ftl(
        "train",
        *TEN_STEPS,
        "strategy=zero3",
        "launch.nproc_per_node=1",
        "train.micro_batch_size=8",
        f"run.dir={run_dir}",
    )
    assert (step_dir(run_dir, 5) / UNIVERSAL_TAG).is_dir()
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [6, 7, 8, 9, 10]
    assert_losses_close(rows, metrics(zero3_run), rel=2e-3)
    assert json.loads((step_dir(run_dir, 10) / META_FILE).read_text())["world_size"] == 1


CONSOLIDATE_DRIVER = r"""
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from launcher.config.compose import compose
from launcher.config.validate import validated
from launcher.runtime.distributed import destroy, init_distributed
from launcher.runtime.device import select_device
from launcher.engines.deepspeed import DeepSpeedEngine
from launcher.model.loading import load_model_and_tokenizer

out, results = Path(sys.argv[1]), {}
for stage in (0, 3):
    raw, _, errors = compose(["recipe=tiny", "strategy=zero3", f"strategy.zero_stage={stage}", "launch.nproc_per_node=2"])
    cfg = validated(raw)
    device = select_device(cfg.train)
    info = init_distributed(cfg.launch, device)
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(cfg.model)
    keys = sorted(model.state_dict())
    engine = DeepSpeedEngine(cfg, model, info, device)
    engine.setup(total_steps=4)
    for _ in range(2):
        ids = torch.randint(0, 512, (2, 16))
        with engine.grad_sync(True):
            engine.backward(engine.model(input_ids=ids, labels=ids).loss)
        engine.step()
    ckpt = out / f"stage{stage}"
    ckpt.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save(ckpt)
    dist.barrier()
    live = engine.consolidated_state_dict()
    if info.is_main:
        offline = DeepSpeedEngine.consolidate_checkpoint(ckpt)
        results[stage] = {"live_keys": sorted(live) == keys, "offline_keys": sorted(offline) == keys,
                          "max_diff": max(float((live[k] - offline[k]).abs().max()) for k in keys),
                          "dtype": str(offline[keys[0]].dtype)}
if info.is_main:
    (out / "results.json").write_text(json.dumps(results))
destroy()
from launcher.train.entry import exit_now
exit_now(0)  # as launcher.train does: no C++ teardown after a distributed run
"""


def test_consolidation_live_and_offline_agree_for_stage0_and_stage3(tmp_path: Path) -> None:
    """consolidated_state_dict (collective, live) and consolidate_checkpoint (offline, no process
    group) return the model's own state_dict keys and the same fp32 weights; stage 0 is read from
    the model-states file, where DeepSpeed's zero_to_fp32 fails."""
    driver = tmp_path / "driver.py"
    driver.write_text(CONSOLIDATE_DRIVER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(driver),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ftl_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for stage in ("0", "3"):
        assert results[stage] == {"live_keys": True, "offline_keys": True, "max_diff": 0.0, "dtype": "torch.float32"}, (
            stage
        )


def test_contradicting_extra_key_exits_2_before_anything_starts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = ftl(
        "train",
        *TEN_STEPS,
        *TWO_RANKS,
        "strategy=zero3",
        "+strategy.extra.zero_optimization.stage=2",
        "+strategy.extra.wall_clock_breakdown=true",
        f"run.dir={run_dir}",
        check=False,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "strategy.extra.zero_optimization.stage: 2 contradicts strategy.zero_stage=3" in out.stderr
    assert "wall_clock_breakdown" not in out.stderr  # a key ftl does not derive is merged, not refused
    assert "launching" not in out.stderr and not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.heavy
def test_zero3_offload_trains_with_adamw_numbers(zero3_run: Path, tmp_path: Path) -> None:
    """Parameters and optimizer states in CPU memory, DeepSpeedCPUAdam (compiled on first use,
    ~100 s) in AdamW mode and activation checkpointing: the same losses as ZeRO-3."""
    ftl(
        "train",
        *TEN_STEPS,
        *TWO_RANKS,
        "strategy=zero3_offload",
        "train.max_steps=3",
        "checkpoint.every_steps=0",
        "checkpoint.save_final=false",
        f"run.dir={tmp_path}",
        timeout=600,
    )
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # A 3-step run has its own cosine schedule: only the first steps (warmup) share the lr.
    assert_losses_close(rows[:2], metrics(zero3_run), rel=1e-4)


def test_export_of_a_zero3_checkpoint_loads_in_plain_transformers(zero3_run: Path, tmp_path: Path) -> None:
    """`ftl export` of ZeRO-3 shards → a safetensors directory that transformers loads with no ftl
    import, whose logits equal the model holding the checkpoint's consolidated weights (which
    test_consolidation_live_and_offline_agree_for_stage0_and_stage3 shows equal the live ones)."""
    from launcher.config.validate import load_run_config
    from launcher.model.loading import load_model_and_tokenizer

    out = tmp_path / "hf"
    ftl("export", str(zero3_run), "--out", str(out))
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    exported = plain_transformers_logits(out, ids, tmp_path)
    cfg = load_run_config(zero3_run / "config.yaml")
    torch.manual_seed(1234)  # a different init: every weight must come from the checkpoint
    model, _ = load_model_and_tokenizer(cfg.model)
    model.load_state_dict(consolidate_checkpoint(checkpoints_dir(zero3_run) / "step-10"))
    with torch.no_grad():
        live = model.eval()(ids).logits
    assert float((exported - live).abs().max()) <= 1e-5


GENERATE_DRIVER = r"""
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from launcher.config.compose import compose
from launcher.config.validate import validated
from launcher.engines.deepspeed import DeepSpeedEngine
from launcher.eval.metrics import generate_answers
from launcher.model.loading import load_model_and_tokenizer
from launcher.runtime.device import select_device
from launcher.runtime.distributed import destroy, init_distributed

raw, _, _ = compose(["recipe=tiny", "strategy=zero3", "launch.nproc_per_node=2"])
cfg = validated(raw)
device = select_device(cfg.train)
info = init_distributed(cfg.launch, device, timeout_s=60)
torch.manual_seed(0)
model, tokenizer = load_model_and_tokenizer(cfg.model)
engine = DeepSpeedEngine(cfg, model, info, device)
engine.setup(total_steps=1)
import launcher.eval.metrics as metrics
metrics.stop_token_ids = lambda model, tokenizer: []  # a random model might say eos: stop by length only
# Each rank its own question and its own length: rank 0 is done after 2 tokens, rank 1 after 12.
conversation = [{"role": "user", "content": ["hello", "how do I resume a run?"][info.rank]}, {"role": "assistant", "content": "x"}]
answers = generate_answers(engine.model, tokenizer, [conversation], max_new_tokens=[2, 12][info.rank], device=device,
                           batch_size=1, synced=True)
after = torch.ones(1)
dist.all_reduce(after)  # every rank got here: nobody is left inside a gather
(Path(sys.argv[1]) / f"rank{info.rank}.json").write_text(json.dumps({"answer": answers[0], "after": after.item()}))
destroy()
from launcher.train.entry import exit_now
exit_now(0)
"""


def test_zero3_generation_of_different_lengths_keeps_ranks_in_step(tmp_path: Path) -> None:
    """ZeRO-3 gathers each layer's weights from every rank in every forward: ranks that stop
    generating at different lengths must keep stepping until all are done (synced_gpus, which the
    trainer sets for engines that shard parameters). Here rank 0 stops after 2 tokens, rank 1
    after 12; both answer and meet again."""
    driver = tmp_path / "driver.py"
    driver.write_text(GENERATE_DRIVER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(driver),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ftl_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["after"] for r in ranks] == [2.0, 2.0]
    assert all(r["answer"] for r in ranks), ranks


BF16_COMMON = [
    "recipe=tiny",
    "wandb.mode=disabled",
    "launch.dist_timeout_s=60",
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.precision=bf16",
    "train.grad_accum=4",
    "train.micro_batch_size=2",
    "checkpoint.save_final=false",
    "eval.after_training=false",
    *TWO_RANKS,
]


@pytest.fixture(scope="module")
def fsdp_bf16_norm(tmp_path_factory: pytest.TempPathFactory) -> float:
    run = tmp_path_factory.mktemp("fsdp-bf16")
    ftl("train", *BF16_COMMON, "strategy=fsdp", f"run.dir={run}")
    return metrics(run)[0]["grad_norm"]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_in_bf16_reduces_and_accumulates_gradients_like_fsdp(
    stage: int, fsdp_bf16_norm: float, tmp_path: Path
) -> None:
    """bf16 with 4 micro-batches per step: ZeRO-2/3's first gradient equals FSDP2's (fp32
    reduce-scatter) to 1e-6, the precision of an fp32 sum. With DeepSpeed's default bf16
    reduction and accumulation the same run was 1.5e-5 off (measured; see gradient_dtypes)."""
    ftl("train", *BF16_COMMON, f"strategy=zero{stage}", f"run.dir={tmp_path}")
    norm = metrics(tmp_path)[0]["grad_norm"]
    assert norm == pytest.approx(fsdp_bf16_norm, rel=1e-6), (norm, fsdp_bf16_norm)


def test_zero3_checkpoint_bytes_are_what_the_planner_charges(zero3_run: Path) -> None:
    """What launch.signal and launch.io_timeout_s are sized from: ZeRO-3 writes the fp32 master
    and the two moments (12 B per parameter) and no gathered module."""
    from launcher.config.validate import load_run_config
    from launcher.plan.memory import checkpoint_bytes
    from launcher.plan.report import layout_for, workload_of

    on_disk = sum(f.stat().st_size for f in step_dir(zero3_run, 10).rglob("*") if f.is_file())
    cfg = load_run_config(zero3_run / "config.yaml")
    planned = checkpoint_bytes(workload_of(cfg, "fp32"), layout_for(cfg))
    assert 0.9 * on_disk <= planned <= on_disk, (planned, on_disk)  # + DeepSpeed's scripts, RNG states
