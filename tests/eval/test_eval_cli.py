"""`ftl eval` end to end on a tiny LoRA run: its numbers against independent computations
(perplexity as exp of the mean token loss; BLEU with sacrebleu, ROUGE with rouge-score on the
answers it wrote down), 2 ranks reporting what 1 does, the base-vs-fine-tuned table, an export
evaluated like its run, periodic eval during LoRA training, and SmolLM2 improving (slow)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import ftl

pytest.importorskip("peft")

TRAIN = [
    "recipe=tiny",
    "peft=lora",
    "peft.r=4",
    "peft.alpha=8",
    "peft.dropout=0.0",
    "train.lr=1e-2",
    "train.max_steps=4",
    "eval.every_steps=2",
    "eval.max_batches=1",
    "wandb.mode=disabled",
    "launch.dist_timeout_s=60",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is ftl?"}, {"role": "assistant", "content": "A launcher for fine-tuning."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I resume?"},
        {"role": "assistant", "content": "Rerun the same command."},
    ],
    [
        {"role": "user", "content": "Which engines are there?"},
        {"role": "assistant", "content": "single, ddp, deepspeed and fsdp."},
    ],
]
EVAL = [
    "eval.generate=true",
    "eval.num_generate=3",
    "eval.max_new_tokens=8",
    "eval.batch_size=2",
    "eval.max_batches=null",
    "wandb.mode=disabled",
    "launch.dist_timeout_s=60",
]


def write_jsonl(path: Path, conversations: list[list[dict[str, str]]]) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora")
    ftl("train", *TRAIN, f"run.dir={run_dir}")
    return run_dir


@pytest.fixture(scope="module")
def eval_case(lora_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The fixed tiny case: the model's own greedy answers, then references made from them (so
    BLEU and ROUGE are neither 0 nor 100), evaluated against the base too."""
    root = tmp_path_factory.mktemp("case")
    first = write_jsonl(root / "first.jsonl", CONVERSATIONS)
    ftl("eval", str(lora_run), f"data.eval_files=[{first}]", *EVAL, "--out", str(root / "first"))
    answers = [s["prediction"] for s in json.loads((root / "first" / "eval.json").read_text())["after"]["samples"]]
    references = [" ".join(a.split()[: max(1, len(a.split()) // 2)] + ["the", "launcher", "resumes"]) for a in answers]
    case = [c[:-1] + [{"role": "assistant", "content": ref}] for c, ref in zip(CONVERSATIONS, references)]
    data = write_jsonl(root / "case.jsonl", case)
    out = ftl("eval", str(lora_run), f"data.eval_files=[{data}]", *EVAL, "--baseline", "--out", str(root / "one"))
    return {
        "data": data,
        "answers": answers,
        "references": references,
        "out": root / "one",
        "stdout": out.stdout,
        "results": json.loads((root / "one" / "eval.json").read_text()),
    }


def independent_loss(model: Any, data: Path, run_dir: Path) -> tuple[float, int]:
    """Each example alone and unpadded, through the run's own tokenization: Σ token losses / count."""
    from dataclasses import replace

    from launcher.config.validate import load_run_config
    from launcher.data.build import build_datasets
    from launcher.data.types import IGNORE_INDEX

    cfg = load_run_config(run_dir / "config.yaml")
    _, tokenizer = model
    _, eval_ds = build_datasets(replace(cfg.data, eval_files=[str(data)]), tokenizer, cfg.train.seq_len, cfg.train.seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in eval_ds:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor(example["labels"][1:])
            logits = model[0](input_ids=ids).logits[0, :-1]
            total += F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    return total / count, count


# --------------------------------------------------------------------------------------------


def test_eval_numbers_match_independent_computations(lora_run: Path, eval_case: dict[str, Any]) -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    from launcher.artifacts.inference import load_model

    after = eval_case["results"]["after"]
    predictions = [s["prediction"] for s in after["samples"]]
    assert predictions == eval_case["answers"]  # greedy: the same answers as the first pass
    assert [s["reference"] for s in after["samples"]] == eval_case["references"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for kind in ("rouge1", "rouge2", "rougeL"):
        want = 100 * sum(scorer.score(r, p)[kind].fmeasure for p, r in zip(predictions, eval_case["references"])) / 3
        assert after[kind] == pytest.approx(want, abs=1e-9)
    assert after["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [eval_case["references"]]).score, abs=1e-9)
    assert 0 < after["rouge1"] < 100 and 0 < after["bleu"] < 100

    loaded = load_model(lora_run)
    loss, tokens = independent_loss((loaded.model, loaded.tokenizer), eval_case["data"], lora_run)
    assert after["tokens"] == tokens
    assert after["loss"] == pytest.approx(loss, rel=1e-5)
    assert after["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    # --baseline: the same model with its adapter switched off, i.e. the base it started from.
    with loaded.model.disable_adapter():
        base_loss, _ = independent_loss((loaded.model, loaded.tokenizer), eval_case["data"], lora_run)
    before = eval_case["results"]["before"]
    assert before["loss"] == pytest.approx(base_loss, rel=1e-5) and abs(before["loss"] - after["loss"]) > 1e-3
    assert "Base vs fine-tuned" in eval_case["stdout"]
    assert json.loads((eval_case["out"] / "eval_job.json").read_text())["baseline"] == "auto"


def test_two_ranks_report_what_one_does(lora_run: Path, eval_case: dict[str, Any], tmp_path: Path) -> None:
    out = ftl(
        "eval",
        str(lora_run),
        f"data.eval_files=[{eval_case['data']}]",
        *EVAL,
        "launch.nproc_per_node=2",
        "--out",
        str(tmp_path),
    )
    assert "launcher.launch.torchrun" in out.stderr and "--nproc_per_node=2" in out.stderr
    two, one = json.loads((tmp_path / "eval.json").read_text())["after"], eval_case["results"]["after"]
    assert two["tokens"] == one["tokens"] and two["loss"] == pytest.approx(one["loss"], rel=1e-9)
    assert [s["prediction"] for s in two["samples"]] == [s["prediction"] for s in one["samples"]]
    assert {k: two[k] for k in ("bleu", "rouge1", "rougeL")} == {k: one[k] for k in ("bleu", "rouge1", "rougeL")}


def test_an_export_evaluates_like_its_run(lora_run: Path, eval_case: dict[str, Any], tmp_path: Path) -> None:
    ftl("export", str(lora_run), "--merge-lora", "--out", str(tmp_path / "merged"))
    ftl("eval", str(tmp_path / "merged"), "recipe=tiny", f"data.eval_files=[{eval_case['data']}]", *EVAL)
    exported = json.loads((tmp_path / "merged" / "eval" / "eval.json").read_text())["after"]
    one = eval_case["results"]["after"]
    assert exported["tokens"] == one["tokens"] and exported["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert [s["prediction"] for s in exported["samples"]] == [s["prediction"] for s in one["samples"]]


def test_baseline_eval_writes_the_side_by_side_page(eval_case: dict[str, Any]) -> None:
    text = html.unescape((eval_case["out"] / "side_by_side.html").read_text())  # generated text is any unicode
    for before, after in zip(eval_case["results"]["before"]["samples"], eval_case["results"]["after"]["samples"]):
        assert after["question"] in text and before["prediction"] in text and after["prediction"] in text
    assert "side_by_side.html" in eval_case["stdout"]


def test_a_judge_scores_both_orders(lora_run: Path, eval_case: dict[str, Any], tmp_path: Path) -> None:
    """The tiny model as judge (its verdict means nothing; the mechanics are checked): --judge implies
    the baseline, each pair is judged in both orders, and one judgement recomputed here agrees."""
    from launcher.artifacts.inference import load_model
    from launcher.eval.judge import PROMPT

    judge_dir = tmp_path / "judge"
    ftl("export", str(lora_run), "--merge-lora", "--out", str(judge_dir))
    out = ftl(
        "eval",
        str(lora_run),
        f"data.eval_files=[{eval_case['data']}]",
        *EVAL,
        "--judge",
        str(judge_dir),
        "--out",
        str(tmp_path / "judged"),
    )
    results = json.loads((tmp_path / "judged" / "eval.json").read_text())
    verdict = results["judge"]
    assert "before" in results and verdict["model"] == str(judge_dir.resolve())
    assert verdict["pairs"] == 3 and verdict["orders"] == ["tuned as A", "tuned as B"]
    assert 0.0 <= verdict["win_rate"] <= 1.0 and 0.0 < verdict["position_bias"] < 1.0
    for e in verdict["examples"]:
        assert e["tuned_better"] == pytest.approx((e["tuned_as_a"] + e["tuned_as_b"]) / 2)
    wins = sum(
        1.0 if e["tuned_better"] > 0.5 else 0.5 if e["tuned_better"] == 0.5 else 0.0 for e in verdict["examples"]
    )
    assert verdict["win_rate"] == pytest.approx(wins / 3)
    assert f"judge: the tuned model wins {verdict['win_rate']:.0%} of 3 pairs" in out.stdout

    judge = load_model(judge_dir)
    tok = judge.tokenizer
    tuned, base = results["after"]["samples"][0], results["before"]["samples"][0]
    prompt = PROMPT.format(
        question=tuned["question"], reference=tuned["reference"], a=base["prediction"], b=tuned["prediction"]
    )
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        logits = judge.model(input_ids=torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, -1]
    a, b = (tok(letter, add_special_tokens=False)["input_ids"][0] for letter in ("A", "B"))
    p_base_first = torch.softmax(logits[[a, b]].float(), dim=-1)[0].item()
    assert verdict["examples"][0]["tuned_as_b"] == pytest.approx(1 - p_base_first, abs=1e-5)
    assert verdict["examples"][0]["tuned_as_a"] != pytest.approx(verdict["examples"][0]["tuned_as_b"], abs=1e-9)


def test_periodic_eval_runs_during_lora_training(lora_run: Path) -> None:
    evals = json.loads((lora_run / "eval.json").read_text())
    assert set(evals) == {"step_2", "after", "best"}
    for name, step in (("step_2", 2), ("after", 4)):
        assert evals[name]["step"] == step and evals[name]["perplexity"] == pytest.approx(math.exp(evals[name]["loss"]))


def test_eval_input_errors_exit_2(lora_run: Path, tmp_path: Path) -> None:
    cases = [
        ([str(tmp_path / "missing")], "no such directory"),
        ([str(tmp_path)], "neither a run dir"),
        ([str(lora_run), "data=demo"], "key=value overrides"),
        ([str(lora_run), "eval.batch_size=0"], "eval.batch_size"),
    ]
    for args, message in cases:
        proc = ftl("eval", *args, check=False, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.timeout(1800)
def test_smollm2_lora_improves_held_out_perplexity(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct on the demo data: 4 LoRA steps lower the held-out perplexity, as the
    training's before/after eval and `ftl eval --baseline` both report (4 min alone on the 2-core
    machine, over 10 beside the other pytest worker). The retain set is not what this test
    measures: tests/train/test_retain.py does."""
    from launcher.model.smollm2 import SmolLM2NotInstalled, gguf_path

    try:
        gguf_path()
    except SmolLM2NotInstalled as e:
        pytest.skip(str(e))
    short = [
        "train.max_steps=4",
        "train.micro_batch_size=4",
        "train.seq_len=256",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "eval.max_batches=2",
        "eval.batch_size=8",
        "eval.generate=false",
        "eval.retain.enabled=false",
        "wandb.mode=disabled",
    ]
    out = ftl(
        "train", "recipe=demo", "peft=lora", *short, "eval.before_training=true", f"run.dir={tmp_path}", timeout=1200
    )
    evals = json.loads((tmp_path / "eval.json").read_text())
    assert evals["after"]["perplexity"] < 0.9 * evals["before"]["perplexity"], evals
    assert "Base vs fine-tuned" in out.stdout
    ftl(
        "eval",
        str(tmp_path),
        "eval.max_batches=2",
        "eval.batch_size=8",
        "eval.generate=false",
        "--baseline",
        timeout=1200,
    )
    again = json.loads((tmp_path / "eval" / "step-4" / "eval.json").read_text())
    assert again["after"]["perplexity"] == pytest.approx(evals["after"]["perplexity"], rel=1e-4)
    assert again["before"]["perplexity"] == pytest.approx(evals["before"]["perplexity"], rel=1e-4)
