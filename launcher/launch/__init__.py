"""Launch backends, siblings chosen by `launch.backend`."""

from __future__ import annotations

from launcher.launch.base import Backend, LaunchPlan
from launcher.launch.local import LocalBackend, TorchrunBackend


def get_backend(name: str) -> Backend:
    if name == "slurm":
        from launcher.launch.slurm import SlurmBackend

        return SlurmBackend()
    return {"local": LocalBackend, "torchrun": TorchrunBackend}[name]()


__all__ = ["Backend", "LaunchPlan", "get_backend"]
