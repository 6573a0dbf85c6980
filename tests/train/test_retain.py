"""Forgetting on the retain set (launcher/train/retain.py): the figures against an independent
computation; at every evaluation of a run they reach eval.json, metrics.jsonl and the before/after
table; a limit warns, or stops the run with exit 1 naming the step and the figure and keeping the
last checkpoint; LoRA measures against its adapters-off base; limits no evaluation would apply are
refused before launch."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import TINY, copy_interrupted, ftl, hand_next_token_terms, metrics, step_dir, tiny

from launcher.cli import main as ftl_main
from launcher.config.schema import LoraConfig, RetainConfig
from launcher.objectives.base_dist import base_pass
from launcher.objectives.reference import ReferenceLogps
from launcher.paths import asset
from launcher.train.retain import SPLIT, Retain

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = [*TINY, "train.max_steps=4", "eval.every_steps=2", "eval.max_batches=1", "eval.generate=false"]


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))


def retain_examples(tok: Any, n: int) -> list[dict[str, list[int]]]:
    lines = Path(asset("retain/general.jsonl")).read_text().splitlines()[:n]
    return [{"input_ids": ids, "labels": list(ids)} for ids in (tok(json.loads(x)["text"])["input_ids"] for x in lines)]


def trainer_of(model: Any, tok: Any, peft_model: Any = None) -> Any:
    """What Retain.measure reads of a trainer: its engine's model, device, eval batch size and ranks."""
    engine = SimpleNamespace(model=model, peft_model=peft_model, autocast=lambda: None)
    return SimpleNamespace(
        engine=engine,
        device=torch.device("cpu"),
        cfg=SimpleNamespace(eval=SimpleNamespace(batch_size=3)),
        dist=SimpleNamespace(rank=0, world_size=1),
        tokenizer=tok,
    )


def hand_figures(base: Any, tuned: Any, examples: list[Any], k: int) -> dict[str, float]:
    terms = hand_next_token_terms(base, tuned, examples, k)
    n = len(terms)
    return {
        "retain_loss": sum(t[0] for t in terms) / n,
        "retain_loss_change": sum(t[0] - t[1] for t in terms) / n,
        "retain_kl": sum(t[2] for t in terms) / n,
    }


def perturb(model: Any, scale: float, only: str = "") -> Any:
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.add_(scale * torch.randn_like(p))
    return model


def test_full_fine_tuning_figures_equal_an_independent_computation(tok: Any) -> None:
    examples = retain_examples(tok, 7)
    base = tiny(tok, "sdpa")
    rows = base_pass(base, examples, top_k=16, batch_size=2, pad_id=tok.pad_token_id, device=torch.device("cpu"))
    retain = Retain(RetainConfig(top_k=16), examples, "precomputed", ReferenceLogps({SPLIT: rows}))
    tuned = perturb(copy.deepcopy(base), 0.05)
    got, want = retain.measure(trainer_of(tuned, tok)), hand_figures(base, tuned, examples, 16)
    assert got == pytest.approx(want, rel=1e-5)
    assert want["retain_kl"] > 1e-3 and abs(want["retain_loss_change"]) > 1e-3
    assert retain.measure(trainer_of(base, tok)) == pytest.approx(
        {"retain_loss": hand_figures(base, base, examples, 16)["retain_loss"], "retain_loss_change": 0, "retain_kl": 0},
        abs=1e-6,
    )  # the starting model: nothing forgotten


def test_lora_figures_are_the_whole_vocabulary_kl_to_the_adapters_off_base(tok: Any) -> None:
    from launcher.model.adapters import apply_peft

    examples = retain_examples(tok, 5)
    base = tiny(tok, "sdpa")
    frozen = copy.deepcopy(base)
    model = perturb(apply_peft(base, LoraConfig(r=4, dropout=0.0)), 0.5, only="lora_B")
    retain = Retain(RetainConfig(), examples, "adapters_off", None)
    got = retain.measure(trainer_of(model, tok, peft_model=model))
    assert got == pytest.approx(hand_figures(frozen, model, examples, frozen.config.vocab_size), rel=1e-5)
    assert got["retain_kl"] > 1e-3


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("retain") / "run"
    out = ftl("train", *SHORT, "eval.before_training=true", "checkpoint.every_steps=2", f"run.dir={run_dir}")
    return run_dir, out.stdout


def test_every_evaluation_logs_the_forgetting_figures_everywhere(full_run: tuple[Path, str]) -> None:
    run_dir, stdout = full_run
    evals = json.loads((run_dir / "eval.json").read_text())
    assert sorted(evals) == ["after", "before", "best", "step_2"]
    before = evals["before"]
    assert abs(before["retain_kl"]) < 1e-9 and abs(before["retain_loss_change"]) < 1e-6  # step 0: the base itself
    assert evals["after"]["retain_kl"] > evals["step_2"]["retain_kl"] > 1e-6
    assert evals["after"]["retain_loss_change"] == pytest.approx(
        evals["after"]["retain_loss"] - before["retain_loss"], abs=1e-6
    )
    rows = {row["step"]: row for row in metrics(run_dir)}
    assert sorted(rows) == [1, 2, 3, 4] and "retain_kl" not in rows[1] and "retain_kl" not in rows[3]
    for step, name in ((2, "step_2"), (4, "after")):
        assert {k: rows[step][k] for k in ("retain_loss", "retain_loss_change", "retain_kl")} == pytest.approx(
            {k: evals[name][k] for k in ("retain_loss", "retain_loss_change", "retain_kl")}
        )
    assert (run_dir / "retain_base.pt").is_file()  # the base's side, computed once, kept for a resume
    table = stdout[stdout.index("Base vs fine-tuned") :]
    assert "general-text loss (retain set)" in table and "KL to the base (retain set)" in table, table


def test_a_resumed_run_measures_against_the_base_it_kept(full_run: tuple[Path, str], tmp_path: Path) -> None:
    """Resumed at step 2, the run reads the starting model's rows back (its model has trained since):
    its figures at step 4 are the uninterrupted run's. Without them it reports none, saying so, or,
    with a limit to check, stops before training (exit 2)."""
    reference, _ = full_run
    missing = copy_interrupted(reference, tmp_path / "missing", step=2)
    out = ftl("train", *SHORT, "eval.retain.max_kl=1", f"run.dir={missing}", check=False)
    assert out.returncode == 2 and f"{missing / 'retain_base.pt'} is missing" in out.stderr, out.stderr[-2000:]
    out = ftl("train", *SHORT, f"run.dir={missing}")
    assert (
        f"ftl: {missing / 'retain_base.pt'} is missing" in out.stdout
        and "this run reports no retain figures" in out.stdout
    )
    assert "retain_kl" not in json.loads((missing / "eval.json").read_text())["after"]
    resumed = copy_interrupted(reference, tmp_path / "resumed", step=2)
    shutil.copy(reference / "retain_base.pt", resumed / "retain_base.pt")
    ftl("train", *SHORT, f"run.dir={resumed}")
    got, want = (json.loads((d / "eval.json").read_text())["after"] for d in (resumed, reference))
    assert got["retain_kl"] == pytest.approx(want["retain_kl"], rel=1e-5) and got["retain_kl"] > 1e-6
    assert got["retain_loss_change"] == pytest.approx(want["retain_loss_change"], rel=1e-5)


def test_past_a_limit_the_run_warns_and_goes_on(tmp_path: Path) -> None:
    out = ftl("train", *SHORT, "eval.retain.max_kl=1e-9", f"run.dir={tmp_path / 'run'}")
    text = out.stdout + out.stderr
    assert "ftl: warning: forgetting at step 2 on the retain set: the KL to the base is " in text, text[-3000:]
    assert "over eval.retain.max_kl=1e-09" in text and step_dir(tmp_path / "run", 4).is_dir()


def test_past_a_limit_with_action_stop_the_run_exits_1_naming_the_step_and_keeps_its_checkpoint(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    out = ftl(
        "train",
        *SHORT,
        "checkpoint.every_steps=1",
        "eval.retain.max_loss_increase=0",
        "eval.retain.max_kl=1e-9",
        "eval.retain.action=stop",
        f"run.dir={run_dir}",
        check=False,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "forgetting at step" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "ftl: forgetting at step 2 on the retain set: the KL to the base is "
    )
    assert f"stopped (eval.retain.action=stop); the last checkpoint, {step_dir(run_dir, 1)}, is kept." in lines[0], (
        lines
    )
    kl = json.loads((run_dir / "eval.json").read_text())["step_2"]["retain_kl"]
    assert f"the KL to the base is {kl:.4g} nats/token, over eval.retain.max_kl=1e-09" in lines[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-1"]
    assert "ftl: failed (exit code 1" in out.stderr


def test_lora_measures_its_own_retain_file_against_the_adapters_off_base(tmp_path: Path) -> None:
    own = tmp_path / "mine.jsonl"
    own.write_text(
        "".join(json.dumps({"text": f"Fact {i}: the river runs past the old mill."}) + "\n" for i in range(5))
    )
    run_dir = tmp_path / "run"
    ftl("train", *SHORT, "peft=lora", "eval.before_training=true", f"eval.retain.path={own}", f"run.dir={run_dir}")
    evals = json.loads((run_dir / "eval.json").read_text())
    assert evals["before"]["retain_kl"] == pytest.approx(0, abs=1e-9) and evals["after"]["retain_kl"] > 1e-6
    assert not (run_dir / "retain_base.pt").exists()  # the base is the model with its adapters off


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.retain.action=stop"], "eval.retain.action: stop needs a limit: set eval.retain.max_kl or"),
        (["eval.retain.max_kl=0.1", "eval.retain.enabled=false"], "eval.retain.max_kl: is never checked with"),
        (
            ["eval.retain.max_loss_increase=0.1", "eval.after_training=false"],
            "eval.retain.max_loss_increase: is never checked: no evaluation runs",
        ),
        (["eval.retain.path=/no/such/retain.jsonl"], "eval.retain.path: file not found: /no/such/retain.jsonl"),
        (["eval.retain.max_kl=-1"], "eval.retain.max_kl: got -1"),
    ],
)
def test_a_limit_no_evaluation_applies_is_refused(
    overrides: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ftl_main(["plan", "recipe=tiny", *overrides]) == 2
    assert message in capsys.readouterr().err


def test_the_before_after_table_shows_the_retain_rows_and_the_bases_kl_as_0() -> None:
    from rich.console import Console

    from launcher.train.telemetry import render_eval_report

    before = {"loss": 2.0, "retain_loss": 3.0, "retain_loss_change": 0.0, "retain_kl": 5.2e-17}
    after = {"loss": 1.5, "retain_loss": 3.25, "retain_loss_change": 0.25, "retain_kl": 0.125}
    console = Console(width=120, record=True)
    for renderable in render_eval_report(before, after, 0):
        console.print(renderable)
    lines = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") == 5}
    cells = {label: [c.strip() for c in line.split("│")[2:5]] for label, line in lines.items()}
    assert cells["general-text loss (retain set)"] == ["3", "3.25", "+0.25"]
    assert cells["KL to the base (retain set)"] == ["0", "0.125", "+0.125"]
