"""Pure arithmetic about a run: parameter counts and what `ftl plan` prints. No torch."""

from __future__ import annotations

from launcher.config.schema import ArchConfig, FtlConfig
from launcher.config.validate import global_batch, nodes, procs_per_node, world_size


def param_count(arch: ArchConfig) -> int:
    """Parameters of a Llama-family decoder (Llama, Mistral, Qwen2) from its architecture numbers."""
    h, i, layers = arch.hidden_size, arch.intermediate_size, arch.num_layers
    head_dim = h // arch.num_heads
    kv = arch.num_kv_heads * head_dim
    attn = h * h + 2 * h * kv + h * h  # q, k, v, o
    if arch.model_type == "qwen2":
        attn += h + 2 * kv  # q/k/v biases
    mlp = 3 * h * i  # gate, up, down
    norms = 2 * h
    embed = arch.vocab_size * h
    head = 0 if arch.tie_embeddings else arch.vocab_size * h
    return layers * (attn + mlp + norms) + embed + head + h


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def summary_lines(cfg: FtlConfig, choices: dict[str, str]) -> list[tuple[str, str]]:
    """The resolved essentials and the batch/world arithmetic, as (label, text) rows."""
    t, s, m = cfg.train, cfg.strategy, cfg.model
    world = world_size(cfg)
    engine = s.engine if s.engine != "deepspeed" else f"deepspeed ZeRO-{s.zero_stage}"
    if s.engine == "deepspeed" and (s.offload_optimizer or s.offload_params):
        engine += " + offload (" + ", ".join(k for k, v in (("optimizer", s.offload_optimizer), ("params", s.offload_params)) if v) + ")"
    peft = cfg.peft.method if cfg.peft.method == "none" else f"{cfg.peft.method} r={cfg.peft.r} alpha={cfg.peft.alpha}"
    steps = f"max_steps {t.max_steps}" if t.max_steps > 0 else f"{t.epochs:g} epoch(s)"
    gb = global_batch(cfg)
    return [
        ("recipe", f"{cfg.recipe}  ({', '.join(f'{g}={v}' for g, v in choices.items() if g != 'recipe')})"),
        ("model", f"{m.name} [{m.source}{': ' + m.path if m.path else ''}] {m.arch.model_type}, {human(param_count(m.arch))} params"),
        ("data", f"{cfg.data.format}: {len(cfg.data.train_files)} train file(s), "
                 f"{len(cfg.data.eval_files)} eval file(s), eval_fraction {cfg.data.eval_fraction:g}"),
        ("strategy", f"{engine}; precision {t.precision}; activation checkpointing {'on' if s.activation_checkpointing else 'off'}; peft {peft}"),
        ("topology", f"{nodes(cfg)} node(s) × {procs_per_node(cfg)} process(es) = world size {world}; data-parallel size {world}"),
        ("batch", f"micro_batch_size {t.micro_batch_size} × grad_accum {t.grad_accum} × data-parallel {world} "
                  f"= global batch {gb} sequences (≤ {gb * t.seq_len:,} tokens at seq_len {t.seq_len})"),
        ("schedule", f"lr {t.lr:g} {t.schedule}, warmup {t.warmup_steps}, {steps}, grad_clip {t.grad_clip:g}, seed {t.seed}"),
        ("checkpoint", f"every {cfg.checkpoint.every_steps or 'end only'} step(s), keep {cfg.checkpoint.keep}, resume {cfg.checkpoint.resume}"),
        ("wandb", f"{cfg.wandb.mode} (project {cfg.wandb.project})"),
    ]
