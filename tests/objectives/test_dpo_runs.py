"""DPO and SimPO end to end on the tiny model: every engine trains the same numbers, the precomputed
reference equals the starting model's live log-probs, resume is exact, LoRA uses its adapter-free
base, and `ftl eval`, `ftl export` and `ftl train -m` work on preference runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import TINY, TWO_RANKS, copy_interrupted, ftl, ftl_env, max_abs_diff, metrics, step_dir

from launcher.objectives.reference import ReferenceLogps
from launcher.rundir import RunPaths

DPO = [
    *TINY,
    "objective=dpo",
    "data=demo_preferences",
    "train.seq_len=512",
    "train.precision=fp32",
    "train.warmup_steps=1",
    "eval.max_batches=1",
]
STEPS = 4


def run(tmp: Path, name: str, *overrides: str, env: dict[str, str] | None = None) -> Path:
    run_dir = tmp / name
    ftl("train", *DPO, f"train.max_steps={STEPS}", *overrides, f"run.dir={run_dir}", env=env)
    return run_dir


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, micro-batch 4, its own cache (the reference pass runs, not a cache hit)."""
    tmp = tmp_path_factory.mktemp("dpo")
    return run(
        tmp, "single", "train.micro_batch_size=4", "checkpoint.every_steps=2", env=ftl_env(FTL_CACHE=str(tmp / "cache"))
    )


def test_dpo_starts_at_log_2_and_learns(single: Path) -> None:
    rows = metrics(single)
    assert len(rows) == STEPS
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is its reference at step 1
    assert rows[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6) and rows[0]["rewards/accuracy"] == 0.5
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margin"] > 0


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_two_ranks_train_the_numbers_of_one_process(single: Path, tmp_path: Path, strategy: str) -> None:
    """2 ranks × micro-batch 2 = 1 process × 4: the loss is a mean over the pairs of the whole
    step, and the reference pass is shared among the ranks."""
    got = metrics(run(tmp_path, strategy, f"strategy={strategy}", *TWO_RANKS, "train.micro_batch_size=2"))
    want = metrics(single)
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4), (strategy, g["step"])
        assert g["rewards/margin"] == pytest.approx(w["rewards/margin"], rel=1e-3, abs=1e-5), (strategy, g["step"])


def test_precomputed_reference_equals_the_starting_models_live_log_probs(single: Path) -> None:
    from launcher.config.validate import load_run_config
    from launcher.data.build import collate
    from launcher.data.cache import prepare_datasets
    from launcher.objectives.losses import sequence_logps
    from launcher.train.trainer import build_model, seed_everything

    stored = ReferenceLogps.load(single / RunPaths.REFERENCE_LOGPS)
    assert stored is not None and set(stored.splits) == {"train", "eval"}
    cfg = load_run_config(single / "config.yaml")
    seed_everything(cfg.train.seed)  # as the trainer does before building the model
    model, tokenizer = build_model(cfg, torch.device("cpu"))
    train, _ = prepare_datasets(cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed)
    model.eval()
    for indices in ([0, 1, 2], [len(train) - 1]):
        with torch.no_grad():
            live, _ = sequence_logps(model, collate([train[i] for i in indices], tokenizer.pad_token_id))
        torch.testing.assert_close(live, stored.lookup("train", indices), rtol=1e-6, atol=1e-5)


def test_resume_is_exact(single: Path, tmp_path: Path) -> None:
    """Killed after step 2: the copy holds the step-2 checkpoint and the run's reference file, and
    finishes with the uninterrupted run's weights."""
    import shutil

    from launcher.engines import engine_class

    resumed = copy_interrupted(single, tmp_path / "resumed", step=2)
    shutil.copy(single / RunPaths.REFERENCE_LOGPS, resumed / RunPaths.REFERENCE_LOGPS)
    ftl(
        "train",
        *DPO,
        f"train.max_steps={STEPS}",
        "train.micro_batch_size=4",
        "checkpoint.every_steps=2",
        f"run.dir={resumed}",
    )
    read = engine_class("single").consolidate_checkpoint
    assert max_abs_diff(read(step_dir(resumed, STEPS)), read(step_dir(single, STEPS))) <= 1e-6
    assert [m["step"] for m in metrics(resumed)] == [3, 4]


def test_a_resumed_run_without_its_reference_file_stops_clearly(single: Path, tmp_path: Path) -> None:
    resumed = copy_interrupted(single, tmp_path / "lost", step=2)
    out = ftl("train", *DPO, f"train.max_steps={STEPS}", "train.micro_batch_size=4", f"run.dir={resumed}", check=False)
    assert out.returncode == 2 and RunPaths.REFERENCE_LOGPS in out.stderr and "checkpoint.resume=never" in out.stderr


def test_ftl_eval_reports_preference_metrics_against_the_starting_model(single: Path, tmp_path: Path) -> None:
    import json

    ftl("eval", str(single), "--baseline", "--out", str(tmp_path / "eval"))
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())
    before, after = results["before"], results["after"]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["rewards/accuracy"] == 0.5
    trained = json.loads((single / "eval.json").read_text())["after"]
    for key in ("loss", "rewards/margin", "rewards/accuracy", "logp_accuracy"):
        assert after[key] == pytest.approx(trained[key], rel=1e-5, abs=1e-6), key  # what training's own eval said


def test_lora_dpo_uses_the_base_as_reference_and_exports(tmp_path: Path) -> None:
    from helpers import plain_transformers_logits

    lora = run(tmp_path, "lora", "peft=lora", "peft.r=4", "train.micro_batch_size=4", "train.lr=1e-2")
    rows = metrics(lora)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at zero: policy = base
    assert rows[-1]["rewards/margin"] != 0
    assert not (lora / RunPaths.REFERENCE_LOGPS).exists()  # adapters_off: nothing precomputed
    ftl("export", str(lora), "merge_lora=true", "--out", str(tmp_path / "merged"))
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    logits = plain_transformers_logits(tmp_path / "merged", ids, tmp_path)
    assert logits.shape == (1, 5, 512) and torch.isfinite(logits).all()


def test_lora_dpo_on_two_zero3_ranks_trains_the_numbers_of_one_process(tmp_path: Path) -> None:
    """The adapters-off reference runs through ZeRO-3's partitioned base on every rank."""
    lora = ["peft=lora", "peft.r=4", "peft.dropout=0", "train.lr=1e-2"]
    one = metrics(run(tmp_path, "one", *lora, "train.micro_batch_size=4"))
    two = metrics(run(tmp_path, "two", *lora, "strategy=zero3", *TWO_RANKS, "train.micro_batch_size=2"))
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for g, w in zip(two, one):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4), g["step"]
    assert one[-1]["rewards/margin"] != 0


def test_simpo_trains_without_a_reference(tmp_path: Path) -> None:
    simpo = run(tmp_path, "simpo", "objective=simpo", "train.micro_batch_size=4")
    rows = metrics(simpo)
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert not (simpo / RunPaths.REFERENCE_LOGPS).exists()


def test_a_beta_sweep_runs_one_trial_per_value(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher",
            "train",
            "-m",
            *DPO,
            "train.max_steps=2",
            "train.micro_batch_size=4",
            "objective.beta=0.1,0.5",
            "eval.after_training=false",
        ],
        cwd=tmp_path,
        env=ftl_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    margins = [
        metrics(next((tmp_path / "runs" / "tiny-multirun").glob(f"objective.beta_{b}-*")))[-1]["rewards/margin"]
        for b in ("0.1", "0.5")
    ]
    assert margins[0] != 0 and margins[1] / margins[0] > 2  # beta scales the rewards
    assert "objective.beta=0.5" in out.stdout


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["objective=dpo", "data=demo"], "data.format"),
        (["data=demo_preferences"], "objective"),
        (["objective=dpo", "data=demo_preferences", "objective.reference=adapters_off"], "objective.reference"),
        (["objective=dpo", "data=demo_preferences", "objective.beta=0"], "objective.beta"),
    ],
)
def test_mismatched_objective_and_data_are_refused_before_launch(overrides: list[str], field: str) -> None:
    out = ftl("plan", "recipe=tiny", *overrides, check=False)
    assert out.returncode == 2 and f"- {field}:" in out.stderr, out.stderr


def test_a_bad_pair_names_its_file_and_row(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    out = ftl(
        "train",
        *DPO,
        f"data.train_files=[{pairs}]",
        "data.eval_files=[]",
        "eval.after_training=false",
        "train.max_steps=2",
        f"run.dir={tmp_path / 'run'}",
        check=False,
    )
    assert out.returncode == 2 and f"{pairs}" in out.stderr and "row 2" in out.stderr and "'rejected'" in out.stderr, (
        out.stderr[-2000:]
    )


def test_the_planner_refuses_a_dpo_job_that_does_not_fit() -> None:
    out = ftl("plan", "recipe=llama3-8b-dpo-zero3-multinode", "launch.gpu_mem_gb=8", check=False)
    assert out.returncode == 2 and "won't fit" in out.stderr
    assert "reference precomputed" in ftl("plan", "recipe=llama3-8b-dpo-zero3-multinode").stdout
