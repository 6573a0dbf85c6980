"""Host-side batch preparation ahead of the device: the next micro-batches are read from the data
cache and collated in a background thread while the current step computes, and on CUDA they are
pinned, so the trainer's ``.to(device, non_blocking=True)`` is a real asynchronous copy (from
pageable memory it is a synchronous one). Before this, a step began by collating all of its
``grad_accum`` micro-batches while the GPU waited."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")


class BatchPrefetcher(Generic[T]):
    """``get()`` returns what ``produce()`` returned, in order, up to ``depth`` of them made ahead.
    The thread starts at the first ``get()`` (a resumed run seeks its data order first) and is
    the only caller of ``produce`` from then on. Tensors in what it returns (a tensor, or a
    tuple/list/dict holding them, at any depth) are pinned when ``pin``. An exception in
    ``produce`` is raised by the ``get()`` that would have returned its result."""

    def __init__(self, produce: Callable[[], T], depth: int, pin: bool) -> None:
        self._produce, self._pin = produce, pin
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self) -> T:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ftl-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():  # unblock a put() waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.1)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item: Any = self._produce()
                if self._pin:
                    item = pinned(item)
            except BaseException as e:  # handed to the trainer's thread, which raises it
                item = _Failed(e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failed):
                return


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def pinned(obj: Any) -> Any:
    """``obj`` with every tensor in it in page-locked memory."""
    if isinstance(obj, torch.Tensor):
        return obj.pin_memory()
    if isinstance(obj, dict):
        return {k: pinned(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(pinned(v) for v in obj)
    return obj
