"""Pure arithmetic about a run: parameter counts, the memory verdict, and what `ftl plan` prints.
No torch: the memory model itself is :mod:`launcher.plan.memory`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from launcher.config.schema import ArchConfig, DeepSpeedStrategy, FtlConfig
from launcher.config.topology import (
    compile_choice,
    global_batch,
    nodes,
    planned_device_type,
    procs_per_node,
    resolve_precision,
    world_size,
)
from launcher.engines.traits import engine_traits
from launcher.plan.memory import (
    STRATEGY_ROWS,
    Alternative,
    Estimate,
    GiB,
    Layout,
    Peft,
    Workload,
    alternatives,
    estimate,
    fmt_bytes,
    gib,
    layout_named,
    layout_of,
    param_counts,
)


def param_count(arch: ArchConfig) -> int:
    """Parameters of the decoder ``arch`` describes (every family in launcher/model/families.py)."""
    return param_counts(arch).total


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def summary_lines(cfg: FtlConfig, choices: dict[str, str]) -> list[tuple[str, str]]:
    """The resolved essentials and the batch/world arithmetic, as (label, text) rows."""
    t, s, m = cfg.train, cfg.strategy, cfg.model
    world = world_size(cfg)
    engine = engine_traits(s).title
    peft = cfg.peft.method if cfg.peft.method == "none" else f"{cfg.peft.method} r={cfg.peft.r} alpha={cfg.peft.alpha}"
    steps = f"max_steps {t.max_steps}" if t.max_steps > 0 else f"{t.epochs:g} epoch(s)"
    gb = global_batch(cfg)
    return [
        ("recipe", f"{cfg.recipe}  ({', '.join(f'{g}={v}' for g, v in choices.items() if g != 'recipe')})"),
        (
            "model",
            f"{m.name} [{m.source}{': ' + m.path if m.path else ''}] {m.arch.model_type}, {human(param_count(m.arch))} params"
            + (f" ({human(param_counts(m.arch).active)} active per token)" if m.arch.num_experts else ""),
        ),
        (
            "data",
            f"{cfg.data.format}: {len(cfg.data.train_files)} train file(s), "
            f"{len(cfg.data.eval_files)} eval file(s), eval_fraction {cfg.data.eval_fraction:g}",
        ),
        (
            "strategy",
            f"{engine}; precision {t.precision}; activation checkpointing {'on' if s.activation_checkpointing else 'off'}; peft {peft}",
        ),
        ("compile", compile_choice(cfg, planned_device_type(cfg))[1]),
        ("objective", objective_text(cfg)),
        (
            "topology",
            f"{nodes(cfg)} node(s) × {procs_per_node(cfg)} process(es) = world size {world}; data-parallel size {world}",
        ),
        (
            "batch",
            f"micro_batch_size {t.micro_batch_size} × grad_accum {t.grad_accum} × data-parallel {world} "
            f"= global batch {gb} sequences (≤ {gb * t.seq_len:,} tokens at seq_len {t.seq_len})",
        ),
        (
            "schedule",
            f"lr {t.lr:g} {t.schedule}, warmup {t.warmup_steps}, {steps}, grad_clip {t.grad_clip:g}, seed {t.seed}",
        ),
        (
            "checkpoint",
            (f"every {cfg.checkpoint.every_steps} steps" if cfg.checkpoint.every_steps else "at the end only")
            + f", keep {cfg.checkpoint.keep}, resume {cfg.checkpoint.resume}",
        ),
        ("wandb", f"{cfg.wandb.mode} (project {cfg.wandb.project})"),
    ]


def objective_text(cfg: FtlConfig) -> str:
    """The objective and, for DPO, where its reference comes from (no second model either way)."""
    o = cfg.objective
    if o.method == "sft":
        return "sft (next-token loss on the labelled tokens)"
    if o.method == "simpo":
        return f"simpo beta={o.beta:g} gamma={o.gamma:g} (no reference model)"
    reference = (
        o.reference if o.reference != "auto" else ("adapters_off" if cfg.peft.method != "none" else "precomputed")
    )
    where = {
        "adapters_off": "the base with the adapters switched off: no second model",
        "precomputed": "the starting model's log-probs, computed once before training and cached: no second model",
    }[reference]
    return f"dpo beta={o.beta:g} loss={o.loss}; reference {reference} ({where})"


# --------------------------------------------------------------------------------------------
# memory: the estimate for the chosen strategy, a table over all of them, the verdict


@dataclass(frozen=True)
class MemoryReport:
    chosen: Estimate
    rows: list[tuple[Estimate, bool]]  # (estimate, is the chosen one)
    limit: float  # bytes: launch.gpu_mem_gb
    on_gpu: bool
    checked: bool  # whether a miss refuses the job (GPU run and launch.check_memory)
    alternatives: list[Alternative]
    precision: str

    @property
    def fits(self) -> bool:
        return self.chosen.fits(self.limit)


def workload_of(cfg: FtlConfig, precision: str) -> Workload:
    t, p = cfg.train, cfg.peft
    peft = (
        Peft()
        if p.method == "none"
        else Peft(
            p.method,
            p.r,
            tuple(p.target_modules),
            tuple(p.modules_to_save),
            p.dropout,
            getattr(p, "double_quant", True),
        )
    )
    loss = t.loss if cfg.objective.method == "sft" else "chunked"  # preference objectives: per-token log-probs, chunked
    return Workload(
        cfg.model.arch,
        t.micro_batch_size,
        t.seq_len,
        t.grad_accum,
        precision,
        cfg.strategy.activation_checkpointing,
        peft,
        cfg.strategy.activation_offloading,
        loss,
        t.fp32_residual,
    )


def layout_for(cfg: FtlConfig) -> Layout:
    s = cfg.strategy
    shard = procs_per_node(cfg) if getattr(s, "hybrid_shard", False) else 0
    return layout_of(s, world_size(cfg), shard)


def memory_report(cfg: FtlConfig) -> MemoryReport:
    device = planned_device_type(cfg)
    precision = resolve_precision(cfg.train.precision, device)
    on_gpu = device == "cuda"
    w, lay = workload_of(cfg, precision), layout_for(cfg)
    chosen = estimate(w, lay, on_gpu=on_gpu)
    world = lay.world
    rows: list[tuple[Estimate, bool]] = []
    names = [("ddp" if world > 1 else "single"), *STRATEGY_ROWS[1:]]
    shard = lay.shard
    for name in names:
        if name == lay.name:
            rows.append((chosen, True))
            continue
        other = layout_named(name, world, shard if name == "fsdp" else 0)
        rows.append((estimate(w, other, on_gpu=on_gpu), False))
    if lay.name not in names:
        rows.append((chosen, True))
    replicated = layout_named(names[0], world)
    for method in ("lora", "qlora"):
        if method != w.peft.method:
            base = w.peft if w.peft.method != "none" else Peft()
            rows.append((estimate(replace(w, peft=replace(base, method=method)), replicated, on_gpu=on_gpu), False))
    limit = cfg.launch.gpu_mem_gb * GiB
    checked = on_gpu and cfg.launch.check_memory
    alts = alternatives(w, lay, limit, on_gpu=on_gpu) if not chosen.fits(limit) else []
    return MemoryReport(chosen, rows, limit, on_gpu, checked, alts, precision)


def memory_lines(report: MemoryReport) -> list[str]:
    """The chosen strategy's breakdown, then every strategy's total against launch.gpu_mem_gb."""
    e = report.chosen
    where = "per GPU" if report.on_gpu else "per process (a CPU run: not checked)"
    out = [f"--- memory {where}, estimated ({report.precision}; launch.gpu_mem_gb={report.limit / GiB:g}) ---"]
    for key in ("params", "grads", "optimizer", "activations", "buffers"):
        out.append(f"  {key:<12} {fmt_bytes(getattr(e, key)):>10}  {e.details.get(key, '')}")
    verdict = "fits in" if report.fits else "does NOT fit in"
    out.append(f"  {'total':<12} {fmt_bytes(e.total):>10}  {verdict} {report.limit / GiB:g} GiB")
    out += [f"  note: {n}" for n in e.notes]
    unit, div = ("GiB", GiB) if e.total >= GiB else ("MiB", 2**20)
    width = max(len(row.label) for row, _ in report.rows) + 2
    heads = ("params", "grads", "optim", "activ", "buffers", "total")
    out += ["", f"  {'strategy':<{width}}" + "".join(f"{h:>9}" for h in heads) + "  fits"]
    for row, chosen in report.rows:
        values = (row.params, row.grads, row.optimizer, row.activations, row.buffers, row.total)
        cells = "".join(f"{_num(v / div):>9}" for v in values)
        out.append(
            f"  {row.label:<{width}}{cells}  {'yes' if row.fits(report.limit) else 'no'}{'   <- chosen' if chosen else ''}"
        )
    out.append(f"  ({unit} per device at the peak; offloaded states sit in host memory and are not counted)")
    out += [f"  {row.label}: {note}" for row, chosen in report.rows if not chosen for note in row.notes]
    return out


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def memory_verdict(report: MemoryReport) -> str:
    """One line: fits, or won't fit and what would."""
    e, limit = report.chosen, report.limit / GiB
    if not report.on_gpu:
        return f"{fmt_bytes(e.total)} per process ({e.label}); a CPU run: launch.gpu_mem_gb is not checked"
    if report.fits:
        return f"fits: {fmt_bytes(e.total)} per GPU ≤ {limit:g} GiB ({e.label})"
    head = f"won't fit: {gib(e.total)} GiB per GPU > {limit:g} GiB ({e.label})"
    if not report.alternatives:
        fix = "; nothing tried fits (other strategies, activation checkpointing, micro_batch_size=1, LoRA/QLoRA): use more GPUs"
    else:
        fix = "; fits with " + ", or ".join(
            f"{' '.join(a.overrides)} ({gib(a.estimate.total)} GiB)" for a in report.alternatives
        )
    return head + fix + ("" if report.checked else " [launch.check_memory=false: not refused]")


def deepspeed_lines(cfg: FtlConfig) -> list[str]:
    """The generated DeepSpeed JSON as `ftl plan` shows it; nothing for other engines."""
    import json

    from launcher.config.deepspeed_config import build_deepspeed_config

    if not isinstance(cfg.strategy, DeepSpeedStrategy):
        return []
    device = planned_device_type(cfg)
    precision = resolve_precision(cfg.train.precision, device)
    body = json.dumps(build_deepspeed_config(cfg, world_size(cfg), precision), indent=2)
    return [
        f"--- DeepSpeed config (generated; train.precision={cfg.train.precision} -> {precision} on {device}) ---",
        body,
        "---",
    ]


# --------------------------------------------------------------------------------------------
# the whole plan as JSON (`ftl plan --json`): for a scheduler or a notebook


def memory_json(report: MemoryReport) -> dict[str, Any]:
    """The memory estimate in bytes per device: the chosen strategy, every row of the table, the verdict."""

    def row(e: Estimate) -> dict[str, Any]:
        keys = ("params", "grads", "optimizer", "activations", "buffers", "total", "host")
        return {
            "label": e.label,
            **{k: getattr(e, k) for k in keys},
            "fits": e.fits(report.limit),
            "notes": list(e.notes),
        }

    return {
        "precision": report.precision,
        "limit_bytes": report.limit,
        "on_gpu": report.on_gpu,
        "checked": report.checked,
        "fits": report.fits,
        "verdict": memory_verdict(report),
        "chosen": row(report.chosen),
        "rows": [{**row(e), "chosen": chosen} for e, chosen in report.rows],
        "alternatives": [{"overrides": list(a.overrides), "total": a.estimate.total} for a in report.alternatives],
    }


def layout_json(cfg: FtlConfig) -> dict[str, Any]:
    lay = layout_for(cfg)
    return {
        "engine": lay.traits.engine,
        "strategy": lay.name,
        "nodes": nodes(cfg),
        "procs_per_node": procs_per_node(cfg),
        "world_size": lay.world,
        "shard_size": lay.n,
        "global_batch": global_batch(cfg),
    }
