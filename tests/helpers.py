"""Shared by the end-to-end tests: run the real `ftl` CLI in a subprocess and read a run dir back."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from launcher.paths import ROOT

if TYPE_CHECKING:
    import torch

# Every run in the suite: tiny model, no W&B, and a short process-group timeout so a broken rank
# fails the test in a minute instead of hanging it for ten.
TINY = ["recipe=tiny", "wandb.mode=disabled", "launch.dist_timeout_s=60"]

# The distributed-engine tests' reference runs (test_engines_distributed, test_engine_deepspeed):
# 10 steps with checkpoints at 5 and 10, so an "interrupted" copy resumes from step 5.
TEN_STEPS = [
    "recipe=tiny",
    "train.max_steps=10",
    "checkpoint.every_steps=5",
    "checkpoint.keep=2",
    "eval.after_training=false",
    "wandb.mode=disabled",
    "launch.dist_timeout_s=60",
]
TWO_RANKS = ["launch.nproc_per_node=2"]


def ftl_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # DeepSpeed's JIT ops, built once
    return env


def ftl(
    *args: str,
    timeout: float = 300,
    check: bool = True,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    """``cwd``: where the user types the command (this checkout's launcher is imported from any)."""
    # Its own session, so that a run past the timeout is killed with its torchrun agent and ranks
    # (left running, they would slow every later test), and the failure shows what it printed.
    child = subprocess.Popen(
        [sys.executable, "-m", "launcher", *args],
        cwd=cwd,
        env={**(env or ftl_env()), "PYTHONPATH": str(ROOT)} if cwd != ROOT else env or ftl_env(),
        text=True,
        stdin=None if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        pytest.fail(
            f"ftl {' '.join(args)} ran past {timeout} s; killed with its process group\n{out[-3000:]}\n{err[-6000:]}"
        )
    proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    if check:
        assert proc.returncode == 0, (
            f"ftl {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def wandb_offline_attempts(run_dir: Path, run_id: str) -> list[Path]:
    """The run dir's W&B offline run folders, checked to all belong to run `run_id`.

    wandb names them offline-run-<YYYYmmdd_HHMMSS>-<id>, adding "-1", "-2"... when an attempt starts
    in the same second as an earlier one (a quick resume)."""
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    pattern = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")
    assert all(pattern.fullmatch(p.name) and (p / f"run-{run_id}.wandb").is_file() for p in attempts), attempts
    return attempts


def step_dir(run_dir: Path, step: int) -> Path:
    from launcher.train.checkpoint import checkpoints_dir

    return checkpoints_dir(run_dir) / f"step-{step}"


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest elementwise difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def reference_run(tmp_path_factory: pytest.TempPathFactory, strategy: str) -> Path:
    """A TEN_STEPS run of `strategy` on TWO_RANKS, in a fresh directory named after it (the body of
    the distributed-engine tests' module-scoped reference fixtures)."""
    run_dir = tmp_path_factory.mktemp(strategy)
    ftl("train", *TEN_STEPS, *TWO_RANKS, f"strategy={strategy}", f"run.dir={run_dir}")
    return run_dir


def copy_interrupted(reference: Path, run_dir: Path, step: int = 5) -> Path:
    """A run dir as a job killed after its step-`step` checkpoint leaves it: ftl's marker, the checkpoint."""
    from launcher.files import mark_dir

    shutil.copytree(step_dir(reference, step), step_dir(run_dir, step))
    mark_dir(run_dir, "run")
    return run_dir


def assert_losses_close(rows: list[dict[str, Any]], reference: list[dict[str, Any]], rel: float) -> None:
    """Every row's lr equals the reference's at the same step, and its loss is within `rel`."""
    by_step = {r["step"]: r for r in reference}
    assert rows, "no metrics"
    for row in rows:
        ref = by_step[row["step"]]
        assert row["lr"] == pytest.approx(ref["lr"], rel=1e-9), row["step"]
        assert row["loss"] == pytest.approx(ref["loss"], rel=rel), (row["step"], row["loss"], ref["loss"])


def plain_transformers_logits(
    model_dir: Path, ids: torch.Tensor, work: Path, check_tokenizer_and_dtype: bool = False
) -> torch.Tensor:
    """The logits for `ids` of the model in `model_dir` as transformers alone computes them: a fresh
    process loads it, imports nothing of ftl (it asserts so), and leaves its files in `work`. With
    check_tokenizer_and_dtype it also loads the tokenizer, which must have a chat template, and
    requires fp32 weights."""
    import torch

    checks = (
        (
            "from transformers import AutoTokenizer\n"
            "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "assert tokenizer.chat_template, 'no chat template'\n"
            "assert model.dtype == torch.float32, model.dtype\n"
        )
        if check_tokenizer_and_dtype
        else ""
    )
    plain = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        f"{checks}"
        "with torch.no_grad():\n"
        "    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])\n"
        "assert not [m for m in sys.modules if m == 'launcher' or m.startswith('launcher.')]\n"
    )
    torch.save(ids, work / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", plain, str(model_dir), str(work / "ids.pt"), str(work / "logits.pt")],
        cwd=work,
        env=ftl_env(),
        check=True,
        timeout=120,
    )
    return torch.load(work / "logits.pt")


def need_gpus(n: int) -> None:
    """Skip the calling test, visibly, unless this machine has ``n`` CUDA GPUs."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip(f"needs {n} CUDA GPU(s): torch.cuda.is_available() is False")
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} CUDA GPUs, found {torch.cuda.device_count()}")


def tiny(tok: Any, attn: str, model_type: str = "llama", **extra: Any) -> Any:
    """A random 2-layer Llama-family model (hidden 64) for ``tok``, seeded: the same one every call."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.config.schema import ArchConfig
    from launcher.model import attention
    from launcher.model.loading import arch_to_hf_config

    attention.register()
    arch = ArchConfig(
        model_type=model_type,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=1024,
    )
    config = arch_to_hf_config(arch, tok)
    for k, v in extra.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def hand_next_token_terms(
    base: Any, tuned: Any, examples: list[dict[str, list[int]]], k: int
) -> list[tuple[float, float, float]]:
    """(−log q(label), −log p(label), KL(p || q)) at every labelled position, p the base's and q the
    tuned model's next-token distribution, one example at a time over its full logits in float64:
    the independent computation of launcher/objectives/base_dist.py. The KL is summed term by term
    over the base's ``k`` most likely tokens plus one outcome for the rest (k = the vocabulary: the whole KL)."""
    import math

    import torch
    import torch.nn.functional as F

    terms = []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            lp = F.log_softmax(base(ids).logits[0].double(), -1)
            lq = F.log_softmax(tuned(ids).logits[0].double(), -1)
        for t in range(len(ex["input_ids"]) - 1):
            label = ex["labels"][t + 1]
            if label == -100:
                continue
            p, q = lp[t].exp().tolist(), lq[t].exp().tolist()
            top = sorted(range(len(p)), key=lambda i: -p[i])[:k]
            kl = sum(p[i] * math.log(p[i] / q[i]) for i in top)
            p_rest, q_rest = 1 - sum(p[i] for i in top), 1 - sum(q[i] for i in top)
            if p_rest > 1e-12:
                kl += p_rest * math.log(p_rest / q_rest)
            terms.append((-math.log(q[label]), -math.log(p[label]), kl))
    return terms


def worker_pid(config_path: Path, rank: int) -> int:
    """The pid of the torchrun worker with RANK=rank running this config (not the agent)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        agent = b"torch.distributed.run" in argv or b"launcher.launch.torchrun" in argv
        if str(config_path).encode() in argv and b"launcher.train" in argv and not agent:
            if f"RANK={rank}".encode() in environ:
                return int(proc.name)
    raise AssertionError(f"no rank-{rank} worker running {config_path}")
