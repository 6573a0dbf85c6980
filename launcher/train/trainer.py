"""The training loop: ``Trainer(cfg).run()``, one per rank.

Setup is a row of small functions (seed, device, process group, model, data order, engine,
resume, telemetry); :meth:`Trainer.train` is the loop and fits on a screen. Everything
engine-specific (DDP, DeepSpeed, FSDP) is behind :class:`launcher.engines.Engine`, everything
rank-0-only behind :class:`launcher.train.telemetry.Telemetry`.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from launcher.config.errors import ConfigError, ConfigErrors
from launcher.config.schema import FtlConfig, TrainConfig
from launcher.config.topology import compile_choice
from launcher.data.build import collate, skipped_rows_note
from launcher.data.cache import prepare_datasets
from launcher.data.packing import flattens_packs
from launcher.data.privacy import from_stats, summary
from launcher.data.types import DataError
from launcher.engines import build_engine, engine_class
from launcher.engines.base import Engine
from launcher.engines.traits import engine_traits
from launcher.model.attention import attention_paths, note_host_copy
from launcher.model.compile import compile_decoder_layers, eager, first_step_note
from launcher.model.loading import count_parameters
from launcher.model.loss import count_label_tokens, label_positions, output_layer
from launcher.objectives import build_objective
from launcher.objectives.base import StatSums
from launcher.progress import phase
from launcher.rundir import RunPaths, run_dir_of
from launcher.rundir.resume import (
    ResumeError,
    Verdict,
    cross_engine_notice,
    evaluated_after,
    finished_message,
    get,
    latest_sound,
    moved_message,
    read_checkpoint_info,
    refusal,
    resume_verdict,
    set_aside_earlier_run,
    unpublished_note,
)
from launcher.runtime import watchdog
from launcher.runtime.device import autocast_dtype, select_device, set_residual_stream
from launcher.runtime.distributed import (
    DistInfo,
    any_rank,
    barrier,
    check_same_on_all_ranks,
    collective_timeout,
    destroy,
    init_distributed,
    reduce_max,
    reduce_mean,
    reduce_sum,
    set_collective_timeout,
)
from launcher.runtime.preflight import run_preflight
from launcher.runtime.schedule import warmup_notice
from launcher.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    TrainerState,
    capture_rng,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    resume_checkpoint,
    verify,
)
from launcher.train.early_stop import EarlyStopping
from launcher.train.finite import TrainingStopped, check_step, refuse_nonfinite_weights
from launcher.train.mfu import model_flops, model_flops_utilization
from launcher.train.offload import build_offloader
from launcher.train.prefetch import BatchPrefetcher
from launcher.train.retain import build_retain
from launcher.train.telemetry import Telemetry, build_telemetry, local_param_bytes, peak_memory_gb, reset_peak_memory

StepHook = Callable[["Trainer"], None]


class Trainer:
    def __init__(self, cfg: FtlConfig, *, step_hooks: Sequence[StepHook] = ()) -> None:
        self.given_cfg, self.step_hooks = cfg, list(step_hooks)  # as written: what checkpoints record
        self.cfg = cfg
        self.run_dir = run_dir_of(cfg)
        seed_everything(cfg.train.seed)
        self.device = select_device(cfg.train)
        self.loss_scaled = (
            autocast_dtype(cfg.train.precision, self.device) == torch.float16
        )  # fp16: the scaler skips overflowed steps
        if cfg.strategy.activation_offloading and self.device.type != "cuda":
            raise ConfigErrors(
                [
                    ConfigError(
                        "strategy.activation_offloading", f"needs a CUDA GPU; this rank trains on {self.device.type}"
                    )
                ]
            )
        # Loading, conversion, checkpoints: the launcher fixed it in config.yaml (launcher.session.fix_estimates);
        # a Trainer built by hand from an unresolved config keeps the step timeout for them too.
        self.io_timeout_s = cfg.launch.io_timeout_s or cfg.launch.dist_timeout_s
        watchdog.enter("process group")  # each phase before step 1: its time on rank 0, under the watchdog
        self.dist = init_distributed(cfg.launch, self.device, timeout_s=self.io_timeout_s)
        check_same_on_all_ranks(config_digest(cfg), "config (run dir, model, data, training settings)")
        watchdog.enter("preflight")
        run_preflight(cfg.launch, self.dist, self.device, self.run_dir, self.io_timeout_s)  # names a bad node, or stops
        watchdog.enter("model")
        self.cfg = cfg = with_start(cfg, self.run_dir, self.dist)  # model.path=an earlier stage: its HF dir
        model, self.tokenizer = build_model(cfg, self.device, self.dist)
        self.base = record_base(cfg, self.device, self.dist)  # LoRA/QLoRA: what the checkpoints name, not copy
        watchdog.enter("data")
        self.train_ds, self.eval_ds = prepare_datasets(
            cfg.data, self.tokenizer, cfg.train.seq_len, cfg.train.seed, self.dist
        )
        skipped = self.dist.is_main and skipped_rows_note(
            RunPaths(self.run_dir).skipped_rows, self.train_ds, self.eval_ds
        )
        if skipped:  # data.on_error=skip: which rows, and why
            warn(skipped)
        self.order = DataOrder(len(self.train_ds), cfg.train.seed, cfg.data.shuffle, self.dist)
        check_micro_batch(cfg.train, self.order, self.train_ds.stats)
        self.total_steps = compute_total_steps(cfg.train, self.order.batches_per_epoch(cfg.train.micro_batch_size))
        self.start = resume_point(
            self.given_cfg, self.run_dir, len(self.train_ds), self.total_steps, self.dist, self.base
        )  # refuses what it cannot continue
        watchdog.enter("engine")
        self.engine: Engine = build_engine(cfg, model, self.dist, self.device)
        if self.start is not None and self.start.verdict.cross_engine:
            self.engine.load_weights(lambda: weights_for(self.start, model))
        self.engine.setup(self.total_steps)
        self.n_params = count_parameters(self.engine.model)
        self.flops = model_flops(self.engine.model, output_layer(self.engine.model))
        self.param_bytes_local = local_param_bytes(self.engine.model)  # this rank's shard under ZeRO-3/FSDP
        self.offloader = build_offloader(self.engine.model, cfg.strategy.activation_offloading)
        self.resumed_from: Optional[Path] = None
        watchdog.enter("resume")
        self.watch = EarlyStopping(cfg.train.early_stopping)  # restored by resume()
        self.last_eval: Optional[tuple[int, dict[str, Any]]] = None
        self.step = self.saved_step = self.resume()
        background = cfg.checkpoint.async_save and engine_traits(cfg.strategy).async_checkpoint
        self.checkpoints = Checkpointer(
            self.run_dir, self.engine, self.dist, cfg.checkpoint.keep, background=background
        )
        self.batches = BatchPrefetcher(
            self.collate_next, depth=2 * cfg.train.grad_accum, pin=self.device.type == "cuda"
        )
        self.data_position = (self.order.epoch, self.order.consumed)  # of the last batch trained on
        set_collective_timeout(cfg.launch.dist_timeout_s)  # set up: from here a hung step fails fast
        self.telemetry: Telemetry = build_telemetry(cfg, self.run_dir, self.dist, self.total_steps, self.step)
        self.objective = build_objective(cfg)
        watchdog.enter("objective")
        with collective_timeout(self.io_timeout_s, restore=cfg.launch.dist_timeout_s):
            self.objective.prepare(self)  # e.g. DPO's reference log-probs: a pass over the data with the starting model
            self.retain = build_retain(self)  # the retain set's base side (launcher.train.retain)
        self.started = time.perf_counter()
        self.telemetry.info(describe_run(self))
        notes = (self.start.notes if self.start else []) + [warmup_notice(cfg.train, self.total_steps)]
        for note in notes + [sync_save_notice(cfg)]:
            if note:
                self.telemetry.info(f"ftl: {note}")

    def run(self) -> str:
        """Train to the end ("completed") or to a stop signal ("stopped", after a checkpoint); a
        non-finite loss or gradient norm raises NonFiniteError on every rank at the same step."""
        with stop_on_signals() as stop:  # through the teardown: the SIGTERM torchrun sends once a peer has left
            return self._run(stop)

    def _run(self, stop: StopFlag) -> str:
        exit_code, diverged = 1, False
        try:
            outcome = self.train(stop)
            barrier()  # every rank is past its last collective before any leaves the group
            exit_code = 0
            return outcome
        except (
            TrainingStopped
        ) as e:  # raised on every rank at this step (the same reduced values): none is in a collective
            diverged = True
            if self.dist.is_main:
                warn(f"ftl: {e}")
            raise
        finally:
            if exit_code:  # a save in flight finishes (or its failure is said) before the exit
                self.checkpoints.wait_on_exit(warn, self.io_timeout_s)
            watchdog.stop()  # leaving: the barrier and the collective timeout hold the rest
            self.batches.close()
            self.telemetry.close(exit_code)
            if diverged:
                barrier()  # leave together: once one rank exits non-zero, torchrun stops the others wherever they are
            destroy(clean=exit_code == 0 or diverged)

    def train(self, stop: StopFlag) -> str:
        if self.start is not None and self.start.verdict.finished:
            self.telemetry.info(f"ftl: {finished_message(self.start.verdict, self.run_dir)}")
            return "completed"
        if self.cfg.eval.before_training and self.step == 0 and self.evaluate("before", stop) is None:
            return "stopped"  # nothing trained yet: nothing to save
        first = self.step + 1
        watchdog.training()
        while self.step < self.total_steps:
            metrics = self.train_step()
            watchdog.step_done(self.step, metrics["step_s"])
            self.telemetry.log_step(self.step, metrics)
            self.watch.train_losses.append(metrics["loss"])
            check_step(  # a NaN stops the run unsaved, once the save in flight is published
                self.step, metrics, loss_scaled=self.loss_scaled, run_dir=self.run_dir, settle=self.checkpoints.wait
            )
            if self.step == first and compile_choice(self.cfg, self.device.type)[0]:
                self.telemetry.info(first_step_note(first, metrics["step_s"]))
            last_is_after = self.step == self.total_steps and self.cfg.eval.after_training
            if due(self.step, self.cfg.eval.every_steps) and (self.watch.on or not last_is_after):
                if self.periodic_eval(stop):
                    break
            if any_rank(stop.requested):
                self.save()
                self.checkpoints.wait()
                self.telemetry.info(
                    f"stopped by {stop.signal_name or 'a signal to another rank'} at step {self.step}; "
                    "rerun the same command to resume"
                )
                return "stopped"
            if due(self.step, self.cfg.checkpoint.every_steps):
                self.save()
            for hook in self.step_hooks:
                hook(self)
        if self.cfg.checkpoint.save_final:
            self.save()
        if self.cfg.eval.after_training and self.evaluate("after", stop) is None:
            self.checkpoints.wait()
            return "stopped"  # saved; the rerun finds the final checkpoint and evaluates it
        self.checkpoints.wait()  # the evaluation ran while the last checkpoint was written
        if self.watch.best:
            best = {k: v for k, v in self.watch.best.items() if k != "step"}
            self.telemetry.log_eval("best", self.watch.best["step"], best)  # eval.json's "best"
            self.telemetry.info(f"ftl: {self.watch.summary()}")
        return "completed"

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches on every rank. The loss is normalised by
        the objective's units (label tokens, pairs) of the whole window on all ranks (times the world
        size, which the engines' gradient averaging divides out), so every unit weighs the same
        whatever batch or rank it fell in, and N ranks train exactly like one process with N times the batch."""
        start = time.perf_counter()
        reset_peak_memory(self.device)  # peak_mem_gb is this step's peak
        batches = [self.next_batch() for _ in range(self.cfg.train.grad_accum)]
        window = reduce_sum(sum(self.objective.weight(b) for b in batches))
        norm = max(1.0, window) / self.dist.world_size
        real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        loss_sum, stat_sums = torch.zeros((), device=self.device), StatSums()
        for i, host in enumerate(batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
            note_host_copy(batch.get("position_ids"), host.get("position_ids"))  # packed attention reads the host copy
            with self.engine.grad_sync(i == len(batches) - 1):
                with self.offloader:
                    loss, stats = self.objective.loss(self.engine, batch)
                self.engine.backward(loss / norm)
            loss_sum += loss.detach() / norm
            stat_sums.add(stats)  # tensors until logged: no wait for the device per micro-batch
            del loss  # or this micro-batch's graph lives on through the next forward
        lr = self.engine.lr
        grad_norm = self.engine.step()
        self.step += 1
        seconds = time.perf_counter() - start
        tokens = reduce_sum(real_tokens)
        metrics = {
            "loss": reduce_mean(float(loss_sum)),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / seconds,
            "step_s": seconds,
            "peak_mem_gb": reduce_max(peak_memory_gb(self.device)),
            "param_bytes_local": self.param_bytes_local,
            "elapsed": time.perf_counter() - self.started,
            **attention_paths(self.device),
        }
        metrics.update({k: reduce_sum(v) / max(1.0, window) for k, v in stat_sums.read().items()})
        labelled = reduce_sum(sum(count_label_tokens(b["labels"]) for b in batches))  # where the output layer ran
        mfu = model_flops_utilization(self.flops.step(tokens, labelled) / seconds, self.dist.world_size, self.device)
        if mfu is not None:
            metrics["mfu"] = mfu
        return metrics

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch, self.data_position = self.batches.get()
        return batch

    def collate_next(self) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
        """The next micro-batch and the data position after it (in the prefetch thread, which alone
        advances self.order once training has started)."""
        indices = self.order.take(self.cfg.train.micro_batch_size)
        flatten = flattens_packs(self.cfg.model.attn_implementation)  # flash attention reads packs from one row
        batch = collate([self.train_ds[i] for i in indices], self.tokenizer.pad_token_id, flatten=flatten)
        # index: per-example data (reference log-probs); label_positions: where the loss runs, made
        # here on the host (on the device its data-dependent size would wait for the device)
        extra = {"index": torch.tensor(indices), "label_positions": label_positions(batch["labels"])}
        return {**batch, **extra}, (self.order.epoch, self.order.consumed)

    def periodic_eval(self, stop: StopFlag) -> bool:
        """An eval during training, counted by early stopping; with it on, a new best is saved
        (and kept by pruning). True: stop early."""
        results = self.evaluate(f"step_{self.step}", stop)
        if results and "loss" in results and self.watch.observe(self.step, results) and self.watch.on:
            self.save()
        if self.watch.stop:
            self.telemetry.info(f"ftl: {self.watch.stop_message(self.step)}")
        return self.watch.stop

    def evaluate(self, name: str, stop: Optional[StopFlag] = None) -> Optional[dict[str, Any]]:
        """The eval split's metrics and the retain set's forgetting figures (which may stop the run),
        logged and returned; None when a stop signal (on any rank) ended it between two batches
        (nothing is logged)."""
        if self.last_eval is not None and self.last_eval[0] == self.step:  # "after" a periodic eval at this step
            self.telemetry.log_eval(name, self.step, self.last_eval[1])
            return self.last_eval[1]
        from launcher.eval.metrics import EvalStopped

        has_split = self.eval_ds is not None and len(self.eval_ds) > 0
        try:
            with (
                preserved_rng(),
                eager(),
                watchdog.during(f"evaluation ({name})"),
            ):  # evaluating must not change what training draws next; compiled layers run eagerly
                results = self.eval_split(stop) if has_split else {}
                forgetting = self.retain.measure(self) if self.retain is not None else {}
        except EvalStopped:
            self.telemetry.info(f"ftl: evaluation ({name}) stopped by {stop.signal_name} at step {self.step}")
            return None
        if has_split and name != "before":
            results.update(self.watch.gap(results))
        results.update(forgetting)
        self.last_eval = (self.step, results)
        if results:
            self.telemetry.log_eval(name, self.step, results)
        if self.retain is not None:
            self.retain.check(self.step, forgetting, self.run_dir, self.telemetry.info)
        return results

    def eval_split(self, stop: Optional[StopFlag]) -> dict[str, Any]:
        from launcher.eval.metrics import evaluate
        from launcher.runtime.distributed import all_reduce_sum

        return evaluate(
            self.engine.model,
            self.tokenizer,
            self.eval_ds,
            self.cfg.eval,
            device=self.device,
            autocast_dtype=autocast_dtype(self.cfg.train.precision, self.device),
            reduce_fn=all_reduce_sum,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            loss_metrics=lambda: self.objective.eval_metrics(self),
            synced=engine_traits(self.cfg.strategy).shards_params and self.dist.world_size > 1,
            stop=(lambda: any_rank(stop.requested)) if stop is not None else lambda: False,
        )  # perplexity batches shared among ranks; every rank generates every answer

    def save(self) -> None:
        if self.saved_step == self.step:
            return
        state = TrainerState(
            self.step,
            *self.data_position,
            self.dist.world_size,
            self.total_steps,
            len(self.train_ds),
            recorded_config(self.given_cfg),
            self.watch.state(),
            self.watch.stop,
            self.base,
        )
        best = self.watch.best_step if self.watch.on else None  # pruning keeps it
        started = time.perf_counter()
        with (
            watchdog.during(f"checkpoint of step {self.step}"),
            collective_timeout(self.io_timeout_s, restore=self.cfg.launch.dist_timeout_s),
        ):
            path = self.checkpoints.save(state, best)
        self.saved_step = self.step
        blocked = f"training waited {time.perf_counter() - started:.2f} s"
        self.telemetry.info(
            f"checkpoint {path} ({blocked}; written in the background)"
            if self.checkpoints.background
            else f"checkpoint {path} ({blocked})"
        )

    def resume(self) -> int:
        if self.start is None:
            return 0
        if (
            self.start.verdict.cross_engine is not None
        ):  # the engine loaded its weights; the schedule and data position follow
            path, state = self.start.path, load_checkpoint(self.start.path, self.engine, self.dist, engine_state=False)
        else:  # verified, and an older one in its place when it is damaged
            found = resume_checkpoint(self.cfg.checkpoint.resume, self.run_dir, self.engine, self.dist, warn)
            if found is None:
                return 0
            path, state = found
        refuse_nonfinite_weights(self.engine.model, path)
        self.order.seek(state.epoch, state.epoch_samples)
        self.watch.restore(state.early_stopping)
        self.resumed_from = path
        return state.step


# --------------------------------------------------------------------------------------------
# setup


@dataclass
class ResumePoint:
    path: Path
    verdict: Verdict
    notes: list[str]


def resume_point(
    cfg: FtlConfig, run_dir: Path, train_samples: int, total_steps: int, dist: DistInfo, base: dict[str, Any]
) -> Optional[ResumePoint]:
    """The checkpoint this run continues (checkpoint.resume), checked against the config by
    :func:`launcher.rundir.resume.resume_verdict`, as `ftl train` checked it before launch, and (a
    LoRA/QLoRA run) against the base this run loaded (``base``, rank 0's :func:`record_base`): raises
    ResumeError (exit 2) for what it cannot continue."""
    import dataclasses

    if cfg.checkpoint.resume == "never":
        # `ftl train` moved them aside before launch; a run started otherwise (your torchrun, a
        # requeued job) starts over the same way, or its first saves would be pruned in favour of older steps.
        moved = set_aside_earlier_run(run_dir) if dist.is_main else None
        if moved is not None:
            print(f"ftl: {moved_message(*moved)}", file=sys.stderr, flush=True)
        barrier()
        return None
    path = resolve_resume(cfg.checkpoint.resume, run_dir)
    if cfg.checkpoint.resume == "auto":  # the newest one whose files are whole (the load falls back further if need be)
        path = latest_sound(run_dir)
        note = unpublished_note(run_dir, path) if dist.is_main else ""
        if note:
            print(f"ftl: {note}", file=sys.stderr, flush=True)
    if path is None:
        return None
    info = read_checkpoint_info(path)
    evaluated = evaluated_after(run_dir, info.step)
    verdict = resume_verdict(info, dataclasses.asdict(cfg), dist.world_size, evaluated=evaluated, total=total_steps)
    verdict.finished = (
        verdict.finished and cfg.checkpoint.resume == "auto"
    )  # another run's checkpoint: this run's eval is still to do
    if info.train_samples and info.train_samples != train_samples:
        verdict.errors.append(
            ConfigError(
                "data",
                f"{train_samples} training samples per epoch, but checkpoint step {info.step} "
                f"was written with {info.train_samples}: the training data changed",
            )
        )
    if verdict.refused:
        raise ResumeError(refusal(verdict, run_dir))
    from launcher.model.adapters import base_mismatch

    other_base = base_mismatch(info.base, base) if dist.is_main else None
    if any_rank(other_base is not None):
        raise ResumeError(f"cannot resume from {path}: {other_base or 'rank 0 found another base model'}")
    if verdict.cross_engine:  # another engine's reader loads it, checking no hash: check the contents here
        problem = verify(path, dist)
        if any_rank(problem is not None):
            raise CheckpointError(
                f"checkpoint {path} is damaged: {problem or 'on another rank'}; resume from an earlier one"
            )
    notes = [cross_engine_notice(verdict)] if verdict.cross_engine else []
    if info.world_size != dist.world_size:
        notes.append(
            f"checkpoint step {info.step} was written by {info.world_size} rank(s); continuing on {dist.world_size}"
        )
    return ResumePoint(path, verdict, notes)


def weights_for(start: ResumePoint, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Another engine's checkpoint, consolidated offline by the engine that wrote it, as the values
    of ``model``'s trainable parameters (LoRA/QLoRA: the adapter; the frozen base is the model's own)."""
    from launcher.engines import engine_class

    engine = start.verdict.checkpoint.engine or str(get(start.verdict.checkpoint.config, "strategy.engine"))
    state = engine_class(engine).consolidate_checkpoint(start.path)
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied head is one parameter under two names
        aliases.setdefault(id(p), []).append(name)
    out, missing = {}, []
    for name, p in model.named_parameters():
        if p.requires_grad:
            found = next((a for a in aliases[id(p)] if a in state), None)
            if found is None:
                missing.append(name)
            else:
                out[name] = state[found]
    if missing:
        raise RuntimeError(f"checkpoint {start.path} ({engine}) does not hold {missing[:5]}: it is not this model's")
    return out


def recorded_config(cfg: FtlConfig) -> dict[str, Any]:
    """The config a checkpoint records for later resumes to be checked against (secrets redacted)."""
    import dataclasses

    from launcher.redact import known_secrets, redact

    return redact(dataclasses.asdict(cfg), known_secrets())


def config_digest(cfg: FtlConfig) -> str:
    """What every rank must agree on: the whole config but `launch`, whose node rank, address and
    network interface differ from node to node by design (torchrun checks the topology itself)."""
    import dataclasses
    import hashlib
    import json

    data = dataclasses.asdict(cfg)
    del data["launch"]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def build_model(cfg: FtlConfig, device: torch.device, dist: DistInfo = DistInfo()) -> tuple[Any, Any]:
    """The model to train, LoRA adapters included (before any engine wraps or shards it); QLoRA
    loads the base in 4 bit onto ``device``. The engine decides how (see ``Engine.model_loading``):
    under FSDP only rank 0 reads the weights, under ZeRO-3 each tensor is partitioned as it is made."""
    from launcher.model.adapters import apply_peft, quantization_config
    from launcher.model.loading import load_model_and_tokenizer

    compute = autocast_dtype(cfg.train.precision, device)
    quantization = quantization_config(cfg.peft, cfg.strategy, compute)
    loading = engine_class(cfg.strategy.engine).model_loading(cfg, dist, device)
    with loading.context(), phase(f"model: loading {cfg.model.name}"):
        model, tokenizer = load_model_and_tokenizer(
            cfg.model, dtype=load_dtype(cfg, compute), quantization=quantization, device=device, empty=loading.empty
        )
        model = apply_peft(model, cfg.peft)
    set_residual_stream(model, cfg.train, compute)
    if compile_choice(cfg, device.type)[0]:  # before any engine wraps or shards it (see launcher.model.compile)
        compile_decoder_layers(model, device)
    return model, tokenizer


def with_start(cfg: FtlConfig, run_dir: Path, dist: DistInfo) -> FtlConfig:
    """``cfg``, or where model.path names an earlier stage (an ftl run, a PEFT adapter) the same
    with model.path at the Hugging Face dir rank 0 makes of it (:mod:`launcher.artifacts.stages`)."""
    import dataclasses

    from launcher.artifacts.stages import start_model

    model_cfg = start_model(cfg.model, run_dir, is_main=dist.is_main, log=warn)
    if model_cfg is cfg.model:
        return cfg
    barrier()  # under the I/O timeout: rank 0 may be exporting a large model
    seed_everything(cfg.train.seed)  # rank 0's export may have drawn (a random base is rebuilt from its seed)
    return dataclasses.replace(cfg, model=model_cfg)


def record_base(cfg: FtlConfig, device: torch.device, dist: DistInfo) -> dict[str, Any]:
    """A LoRA/QLoRA run's base, named and hashed (:func:`launcher.model.adapters.base_record`) on
    rank 0, which alone writes and checks it; {} elsewhere and for a full fine-tune."""
    if cfg.peft.method == "none" or not dist.is_main:
        return {}
    from launcher.model.adapters import base_record

    return base_record(cfg, load_dtype(cfg, autocast_dtype(cfg.train.precision, device)))


def load_dtype(cfg: FtlConfig, compute: Optional[torch.dtype]) -> torch.dtype:
    """fp32 master weights for whatever trains (the engine autocasts or casts the forward to the
    training precision); LoRA's frozen base in the compute dtype, half the memory of fp32 with
    the same forward (the planner charges it so: plan.memory.frozen_base_bytes). QLoRA's weights
    that are not 4-bit stay fp32 (PEFT's prepare_model_for_kbit_training upcasts them anyway)."""
    return compute if cfg.peft.method == "lora" and compute is not None else torch.float32


def compute_total_steps(train: TrainConfig, batches_per_epoch: int) -> int:
    if train.max_steps > 0:
        return train.max_steps
    return max(1, math.ceil(train.epochs * batches_per_epoch / train.grad_accum))


def check_micro_batch(train: TrainConfig, order: DataOrder, stats: dict[str, Any]) -> None:
    """A micro-batch larger than what a rank reads in an epoch would be clipped to it without a word."""
    if train.micro_batch_size > order.per_rank:
        samples = "packs" if stats.get("packs") else "examples"
        raise ConfigErrors(
            [
                ConfigError(
                    "train.micro_batch_size",
                    f"{train.micro_batch_size} is larger than the training data: {order.size} "
                    f"{samples} give each of {order.world} rank(s) {order.per_rank}; allowed: 1 to {order.per_rank}",
                )
            ]
        )


def describe_run(trainer: Trainer) -> str:
    n_params = trainer.n_params
    trainable = count_parameters(trainer.engine.model, trainable_only=True)
    params = f"{n_params / 1e6:.2f}M params" + (
        f", {trainable / 1e6:.2f}M trainable ({trainer.cfg.peft.method})" if trainable < n_params else ""
    )
    resumed = trainer.resumed_from
    start = f"resuming from {resumed} (step {trainer.step})" if resumed else "starting from step 0"
    return (
        f"ftl: {trainer.cfg.model.name} ({params}), engine {trainer.engine.name}, "
        f"{trainer.dist.world_size} rank(s) on {trainer.device}; {describe_data(trainer.train_ds.stats, len(trainer.train_ds), trainer.cfg.train.seq_len)}; "
        f"{trainer.total_steps} steps, {start}; run dir {trainer.run_dir}"
    )


def describe_data(stats: dict[str, Any], samples: int, seq_len: int) -> str:
    """'320 train examples in 121 packs of 512 tokens (29,317 tokens, 20,229 trainable)': examples
    are conversations (or rows), packs what a step draws when data.packing is on."""
    examples = int(stats.get("examples", samples))
    text = f"{examples:,} train examples" + (
        f" in {stats['packs']:,} packs of {seq_len} tokens" if stats.get("packs") else ""
    )
    counts = [
        f"{stats[k]:,} {label}"
        for k, label in (
            ("tokens", "tokens"),
            ("trainable_tokens", "trainable"),
            ("truncated", "clipped"),
            ("dropped", "dropped"),
            ("skipped", "skipped"),
            ("empty", "empty, not counted"),
            ("identical", "pairs with chosen = rejected, dropped"),
        )
        if stats.get(k)
    ]
    if stats.get("privacy"):  # data.privacy's findings in the training files, by kind (the launcher listed where)
        counts.append(f"personal data or credentials: {summary(from_stats(stats['privacy']))}")
    return text + (f" ({', '.join(counts)})" if counts else "")


class DataOrder:
    """Which training samples this rank reads, in which order: per epoch a permutation seeded by
    ``seed + epoch``, dealt round-robin to ranks from the global position the epoch is at (0, or
    where a resumed run stands), cut to a multiple of the world size (every rank runs the same
    number of steps). ``(epoch, consumed)`` is the whole state: ``consumed`` counts the samples all
    ranks together have read, so a resumed run continues at exactly the next sample on any number
    of ranks, none skipped or read twice."""

    def __init__(self, size: int, seed: int, shuffle: bool, dist: DistInfo) -> None:
        self.size, self.seed, self.shuffle, self.rank, self.world = size, seed, shuffle, dist.rank, dist.world_size
        self.per_rank = size // dist.world_size
        if self.per_rank == 0:
            raise DataError(
                f"{size} training sample(s) (examples, or packs with data.packing) cannot be shared among {dist.world_size} ranks"
            )
        self.epoch, self.start, self.position = 0, 0, 0  # position: samples this rank read since `start`
        self._cached: tuple[tuple[int, int], list[int]] = ((-1, 0), [])

    @property
    def consumed(self) -> int:
        """Samples of this epoch all ranks together have read (every rank reads as many)."""
        return self.start + self.position * self.world

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.per_rank / batch_size)

    def seek(self, epoch: int, consumed: int) -> None:
        self.epoch, self.start, self.position = epoch, consumed, 0

    def indices(self) -> list[int]:
        """This rank's samples of the current epoch from ``start`` on."""
        if self._cached[0] != (self.epoch, self.start):
            order = list(range(self.size))
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + self.epoch)
                order = torch.randperm(self.size, generator=generator).tolist()
            end = self.start + (self.size - self.start) // self.world * self.world
            self._cached = ((self.epoch, self.start), order[self.start + self.rank : end : self.world])
        return self._cached[1]

    def take(self, n: int) -> list[int]:
        """The next micro-batch; the last one of an epoch may be short, none spans two epochs."""
        if self.position >= len(self.indices()):
            self.epoch, self.start, self.position = self.epoch + 1, 0, 0
        batch = self.indices()[self.position : self.position + n]
        self.position += len(batch)
        return batch


# --------------------------------------------------------------------------------------------
# small pieces of the loop


def sync_save_notice(cfg: FtlConfig) -> str:
    """checkpoint.async_save asked of an engine that saves synchronously: said, not silently ignored."""
    if cfg.checkpoint.async_save and not engine_traits(cfg.strategy).async_checkpoint:
        return (
            "checkpoint.async_save: DeepSpeed saves synchronously (its decoupled writer needs DeepNVMe's async I/O "
            "ops); training waits for each checkpoint"
        )
    return ""


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    saved = capture_rng()
    try:
        yield
    finally:
        restore_rng(saved)


@dataclass
class StopFlag:
    requested: bool = False
    signal_name: str = ""


@contextlib.contextmanager
def stop_on_signals(
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT),
) -> Iterator[StopFlag]:
    """SIGTERM (torchrun, scancel), SIGUSR1 (SLURM's warning before the time limit) and a first
    Ctrl-C ask the loop to finish its step and checkpoint; a second Ctrl-C interrupts at once."""
    flag = StopFlag()

    def handle(signum: int, frame: Any) -> None:
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested, flag.signal_name = True, signal.Signals(signum).name

    previous = {}
    if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
        previous = {sig: signal.signal(sig, handle) for sig in signals}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
