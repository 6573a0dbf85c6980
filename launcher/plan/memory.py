"""Per-device memory of a fine-tuning run, from the config alone: pure arithmetic, no torch.

``ftl plan`` prints these estimates and refuses (exit 2) a GPU job whose estimate exceeds
``launch.gpu_mem_gb``. Quantities are bytes on one device (one rank). Ψ is a parameter count, N the
number of ranks a sharded state is split over, T = micro_batch_size × seq_len the tokens of one
micro-batch, h/i/V/L the hidden size, MLP size, vocabulary and layer count.

:func:`estimate` = model states (exact per engine: what each keeps in which dtype, and what it
shards; the ZeRO paper's 2Ψ + 2Ψ + 12Ψ where DeepSpeed does that) + activations (Korthikanti et al.
2022, adapted to a Llama-style decoder) + engine buffers, a fixed 1 GiB of CUDA context and 10%
fragmentation. docs/MEMORY_MODEL.md derives every term; ``bench/planner_validation.py`` checks the
model states against the real engines (within 1%).
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import re
from dataclasses import dataclass, field, replace

from launcher.config.schema import ArchConfig, StrategyBase
from launcher.engines.traits import EngineTraits, engine_traits, strategy_named
from launcher.model.families import expert_width, head_dim, layout, loss_chunk_rows, moe_layer_flags

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4
ADAM_MOMENTS = 8  # exp_avg + exp_avg_sq, fp32 (torch.optim.AdamW and DeepSpeedCPUAdam)
ZERO_K = 12  # the ZeRO paper's K for mixed-precision Adam: fp32 master + two moments
LOGITS_LOSS_PER_LOGIT = 3 * 4  # the backward peak: fp32 log-softmax output + its grad + the upcast logits' grad
CHUNK_PER_LOGIT = 2 * 4  # a chunk's fp32 logits + logsumexp's fp32 temporary
FIXED_GPU_OVERHEAD = 1 * GiB  # CUDA context + cuBLAS workspace + NCCL buffers
FRAGMENTATION = 0.10
ZERO3_SUB_GROUP = 10**9  # DeepSpeed's default sub_group_size: the optimizer steps in chunks of it
NF4_BYTES = 0.5
QUANT_BLOCK, DOUBLE_QUANT_BLOCK = 64, 256

STRATEGY_ROWS = ("ddp", "zero1", "zero2", "fsdp", "zero3", "zero3_offload")  # in order of cost


# --------------------------------------------------------------------------------------------
# parameter counts (exact for every family in launcher/model/families.py: tests/model/test_families.py)


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a decoder, by the part they sit in. "Linear" weights are the ``nn.Linear``
    ones (what QLoRA quantizes and LoRA adapts by name); MoE experts and routers are 3-D or bare
    parameters apart from them."""

    embed: int  # V·h
    head: int  # V·h; 0 when tied to the embeddings
    final_norm: int
    num_layers: int
    layers_linear: int  # every decoder layer's nn.Linear weights
    layers_experts: int  # every MoE layer's experts and router
    layers_other: int  # every decoder layer's norms and biases
    layer: int  # the largest decoder layer, all its parameters (what FSDP gathers at once)
    layer_linear: int  # that layer's weight matrices (linear and experts)
    largest_linear: int  # the largest single weight tensor in a layer (a fused expert tensor in an MoE)
    inactive: int = 0  # expert parameters one token does not pass through (MoE: all but the top-k)

    @property
    def total(self) -> int:
        return self.layers_linear + self.layers_experts + self.layers_other + self.embed + self.head + self.final_norm

    @property
    def active(self) -> int:
        """Parameters one token passes through: the total for a dense model, top-k experts for an MoE."""
        return self.total - self.inactive

    @property
    def linear(self) -> int:
        return self.layers_linear

    @property
    def root(self) -> int:
        """What FSDP wraps in the root unit: everything outside the decoder layers."""
        return self.embed + self.head + self.final_norm


def layer_linears(arch: ArchConfig, moe: bool = False) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each nn.Linear of one decoder layer, by module name; ``moe``:
    a layer whose MLP is a mixture of experts (its experts are not nn.Linear)."""
    h, d, i = arch.hidden_size, head_dim(arch), arch.intermediate_size
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    fam = layout(arch.model_type)
    if fam.fused:
        out = {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h)}
    else:
        out = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    if not moe:
        mlp = {"gate_up_proj": (h, 2 * i)} if fam.fused else {"gate_proj": (h, i), "up_proj": (h, i)}
        out.update(mlp, down_proj=(i, h))
    elif fam.moe == "qwen2_moe":  # the always-on shared expert and its one-output gate
        si = arch.shared_expert_intermediate_size
        out.update(gate_proj=(h, si), up_proj=(h, si), down_proj=(si, h), shared_expert_gate=(h, 1))
    return out


def linear_shapes(arch: ArchConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one dense decoder layer."""
    return layer_linears(arch)


def mlp_width(arch: ArchConfig) -> int:
    """The MLP width one token's activations go through: the dense MLP's, or top-k experts plus the shared one."""
    if not arch.num_experts:
        return arch.intermediate_size
    moe = arch.num_experts_per_tok * expert_width(arch) + arch.shared_expert_intermediate_size
    return max(moe, arch.intermediate_size) if arch.dense_layers else moe


def _layer_counts(arch: ArchConfig, moe: bool) -> tuple[int, int, int, int, int]:
    """One decoder layer: (linear weights, experts + router, norms + biases, largest tensor, inactive experts)."""
    h, d = arch.hidden_size, head_dim(arch)
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    fam = layout(arch.model_type)
    shapes = layer_linears(arch, moe)
    linear = sum(a * b for a, b in shapes.values())
    largest = max(a * b for a, b in shapes.values())
    other = fam.norms_per_layer * h
    if fam.qkv_bias == "always" or (fam.qkv_bias and arch.attention_bias):
        other += q + 2 * kv + (h if fam.o_bias and arch.attention_bias else 0)
    other += {"head": 2 * d, "proj": q + kv}.get(fam.qk_norm, 0)
    if arch.mlp_bias and not moe:
        other += 2 * arch.intermediate_size + h
    experts = inactive = 0
    if moe:
        e, w = arch.num_experts, expert_width(arch)
        experts = e * h + e * 3 * h * w  # router [e, h]; gate_up [e, 2w, h] and down [e, h, w]
        largest = max(largest, e * 2 * w * h)
        inactive = (e - arch.num_experts_per_tok) * 3 * h * w
    return linear, experts, other, largest, inactive


def param_counts(arch: ArchConfig) -> ParamCounts:
    embed = arch.vocab_size * arch.hidden_size
    per_layer = {moe: _layer_counts(arch, moe) for moe in set(moe_layer_flags(arch))}
    flags = moe_layer_flags(arch)
    sums = [sum(per_layer[m][k] for m in flags) for k in range(5)]
    biggest = max(per_layer.values(), key=lambda c: c[0] + c[1] + c[2])
    return ParamCounts(
        embed=embed,
        head=0 if arch.tie_embeddings else embed,
        final_norm=arch.hidden_size,
        num_layers=arch.num_layers,
        layers_linear=sums[0],
        layers_experts=sums[1],
        layers_other=sums[2],
        layer=biggest[0] + biggest[1] + biggest[2],
        layer_linear=biggest[0] + biggest[1],
        largest_linear=max(c[3] for c in per_layer.values()),
        inactive=sums[4],
    )


def resolve_lora_targets(targets: list[str] | tuple[str, ...], arch: ArchConfig) -> tuple[list[str], list[str]]:
    """(known, unknown) module names. ``all-linear`` is PEFT's shorthand for every linear layer
    but the output head; a short name (``q``) means ``q_proj``."""
    names = {n for moe in set(moe_layer_flags(arch)) for n in layer_linears(arch, moe)}
    known: list[str] = []
    unknown: list[str] = []
    for t in targets:
        for name in sorted(names) if t == "all-linear" else [t if t in names or t == "lm_head" else f"{t}_proj"]:
            if name not in names and name != "lm_head":
                unknown.append(t)
            elif name not in known:
                known.append(name)
    return known, unknown


def lora_param_count(
    arch: ArchConfig, r: int, targets: list[str] | tuple[str, ...], modules_to_save: list[str] | tuple[str, ...] = ()
) -> int:
    """Trainable parameters of LoRA: r·(d_in + d_out) per adapted linear (A is r×d_in, B is
    d_out×r), plus a full trainable copy of each module in ``modules_to_save`` (lm_head,
    embed_tokens), plus what peft puts on each MoE layer's experts and router
    (:func:`expert_lora_count`)."""
    known, _ = resolve_lora_targets(targets, arch)
    total = 0
    for moe in moe_layer_flags(arch):
        shapes = layer_linears(arch, moe)
        total += sum(r * (shapes[n][0] + shapes[n][1]) for n in known if n in shapes)
        if moe:
            total += expert_lora_count(arch, r, targets)
    if "lm_head" in known:
        total += r * (arch.hidden_size + arch.vocab_size)
    embed = arch.vocab_size * arch.hidden_size
    total += sum(embed for m in modules_to_save if m in ("lm_head", "embed_tokens"))
    return total


def expert_lora_count(arch: ArchConfig, r: int, targets: list[str] | tuple[str, ...]) -> int:
    """LoRA parameters on one MoE layer's fused experts and router, as the installed peft puts
    them: rank 2r on each expert's gate_up, r on its down and on the router. ``all-linear`` takes
    all three (mixtral since peft 0.21, qwen2_moe since 0.22); from 0.22 qwen2_moe's names of the
    unfused model take their part too: ``down_proj``, ``gate_proj`` with ``up_proj``, ``gate``."""
    moe = layout(arch.model_type).moe
    if not peft_adapts_experts(moe):
        return 0
    h, w, e = arch.hidden_size, expert_width(arch), arch.num_experts
    gate_up, down, router = e * 2 * r * (h + 2 * w), e * r * (w + h), r * (h + e)
    if "all-linear" in targets:
        return gate_up + down + router
    if moe != "qwen2_moe":
        return 0
    named = set(targets)
    return (
        (gate_up if {"gate_proj", "up_proj"} <= named else 0)
        + (down if "down_proj" in named else 0)
        + (router if "gate" in named else 0)
    )


def peft_adapts_experts(moe: str | None) -> bool:
    """Whether the installed peft puts LoRA on a family's fused experts and router (read from its
    metadata: the planner imports no torch). Without peft: as the newest does."""
    if moe == "qwen2_moe":
        version = _installed_version("peft")
        return version is None or version >= (0, 22)
    return moe == "mixtral"


@functools.lru_cache(maxsize=None)
def _installed_version(package: str) -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def quantized_bytes_per_param(double_quant: bool) -> float:
    """NF4/FP4 storage per weight with its block constants (QLoRA, Dettmers et al. 2023)."""
    if double_quant:
        return NF4_BYTES + 1 / QUANT_BLOCK + FP32 / (QUANT_BLOCK * DOUBLE_QUANT_BLOCK)
    return NF4_BYTES + FP32 / QUANT_BLOCK


def zero_model_states(psi: float, dp: int, stage: int, k: int = ZERO_K) -> float:
    """The ZeRO paper's model-state bytes per device: (2 + 2 + K)Ψ with 16-bit params and grads,
    the optimizer term ÷ N_d from stage 1, the gradients from stage 2, the parameters at stage 3."""
    params = 2 * psi / (dp if stage >= 3 else 1)
    grads = 2 * psi / (dp if stage >= 2 else 1)
    optim = k * psi / (dp if stage >= 1 else 1)
    return params + grads + optim


# --------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class Peft:
    method: str = "none"  # none | lora | qlora
    r: int = 16
    targets: tuple[str, ...] = ("all-linear",)
    modules_to_save: tuple[str, ...] = ()
    dropout: float = 0.05
    double_quant: bool = True


@dataclass(frozen=True)
class Workload:
    """What one rank computes: the model, the micro-batch and how it trains."""

    arch: ArchConfig
    micro_batch: int
    seq_len: int
    grad_accum: int = 1
    precision: str = "bf16"  # resolved: fp32 | bf16 | fp16
    activation_checkpointing: bool = False
    peft: Peft = field(default_factory=Peft)
    activation_offloading: bool = False  # saved activations in host memory (CUDA)
    loss: str = (
        "chunked"  # train.loss as the trainer runs it: chunked | liger | logits (preference objectives: chunked)
    )
    fp32_residual: bool = False  # train.fp32_residual: bf16 autocast keeps the residual stream in fp32

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class Layout:
    """How the engine places model states over ranks."""

    traits: EngineTraits
    world: int = 1
    shard: int = 0  # ranks a sharded state is split over; 0: the world (fsdp hybrid: ranks per node)
    reshard_after_forward: bool = True

    @property
    def name(self) -> str:
        """The row label: single | ddp | zero0-3 | zero3_offload | fsdp."""
        return self.traits.row

    @property
    def n(self) -> int:
        return max(1, self.shard or self.world)

    @property
    def replicated(self) -> bool:
        """Every rank holds the whole model in fp32 and autocasts the forward (single, ddp; fsdp on
        one rank shards nothing either)."""
        return self.traits.autocasts_fp32_weights and (not self.traits.shards_params or self.world == 1)


def layout_of(strategy: StrategyBase, world: int, shard: int = 0) -> Layout:
    reshard = getattr(strategy, "reshard_after_forward", True)
    return Layout(engine_traits(strategy), world, shard=shard, reshard_after_forward=reshard)


def layout_named(name: str, world: int, shard: int = 0) -> Layout:
    """The layout of a conf/strategy option (ddp, zero1, ..., fsdp) at a world size."""
    return layout_of(strategy_named(name), world, shard)


# --------------------------------------------------------------------------------------------
# the estimate


@dataclass(frozen=True)
class Estimate:
    """Bytes per device, by category, with the arithmetic behind each in ``details``."""

    label: str
    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float
    host: float = 0.0  # host (CPU) memory per rank holding offloaded states
    details: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.buffers

    def fits(self, limit_bytes: float) -> bool:
        return self.total <= limit_bytes


def gib(x: float) -> str:
    """Bytes as GiB with three significant digits (one decimal from 100 GiB up)."""
    v = x / GiB
    return f"{v:.1f}" if v >= 100 else f"{v:.3g}"


def fmt_bytes(x: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: '1.87 GiB', '533 KiB'."""
    for unit, div in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= div:
            v = x / div
            return f"{v:.1f} {unit}" if v >= 100 else f"{v:.3g} {unit}"
    return f"{x:.0f} B"


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


@dataclass(frozen=True)
class _States:
    params: float
    grads: float
    optimizer: float
    host: float
    persistent: float  # engine buffers alive all the time (DDP buckets, DeepSpeed's reduce bucket)
    working: float  # engine working set during forward/backward (gathers, unsharded grads)
    step: float  # optimizer-step temporaries (after activations are freed)
    details: dict[str, str]


def estimate(w: Workload, lay: Layout, *, on_gpu: bool = True) -> Estimate:
    """Peak bytes on one device for workload ``w`` under layout ``lay``: model states + the larger
    of (activations + working set) and the step's temporaries + fixed overhead + fragmentation."""
    notes: list[str] = []
    if w.peft.method != "none":
        _, unknown = resolve_lora_targets(w.peft.targets, w.arch)
        if unknown:
            notes.append(
                f"LoRA targets that are no linear layer of a {w.arch.model_type} model, not counted: {', '.join(unknown)}"
            )
    st = _model_states(w, lay)
    act, act_detail, act_host = _activations(w, lay, on_gpu)
    fixed = FIXED_GPU_OVERHEAD if on_gpu else 0.0
    working = max(st.working, st.step - act)
    base = st.params + st.grads + st.optimizer + act + st.persistent + working
    frag = FRAGMENTATION * base
    buffers = st.persistent + working + fixed + frag
    parts = [
        f"engine {fmt_bytes(st.persistent + working)}",
        *([f"CUDA/NCCL {fmt_bytes(fixed)}"] if fixed else []),
        f"{FRAGMENTATION:.0%} fragmentation {fmt_bytes(frag)}",
    ]
    details = {**st.details, "activations": act_detail, "buffers": " + ".join(parts)}
    if st.host + act_host:
        notes.append(f"offloaded to host memory: {fmt_bytes(st.host + act_host)} per rank (pinned)")
    label = lay.name if w.peft.method == "none" else f"{w.peft.method} r={w.peft.r} · {lay.name}"
    return Estimate(label, st.params, st.grads, st.optimizer, act, buffers, st.host + act_host, details, tuple(notes))


def _model_states(w: Workload, lay: Layout) -> _States:
    pc = param_counts(w.arch)
    c = DTYPE_BYTES[w.precision]
    h = w.arch.hidden_size
    n = lay.n
    peft = w.peft.method != "none"
    trainable = lora_param_count(w.arch, w.peft.r, w.peft.targets, w.peft.modules_to_save) if peft else pc.total
    psi = _count(trainable)
    # Frozen base (LoRA/QLoRA): bytes it takes in total, before any sharding.
    frozen, frozen_text = frozen_base_bytes(w, lay)
    d: dict[str, str] = {}
    persistent = working = step = host = 0.0

    if lay.replicated:
        # ftl loads fp32 weights and autocasts; PEFT keeps adapters in fp32.
        params, grads, optim = FP32 * trainable, FP32 * trainable, ADAM_MOMENTS * trainable
        d["params"] = f"fp32 {4} B × {psi}" + (f" trainable + {frozen_text}" if peft else "")
        d["grads"] = f"fp32 4 B × {psi}"
        d["optimizer"] = f"AdamW moments 8 B × {psi} (fp32 weights: no master copy)"
        params += frozen
        if lay.traits.reducer_buckets and lay.world > 1:
            persistent = FP32 * trainable  # the reducer's bucket copy of every gradient
        step = FP32 * trainable  # foreach AdamW's param-sized temporary

    elif not lay.traits.autocasts_fp32_weights:  # DeepSpeed ZeRO: casts the module, fp32 master partition
        b = c
        s = lay.traits.zero_stage
        # Parameters smaller than stage3_param_persistence_threshold (10h: norms, biases) stay whole.
        small = pc.layers_other + pc.final_norm if not peft else 0
        p_div = n if s >= 3 else 1
        # Stage 1 reduces at the accumulation boundary only: until then each rank holds every
        # gradient (reduce_ready_partitions_and_remove_grads); with no accumulation it keeps its
        # partition, as stage 2 does.
        g_div = n if (s >= 2 or (s == 1 and w.grad_accum == 1)) else 1
        # From stage 2 the gradient partition accumulates in fp32 (deepspeed_config.gradient_dtypes).
        gb = FP32 if s >= 2 else b
        master = 0 if s == 0 else FP32
        params = b * ((trainable - small) / p_div + small) + frozen / p_div
        grads = gb * trainable / g_div
        optim = (master + ADAM_MOMENTS) * trainable / (n if s >= 1 else 1)
        d["params"] = (
            f"{_dt(b)} {b} B × {psi}"
            + (f" / {n}" if s >= 3 else "")
            + (f" + {frozen_text}" + (f" / {n}" if s >= 3 else "") if peft else "")
        )
        d["grads"] = f"{_dt(gb)} {gb} B × {psi}" + (f" / {n}" if g_div > 1 else "")
        d["optimizer"] = f"{'fp32 master + ' if master else ''}AdamW moments {master + ADAM_MOMENTS} B × {psi}" + (
            f" / {n}" if s >= 1 else ""
        )
        if lay.traits.offload_optimizer:
            # The gradient partition lives in host memory too: at stage 3 DeepSpeed accumulates it
            # (grad_partitions_flat_buffer, in fp32: gb) and keeps a pinned fp32 copy for
            # DeepSpeedCPUAdam (fp32_partitioned_groups_flat[i].grad); stage 2 keeps the fp32 one.
            host_grads = ((gb if s >= 3 else 0) + FP32) * trainable / n if s >= 2 else 0.0
            host += optim + host_grads
            if s >= 2:
                grads = 0.0
                d["grads"] = f"partition in host memory ({fmt_bytes(host_grads)})"
            d["optimizer"] = f"in host memory ({fmt_bytes(optim)})"
            optim = 0.0
        if lay.traits.offload_params and s >= 3:
            moved = params - b * small
            host += moved
            params = b * small
            d["params"] = f"in host memory ({fmt_bytes(moved)}); norms stay on the GPU"
        # reduce bucket: reduce_bucket_size = h² (ftl's default); with overlap_comm, which ftl turns on
        # for stages 1-2, DeepSpeed keeps a second one (stage_1_and_2's setup_buckets: buf_0, buf_1)
        persistent = b * h * h * (2 if s in (1, 2) else 1) if s >= 1 else 0
        if s >= 3:
            leaf = max(pc.embed, pc.head, pc.largest_linear)
            leaf_grad = leaf if not peft else 0
            working = b * (leaf + 0.9 * h * h) + b * leaf_grad
        if not lay.traits.offload_optimizer:
            part = trainable / (n if s >= 1 else 1)
            chunk = min(part, ZERO3_SUB_GROUP) if s >= 3 else part
            step = FP32 * chunk + (FP32 * chunk if s >= 1 else 0)  # foreach temp + fp32 grad copy

    else:  # FSDP2: fp32 shards, compute-dtype gathers (MixedPrecisionPolicy)
        cdt = c  # MixedPrecisionPolicy param_dtype (fp32 when precision is fp32)
        params = FP32 * trainable / n + frozen / n
        grads = FP32 * trainable / n
        optim = ADAM_MOMENTS * trainable / n
        d["params"] = f"fp32 4 B × {psi} / {n}" + (f" + {frozen_text} / {n}" if peft else "")
        d["grads"] = f"fp32 4 B × {psi} / {n}"
        d["optimizer"] = f"AdamW moments 8 B × {psi} / {n}"
        frozen_per_param = (frozen / pc.total) if peft else 0.0
        gathered_layers = 2 if lay.reshard_after_forward else pc.num_layers
        root_bytes = cdt * pc.root if not peft else frozen_per_param * pc.root
        layer_bytes = cdt * pc.layer if not peft else frozen_per_param * pc.layer
        root_grads = cdt * pc.root if not peft else 0
        layer_grads = (cdt + (FP32 if cdt < FP32 else 0)) * pc.layer if not peft else 0
        working = root_bytes + root_grads + gathered_layers * layer_bytes + layer_grads
        step = FP32 * trainable / n

    if w.peft.method == "qlora":
        working += c * pc.largest_linear  # one dequantized weight at a time
    return _States(params, grads, optim, host, persistent, working, step, d)


def frozen_base_bytes(w: Workload, lay: Layout) -> tuple[float, str]:
    """The frozen base of a LoRA/QLoRA run, in total before any sharding, as the trainer holds it
    (``launcher.train.trainer.build_model``; a test compares with the instantiated model): LoRA
    loads it in the compute dtype. QLoRA's decoder linears are 4-bit; its other weights
    (embeddings, head, norms) are loaded in fp32 and PEFT's ``prepare_model_for_kbit_training``
    keeps them there, except that DeepSpeed casts the module to its training dtype."""
    pc = param_counts(w.arch)
    c = DTYPE_BYTES[w.precision]
    if w.peft.method == "lora":
        return c * pc.total, f"frozen base {c} B × {_count(pc.total)}"
    if w.peft.method == "qlora":
        q = quantized_bytes_per_param(w.peft.double_quant)
        rest = pc.total - pc.linear
        rb = FP32 if lay.traits.autocasts_fp32_weights else c
        return (
            q * pc.linear + rb * rest,
            f"frozen base {q:.3f} B × {_count(pc.linear)} quantized + {rb} B × {_count(rest)}",
        )
    return 0.0, ""


def checkpoint_bytes(w: Workload, lay: Layout) -> float:
    """Bytes one checkpoint of the whole job writes: every engine saves the trainable parameters and
    the optimizer states (a LoRA run's frozen base is named, not saved). single/ddp and fsdp write
    fp32 weights and AdamW's two moments (12 B per trainable parameter). DeepSpeed writes the fp32
    master and moments (12 B; stage 0, fp32 only: weights 4 + moments 8) and, below stage 3, its
    module in the training dtype too (b B; stage 3 keeps no gathered copy). A PEFT run adds its
    adapter/ (fp32), which single/ddp keep as their only copy of the weights. Measured on the tiny
    model's checkpoints: within 6% for single, LoRA and ZeRO-2/3, 17% under for FSDP (DCP's
    per-tensor metadata, negligible for a large model)."""
    pc = param_counts(w.arch)
    peft = w.peft.method != "none"
    trainable = lora_param_count(w.arch, w.peft.r, w.peft.targets, w.peft.modules_to_save) if peft else pc.total
    adapter = FP32 * trainable if peft else 0
    if lay.traits.autocasts_fp32_weights:
        weights = 0 if peft and not lay.traits.shards_params else FP32 * trainable
        return weights + ADAM_MOMENTS * trainable + adapter
    stage = lay.traits.zero_stage
    module = 0 if stage >= 3 else DTYPE_BYTES[w.precision] * trainable
    master = FP32 if stage >= 1 else 0
    return module + (master + ADAM_MOMENTS) * trainable + adapter


def _dt(b: int) -> str:
    return "fp32" if b == FP32 else "bf16"


def _autocasts(lay: Layout) -> bool:
    """Engines that keep fp32 weights and autocast the forward (the others cast the model)."""
    return lay.replicated


def _activations(w: Workload, lay: Layout, on_gpu: bool) -> tuple[float, str, float]:
    """(device bytes, how they add up, bytes offloaded to host memory)."""
    a = w.arch
    pc = param_counts(a)
    c = DTYPE_BYTES[w.precision]
    t, h, i = w.tokens, a.hidden_size, mlp_width(a)
    full_ft = w.peft.method == "none"
    # fp32 weights under autocast give an fp32 residual stream unless the trainer casts it to bf16
    # (launcher.runtime.device.bf16_residual_stream); a cast model gives a c one.
    r = FP32 if (_autocasts(lay) and full_ft and (w.precision != "bf16" or w.fp32_residual)) else c
    mask = c * w.micro_batch * w.seq_len**2
    layer = c * t * (7 * h + 4 * i) + 2 * (FP32 + r) * t * h + mask
    if not full_ft:
        known, _ = resolve_lora_targets(w.peft.targets, a)
        shapes = linear_shapes(a)
        drop = (c + 1) if w.peft.dropout > 0 else 0
        layer += sum(drop * t * shapes[m][0] + c * t * w.peft.r for m in known if m in shapes)
    if w.activation_checkpointing:
        layers = pc.num_layers * r * t * h + layer
        layers_text = f"checkpointed inputs {fmt_bytes(pc.num_layers * r * t * h)} + one layer {fmt_bytes(layer)}"
    else:
        layers = pc.num_layers * layer
        layers_text = f"{pc.num_layers} layers × {fmt_bytes(layer)}"
    host = 0.0
    if w.activation_offloading:
        # What the layers save waits in host memory, except the last layer's (train/offload.py keeps it,
        # and the head's, on the device) and the layer being brought back a layer ahead of backward.
        kept = min(2, pc.num_layers)
        saved = r * t * h if w.activation_checkpointing else layer  # what one layer leaves for backward
        host = (pc.num_layers - kept) * saved
        layers -= host
        layers_text = f"{kept} layers on the device {fmt_bytes(layers)} (the rest offloaded: {fmt_bytes(host)})"
    outside = (FP32 + r + c) * t * h
    logits, logits_text = _loss_bytes(w, r, full_ft, on_gpu)
    copies = 0.0
    if _autocasts(lay) and full_ft and c < FP32:
        head = pc.head or pc.embed
        copies = c * ((pc.layer_linear if w.activation_checkpointing else pc.linear + pc.layers_experts) + head)
    text = f"{layers_text} + {logits_text}"
    if copies:
        text += f" + autocast weight copies {fmt_bytes(copies)}"
    return layers + outside + logits + copies, text, host


def _loss_bytes(w: Workload, r: int, head_trains: bool, on_gpu: bool) -> tuple[float, str]:
    """The output layer's and the loss's buffers at the step's peak. ``logits``: three fp32
    [tokens, vocab] tensors alive together in backward (log-softmax's output, its gradient, the
    upcast logits' gradient; the compute-dtype logits are freed after the forward). ``chunked``
    (and Liger's kernel, the same scheme), whose peak is in the head's forward: one chunk's fp32
    logits and logsumexp's fp32 temporary, the head's fp32 weight gradient (made in forward, when
    the head trains) and the hidden states' gradient (``r``: the residual stream's dtype). Every
    position is charged as labelled; chunks are the device's (``on_gpu``: CUDA's, thousands of rows;
    :func:`launcher.model.families.loss_chunk_rows`). Preference objectives' chunked log-probs hold
    the same, their head gradients made in backward. ``bench/loss_memory.py`` measures both, phase
    by phase."""
    a, t = w.arch, w.tokens
    if w.loss == "logits":
        whole = t * a.vocab_size * LOGITS_LOSS_PER_LOGIT
        return whole, f"logits/loss {fmt_bytes(whole)} ({t} tokens × {a.vocab_size} vocab × {LOGITS_LOSS_PER_LOGIT} B)"
    rows = min(t, loss_chunk_rows(a.vocab_size, "cuda" if on_gpu else "cpu"))
    chunk = rows * a.vocab_size * CHUNK_PER_LOGIT
    grads = (FP32 * a.vocab_size * a.hidden_size if head_trains else 0) + r * t * a.hidden_size
    return (
        chunk + grads,
        f"chunked loss {fmt_bytes(chunk + grads)} ({rows} of {t} tokens × {a.vocab_size} vocab at a time + head gradients)",
    )


# --------------------------------------------------------------------------------------------
# looking for something that fits


@dataclass(frozen=True)
class Alternative:
    overrides: tuple[str, ...]  # Hydra overrides that make the job fit
    estimate: Estimate


def alternatives(
    w: Workload, lay: Layout, limit: float, *, on_gpu: bool = True, rows: tuple[str, ...] = STRATEGY_ROWS
) -> list[Alternative]:
    """Changes that fit in ``limit`` bytes, cheapest first, at most one of each kind: another
    strategy (same batch), activation checkpointing and/or a smaller micro-batch with more
    accumulation (same strategy, same global batch), and LoRA/QLoRA when full fine-tuning."""
    out: list[Alternative] = []
    names = [n for n in rows if n != lay.name and not (n == "ddp" and lay.world == 1)]
    for name in names:
        e = estimate(
            w,
            replace(layout_named(name, lay.world, lay.shard), reshard_after_forward=lay.reshard_after_forward),
            on_gpu=on_gpu,
        )
        if e.fits(limit):
            out.append(Alternative((f"strategy={name}",), e))
            break
    # The largest micro-batch that fits (more accumulation keeps the global batch), turning
    # activation checkpointing on before halving it.
    mb = w.micro_batch
    done = False
    while mb >= 1 and not done:
        for ac in dict.fromkeys((w.activation_checkpointing, True)):
            if (mb, ac) == (w.micro_batch, w.activation_checkpointing):
                continue
            cand = replace(
                w, micro_batch=mb, activation_checkpointing=ac, grad_accum=math.ceil(w.micro_batch * w.grad_accum / mb)
            )
            e = estimate(cand, lay, on_gpu=on_gpu)
            if e.fits(limit):
                ov = [] if ac == w.activation_checkpointing else ["strategy.activation_checkpointing=true"]
                if mb != w.micro_batch:
                    ov += [f"train.micro_batch_size={mb}", f"train.grad_accum={cand.grad_accum}"]
                out.append(Alternative(tuple(ov), e))
                done = True
                break
        mb //= 2
    if not out and w.peft.method == "none":
        for method in ("lora", "qlora"):
            e = estimate(replace(w, peft=Peft(method)), lay, on_gpu=on_gpu)
            if e.fits(limit):
                out.append(Alternative((f"peft={method}",), e))
                break
    return out


__all__ = [
    "Alternative",
    "Estimate",
    "GiB",
    "Layout",
    "ParamCounts",
    "Peft",
    "STRATEGY_ROWS",
    "Workload",
    "alternatives",
    "checkpoint_bytes",
    "estimate",
    "fmt_bytes",
    "frozen_base_bytes",
    "gib",
    "layer_linears",
    "layout_named",
    "layout_of",
    "linear_shapes",
    "lora_param_count",
    "mlp_width",
    "param_counts",
    "quantized_bytes_per_param",
    "resolve_lora_targets",
    "zero_model_states",
]
