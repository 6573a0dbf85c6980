"""The best periodic eval so far, and early stopping on it (``train.early_stopping``). No torch.

Every periodic eval (``eval.every_steps``) is compared with the best eval loss so far: lower by
more than ``min_delta`` is a new best, anything else one more eval without improvement; after
``patience`` of those in a row the run stops. Its whole state (:meth:`EarlyStopping.state`) is
saved in each checkpoint's trainer state, so a resumed run counts on exactly where it was. The
best step's checkpoint is what ``ftl export`` exports when early stopping is on: the trainer saves
one at each new best and pruning never removes it.

Each eval also records the train/eval gap: its loss minus the mean training loss over the steps
since the previous eval (how much better the model does on what it trained on than on held-out data).
"""

from __future__ import annotations

from typing import Any, Optional

from launcher.config.schema import EarlyStoppingConfig


def train_eval_gap(results: dict[str, Any], train_losses: list[float]) -> dict[str, float]:
    """``train_loss`` (the mean over ``train_losses``) and ``gap`` (eval loss minus it) for an eval's
    results; nothing when no step was trained since the previous eval or the eval has no loss."""
    if not train_losses or not isinstance(results.get("loss"), (int, float)):
        return {}
    train_loss = sum(train_losses) / len(train_losses)
    return {"train_loss": train_loss, "gap": float(results["loss"]) - train_loss}


class EarlyStopping:
    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.patience, self.min_delta = cfg.patience, cfg.min_delta
        self.best: dict[str, Any] = {}  # {"step", "loss", "train_loss", "gap"} of the best eval so far
        self.evals_since_best = 0
        self.last: dict[str, Any] = {}  # the same of the latest eval
        self.train_losses: list[float] = []  # of the steps since the latest eval: the next one's gap

    @property
    def on(self) -> bool:
        return self.patience > 0

    @property
    def stop(self) -> bool:
        return self.on and self.evals_since_best >= self.patience

    @property
    def best_step(self) -> Optional[int]:
        return self.best.get("step")

    def gap(self, results: dict[str, Any]) -> dict[str, float]:
        """The train/eval gap of an eval just made (:func:`train_eval_gap`); the next one counts from here."""
        gap, self.train_losses = train_eval_gap(results, self.train_losses), []
        return gap

    def observe(self, step: int, results: dict[str, Any]) -> bool:
        """Count a periodic eval's results; True when it is a new best."""
        entry = {"step": step, **{k: float(results[k]) for k in ("loss", "train_loss", "gap") if k in results}}
        self.last = entry
        if not self.best or entry["loss"] < self.best["loss"] - self.min_delta:
            self.best, self.evals_since_best = entry, 0
            return True
        self.evals_since_best += 1
        return False

    def state(self) -> dict[str, Any]:
        return {
            "best": dict(self.best),
            "evals_since_best": self.evals_since_best,
            "last": dict(self.last),
            "train_losses": list(self.train_losses),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.best = dict(state.get("best") or {})
        self.evals_since_best = int(state.get("evals_since_best", 0))
        self.last = dict(state.get("last") or {})
        self.train_losses = [float(x) for x in state.get("train_losses") or []]

    def stop_message(self, step: int) -> str:
        return (
            f"early stopping at step {step}: {self.evals_since_best} evals in a row without lowering the eval loss "
            f"by more than {self.min_delta:g} (train.early_stopping.patience={self.patience}); the best, "
            f"{self.best['loss']:.4f}, was at step {self.best['step']}"
        )

    def summary(self) -> str:
        """The run's best eval and its gap, and the latest eval's, for the end of training."""
        text = f"best eval loss {self.best['loss']:.4f} at step {self.best['step']}{_gap(self.best)}"
        if self.last and self.last["step"] != self.best["step"]:
            text += f"; last eval (step {self.last['step']}) {self.last['loss']:.4f}{_gap(self.last)}"
        if self.on:
            text += f"; `ftl export` exports step {self.best['step']} (--latest: the last checkpoint)"
        return text


def _gap(entry: dict[str, Any]) -> str:
    if "gap" not in entry:
        return ""
    return f" (train loss {entry['train_loss']:.4f}, train/eval gap {entry['gap']:+.4f})"
