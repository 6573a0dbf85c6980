"""Where ftl's CPU step time goes: one optimizer step with each speed change switched on in turn.

    python bench/ablate_cpu_step.py            # SmolLM2-135M, the demo data, 4 packs of 512 slots (~4 min on 2 cores)
    python bench/ablate_cpu_step.py --quick    # tiny random Llama, 3 steps: checks the script only

Configurations (each adds one change to the one before):

1. transformers' ``sdpa`` (block-diagonal mask per pack), the loss over full logits, for-each AdamW;
2. + the output layer and fp32 loss at labelled positions only (:mod:`launcher.model.loss`);
3. + ``sdpa_varlen``, attention per packed example (:mod:`launcher.model.attention`);
4. + fused AdamW (ftl before its second speed round: ``train.loss=logits train.compile=false``);
5. + the head and loss in chunks, never the full logits (``train.loss=chunked``, :mod:`launcher.model.loss`);
6. + short examples' attention in three ops each instead of SDPA one by one
   (:func:`launcher.model.attention.short_causal`; the rows above run ``sdpa_per_example``);
7. + each decoder layer compiled (``train.compile=true``, :mod:`launcher.model.compile`), the
   packed attention run eagerly between two graphs per layer (how ftl compiled before 2026-12-02);
8. + the packed attention as one operator inside each layer's graph
   (:mod:`launcher.model.attention_op`: one graph per layer, no break);
9. + the residual stream in bf16 (the embeddings' output cast, ``train.fp32_residual=false``,
   :func:`launcher.runtime.device.bf16_residual_stream`): what ``ftl train`` runs.

A step is forward + backward + optimizer step on 4 packs under bf16 autocast. The configurations
take turns on one model, round by round on the same packs (a slow spell of a shared machine hits
them alike); the first round is left out and each one's median is printed, with its speed-up
over configuration 1. The compiled configurations' first steps (compile included) are printed
beside them; the others run the same layers with compiled code switched off (``torch.compiler``'s
``force_eager`` stance). Delete inductor's cache (``/tmp/torchinductor_$USER``) first for a cold
compile time.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name, attention (sdpa_varlen+: with the short-example path; BROKEN: that, run outside the compiled
# graph), loss (full: logits everywhere; else train.loss), fused AdamW, compiled layers, bf16 residual stream
BROKEN = "sdpa_varlen_between_graphs+"
CONFIGS = [
    ("transformers sdpa, full logits, for-each AdamW", "sdpa", "full", False, False, False),
    ("+ loss at labelled positions only", "sdpa", "logits", False, False, False),
    ("+ sdpa_varlen", "sdpa_varlen", "logits", False, False, False),
    ("+ fused AdamW", "sdpa_varlen", "logits", True, False, False),
    ("+ chunked head and loss", "sdpa_varlen", "chunked", True, False, False),
    ("+ short examples' attention in three ops", "sdpa_varlen+", "chunked", True, False, False),
    ("+ compiled decoder layers, attention between graphs", BROKEN, "chunked", True, True, False),
    ("+ attention as one operator in the graph", "sdpa_varlen+", "chunked", True, True, False),
    ("+ residual stream in bf16 (ftl train)", "sdpa_varlen+", "chunked", True, True, True),
]


def step_times(recipe: str, steps: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per configuration, the seconds of its steps. The configurations take turns on one model
    (round after round, each on the same 4 packs within a round), so a slow spell of the machine
    hits them alike; the first round is left out."""
    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from launcher.data.build import build_datasets, collate
    from launcher.data.packing import model_inputs, pack_dataset
    from launcher.data.types import IGNORE_INDEX
    from launcher.engines.common import build_param_groups
    from launcher.model import attention
    from launcher.model.compile import compile_decoder_layers, eager
    from launcher.model.loading import load_model_and_tokenizer
    from launcher.model.loss import next_token_loss
    from launcher.runtime.device import bf16_residual_stream
    from launcher.session import load_config

    cfg = load_config([f"recipe={recipe}", "train.seq_len=512"]).cfg
    torch.manual_seed(0)
    attention.register()
    AttentionInterface.register(BROKEN[:-1], torch.compiler.disable(attention.varlen_attention_forward))
    ALL_MASK_ATTENTION_FUNCTIONS.register(BROKEN[:-1], attention.varlen_mask)
    model, tok = load_model_and_tokenizer(cfg.model, dtype=torch.float32)
    train, _ = build_datasets(cfg.data, tok, 512, seed=0)
    packs = pack_dataset(train, 512)
    groups = build_param_groups(model, 0.0)
    optimizers = {fused: torch.optim.AdamW(groups, lr=1e-5, fused=fused) for fused in (False, True)}
    compile_decoder_layers(model)

    def autocast() -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16)

    short_path = attention.per_example

    def step(batch: dict[str, Any], attn: str, loss_impl: str, fused: bool, compiled: bool, bf16_stream: bool) -> float:
        model.config._attn_implementation = attn.rstrip("+")
        attention.per_example = short_path if attn.endswith("+") else attention.sdpa_per_example
        cast = bf16_residual_stream(model) if bf16_stream else None
        try:
            with contextlib.nullcontext() if compiled else eager():
                return timed_step(batch, loss_impl, fused)
        finally:
            if cast is not None:
                cast.remove()

    def timed_step(batch: dict[str, Any], loss_impl: str, fused: bool) -> float:
        start = time.perf_counter()
        if loss_impl != "full":
            loss = next_token_loss(model, model_inputs(batch), batch["labels"], autocast=autocast(), impl=loss_impl)
        else:
            with autocast():
                logits = model(**model_inputs(batch), use_cache=False).logits
            flat = logits[:, :-1].float().reshape(-1, logits.size(-1))
            loss = F.cross_entropy(flat, batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        loss.backward()
        optimizers[fused].step()
        optimizers[fused].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name, *_ in CONFIGS}
    first_compiled: dict[str, float] = {}
    for i in range(steps):
        batch = collate([packs[(4 * i + j) % len(packs)] for j in range(4)], tok.pad_token_id)
        for name, *config in CONFIGS:
            seconds = step(batch, *config)
            if i > 0:
                times[name].append(seconds)
            elif config[3] and not config[4]:  # a compiled configuration's compile
                first_compiled[name] = seconds
    return times, first_compiled


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="tiny random model, 3 steps: checks the script, not a result"
    )
    parser.add_argument("--steps", type=int, default=None, help="rounds (default 8; quick 3)")
    args = parser.parse_args(argv)
    recipe = "tiny" if args.quick else "demo"
    steps = args.steps or (3 if args.quick else 8)
    print(f"bench: {len(CONFIGS)} configurations, {steps} rounds ...", file=sys.stderr, flush=True)
    times, first_compiled = step_times(recipe, steps)
    rows = [{"config": name, "median_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()]
    base = rows[0]["median_s"]
    print(
        f"recipe={recipe}, 4 packs of 512 slots, bf16 autocast, {steps - 1} timed rounds"
        + (" (QUICK: not a result)" if args.quick else "")
    )
    print(f"{'configuration':<52} | {'median s':>8} | {'min s':>6} | {'speed-up':>8}")
    print(f"{'-' * 52}-|-{'-' * 8}-|-{'-' * 6}-|-{'-' * 8}")
    for r in rows:
        print(f"{r['config']:<52} | {r['median_s']:>8.2f} | {r['min_s']:>6.2f} | {base / r['median_s']:>7.2f}x")
    for name, seconds in first_compiled.items():  # the second compile runs in a process the first warmed up
        print(f"first step of {name!r} (its compile included): {seconds:.1f} s")
    return rows


if __name__ == "__main__":
    main()
