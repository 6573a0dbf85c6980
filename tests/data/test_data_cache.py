"""The data cache: reuse, a rebuild whenever a keyed input changes, one build when processes race,
the file barrier (waiters, failures, stale locks, timeouts), `ftl preprocess`, and the trainer
reading packed data from the cache."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from launcher.config.schema import DataConfig, DataSource
from launcher.data import cache as data_cache
from launcher.data.build import build_datasets
from launcher.data.cache import FileLock, build_once, cache_key, prepare
from launcher.data.packing import pack_dataset
from launcher.data.types import DataError
from launcher.paths import asset

ROWS = [
    {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
    for i in range(12)
]


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_cache, "POLL_S", 0.05)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def config(tmp_path: Path, **kwargs: Any) -> DataConfig:
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    return DataConfig(train_files=[train], eval_fraction=0.25, **kwargs)


# --------------------------------------------------------------------------------------------
# reuse and keys


def test_second_prepare_reuses_and_matches_a_fresh_build(tok: Any, tmp_path: Path) -> None:
    cfg = config(tmp_path, packing=True)
    first = prepare(cfg, tok, 64, seed=0)
    second = prepare(cfg, tok, 64, seed=0)
    assert first.built and not second.built and first.directory == second.directory
    assert sorted(p.name for p in first.directory.iterdir()) == ["COMPLETE", "eval.arrow", "meta.json", "train.arrow"]
    train, evals = build_datasets(cfg, tok, 64, seed=0)
    assert evals is not None and second.eval is not None
    assert list(second.train.examples) == list(pack_dataset(train, 64).examples)
    assert second.train.stats == pack_dataset(train, 64).stats
    assert list(second.eval.examples) == list(evals.examples)
    assert second.eval.conversations == evals.conversations and second.eval.chat_template == evals.chat_template


def test_reading_the_cache_leaves_pandas_unimported(tok: Any, tmp_path: Path) -> None:
    """Every rank reads the cache at start-up; pyarrow's to_numpy would import pandas (~0.5 s per
    process). The rows a fresh process reads equal the ones written, with no pandas loaded."""
    cfg = config(tmp_path, packing=True)
    directory = prepare(cfg, tok, 64, seed=0).directory
    code = (
        "import json, sys\n"
        "from launcher.data.cache import read_datasets\n"
        f"train, evals = read_datasets(__import__('pathlib').Path({str(directory)!r}))\n"
        "print(json.dumps([list(train.examples), list(evals.examples), 'pandas' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    train_rows, eval_rows, pandas_loaded = json.loads(out.stdout)
    again = prepare(cfg, tok, 64, seed=0)
    assert train_rows == list(again.train.examples) and eval_rows == list(again.eval.examples) and train_rows
    assert not pandas_loaded


def other_tokenizer(tok: Any) -> Any:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))
    t.add_tokens(["checkpoint"])
    return t


CHANGES: dict[str, Any] = {
    "data content": lambda tmp, tok, cfg: (
        replace(cfg, train_files=[write_jsonl(tmp / "more.jsonl", ROWS + ROWS[:1])]),
        tok,
        64,
        0,
    ),
    "tokenizer": lambda tmp, tok, cfg: (cfg, other_tokenizer(tok), 64, 0),
    "template": lambda tmp, tok, cfg: (replace(cfg, chat_template="alpaca"), tok, 64, 0),
    "seq_len": lambda tmp, tok, cfg: (cfg, tok, 128, 0),
    "packing": lambda tmp, tok, cfg: (replace(cfg, packing=False), tok, 64, 0),
    "format": lambda tmp, tok, cfg: (
        replace(cfg, sources=[DataSource(path=cfg.train_files[0], format="completion")], train_files=[]),
        tok,
        64,
        0,
    ),
    "masking": lambda tmp, tok, cfg: (replace(cfg, assistant_only_loss=False), tok, 64, 0),
    "truncation": lambda tmp, tok, cfg: (replace(cfg, truncation="drop"), tok, 64, 0),
    "privacy": lambda tmp, tok, cfg: (replace(cfg, privacy="redact"), tok, 64, 0),
    "weight": lambda tmp, tok, cfg: (
        replace(cfg, sources=[DataSource(path=cfg.train_files[0], weight=2.0)], train_files=[]),
        tok,
        64,
        0,
    ),
    "seed, when it carves the eval split": lambda tmp, tok, cfg: (cfg, tok, 64, 1),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_keyed_change_gives_a_new_key(change: str, tok: Any, tmp_path: Path) -> None:
    cfg = config(tmp_path, packing=True)
    key, _ = cache_key(cfg, tok, 64, 0)
    assert cache_key(*CHANGES[change](tmp_path, tok, cfg))[0] != key


def test_content_not_path_nor_unkeyed_settings(tok: Any, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "renamed.jsonl").write_bytes(Path(cfg.train_files[0]).read_bytes())
    key, _ = cache_key(cfg, tok, 64, 0)
    assert cache_key(replace(cfg, train_files=[str(moved / "renamed.jsonl")]), tok, 64, 0)[0] == key
    assert cache_key(replace(cfg, shuffle=False, prepare_timeout_s=5, cache_shared=True), tok, 64, 0)[0] == key
    assert cache_key(replace(cfg, eval_fraction=0.0), tok, 64, 0)[0] != key
    no_carve = replace(cfg, eval_fraction=0.0)
    assert cache_key(no_carve, tok, 64, 0)[0] == cache_key(no_carve, tok, 64, 7)[0]  # the seed then changes nothing


def test_skipped_rows_are_named_by_the_path_the_run_reads(tok: Any, tmp_path: Path) -> None:
    """data.on_error=skip: the cache lists the skipped rows by file, so the same bytes at another
    path are another entry, never a list naming a file this run did not read."""
    lines = [json.dumps(row) for row in ROWS[:4]]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [tmp_path / d / "train.jsonl" for d in ("a", "b")]
    for path in paths:
        path.write_text("\n".join([*lines[:2], "{oops", *lines[2:]]) + "\n")
    for path in paths:
        rows = prepare(DataConfig(train_files=[str(path)], on_error="skip"), tok, 64, seed=0).train.stats[
            "skipped_rows"
        ]
        assert rows == [f"{path}, row 3: invalid JSON (Expecting property name enclosed in double quotes at column 2)"]


def test_a_changed_file_is_rebuilt(tok: Any, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    first = prepare(cfg, tok, 64, 0)
    time.sleep(0.01)  # a new mtime, so the digest memo cannot answer for the old content
    write_jsonl(Path(cfg.train_files[0]), ROWS[:8])
    second = prepare(cfg, tok, 64, 0)
    assert second.built and second.directory != first.directory
    assert second.train.stats["examples"] + len(second.eval or []) == 8


# --------------------------------------------------------------------------------------------
# racing and the barrier


def _race(cfg: DataConfig, tok: Any, start: Any, out: Any) -> None:
    start.wait()
    prepared = prepare(cfg, tok, 64, 0)
    out.put((prepared.built, str(prepared.directory), len(prepared.train)))


def test_two_processes_racing_on_a_cold_cache_build_once(
    tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "builds.log"
    real_write = data_cache.write_datasets

    def slow_counted_write(*args: Any) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # a long build: the other process must find the lock held
        real_write(*args)

    monkeypatch.setattr(data_cache, "write_datasets", slow_counted_write)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    cfg = config(tmp_path, packing=True)
    ctx = multiprocessing.get_context("fork")  # the children inherit the patched writer
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(cfg, tok, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(log.read_text().splitlines()) == 1
    assert sorted(built for built, _, _ in results) == [False, True]
    assert len({(d, n) for _, d, n in results}) == 1


def test_waiters_wait_for_the_builder(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "k"
    seen: list[Any] = []
    waiter = threading.Thread(target=lambda: seen.append(build_once(target, _fail, is_builder=False, timeout_s=30)))
    waiter.start()
    time.sleep(0.2)
    assert not seen  # nothing to read yet: still waiting

    def build(tmp: Path) -> None:
        (tmp / "data").write_text("ok")

    assert build_once(target, build, is_builder=True, timeout_s=30) is True
    waiter.join(timeout=10)
    assert seen == [False] and (target / "data").read_text() == "ok"
    assert not list(target.parent.glob(".k.tmp-*")) and not (target.parent / "k.lock").exists()


def _fail(tmp: Path) -> None:
    raise AssertionError("a waiter never builds")


def test_a_failed_build_fails_the_waiters_with_its_error(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "k"
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            build_once(target, _fail, is_builder=False, timeout_s=30)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()

    def bad_build(tmp: Path) -> None:
        raise DataError("train.jsonl, row 7: unknown role 'bot'")

    with pytest.raises(DataError):
        build_once(target, bad_build, is_builder=True, timeout_s=30)
    waiter.join(timeout=10)
    assert len(errors) == 1 and isinstance(errors[0], DataError) and "row 7" in str(errors[0])
    assert not target.exists()


def test_stale_locks_are_broken_and_waiting_times_out(tmp_path: Path) -> None:
    import socket

    target = tmp_path / "cache" / "k"
    target.parent.mkdir(parents=True)
    lock = target.parent / "k.lock"
    gone = subprocess.Popen(["true"])  # only for a pid that no longer runs
    gone.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
    assert FileLock(lock).is_stale()
    assert build_once(target, lambda tmp: None, is_builder=True, timeout_s=5) is True

    other = tmp_path / "cache" / "other"
    lock = target.parent / "other.lock"
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 1}))
    assert not FileLock(lock).is_stale()  # another host's lock with a fresh heartbeat is live
    with pytest.raises(TimeoutError, match="node-elsewhere.*ftl preprocess"):
        build_once(other, _fail, is_builder=False, timeout_s=0.2)
    old = time.time() - data_cache.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert FileLock(lock).is_stale()


def test_builder_is_local_rank_zero_or_rank_zero_when_shared() -> None:
    from launcher.runtime.distributed import DistInfo

    node1_rank0 = DistInfo(rank=2, local_rank=0, world_size=4, local_world_size=2)
    assert data_cache.is_builder(DataConfig(), node1_rank0)
    assert not data_cache.is_builder(DataConfig(cache_shared=True), node1_rank0)
    assert data_cache.is_builder(
        DataConfig(cache_shared=True), DistInfo(rank=0, local_rank=0, world_size=4, local_world_size=2)
    )
    assert not data_cache.is_builder(DataConfig(), DistInfo(rank=1, local_rank=1, world_size=4, local_world_size=2))
    assert data_cache.is_builder(DataConfig(), None)


# --------------------------------------------------------------------------------------------
# ftl preprocess, and the trainer on the cache


def test_ftl_preprocess_prints_counts_and_exits_2_on_bad_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from launcher.cli import main

    assert main(["preprocess", "recipe=tiny", "data.packing=true"]) == 0
    out = capsys.readouterr().out
    assert "built" in out and "packing eff." in out and "clipped" in out and "dropped" in out
    train_line = next(line for line in out.splitlines() if line.startswith("train"))
    assert train_line.split()[1] == "320"  # the demo's training conversations
    assert main(["preprocess", "recipe=tiny", "data.packing=true"]) == 0
    assert "reused" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + '{"messages": [{"role": "bot", "content": "x"}]}\n')
    assert main(["preprocess", "recipe=tiny", f"data.train_files=[{bad}]"]) == 2
    assert "bad.jsonl, row 2: message 1 has unknown role 'bot'" in capsys.readouterr().err
    assert main(["preprocess", "recipe=tiny", f"data.train_files=[{tmp_path / 'missing.jsonl'}]"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_trainer_trains_on_packed_data_from_the_cache(tmp_path: Path, cache_home: Path) -> None:
    import torch

    from launcher.config.schema import (
        ArchConfig,
        CheckpointConfig,
        EvalConfig,
        FtlConfig,
        ModelConfig,
        RunConfig,
        TrainConfig,
        WandbConfig,
    )
    from launcher.train.trainer import Trainer

    cfg = FtlConfig(
        model=ModelConfig(
            name="tiny-llama",
            source="random",
            tokenizer=asset("tiny-tokenizer"),
            arch=ArchConfig(
                vocab_size=512,
                hidden_size=64,
                intermediate_size=128,
                num_layers=2,
                num_heads=4,
                num_kv_heads=2,
                max_position_embeddings=1024,
            ),
        ),
        data=DataConfig(train_files=[asset("demo/train.jsonl")], eval_files=[asset("demo/eval.jsonl")], packing=True),
        train=TrainConfig(lr=3e-3, max_steps=3, micro_batch_size=2, seq_len=256, precision="fp32"),
        checkpoint=CheckpointConfig(every_steps=0, save_final=False),
        eval=EvalConfig(after_training=False),
        wandb=WandbConfig(mode="disabled"),
        run=RunConfig(name="packed", dir=str(tmp_path / "run")),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg)
        assert trainer.train_ds.stats["packs"] == len(trainer.train_ds) < 320
        assert trainer.run() == "completed"
    finally:
        torch.set_num_threads(threads)
    assert len(list((cache_home / "data").glob("*/COMPLETE"))) == 1
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3 and all(s["loss"] == s["loss"] and s["loss"] > 0 for s in steps)


STAGE = """
import sys
from launcher.cli import main
sys.exit(main(["preprocess", "--fetch-model", "recipe=tiny", "model.source=hf", "model.path=acme/tiny-chat"]))
"""


def test_preprocess_fetch_model_stages_a_hub_model_the_ranks_read_offline(tmp_path: Path) -> None:
    """`ftl preprocess --fetch-model` (what launch.preprocess_job runs) puts a hub model into
    HF_HOME; under HF_HUB_OFFLINE=1, as the training job runs, it is found there. No hub here: the
    cache is laid out as huggingface_hub leaves it after a download, then read back offline; with
    nothing staged the command says which model and where, and exits 1."""
    from launcher.paths import ROOT

    hf_home = tmp_path / "hf"
    snapshot = hf_home / "hub" / "models--acme--tiny-chat" / "snapshots" / ("0" * 40)
    shutil.copytree(asset("tiny-tokenizer"), snapshot)
    (snapshot / "config.json").write_text(
        json.dumps(
            {  # a hub model's files hold its architecture
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 512,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 1024,
            }
        )
    )
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "FTL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", STAGE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"model       acme/tiny-chat staged in {snapshot}" in done.stdout and "data cache  built" in done.stdout
    env["HF_HOME"] = str(tmp_path / "empty")
    missing = subprocess.run(
        [sys.executable, "-c", STAGE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 1, missing.stderr[-3000:]
    assert f"ftl preprocess: cannot stage model.path='acme/tiny-chat' into {tmp_path / 'empty'}" in missing.stderr
