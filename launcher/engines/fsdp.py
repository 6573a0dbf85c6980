"""strategy=fsdp: PyTorch FSDP2 (``fully_shard``): parameters, gradients and optimizer states are
sharded across ranks, each decoder layer all-gathered just before it runs.

* Sharding: one ``fully_shard`` per decoder layer (the model's ``_no_split_modules``), then the
  root for what is left (embeddings, final norm, head). ``hybrid_shard`` uses a 2-D mesh
  (nodes × ranks per node): shard within a node, replicate across nodes.
* Loading (``strategy.load_on_rank0``, default on): rank 0 reads the weights; the other ranks
  build the model on the meta device (:meth:`FSDPEngine.model_loading`), and after sharding
  :func:`fill_from_rank0` sends each its shards and rank 0's buffers. Host memory holds one copy
  of the model per job instead of one per rank (70B in fp32: 280 GB, not 8 × 280 GB per node).
  QLoRA, whose 4-bit weights are made as they load, loads on every rank.
* Precision: bf16 is FSDP's own mixed precision (bf16 compute copies of fp32 sharded weights,
  gradients reduced in ``strategy.reduce_dtype``, fp32 by default), so :meth:`autocast` is a no-op then. fp16 would need a sharded
  grad scaler and is refused.
* Checkpoint: ``dcp/`` is a torch.distributed.checkpoint directory of model + optimizer state
  keyed by parameter name (a LoRA/QLoRA run: the trainable parameters only, not the frozen base;
  each rank writes its own shards; loading reshards to any world size),
  and ``engine_state.pt`` (LR schedule) from rank 0.
* One rank (WORLD_SIZE=1, no process group): nothing to shard; the model trains unwrapped, in the
  same checkpoint format, so an fsdp checkpoint resumes on 1 rank as on N.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
from torch import nn

from launcher.config.schema import FtlConfig
from launcher.engines.base import ModelLoading, TorchEngine
from launcher.engines.common import apply_activation_checkpointing, finish_step
from launcher.model.compile import decoder_layers
from launcher.runtime.device import autocast_dtype
from launcher.runtime.distributed import DistInfo

DCP_DIR = "dcp"
STATE_FILE = "engine_state.pt"
MODEL_KEY, OPTIM_KEY = "model", "optimizer"


class FSDPEngine(TorchEngine):
    name = "fsdp"

    def __init__(self, cfg: FtlConfig, model: nn.Module, dist: DistInfo, device: torch.device) -> None:
        super().__init__(cfg, model, dist, device)
        self.compute_dtype = autocast_dtype(cfg.train.precision, device)
        if self.compute_dtype == torch.float16:
            raise ValueError(
                "strategy=fsdp trains in fp32 or bf16 (train.precision=bf16); fp16 needs loss scaling it does not do"
            )
        if cfg.strategy.activation_checkpointing:
            # Before sharding: each layer's forward (FSDP's all-gather hooks included) is recomputed in backward.
            apply_activation_checkpointing(model)
        model.train()
        self.sharded = torch.distributed.is_initialized() and dist.world_size > 1
        if self.sharded:
            from_rank0 = _loads_on_rank0(cfg, dist)
            full = model.state_dict() if from_rank0 and dist.is_main else {}  # before sharding replaces the tensors
            apply_fully_shard(
                model,
                dist,
                device,
                cfg.strategy.reshard_after_forward,
                cfg.strategy.hybrid_shard,
                self.compute_dtype,
                reduce_dtype(cfg.strategy.reduce_dtype, self.compute_dtype),
            )
            if from_rank0:
                fill_from_rank0(model, full, device, is_main=dist.is_main)
                del full
        else:
            model.to(device)
        self._model = model
        self._stager: Any = None  # checkpoint.async_save: DCP's host buffers, kept between saves
        self._save_group: Any = None  # and the gloo group its writer thread coordinates on

    @classmethod
    def model_loading(cls, cfg: FtlConfig, dist: DistInfo, device: torch.device) -> ModelLoading:
        return ModelLoading(empty=_loads_on_rank0(cfg, dist) and not dist.is_main)

    def autocast(self) -> ContextManager[object]:
        if self.sharded:
            return contextlib.nullcontext()  # MixedPrecisionPolicy casts the compute copies itself
        return super().autocast()

    def grad_sync(self, sync: bool) -> ContextManager[object]:
        # Reduce-scatter after every micro-batch, as torchtitan does: skipping the sync would make
        # FSDP2 hold every layer's *unsharded* fp32 gradient until the window ends (4 bytes per
        # parameter on every rank, the memory that sharding exists to save).
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        optimizer, scheduler = self._require_setup()
        params = [p for p in self._model.parameters() if p.requires_grad and p.grad is not None]
        norm = global_grad_norm(params)
        clip = self.cfg.train.grad_clip
        if clip > 0:
            # As torch.nn.utils.clip_grad_norm_, on each rank's shards with the global norm.
            coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
            torch._foreach_mul_([_local(p.grad) for p in params], coef)
        optimizer.step()
        return finish_step(optimizer, scheduler, norm)

    def save(self, ckpt_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp

        with _single_process_ok():
            dcp.save(self._save_start(ckpt_dir), checkpoint_id=str(ckpt_dir / DCP_DIR), no_dist=not self.sharded)

    def save_staged(self, ckpt_dir: Path) -> Callable[[], None]:
        """DCP's async save: each rank's shards copied to host memory now (pinned on CUDA, into
        buffers kept from one save to the next), written by DCP's thread, which coordinates the
        ranks on a gloo group of its own (never the training group, whose collectives run meanwhile);
        rank 0 writes the metadata last, once every rank's shards are written."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        state = self._save_start(ckpt_dir)
        if self._stager is None:
            pinned = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(pinned, False, False, False))
            if self.sharded:
                self._save_group = torch.distributed.new_group(backend="gloo")
        with _single_process_ok():
            future = dcp.async_save(
                state,
                checkpoint_id=str(ckpt_dir / DCP_DIR),
                process_group=self._save_group,
                async_stager=self._stager,
                no_dist=not self.sharded,
            )
        return future.result

    def _save_start(self, ckpt_dir: Path) -> dict[str, Any]:
        """The adapter and the LR schedule (small, written now); the sharded state dicts DCP writes."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        optimizer, scheduler = self._require_setup()
        self.save_adapter(ckpt_dir)
        if self.dist.is_main:
            torch.save({"scheduler": scheduler.state_dict()}, ckpt_dir / STATE_FILE)
        model_sd, optim_sd = get_state_dict(self._model, optimizer, options=self._state_options())
        return {MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}

    def load(self, ckpt_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        optimizer, scheduler = self._require_setup()
        if not (ckpt_dir / DCP_DIR / ".metadata").is_file():
            raise RuntimeError(
                f"checkpoint {ckpt_dir} has no {DCP_DIR}/ (torch.distributed.checkpoint): it was not written by "
                "strategy=fsdp (a single/ddp or deepspeed checkpoint resumes only under its own strategy; "
                "`ftl export` converts any of them)"
            )
        # The current (sharded) state dicts are the templates: DCP reads into them, resharding a
        # checkpoint written by another world size.
        options = self._state_options()
        model_sd, optim_sd = get_state_dict(self._model, optimizer, options=options)
        state = {MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(ckpt_dir / DCP_DIR), no_dist=not self.sharded)
        set_state_dict(
            self._model,
            optimizer,
            model_state_dict=state[MODEL_KEY],
            optim_state_dict=state[OPTIM_KEY],
            options=options,
        )
        extra = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=True)
        scheduler.load_state_dict(extra["scheduler"])

    def _state_options(self) -> Any:
        """A PEFT run's checkpoint leaves the frozen base out (this run loads its own): set_state_dict
        must not miss it. (dcp.load has already refused a checkpoint that lacks a trainable tensor.)"""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        peft = self.peft_model is not None
        return StateDictOptions(ignore_frozen_params=peft, strict=not peft)

    def load_weights(self, read: Callable[[], dict[str, torch.Tensor]]) -> None:
        if not self.sharded:
            return super().load_weights(read)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Rank 0 reads; every rank receives its shards (as fill_from_rank0 does when loading).
        full = read() if self.dist.is_main else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(self._model, full, options=options)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Gathered one tensor at a time and moved to CPU: never the whole model on one device.
        return get_model_state_dict(self._model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        out = {}
        for name, p in self._model.named_parameters():  # the same order on every rank: the gathers pair up
            if p.requires_grad:
                out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().to("cpu", copy=True)
        return out

    @staticmethod
    def consolidate_checkpoint(ckpt_dir: Path) -> dict[str, torch.Tensor]:
        """The full weights of an fsdp checkpoint on CPU, in one process with no process group:
        DCP reads every rank's shards into full tensors. The optimizer states are not read."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        path = Path(ckpt_dir) / DCP_DIR
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"{ckpt_dir} has no {DCP_DIR}/.metadata")
        metadata = FileSystemReader(str(path)).read_metadata()
        prefix = MODEL_KEY + "."
        model_sd: dict[str, torch.Tensor] = {}
        for key, meta in metadata.state_dict_metadata.items():
            if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
                model_sd[key[len(prefix) :]] = torch.empty(meta.size, dtype=meta.properties.dtype)
        if not model_sd:
            raise ValueError(f"{path} holds no model tensors")
        state = {MODEL_KEY: model_sd}
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
        return state[MODEL_KEY]


# --------------------------------------------------------------------------------------------
# sharding


def apply_fully_shard(
    model: nn.Module,
    dist: DistInfo,
    device: torch.device,
    reshard_after_forward: bool,
    hybrid: bool,
    compute_dtype: Optional[torch.dtype],
    reduce: torch.dtype = torch.float32,
) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = build_mesh(dist, device, hybrid)
    mp = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=reduce)
        if compute_dtype
        else MixedPrecisionPolicy()
    )
    # FSDP2 shards floating-point tensors only: QLoRA's packed 4-bit weights are sharded when stored
    # in the training dtype (peft.quant_storage=auto), and stay whole on every rank in uint8.
    ignored = {p for p in model.parameters() if not p.is_floating_point()} or None
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp, ignored_params=ignored)
    # The root: embeddings, final norm and head (tied or not). It runs last in forward and first in
    # backward, so resharding it after forward would only all-gather it again at once.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp, ignored_params=ignored)
    # transformers' generate() then keeps every rank stepping until all are done (synced_gpus):
    # a rank that stopped early would leave the others waiting in an all-gather.
    model._is_fsdp_managed_module = True


def reduce_dtype(name: str, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    """``strategy.reduce_dtype`` as a dtype: what the reduce-scatter sends. bf16 only over bf16
    compute (validate checks the planned precision; this, the one the rank resolved)."""
    if name == "fp32":
        return torch.float32
    if compute_dtype != torch.bfloat16:
        raise ValueError(
            f"strategy.reduce_dtype={name} needs bf16 training; this rank trains in {compute_dtype or torch.float32}"
        )
    return torch.bfloat16


def _loads_on_rank0(cfg: FtlConfig, dist: DistInfo) -> bool:
    # QLoRA's 4-bit weights are made as they load: they cannot be built empty and filled later.
    return cfg.strategy.load_on_rank0 and dist.world_size > 1 and cfg.peft.method != "qlora"


def fill_from_rank0(model: nn.Module, full: dict[str, torch.Tensor], device: torch.device, *, is_main: bool) -> None:
    """After ``fully_shard``: give every rank its shards of rank 0's ``full`` state dict (empty on
    the other ranks, whose model is on the meta device until here), then rank 0's buffers, which no
    checkpoint holds whole (RoPE's inverse frequencies are non-persistent)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not is_main:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer.data, src=0)


def build_mesh(dist: DistInfo, device: torch.device, hybrid: bool) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    if not hybrid:
        return init_device_mesh(device.type, (dist.world_size,), mesh_dim_names=("shard",))
    per_node = dist.local_world_size
    if dist.world_size % per_node:
        raise ValueError(
            f"strategy.hybrid_shard: world size {dist.world_size} is not a multiple of {per_node} ranks per node"
        )
    return init_device_mesh(device.type, (dist.world_size // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def global_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The L2 norm of the whole model's gradient. Sharded gradients are DTensors: the per-shard
    norms combine into the global one over the mesh (each shard counted once, also with a
    replicate dimension)."""
    from torch.distributed.tensor import DTensor

    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# --------------------------------------------------------------------------------------------
# offline


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns that it assumes one process even when told so (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
