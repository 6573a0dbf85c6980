"""MFU of a Llama-3-8B-shaped full fine-tune on one GPU, with FSDP2 and DeepSpeed ZeRO-3, bf16.

    python bench/gpu_mfu.py              # as many 8B layers as fit, seq 4096, 10 steps each (a few minutes)
    python bench/gpu_mfu.py --quick      # 2 layers, seq 1024, 4 steps (the suite's GPU test)
    python bench/gpu_mfu.py --layers 12  # choose the depth yourself
    python bench/gpu_mfu.py --compile off  # FSDP2 without its compiled-layers row (default: both; quick: off)
    python bench/gpu_mfu.py --rows fsdp,fsdp-compiled,zero3,fsdp-compiled-ac --head   # bench/gpu_check.sh's choice

Without CUDA it prints ``no GPU: skipped ...`` and exits 0 (``--require-gpu`` makes that exit 3):
nothing is measured, nothing is estimated.

The model: ``conf/model/llama3-8b.yaml``'s architecture (hidden 4096, MLP 14336, 32 heads, 8 KV
heads, vocab 128,256) with ``num_layers`` cut to what fits, randomly initialised on the GPU through
:func:`launcher.model.loading.arch_to_hf_config` (``model.source=random``; no download; the bundled tiny
tokenizer is named only because the schema asks for one and gives the special ids). The batch is synthetic
token ids (``micro_batch × seq_len``), labels = inputs; ``grad_accum`` 1; sdpa attention; no
activation checkpointing (so no recomputation hides in the numbers).

Each strategy runs in its own process with a one-rank process group (nccl):

* ``fsdp``: :func:`launcher.engines.fsdp.apply_fully_shard` (per decoder layer + root, bf16
  MixedPrecisionPolicy, fp32 reduce) and ftl's AdamW; ftl's FSDPEngine skips sharding at one rank,
  so the sharding is applied here to measure the FSDP2 code path itself.
* ``zero3``: ftl's :class:`launcher.engines.deepspeed.DeepSpeedEngine` with ``strategy=zero3``
  (bf16 weights, fp32 master copy and Adam states), the same engine ``ftl train`` uses.

``--compile`` adds (``both``, the default) or keeps alone (``on``) an FSDP2 row whose decoder
layers are compiled first (:func:`launcher.model.compile.compile_decoder_layers`, before
``fully_shard``, as ``train.compile`` does); ZeRO-3 never compiles layers (its parameter fetch
hooks sit inside them: ``EngineTraits.compiles_layers``), so its row is always eager. A compiled
row's warm-up steps hold the compile.

MFU = 6 · N · tokens/s / peak, with peak from :func:`launcher.train.mfu.peak_flops` (989 TFLOP/s
dense bf16 for H100 SXM / H200). Two N are printed: ``N`` without the input embedding table (a
lookup, no FLOPs: the conservative figure, the one the goal is judged on, and ftl's own ``mfu``
metric's convention, :mod:`launcher.train.mfu`) and ``N all`` with it. Attention's s² FLOPs are not
counted (also conservative). tokens/s is over the steps after ``--warmup`` steps, timed with CUDA syncs.
Goal: ≥ 45% MFU on an H200.

``--rows`` names the rows instead of ``--strategies``/``--compile``: ``STRATEGY[-compiled][-ac]``,
``-ac`` with activation checkpointing (ftl's :func:`launcher.engines.common.apply_activation_checkpointing`
before sharding, as the engines apply it; the recomputed forward is not counted in N, so its MFU is
lower by design).

``--head`` adds the output layer and loss alone at vocab 128,256 and hidden 4096, one micro-batch
(``--micro-batch`` × ``--seq-len`` tokens, all labelled), bf16 weight as FSDP's compute copy:
forward + backward through :func:`launcher.model.loss.next_token_loss` with ``impl`` chunked
(ftl's default), logits (the full [tokens, vocab] logits) and liger; median time and peak memory
above what was allocated before.

The projected 8B MFU (with ``--head``) puts a row's timings on the 32-layer model: a step's
forward + backward is split into the output layer and loss (the ``chunked`` head time) and the
decoder layers (the rest, embedding lookup included), the layers' part scaled by 32 / layers; the
optimizer's time scales with the parameters it updates, over :data:`PROJECT_WORLD` GPUs that shard
them (FSDP2 / ZeRO-3), communication taken as hidden behind compute. Estimated, not measured: the
measured MFU at the cut depth is beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.paths import asset

STRATEGIES = ("fsdp", "zero3")
ROW_NAMES = {"fsdp": "FSDP2 (fully_shard, bf16 mixed precision)", "zero3": "DeepSpeed ZeRO-3 (bf16)"}
GOAL_MFU = 0.45
PROJECT_WORLD = 8  # GPUs the projected 8B step shards its optimizer states over
HEAD_IMPLS = ("chunked", "logits", "liger")
NO_GPU_EXIT = 3  # with --require-gpu
# Memory arithmetic that picks the depth (deliberately generous; --layers overrides it):
BYTES_PER_PARAM = 20  # fp32 master 4 + fp32 grad 4 + Adam 8, plus bf16 weight/grad copies (ZeRO-3 keeps both)
ACT_BYTES_PER_TOKEN_LAYER = 250e3  # bf16 activations of one 8B decoder layer without checkpointing
LOGIT_BYTES_PER_TOKEN_VOCAB = 14  # bf16 logits, their fp32 upcast, softmax and gradient
RESERVED_BYTES = 4e9  # CUDA context, cuBLAS/NCCL workspaces, allocator slack


def model_overrides(
    layers: int, strategy: str, seq_len: int, micro_batch: int, run_dir: Path, ac: bool = False
) -> list[str]:
    return [
        # source=random validates only with a tokenizer named; it is read for its special ids alone.
        "model=llama3-8b",
        "model.source=random",
        f"model.tokenizer={asset('tiny-tokenizer')}",
        f"model.arch.num_layers={layers}",
        f"strategy={strategy}",
        "train.precision=bf16",
        "train.device=cuda",
        f"train.seq_len={seq_len}",
        f"train.micro_batch_size={micro_batch}",
        "train.grad_accum=1",
        "train.grad_clip=1.0",
        f"run.dir={run_dir}",
        "wandb.mode=disabled",
        f"strategy.activation_checkpointing={str(ac).lower()}",
    ]


def layer_params(arch: Any) -> int:
    h, kv = arch.hidden_size, arch.hidden_size // arch.num_heads * arch.num_kv_heads
    return 2 * h * h + 2 * h * kv + 3 * h * arch.intermediate_size + 2 * h  # q,o + k,v + gate,up,down + 2 norms


def layers_that_fit(arch: Any, total_bytes: float, tokens: int, fraction: float = 0.85) -> int:
    """Pure arithmetic: the depth whose model states and activations fit in ``fraction`` of memory."""
    fixed = arch.vocab_size * arch.hidden_size * (1 if arch.tie_embeddings else 2) * BYTES_PER_PARAM
    fixed += tokens * arch.vocab_size * LOGIT_BYTES_PER_TOKEN_VOCAB + RESERVED_BYTES
    per_layer = layer_params(arch) * BYTES_PER_PARAM + tokens * ACT_BYTES_PER_TOKEN_LAYER
    return max(1, min(arch.num_layers, int((total_bytes * fraction - fixed) // per_layer)))


# --------------------------------------------------------------------------------------------
# worker: one strategy, one process


def worker(args: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.engines.common import apply_activation_checkpointing, build_optimizer
    from launcher.engines.deepspeed import DeepSpeedEngine, ensure_process_group
    from launcher.engines.fsdp import apply_fully_shard
    from launcher.model import attention
    from launcher.model.loading import arch_to_hf_config, ensure_pad_token, load_tokenizer
    from launcher.model.loss import next_token_loss
    from launcher.runtime.distributed import DistInfo
    from launcher.session import load_config
    from launcher.train.mfu import peak_flops

    strategy, layers, seq_len, micro_batch = args["strategy"], args["layers"], args["seq_len"], args["micro_batch"]
    cfg = load_config(
        model_overrides(layers, strategy, seq_len, micro_batch, Path(args["run_dir"]), args.get("ac", False))
    ).cfg
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    ensure_pad_token(tokenizer)
    config = arch_to_hf_config(cfg.model.arch, tokenizer)
    attention.register()  # model.attn_implementation is ftl's sdpa_varlen by default
    with torch.device(device):  # initialise on the GPU: seconds, where the CPU would take minutes
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=cfg.model.attn_implementation, dtype=torch.float32
        )
    n_all = sum(p.numel() for p in model.parameters())
    n_compute = n_all - model.get_input_embeddings().weight.numel()
    dist = DistInfo()
    ensure_process_group(device)  # a one-rank nccl group, as ftl's engines get for one process

    if args.get("compile"):
        from launcher.model.compile import compile_decoder_layers

        compile_decoder_layers(model, device)
    if strategy == "fsdp":
        if (
            cfg.strategy.activation_checkpointing
        ):  # before sharding, as FSDPEngine applies it (DeepSpeedEngine applies its own)
            apply_activation_checkpointing(model)
        apply_fully_shard(model, dist, device, reshard_after_forward=True, hybrid=False, compute_dtype=torch.bfloat16)
        optimizer = build_optimizer(model, cfg.train)
        forward = model

        def backward(loss: Any) -> None:
            loss.backward()

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        engine = DeepSpeedEngine(cfg, model, dist, device)
        engine.setup(args["steps"])
        forward = engine.model

        def backward(loss: Any) -> None:
            with engine.grad_sync(True):
                engine.backward(loss)

        def step() -> None:
            engine.step()

    tokens = micro_batch * seq_len
    input_ids = torch.randint(0, cfg.model.arch.vocab_size, (micro_batch, seq_len), device=device)
    times, fb_times = [], []
    for _ in range(args["steps"]):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = next_token_loss(forward, {"input_ids": input_ids}, input_ids) / float(tokens - micro_batch)
        backward(loss)
        torch.cuda.synchronize()
        fb_times.append(time.perf_counter() - start)
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    measured, fb = times[args["warmup"] :], fb_times[args["warmup"] :]
    tokens_per_s = tokens * len(measured) / sum(measured)
    peak = peak_flops(device)
    return {
        "strategy": strategy,
        "compile": bool(args.get("compile")),
        "ac": bool(args.get("ac")),
        "gpu": torch.cuda.get_device_name(device),
        "layers": layers,
        "n_compute": n_compute,
        "n_all": n_all,
        "tokens_per_step": tokens,
        "step_s": sum(measured) / len(measured),
        "fb_s": sum(fb) / len(fb),
        "tokens_per_s": tokens_per_s,
        "peak_flops": peak,
        "mfu": 6 * n_compute * tokens_per_s / peak if peak else None,
        "mfu_all": 6 * n_all * tokens_per_s / peak if peak else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        "loss": float(loss),
    }


def head_only(hidden_size: int, vocab: int, device: Any, dtype: Any) -> Any:
    """The output layer alone, as :func:`launcher.model.loss.next_token_loss` finds it in a causal
    LM (``get_output_embeddings``, a Llama ``config``, ``.logits``), fed hidden states as ``inputs_embeds``."""
    from types import SimpleNamespace

    from torch import nn

    class HeadOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = nn.Linear(hidden_size, vocab, bias=False, device=device, dtype=dtype)
            self.config = SimpleNamespace(model_type="llama")

        def get_output_embeddings(self) -> nn.Module:
            return self.lm_head

        def forward(self, inputs_embeds: Any, use_cache: bool = False) -> Any:
            return SimpleNamespace(logits=self.lm_head(inputs_embeds))

    return HeadOnly()


def head_worker(args: dict[str, Any]) -> dict[str, Any]:
    """The output layer and loss alone, per ``impl``: median ms of forward + backward, peak memory."""
    import statistics

    import torch

    from launcher.model.loss import next_token_loss

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    hidden_size, vocab, micro_batch, seq_len = args["hidden"], args["vocab"], args["micro_batch"], args["seq_len"]

    torch.manual_seed(0)
    head = head_only(hidden_size, vocab, device, torch.bfloat16)
    hidden = torch.randn(micro_batch, seq_len, hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (micro_batch, seq_len), device=device)
    rows = []
    for impl in args["impls"]:

        def once(impl=impl) -> float:
            head.zero_grad(set_to_none=True)
            hidden.grad = None
            loss = next_token_loss(head, {"inputs_embeds": hidden}, labels, impl=impl)
            loss.backward()
            return float(loss.detach())

        try:
            once()  # warm-up: Triton's autotuning, cuBLAS's workspaces
            head.zero_grad(set_to_none=True)
            hidden.grad = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(args["repeats"]):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                loss = once()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            rows.append(
                {
                    "impl": impl,
                    "s": statistics.median(times),
                    "peak_gb": (torch.cuda.max_memory_allocated(device) - before) / 2**30,
                    "loss": loss / (micro_batch * (seq_len - 1)),
                }
            )
        except Exception as e:  # liger-kernel missing, or a kernel failing: its row says so, the others still run
            rows.append({"impl": impl, "error": f"{type(e).__name__}: {str(e)[:150]}"})
    return {"head": rows, "tokens": micro_batch * seq_len}


def project_8b(row: dict[str, Any], head_s: float, arch_layers: int, n_8b_compute: int, n_8b_all: int) -> float | None:
    """MFU of the whole 8B model from a row at a cut depth (the module docstring's projection)."""
    if not row.get("peak_flops"):
        return None
    layers_s = max(0.0, row["fb_s"] - head_s) * arch_layers / row["layers"]
    optimizer_s = (row["step_s"] - row["fb_s"]) * n_8b_all / row["n_all"] / PROJECT_WORLD
    return 6 * n_8b_compute * row["tokens_per_step"] / (head_s + layers_s + optimizer_s) / row["peak_flops"]


# --------------------------------------------------------------------------------------------
# driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(args: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
    }
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(args)],
            check=False,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {**args, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(
            f"gpu_mfu: {args.get('strategy', 'head')} exited {proc.returncode}:\n{proc.stderr[-4000:]}", file=sys.stderr
        )
        return {**args, "error": f"exit {proc.returncode}: {tail[0][:120]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def row_name(r: dict[str, Any]) -> str:
    return (
        ROW_NAMES[r["strategy"]] + (" + compiled layers" if r.get("compile") else "") + (" + AC" if r.get("ac") else "")
    )


def table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "strategy",
        "layers",
        "N (no emb)",
        "tokens/step",
        "step s",
        "tokens/s",
        "MFU",
        "MFU (N all)",
        "peak GiB",
        "projected 8B MFU",
    ]
    cells = [headers]
    for r in rows:
        if "error" in r:
            cells.append([row_name(r), "-", "-", "-", "-", "-", "failed", r["error"], "-", "-"])
            continue

        def pct(v):
            return f"{v:.1%}" if v is not None else "peak unknown"

        cells.append(
            [
                row_name(r),
                str(r["layers"]),
                f"{r['n_compute'] / 1e9:.2f}B",
                f"{r['tokens_per_step']:,}",
                f"{r['step_s']:.3f}",
                f"{r['tokens_per_s']:,.0f}",
                pct(r["mfu"]),
                pct(r["mfu_all"]),
                f"{r['peak_mem_gb']:.1f}",
                pct(r["projected"]) if "projected" in r else "-",
            ]
        )
    return aligned(cells)


def head_table(result: dict[str, Any]) -> str:
    cells = [["output layer + loss", "ms per micro-batch", "peak GiB above inputs", "loss per token"]]
    for r in result.get("head", []):
        if "error" in r:
            cells.append([r["impl"], "failed", r["error"], "-"])
        else:
            cells.append([r["impl"], f"{r['s'] * 1e3:.2f}", f"{r['peak_gb']:.2f}", f"{r['loss']:.4f}"])
    if "error" in result:
        cells.append(["all", "failed", result["error"], "-"])
    return aligned(cells)


def aligned(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [
        " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells
    ]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_rows(text: str) -> list[tuple[str, bool, bool]]:
    """``fsdp,fsdp-compiled,zero3-ac`` -> [(strategy, compiled, ac)]; ZeRO-3 rows never compile."""
    out = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        strategy, *flags = name.split("-")
        if (
            strategy not in STRATEGIES
            or not set(flags) <= {"compiled", "ac"}
            or (strategy == "zero3" and "compiled" in flags)
        ):
            raise ValueError(
                f"row {name!r}: expected STRATEGY[-compiled][-ac] with STRATEGY in {', '.join(STRATEGIES)} (zero3 never compiled)"
            )
        out.append((strategy, "compiled" in flags, "ac" in flags))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 layers, seq 1024, 4 steps: checks the path, measures nothing"
    )
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of fsdp,zero3")
    parser.add_argument(
        "--rows",
        help="the rows by name, STRATEGY[-compiled][-ac] (e.g. fsdp,fsdp-compiled-ac,zero3): instead of "
        "--strategies and --compile",
    )
    parser.add_argument(
        "--head",
        action="store_true",
        help="the output layer + loss alone (chunked, logits, liger), and the projected 8B MFU",
    )
    parser.add_argument("--layers", type=int, help="decoder layers (default: as many as fit, at most 32)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default 4096; quick 1024)")
    parser.add_argument("--micro-batch", type=int, default=1, help="rows per step")
    parser.add_argument("--steps", type=int, help="steps per strategy (default 10; quick 4)")
    parser.add_argument("--warmup", type=int, help="first steps left out of the rate (default 3; quick 2)")
    parser.add_argument(
        "--compile",
        choices=("off", "on", "both"),
        help="FSDP2 with compiled decoder layers: not, only, or beside the eager row (default both; quick off)",
    )
    parser.add_argument("--timeout", type=float, default=240, help="seconds per strategy")
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds for all rows: a row that would start with less than 15 s left is "
        "not run (its row says so), and a row's limit is what is left (default: no limit)",
    )
    parser.add_argument(
        "--require-gpu", action="store_true", help=f"exit {NO_GPU_EXIT} instead of 0 when there is no GPU"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print("RESULT " + json.dumps(head_worker(job) if job.get("kind") == "head" else worker(job)), flush=True)
        return 0
    try:
        if args.rows:
            variants = parse_rows(args.rows)
        else:
            compile_setting = args.compile or ("off" if args.quick else "both")
            compiles = {"off": [False], "on": [True], "both": [False, True]}[compile_setting]
            strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
            variants = parse_rows(
                ",".join(
                    f"{s}-compiled" if c else s for s in strategies for c in (compiles if s == "fsdp" else [False])
                )
            )
    except ValueError as e:
        parser.error(str(e))

    import torch

    if not torch.cuda.is_available():
        print("no GPU: skipped (bench/gpu_mfu.py measures MFU on a CUDA GPU; torch sees none here)")
        return NO_GPU_EXIT if args.require_gpu else 0
    seq_len = args.seq_len or (1024 if args.quick else 4096)
    steps = args.steps or (4 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    if steps <= warmup:
        parser.error("--steps must exceed --warmup")
    from launcher.session import load_config

    with tempfile.TemporaryDirectory(prefix="ftl-mfu-") as tmp:
        arch = load_config(model_overrides(32, "fsdp", seq_len, args.micro_batch, Path(tmp))).cfg.model.arch
        total = torch.cuda.get_device_properties(0).total_memory
        layers = args.layers or (2 if args.quick else layers_that_fit(arch, total, args.micro_batch * seq_len))
        print(
            f"gpu_mfu: {torch.cuda.get_device_name(0)} ({total / 2**30:.0f} GiB), Llama-3-8B shape with {layers} of "
            f"{arch.num_layers} layers, {args.micro_batch} x {seq_len} tokens per step, {steps} steps "
            f"({warmup} warm-up)",
            file=sys.stderr,
        )
        deadline = time.monotonic() + args.budget if args.budget else math.inf

        def limit() -> float:
            return min(args.timeout, deadline - time.monotonic())

        head: dict[str, Any] = {}
        if args.head:  # first: the projection needs it, and it is the shortest
            head = run_worker(
                {
                    "kind": "head",
                    "impls": list(HEAD_IMPLS),
                    "hidden": arch.hidden_size,
                    "vocab": arch.vocab_size,
                    "micro_batch": args.micro_batch,
                    "seq_len": seq_len,
                    "repeats": 5,
                },
                limit(),
            )
            print(f"gpu_mfu: head: {json.dumps(head)}", file=sys.stderr, flush=True)
        rows = []
        for strategy, compiled, ac in variants:
            tag = f"{strategy}{'-compiled' if compiled else ''}{'-ac' if ac else ''}"
            job = {
                "strategy": strategy,
                "compile": compiled,
                "ac": ac,
                "layers": layers,
                "seq_len": seq_len,
                "micro_batch": args.micro_batch,
                "steps": steps,
                "warmup": warmup,
                "run_dir": str(Path(tmp) / tag),
            }
            rows.append(run_worker(job, limit()) if limit() >= 15 else {**job, "error": "not run: --budget spent"})
            print(f"gpu_mfu: {tag}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)  # what a cut call still shows
    chunked = next((r for r in head.get("head", []) if r["impl"] == "chunked" and "s" in r), None)
    if chunked:
        n_8b_compute = arch.num_layers * layer_params(arch) + arch.hidden_size * (
            1 + arch.vocab_size
        )  # layers, final norm, head
        n_8b_all = n_8b_compute + arch.vocab_size * arch.hidden_size
        for r in rows:
            if "error" not in r:
                r["projected"] = project_8b(r, chunked["s"], arch.num_layers, n_8b_compute, n_8b_all)
    print(table(rows))
    if args.head:
        print("\n" + head_table(head))
    done = [r for r in rows if r.get("mfu") is not None]
    summary = []
    if done:
        best = max(done, key=lambda r: r["mfu"])
        print(
            f"\nMFU >= {GOAL_MFU:.0%} (6·N without the input embedding): {'yes' if best['mfu'] >= GOAL_MFU else 'NO'} (best {best['mfu']:.1%})"
        )
        summary.append(f"best measured MFU {best['mfu']:.1%} ({row_name(best)}, {layers} layers)")
    projected = [r for r in done if r.get("projected") is not None]
    if projected:
        best = max(projected, key=lambda r: r["projected"])
        print(
            f"projected 8B MFU (32 layers, optimizer over {PROJECT_WORLD} GPUs): best {best['projected']:.1%} ({row_name(best)}) "
            f"against the {GOAL_MFU:.0%} goal: {'met' if best['projected'] >= GOAL_MFU else 'NOT met'}"
        )
        summary.append(f"projected 8B {best['projected']:.1%} vs goal {GOAL_MFU:.0%}")
    heads = {r["impl"]: r for r in head.get("head", []) if "s" in r}
    if heads:
        summary.append(
            "head " + ", ".join(f"{k} {v['s'] * 1e3:.1f} ms {v['peak_gb']:.1f} GiB" for k, v in heads.items())
        )
    if args.quick:
        print("quick mode: 2 layers and few steps; these numbers are no result.")
    failed = (
        [row_name(r) for r in rows if "error" in r]
        + [r["impl"] for r in head.get("head", []) if "error" in r]
        + (["head"] if "error" in head else [])
    )
    print("SUMMARY " + "; ".join(summary + ([f"failed: {', '.join(failed)}"] if failed else [])))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
