"""strategy=zero1|zero2|zero3|zero3_offload (engine deepspeed): DeepSpeed ZeRO stages 0-3.

The DeepSpeed JSON comes from :func:`launcher.config.deepspeed_config.build_deepspeed_config`;
``deepspeed`` itself is imported only inside this module's functions.

How the Engine interface maps onto DeepSpeed:

* **Process group.** :mod:`launcher.runtime.distributed` creates it; ``deepspeed.initialize`` runs with
  ``dist_init_required=False`` and wraps that group (gloo on CPU, nccl on GPU) instead of creating one.
* **Optimizer and schedule.** ftl's own AdamW and LambdaLR objects go to ``deepspeed.initialize``,
  so ZeRO trains with the numbers of every other engine. With ``strategy.offload_optimizer`` the
  optimizer is DeepSpeedCPUAdam in AdamW mode with the same groups and hyper-parameters (DeepSpeed
  refuses a torch optimizer for ZeRO-Offload); its update is the same AdamW update, computed by a
  vectorised C++ kernel (JIT-compiled on first use, about 100 s on CPU).
* **Accumulation.** The trainer already divides each micro-batch's loss by the label tokens of the
  whole window, so ``backward`` passes ``scale_wrt_gas=False``: DeepSpeed must not divide by
  ``gradient_accumulation_steps`` a second time. ``grad_sync(sync)`` becomes
  ``set_gradient_accumulation_boundary(sync)``: gradients are reduced at the boundary micro-batch
  (ZeRO-2/3 reduce-scatter as gradients arrive, as DeepSpeed always does), and the one ``step()``
  per optimizer step is the boundary at which DeepSpeed clips, steps and advances the schedule.
* **Precision.** DeepSpeed casts the model itself (bf16/fp16 weights, fp32 master copy in the
  optimizer), so :meth:`autocast` is a no-op.
* **Checkpoints.** ``save_checkpoint(ckpt_dir, tag="deepspeed")``: DeepSpeed's own format in
  ``<ckpt>/deepspeed/`` with its ``latest`` file beside it, so DeepSpeed's ``zero_to_fp32.py`` and
  ``ds_to_universal`` work on ``<ckpt>`` as they are; ``ftl_deepspeed.json`` records the stage and
  world size for :func:`consolidate_checkpoint` and resume. A LoRA/QLoRA run saves with
  ``exclude_frozen_parameters``: the adapter and its optimizer state, not the frozen base.

Resume paths:

* same world size, any stage: ``load_checkpoint``, exact (weights, optimizer, schedule);
* another world size, stage 0: ``load_checkpoint`` as is (nothing is partitioned), exact;
* another world size, stages 1-3: rank 0 converts the checkpoint once into DeepSpeed's universal
  format (``<ckpt>/deepspeed_universal``, written atomically), then every rank loads that with
  ``load_universal``: weights, Adam moments and schedule carry over;
* from weights only (``ftl export`` output, or :func:`consolidate_checkpoint`): start a new run with
  ``model.source=hf model.path=EXPORT``; the optimizer state starts fresh.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
import torch.distributed as torch_dist
from torch import nn

from launcher.config.deepspeed_config import build_deepspeed_config
from launcher.config.schema import FtlConfig, TrainConfig
from launcher.engines.base import Engine, ModelLoading
from launcher.engines.common import (
    apply_activation_checkpointing,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    seek_schedule,
    trainable_parameters,
)
from launcher.runtime import watchdog
from launcher.runtime.build_lock import clear_stale_lock
from launcher.runtime.device import autocast_dtype
from launcher.runtime.distributed import DistInfo, barrier

TAG = "deepspeed"
UNIVERSAL_TAG = "deepspeed_universal"
META_FILE = "ftl_deepspeed.json"
_PRECISION_OF = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg: FtlConfig, model: nn.Module, dist: DistInfo, device: torch.device) -> None:
        super().__init__(cfg, model, dist, device)
        self.stage: int = cfg.strategy.zero_stage
        self.precision = _PRECISION_OF[autocast_dtype(cfg.train.precision, device)]
        self.ds_config = build_deepspeed_config(cfg, dist.world_size, self.precision)
        if cfg.strategy.activation_checkpointing:
            apply_activation_checkpointing(model)
        self._module = model
        self._ds: Any = None  # deepspeed.DeepSpeedEngine, after setup()
        self._boundary: Optional[bool] = None  # set by grad_sync for the micro-batch in flight
        self._micro = 0  # micro-batches since the last step(), for callers that skip grad_sync
        self._last_was_boundary = False

    @classmethod
    def model_loading(cls, cfg: FtlConfig, dist: DistInfo, device: torch.device) -> ModelLoading:
        # ZeRO-3 across ranks: transformers builds (and loads) the model inside deepspeed.zero.Init,
        # which partitions each tensor as it is made. Not for QLoRA (4-bit weights do not partition)
        # nor model.source=random (zero.Init draws other random weights than a plain build: the
        # seed would no longer give the same model under every engine).
        zero3 = cfg.strategy.zero_stage == 3 and cfg.strategy.zero3_init and dist.world_size > 1
        if not zero3 or cfg.peft.method == "qlora" or cfg.model.source == "random":
            return ModelLoading()
        ds_config = build_deepspeed_config(
            cfg, dist.world_size, _PRECISION_OF[autocast_dtype(cfg.train.precision, device)]
        )
        return ModelLoading(context=lambda: _zero3_init(ds_config, cfg, dist))

    @property
    def model(self) -> nn.Module:
        # The DeepSpeed engine: its forward runs ZeRO-3's gather hooks and the backward bookkeeping.
        return self._ds if self._ds is not None else self._module

    def setup(self, total_steps: int) -> None:
        import deepspeed

        # DeepSpeed's ZeRO collectives call torch APIs that torch marks deprecated, once per call:
        # thousands of lines the user cannot act on.
        warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
        ensure_process_group(self.device)
        build_ops(self.cfg, self.dist)
        optimizer = build_ds_optimizer(self._module, self.cfg.train, offload=self.cfg.strategy.offload_optimizer)
        scheduler = build_scheduler(optimizer, self.cfg.train, total_steps)
        self._ds, _, _, _ = deepspeed.initialize(
            model=self._module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self._ds.train()

    def grad_sync(self, sync: bool) -> ContextManager[object]:
        return self._sync_window(sync)

    @contextlib.contextmanager
    def _sync_window(self, sync: bool) -> Iterator[None]:
        self._boundary = sync
        try:
            yield
        finally:
            self._boundary = None

    def autocast(self) -> ContextManager[object]:
        return contextlib.nullcontext()  # DeepSpeed casts the model to the training dtype itself

    def backward(self, loss: torch.Tensor) -> None:
        ds = self._require_setup()
        boundary = self._boundary if self._boundary is not None else self._micro + 1 >= self.cfg.train.grad_accum
        ds.set_gradient_accumulation_boundary(boundary)
        ds.backward(loss, scale_wrt_gas=False)  # the trainer's loss is already normalised over the window
        self._micro += 1
        self._last_was_boundary = boundary

    def step(self) -> float:
        ds = self._require_setup()
        if not self._last_was_boundary:
            raise RuntimeError(
                "DeepSpeedEngine.step() after a backward outside the accumulation boundary: "
                "run the window's last micro-batch inside grad_sync(True)"
            )
        # DeepSpeed's optimizer wrappers (ZeRO, bf16) compute the pre-clip global norm; plain stage 0
        # in fp32 steps the torch optimizer directly, so measure the (already reduced) grads here.
        own_norm = None if hasattr(ds.optimizer, "_global_grad_norm") else _total_norm(self._module)
        ds.step()
        self._micro, self._last_was_boundary = 0, False
        norm = own_norm if own_norm is not None else ds.get_global_grad_norm()
        value = float(norm) if norm is not None else float("nan")
        return value if math.isfinite(value) else float("nan")

    @property
    def lr(self) -> float:
        return float(self._require_setup().get_lr()[0])

    # ----------------------------------------------------------------------------------------
    # checkpoints

    def save(self, ckpt_dir: Path) -> None:
        ds = self._require_setup()
        self.save_adapter(ckpt_dir)
        adapter_only = self.peft_model is not None
        ds.save_checkpoint(str(ckpt_dir), tag=TAG, exclude_frozen_parameters=adapter_only)
        if self.dist.is_main:
            meta = {
                "tag": TAG,
                "zero_stage": self.stage,
                "world_size": self.dist.world_size,
                "precision": self.precision,
                "frozen_excluded": adapter_only,
            }
            (ckpt_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def load(self, ckpt_dir: Path) -> None:
        ds = self._require_setup()
        meta = read_meta(ckpt_dir)
        if meta["zero_stage"] != self.stage:
            raise RuntimeError(
                f"checkpoint {ckpt_dir} is ZeRO stage {meta['zero_stage']} but strategy.zero_stage={self.stage}: "
                "resume with the same stage, or export it and start from the weights"
            )
        tag = TAG
        if meta["world_size"] != self.dist.world_size and self.stage > 0:
            tag = UNIVERSAL_TAG
            if self.dist.is_main:
                convert_to_universal(ckpt_dir)
            torch_dist.barrier()
            # Read by load_checkpoint only; setting it here (not in the JSON) lets one config
            # serve both a fresh start and a resume on another world size.
            ds._config.load_universal_checkpoint = True
        try:
            path, _ = ds.load_checkpoint(
                str(ckpt_dir),
                tag=tag,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                load_module_strict=self.peft_model is None,  # a PEFT checkpoint holds no frozen base
            )
        finally:
            ds._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {ckpt_dir / tag}")

    def load_weights(self, read: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Before ``deepspeed.initialize``, so the fp32 master copy it makes holds these weights.
        ZeRO-3 parameters partitioned at build (zero.Init) are gathered one at a time, set from
        rank 0's copy, and partitioned again."""
        if not any(hasattr(p, "ds_id") for p in self._module.parameters()):
            return super().load_weights(read)
        import deepspeed

        full = read() if self.dist.is_main else {}
        params = dict(self._module.named_parameters())
        unknown = sorted(set(full) - set(params))
        if unknown:
            raise RuntimeError(f"another engine's checkpoint does not match the model: unexpected {unknown[:5]}")
        names = torch_dist_broadcast_names(sorted(full), self.dist.is_main)
        for name in names:  # the same names in the same order on every rank: the gathers pair up
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
                if self.dist.is_main:
                    params[name].data.copy_(full[name])

    def start_at(self, step: int) -> None:
        seek_schedule(self._require_setup().lr_scheduler, step, self.cfg.train.lr)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 master weights, gathered one parameter at a time (collective). Complete on every
        rank, though only rank 0's copy is meant to be used."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        self._require_setup()
        full: dict[int, torch.Tensor] = {}
        for p in self._module.parameters():  # the same order on every rank: the gathers pair up
            value = safe_get_full_fp32_param(p) if self.stage > 0 or hasattr(p, "_hp_mapping") else None
            if value is None and hasattr(p, "ds_id"):  # a frozen ZeRO-3 parameter (LoRA's base): no fp32 master
                with deepspeed.zero.GatheredParameters([p]):
                    value = p.detach().to("cpu", torch.float32, copy=True)
            full[id(p)] = (value if value is not None else p.detach()).to("cpu", torch.float32, copy=True)
        out: dict[str, torch.Tensor] = {}
        for key, tensor in self._module.state_dict(keep_vars=True).items():
            out[key] = full[id(tensor)] if id(tensor) in full else tensor.detach().to("cpu", copy=True)
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 master values of the trainable parameters, each gathered from its ZeRO
        partitions (collective): a ZeRO-3 rank's own tensors are empty placeholders."""
        from deepspeed.utils import safe_get_full_fp32_param

        self._require_setup()
        out = {}
        for name, p in self._module.named_parameters():  # the same order on every rank: the gathers pair up
            if p.requires_grad:
                value = safe_get_full_fp32_param(p) if self.stage > 0 or hasattr(p, "_hp_mapping") else None
                out[name] = (value if value is not None else p.detach()).to("cpu", torch.float32, copy=True)
        return out

    def _require_setup(self) -> Any:
        if self._ds is None:
            raise RuntimeError("Engine.setup(total_steps) must be called first")
        return self._ds

    @staticmethod
    def consolidate_checkpoint(ckpt_dir: Path) -> dict[str, torch.Tensor]:
        """Full fp32 weights of a DeepSpeed checkpoint written by ftl, on CPU, with no process group:
        what ``ftl export`` turns into a Hugging Face directory. Keys are the model's state_dict keys."""
        ckpt_dir = Path(ckpt_dir)
        meta = read_meta(ckpt_dir)
        if meta["zero_stage"] == 0:
            # get_fp32_state_dict_from_zero_checkpoint fails on stage 0 (nothing is partitioned):
            # the full module sits in the model-states file.
            state = torch.load(
                ckpt_dir / meta["tag"] / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
            )
            return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
            state = get_fp32_state_dict_from_zero_checkpoint(
                str(ckpt_dir), tag=meta["tag"], exclude_frozen_parameters=bool(meta.get("frozen_excluded"))
            )
        return {k: v.detach() for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# building blocks


@contextlib.contextmanager
def _zero3_init(ds_config: dict[str, Any], cfg: FtlConfig, dist: DistInfo) -> Iterator[None]:
    """transformers builds models inside ``deepspeed.zero.Init`` while an ``HfDeepSpeedConfig`` of a
    stage-3 config is alive (it holds a weak reference); each rank then reads the weights one
    tensor at a time into its partitions."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # zero.Init sizes partitions by deepspeed.comm's world: wrap the process group ftl made.
    build_ops(cfg, dist)
    deepspeed.init_distributed(dist_backend=torch_dist.get_backend(), dist_init_required=False)
    holder = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del holder


def build_ops(cfg: FtlConfig, dist: DistInfo) -> None:
    """DeepSpeed's just-in-time ops this run uses (its shared-memory collectives on a CPU, CPU Adam
    with an offloaded optimizer), built or loaded from $TORCH_EXTENSIONS_DIR before anything needs
    them: each one a phase of its own (its time said on rank 0, under the watchdog's phase limit),
    built by local rank 0 while the node's other ranks wait at a barrier rather than on torch's
    build lock, and that lock cleared when a killed build left it (:mod:`launcher.runtime.build_lock`)."""
    builders = _jit_op_builders(cfg)
    if dist.local_rank == 0:
        _load_ops(builders)
    barrier()
    if dist.local_rank != 0:
        _load_ops(builders)


def _jit_op_builders(cfg: FtlConfig) -> list[Any]:
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    names = ["ShareMemCommBuilder"] + (["CPUAdamBuilder"] if cfg.strategy.offload_optimizer else [])
    builders = [get_accelerator().create_op_builder(name) for name in names]
    return [
        b
        for b in builders
        if b is not None
        and deepspeed.ops.__compatible_ops__.get(b.NAME, False)
        and b.name not in type(b)._loaded_ops
        and not installed_ops.get(b.name, False)  # built into the wheel (DS_BUILD_OPS=1): nothing to compile
    ]


def _load_ops(builders: list[Any]) -> None:
    from torch.utils.cpp_extension import _get_build_directory  # where torch builds (and locks) an extension

    for builder in builders:
        with watchdog.during(f"DeepSpeed op {builder.name} (built on first use, then cached)"):
            clear_stale_lock(Path(_get_build_directory(builder.name, False)), say=_say)
            builder.load(verbose=False)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for one process; launcher.runtime.distributed creates one only
    for WORLD_SIZE > 1, so a single rank gets a private in-memory group here (no network), and the
    LOCAL_RANK that DeepSpeed insists on reading (torchrun sets it for real ranks)."""
    if torch_dist.is_initialized():
        return
    for name in ("LOCAL_RANK", "RANK"):
        os.environ.setdefault(name, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)


def build_ds_optimizer(model: nn.Module, train: TrainConfig, offload: bool) -> torch.optim.Optimizer:
    if not offload:
        return build_optimizer(model, train)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    beta1, beta2 = (float(b) for b in train.betas)
    groups = build_param_groups(model, train.weight_decay)
    # adamw_mode: decoupled weight decay, exactly torch.optim.AdamW's update (eps 1e-8 as torch's).
    return DeepSpeedCPUAdam(groups, lr=train.lr, betas=(beta1, beta2), eps=1e-8, adamw_mode=True)


def _total_norm(model: nn.Module) -> Optional[torch.Tensor]:
    grads = [p.grad for p in trainable_parameters(model) if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def torch_dist_broadcast_names(names: list[str], is_main: bool) -> list[str]:
    """Rank 0's list of names, on every rank."""
    box: list[Any] = [names if is_main else None]
    torch_dist.broadcast_object_list(box, src=0)
    return list(box[0])


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a DeepSpeed checkpoint written by ftl (no {META_FILE})")
    return json.loads(path.read_text())


def convert_to_universal(ckpt_dir: Path) -> Path:
    """DeepSpeed's universal checkpoint of ``<ckpt>/deepspeed`` in ``<ckpt>/deepspeed_universal``,
    loadable on any world size. Written once, atomically; CPU only. Rank 0 converts while the other
    ranks wait at a barrier under the I/O-phase timeout (``launch.io_timeout_s``, sized for reading
    and rewriting the checkpoint), with worker processes on half of its CPUs: a rank's optimizer
    file is extracted per worker (host memory: one file each), parameters merged by half as many."""
    out = Path(ckpt_dir) / UNIVERSAL_TAG
    if out.is_dir():
        return out
    tmp = Path(ckpt_dir) / f".tmp-{UNIVERSAL_TAG}"
    shutil.rmtree(tmp, ignore_errors=True)
    workers = conversion_workers()
    # Its own process: the worker pool forks from a clean interpreter, not from a rank holding a
    # CUDA context and NCCL threads, and the conversion's memory is returned when it ends.
    argv = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(Path(ckpt_dir) / TAG),
        "--output_folder",
        str(tmp),
        "--num_extract_workers",
        str(workers),
        "--num_merge_workers",
        str(max(1, workers // 2)),
        "--inject_missing_state",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"converting {ckpt_dir / TAG} to a universal checkpoint failed ({done.returncode}):\n{done.stderr[-4000:]}"
        )
    os.rename(tmp, out)
    return out


def conversion_workers(cap: int = 8) -> int:
    """Processes for the universal-checkpoint conversion: half this process's CPUs, at most ``cap``
    (each extract worker holds one rank's optimizer file), 1 on a small machine (no pool)."""
    return max(1, min(cap, len(os.sched_getaffinity(0)) // 2))


__all__ = ["DeepSpeedEngine", "convert_to_universal", "read_meta"]
