"""What decides a long multi-node job once it fits: time. Pure arithmetic, no torch.

From the config and the cluster facts in ``launch.cluster``: a step's tokens and time (model FLOPs
at a stated MFU of the GPUs' peak), the run's GPU-hours and cost, a checkpoint's bytes and
blocking save time, the job's mean time between failures, and the checkpoint interval that loses
the least (Young 1974, Daly 2006: τ = √(2·δ·MTBF), waste ≈ δ/τ + τ/(2·MTBF)). docs/SCALE.md derives
each figure and gives each default's source. ``checkpoint.max_waste`` refuses an interval that
costs more than the budget (:func:`waste_problems`); ``checkpoint.every_steps=auto`` takes the
Young/Daly interval, fixed once by the launcher (:func:`resolved_every_steps`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional

from launcher.config.schema import FtlConfig
from launcher.config.topology import nodes, planned_device_type, resolve_precision, world_size
from launcher.plan.memory import DTYPE_BYTES, FP32, checkpoint_bytes, lora_param_count, param_counts
from launcher.plan.report import layout_for, workload_of

# Dense bf16 peak FLOP/s by the model name torch reports for a GPU, matched as whole words ("L4"
# is not "L40", "B200" is not "GB200"), more specific names first; no entry (any CPU) means no MFU.
# Source: NVIDIA's datasheets, dense (the sparse figures halved). B200: 2.25 PFLOPS (HGX B200, 36
# sparse over 8 GPUs); GB200: 2.5 PFLOPS per GPU (GB200 NVL72, 360 sparse over 72 GPUs); H800: the
# H100's compute at a lower interconnect bandwidth, so its SXM and PCIe parts take the H100's peaks.
# Here, not in launcher.train.mfu (which reads it too), because `ftl plan` imports no torch.
PEAK_BF16_FLOPS = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800 PCIe", 756e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)

DAY_S = 86400.0
HOUR_S = 3600.0


def peak_for_name(name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU called ``name`` ("NVIDIA A100-SXM4-80GB", "H100"), or None."""
    words = re.split(r"[\s_\-]+", name.upper())
    for key, flops in PEAK_BF16_FLOPS:
        want = key.upper().split()
        if any(words[i : i + len(want)] == want for i in range(len(words))):
            return flops
    return None


# --------------------------------------------------------------------------------------------
# the formulas (tests/plan/test_scale.py reproduces the published figures with them)


def mtbf_s(failures_per_1000_node_days: float, job_nodes: int) -> float:
    """Mean time between the job's failures: each node fails independently at the stated rate."""
    return 1000.0 * DAY_S / (failures_per_1000_node_days * job_nodes)


def young_daly_s(save_s: float, mtbf: float) -> float:
    """The interval between checkpoints that loses the least: τ = √(2·δ·MTBF) (Young's first-order optimum)."""
    return math.sqrt(2.0 * save_s * mtbf)


def checkpoint_waste(interval_s: float, save_s: float, mtbf: float) -> float:
    """The share of the time checkpoints cost at an interval τ: the saves (δ/τ) and the work lost since
    the last one, half an interval per failure on average (τ/(2·MTBF))."""
    return save_s / interval_s + interval_s / (2.0 * mtbf)


def intervals_within(budget: float, save_s: float, mtbf: float) -> Optional[tuple[float, float]]:
    """(shortest, longest) interval whose waste is at most ``budget``: the roots of
    τ²/(2·MTBF) − budget·τ + δ = 0; None when even the optimum costs more."""
    disc = budget * budget - 2.0 * save_s / mtbf
    if disc < 0:
        return None
    return mtbf * (budget - math.sqrt(disc)), mtbf * (budget + math.sqrt(disc))


# --------------------------------------------------------------------------------------------
# the plan of one job


@dataclass(frozen=True)
class ScalePlan:
    """The scale figures of one GPU job. Times in seconds, sizes in bytes, fractions in [0, 1].
    ``None``: not known from the config (a run of train.epochs: its steps depend on the data)."""

    nodes: int
    gpus: int
    gpu: str
    peak_flops: float  # per GPU, dense bf16
    mfu: float
    seq_len: int
    global_batch: int  # sequences per optimizer step
    tokens_per_step: int  # at most: every sequence full (packed)
    min_global_batch: int  # sequences: one per data-parallel rank, no accumulation
    min_tokens_per_step: int
    flops_per_token: float  # 6 per trained matmul weight, 4 per frozen one (LoRA's base)
    step_s: float
    steps: Optional[int]
    tokens: Optional[int]
    compute_s: Optional[float]  # the steps alone, no checkpoint or failure
    checkpoint_bytes: float  # the whole job's resumable state
    checkpoint_bytes_per_gpu: float  # what the rank writing most writes
    export_bytes: float  # `ftl export`'s Hugging Face directory
    save_s: float  # δ: training waits while a checkpoint is written, or (async) staged in host memory
    write_s: float  # the write itself; async: in the background, the next save waits for it
    async_save: bool  # checkpoint.async_save on an engine that stages (fsdp, ddp, single)
    restart_s: float  # a failure: launch.cluster.restart_s + reading the checkpoint back
    mtbf_s: float
    optimal_interval_s: float  # Young/Daly
    optimal_every_steps: int
    optimal_waste: float  # at optimal_every_steps
    every_steps: str  # as configured: N, 0, or auto
    interval_s: Optional[float]  # the configured interval; 0 (only at the end): the run
    waste: Optional[float]  # checkpoint waste at the configured interval
    max_waste: float
    fitting_steps: Optional[tuple[int, int]]  # every_steps values within max_waste; None: none
    restart_waste: float  # restart_s per MTBF
    wall_s: Optional[float]
    interruptions: Optional[float]  # expected failures over the run
    gpu_hours: Optional[float]
    cost: Optional[float]
    price_per_gpu_hour: float

    @property
    def over_budget(self) -> bool:
        return self.waste is not None and self.waste > self.max_waste

    @property
    def refused(self) -> bool:
        """Over the budget by saving too rarely (failures lose more work than checkpoint.max_waste
        allows), or at any interval when none fits. Saving more often than the budget allows is
        shown, not refused: a run may save often for reasons the plan cannot see (evaluating
        checkpoints, a preemptible partition)."""
        return self.over_budget and (self.fitting_steps is None or (self.interval_s or 0.0) > self.optimal_interval_s)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def flops_per_token(cfg: FtlConfig) -> float:
    """Training FLOPs of one token through the matmul weights (launcher.train.mfu counts the same):
    2 forward + 2 for the input's gradient + 2 for a trained weight's own gradient; an MoE's inactive
    experts do nothing. The embedding is a lookup; attention's own FLOPs are left out, as in 6·N."""
    pc = param_counts(cfg.model.arch)
    matmul = pc.active - pc.embed - pc.final_norm - pc.layers_other
    if cfg.peft.method == "none":
        return 6.0 * matmul
    p = cfg.peft
    return 4.0 * matmul + 6.0 * lora_param_count(cfg.model.arch, p.r, p.target_modules, p.modules_to_save)


def scale_plan(cfg: FtlConfig) -> Optional[ScalePlan]:
    """The scale figures of a GPU job; None for a CPU job (no peak to time its steps by)."""
    if planned_device_type(cfg) != "cuda":
        return None
    c, t, ck = cfg.launch.cluster, cfg.train, cfg.checkpoint
    peak = peak_for_name(c.gpu)
    if peak is None:
        return None  # validate() reports the unknown GPU
    n_nodes, gpus = nodes(cfg), world_size(cfg)
    precision = resolve_precision(t.precision, "cuda")
    w, lay = workload_of(cfg, precision), layout_for(cfg)
    gb = t.micro_batch_size * t.grad_accum * gpus
    tokens_per_step = gb * t.seq_len
    per_token = flops_per_token(cfg)
    step_s = per_token * tokens_per_step / (c.mfu * peak * gpus)
    steps = t.max_steps if t.max_steps > 0 else None
    compute_s = None if steps is None else steps * step_s

    ckpt = checkpoint_bytes(w, lay)
    sharded = lay.traits.shards_optimizer and gpus > 1
    pc = param_counts(cfg.model.arch)
    if cfg.peft.method == "none":
        export = DTYPE_BYTES[precision] * pc.total
    else:
        export = FP32 * lora_param_count(cfg.model.arch, cfg.peft.r, cfg.peft.target_modules, cfg.peft.modules_to_save)
    bandwidth = (c.checkpoint_gb_per_s or cfg.launch.io_gb_per_s) * 1e9
    write_s = ckpt / bandwidth
    async_save = ck.async_save and lay.traits.async_checkpoint
    # Async: training waits while each GPU copies what it writes into host memory, all at once.
    save_s = (ckpt / gpus if sharded else ckpt) / (c.staging_gb_per_s * 1e9) if async_save else write_s
    restart_s = c.restart_s + ckpt / (cfg.launch.io_gb_per_s * 1e9)
    mtbf = mtbf_s(c.node_failures_per_1000_node_days, n_nodes)

    tau = max(young_daly_s(save_s, mtbf), write_s)  # async: saved no faster than the last one is written
    best_steps = max(1, round(tau / step_s))
    best_waste = checkpoint_waste(best_steps * step_s, save_s, mtbf)
    within = intervals_within(ck.max_waste, save_s, mtbf)
    fitting = None
    if within is not None:
        low = max(1, math.ceil(max(within[0], write_s if async_save else 0.0) / step_s))
        if math.floor(within[1] / step_s) >= low:
            fitting = (low, math.floor(within[1] / step_s))

    every = ck.every_steps
    if every == "auto":
        interval: Optional[float] = best_steps * step_s
    elif every > 0:
        interval = every * step_s
    else:
        interval = compute_s  # only at the end: a failure loses half the run so far, on average
    if interval is not None and compute_s is not None:
        interval = min(interval, compute_s)  # an interval longer than the run saves only at its end
    waste = None
    if interval is not None and interval > 0:  # async: a save that comes before the last one is written waits for it
        waste = checkpoint_waste(interval, save_s + (max(0.0, write_s - interval) if async_save else 0.0), mtbf)
    restart_waste = restart_s / mtbf
    wall = None if compute_s is None or waste is None else compute_s * (1.0 + waste + restart_waste)
    gpu_hours = None if wall is None else wall * gpus / HOUR_S
    return ScalePlan(
        nodes=n_nodes,
        gpus=gpus,
        gpu=c.gpu,
        peak_flops=peak,
        mfu=c.mfu,
        seq_len=t.seq_len,
        global_batch=gb,
        tokens_per_step=tokens_per_step,
        min_global_batch=gpus,
        min_tokens_per_step=gpus * t.seq_len,
        flops_per_token=per_token,
        step_s=step_s,
        steps=steps,
        tokens=None if steps is None else steps * tokens_per_step,
        compute_s=compute_s,
        checkpoint_bytes=ckpt,
        checkpoint_bytes_per_gpu=ckpt / gpus if sharded else ckpt,
        export_bytes=export,
        save_s=save_s,
        write_s=write_s,
        async_save=async_save,
        restart_s=restart_s,
        mtbf_s=mtbf,
        optimal_interval_s=tau,
        optimal_every_steps=best_steps,
        optimal_waste=best_waste,
        every_steps=str(every),
        interval_s=interval,
        waste=waste,
        max_waste=ck.max_waste,
        fitting_steps=fitting,
        restart_waste=restart_waste,
        wall_s=wall,
        interruptions=None if wall is None else wall / mtbf,
        gpu_hours=gpu_hours,
        cost=None if gpu_hours is None else gpu_hours * c.price_per_gpu_hour,
        price_per_gpu_hour=c.price_per_gpu_hour,
    )


def resolved_every_steps(cfg: FtlConfig) -> int:
    """checkpoint.every_steps as the ranks get it: ``auto`` becomes the Young/Daly interval in steps."""
    every = cfg.checkpoint.every_steps
    if every != "auto":
        return int(every)
    plan = scale_plan(cfg)
    if plan is None:  # validate() refuses auto where there is no plan
        raise ValueError("checkpoint.every_steps=auto needs a GPU job")
    return plan.optimal_every_steps


def waste_problems(cfg: FtlConfig) -> list[tuple[str, str]]:
    """(field, message): a GPU job whose checkpoint interval costs more than checkpoint.max_waste,
    with the interval that would fit (:attr:`ScalePlan.refused`); ``auto`` on a CPU job, which has
    no step time to plan it by."""
    ck = cfg.checkpoint
    plan = scale_plan(cfg)
    if plan is None:
        if ck.every_steps == "auto" and planned_device_type(cfg) != "cuda":
            return [
                (
                    "checkpoint.every_steps",
                    "auto sizes the interval from a GPU job's planned step time, but this job trains "
                    f"on {planned_device_type(cfg)}; give a number of steps (0: only at the end)",
                )
            ]
        return []
    if not plan.refused:
        return []
    assert plan.waste is not None
    what = {
        0: "0 (saving only at the end)",
        "auto": f"auto, the best interval (every {plan.optimal_every_steps} steps),",
    }.get(ck.every_steps, f"every {ck.every_steps} steps ({duration(plan.interval_s)})")
    head = (
        f"{what} costs {plan.waste:.1%} of the run (saves of {duration(plan.save_s)} and the work a failure every "
        f"{duration(plan.mtbf_s)} loses), over checkpoint.max_waste={ck.max_waste:g}"
    )
    if plan.fitting_steps is None:
        best = (
            ""
            if ck.every_steps == "auto"
            else f": the best, every {plan.optimal_every_steps} steps, costs {plan.optimal_waste:.1%}"
        )
        fix = (
            f"; no interval fits{best}. Write "
            "checkpoints faster (launch.cluster.checkpoint_gb_per_s, launch.io_gb_per_s), use fewer nodes, or raise "
            "checkpoint.max_waste"
        )
    else:
        lo, hi = plan.fitting_steps
        fix = (
            f"; use checkpoint.every_steps={plan.optimal_every_steps} (Young/Daly, {plan.optimal_waste:.1%}) or auto; "
            f"any interval from {lo} to {hi} steps fits"
        )
    return [("checkpoint.every_steps", head + fix)]


# --------------------------------------------------------------------------------------------
# rendering


def duration(seconds: Optional[float]) -> str:
    """'2.4 s', '31 min', '37.5 h', '12.3 days'."""
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 72 * HOUR_S:
        return f"{seconds / HOUR_S:.1f} h"
    return f"{seconds / DAY_S:.1f} days"


def _bytes(x: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.0f} B"


def _tokens(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def scale_lines(p: ScalePlan, cfg: FtlConfig) -> list[str]:
    """The scale section of `ftl plan`: what an admin signs off before a long multi-node job."""
    c = cfg.launch.cluster
    bw = c.checkpoint_gb_per_s or cfg.launch.io_gb_per_s
    bw_key = "launch.cluster.checkpoint_gb_per_s" if c.checkpoint_gb_per_s else "launch.io_gb_per_s"
    out = [
        f"--- scale: {p.nodes} nodes × {p.gpus // p.nodes} {p.gpu} = {p.gpus} GPUs "
        f"(launch.cluster: {c.node_failures_per_1000_node_days:g} failures per 1,000 node-days, MFU {p.mfu:.0%}) ---"
    ]

    def row(label: str, text: str) -> None:
        out.append(f"  {label:<15} {text}")

    row(
        "step",
        f"{p.global_batch} sequences × {p.seq_len} = {_tokens(p.tokens_per_step)} tokens; the layout forces at least "
        f"{p.min_global_batch} sequences ({_tokens(p.min_tokens_per_step)} tokens: one per data-parallel rank)",
    )
    row(
        "step time",
        f"{duration(p.step_s)}: {p.tokens_per_step / p.step_s / p.gpus:,.0f} tokens/s per GPU ({p.flops_per_token / 1e12:.3g} "
        f"TFLOP per token at {p.mfu:.0%} of {p.peak_flops / 1e12:.0f} TFLOP/s)",
    )
    if p.steps is None:
        row(
            "run",
            "steps unknown until the data is tokenized (train.epochs): set train.max_steps to plan the run's length",
        )
    else:
        assert p.tokens is not None and p.compute_s is not None
        row("run", f"{p.steps:,} steps, {_tokens(p.tokens)} tokens, {duration(p.compute_s)} of steps")
    if p.async_save:
        saved = (
            f"training waits {duration(p.save_s)} while it is copied to host memory at {c.staging_gb_per_s:g} GB/s "
            f"per GPU (launch.cluster.staging_gb_per_s); written in the background in {duration(p.write_s)} at "
            f"{bw:g} GB/s ({bw_key}; checkpoint.async_save)"
        )
    else:
        saved = f"saved in {duration(p.save_s)} at {bw:g} GB/s ({bw_key}), training waits"
    row(
        "checkpoint",
        f"{_bytes(p.checkpoint_bytes)} resumable state ({_bytes(p.checkpoint_bytes_per_gpu)} per GPU); {saved}",
    )
    row("export", f"{_bytes(p.export_bytes)} Hugging Face directory (ftl export)")
    row(
        "failures",
        f"MTBF {duration(p.mtbf_s)} for {p.nodes} node(s); a restart costs {duration(p.restart_s)} "
        f"({p.restart_waste:.1%} of the time)",
    )
    row(
        "Young/Daly",
        f"every {p.optimal_every_steps} steps ({duration(p.optimal_interval_s)}): {p.optimal_waste:.1%} lost "
        "to saves and recomputed work",
    )
    label = f"every_steps={p.every_steps}"
    if p.waste is None:
        row(label, "waste unknown: the run's length is not known")
    else:
        verdict = (
            "OVER"
            if p.refused
            else "over (saving more often than failures call for: not refused)"
            if p.over_budget
            else "within"
        )
        row(
            label,
            f"interval {duration(p.interval_s)}: {p.waste:.1%} lost, {verdict} checkpoint.max_waste={p.max_waste:g}",
        )
    if p.wall_s is not None:
        assert p.gpu_hours is not None and p.cost is not None and p.interruptions is not None
        row("wall time", f"{duration(p.wall_s)} expected, with {p.interruptions:.1f} interruptions")
        row("GPU-hours", f"{p.gpu_hours:,.0f}; cost {p.cost:,.0f} at {p.price_per_gpu_hour:g} per GPU-hour")
    return out
