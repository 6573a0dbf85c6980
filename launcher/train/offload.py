"""``strategy.activation_offloading``: what the forward saves for backward waits in pinned host
memory, copied there and back on side CUDA streams while the layers compute.

:class:`ActivationOffloader` is a pair of saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``)
entered around each micro-batch's forward. For every tensor autograd saves it decides
(:meth:`ActivationOffloader.decide`):

* ``parameter``: a parameter or a view of one (a matmul saves its weight) stays where it is: it
  lives on the device for the whole step anyway, and a copy would only double it in host memory;
* ``small``: below ``min_bytes`` the copy's fixed cost outweighs the memory it frees;
* ``last``: the last ``keep_last`` decoder layers and everything after them (final norm, head,
  the loss and the head's gradient the chunked loss keeps) stay: backward needs them first, so a
  round trip would only stall it;
* ``offload``: the rest (every other layer's activations, or with activation checkpointing
  their saved inputs).

An offloaded tensor is copied device→host on the offload stream after the compute stream has
produced it (the stream waits for it), into pinned memory, and ``record_stream`` keeps its device
block from reuse until that copy is done; the forward then drops it. A tensor saved several times
(one input, three projections) is copied once. In backward, unpacking a tensor of layer ``i``
starts the host→device copies of layer ``i - 1`` on the prefetch stream, each after its offload
copy's event, so they arrive while layer ``i``'s backward runs; the compute stream waits for a
tensor's copy event before reading it, and the tensor is recorded on the compute stream so its
block outlives that use. The last offloaded layer starts coming back when the forward ends, as
backward begins in the kept layers. On the device at once: the kept layers and one layer coming back.

On CPU (tests only: a CPU rank refuses the option) the same decisions are made and the "host"
copy is a synchronous clone, so what is offloaded, what is kept and the gradients can be checked
without a GPU.
"""

from __future__ import annotations

import weakref
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from launcher.model.compile import decoder_layers

MIN_BYTES = 2**20  # 1 MiB: smaller saved tensors stay on the device
KEEP_LAST = 1  # decoder layers whose saved tensors stay on the device (backward starts there)


@dataclass(eq=False)
class Offloaded:
    """One saved tensor in host memory: ``host`` (pinned on CUDA), the event its device→host copy
    recorded, the layer that saved it, and while prefetched, its copy back on the device."""

    host: torch.Tensor
    device: torch.device
    layer: int
    copied: Optional[torch.cuda.Event] = None
    back: Optional[torch.Tensor] = None
    arrived: Optional[torch.cuda.Event] = None
    uses: int = 1  # saves not yet unpacked: the copy back is dropped after the last
    __weakref__: Any = field(default=None, init=False, repr=False, compare=False)


class ActivationOffloader:
    """Saved-tensor hooks for one model; ``with offloader:`` around each forward (see module doc)."""

    def __init__(self, model: nn.Module, *, min_bytes: int = MIN_BYTES, keep_last: int = KEEP_LAST) -> None:
        self.model, self.min_bytes = model, min_bytes
        layers = decoder_layers(model)
        if not layers:
            raise ValueError(
                f"strategy.activation_offloading: found no decoder layers in {type(model).__name__} to offload from"
            )
        self.first_kept = len(layers) - keep_last  # layer index from which saved tensors stay
        self.layer = -1  # the decoder layer running now; -1 before the first, len(layers) after the last
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda m, a, i=i: self._enter(i))
        if layers:
            layers[-1].register_forward_hook(lambda m, a, o: self._enter(len(layers)))
        self.decisions: Counter[str] = Counter()  # saved tensors by decision, over the run
        self.offloaded_bytes = 0
        self._params: set[int] = set()
        self._same: dict[int, tuple[weakref.ref[torch.Tensor], Offloaded]] = {}  # this forward's copies by tensor id
        self._by_layer: dict[int, list[weakref.ref[Offloaded]]] = {}
        self._hooks: Optional[AbstractContextManager[None]] = None
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}  # offload, prefetch

    def _enter(self, i: int) -> None:
        if self._hooks is not None:  # in an offloaded forward, not in eval or checkpointing's recompute
            self.layer = i

    # -- forward

    def __enter__(self) -> "ActivationOffloader":
        self.layer = -1
        self._by_layer.clear()  # the last backward's leftovers (a layer it never reached)
        self._params = {
            _local(p).untyped_storage().data_ptr() for p in self.model.parameters() if p.device.type != "meta"
        }
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._same.clear()
        # Backward starts in the kept layers, whose tensors were never packed away and so cannot
        # trigger a prefetch: the last offloaded layer starts coming back now.
        if self._by_layer:
            self._prefetch(max(self._by_layer))

    def decide(self, t: torch.Tensor) -> str:
        """What to do with a saved tensor: parameter, small, last or offload (module doc); kept:
        what cannot be copied as a dense block (sparse, nested)."""
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return "parameter"
        if t.layout != torch.strided or type(t) is not torch.Tensor or t.device.type not in ("cuda", "cpu"):
            return "kept"  # sparse, nested, tensor subclasses, other devices: as they are
        if t.untyped_storage().data_ptr() in self._params:  # a view of a parameter made through .data or detach()
            return "parameter"
        if t.numel() * t.element_size() < self.min_bytes:
            return "small"
        return "last" if self.layer >= self.first_kept else "offload"

    def pack(self, t: torch.Tensor) -> Any:
        seen = self._same.get(id(t))
        if seen is not None and seen[0]() is t:  # the same tensor saved again (q, k and v's input): one copy
            seen[1].uses += 1
            self.decisions["offload"] += 1
            return seen[1]
        decision = self.decide(t)
        self.decisions[decision] += 1
        if decision != "offload":
            return t
        self.offloaded_bytes += t.numel() * t.element_size()
        if t.device.type == "cpu":
            item = Offloaded(t.detach().clone(), t.device, self.layer)
        else:
            offload, _ = self._cuda_streams(t.device)
            host = torch.empty_like(
                t, device="cpu", pin_memory=True
            )  # t's strides where they are dense (transposed q, k, v)
            offload.wait_stream(torch.cuda.current_stream(t.device))  # t is written by work queued there
            with torch.cuda.stream(offload):
                host.copy_(t, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(offload)
            t.record_stream(offload)  # its block is not reused before the copy has read it
            item = Offloaded(host, t.device, self.layer, copied)
        self._same[id(t)] = (weakref.ref(t), item)
        self._by_layer.setdefault(self.layer, []).append(weakref.ref(item))
        return item

    # -- backward

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, Offloaded):
            return packed
        out = self._bring_back(packed)  # first: a copy not prefetched must not queue behind the next layer's
        self._prefetch(packed.layer - 1)
        if packed.device.type == "cuda":
            compute = torch.cuda.current_stream(packed.device)
            compute.wait_event(packed.arrived)
            out.record_stream(compute)  # made on the prefetch stream, read on this one
        packed.uses -= 1
        if packed.uses <= 0:
            packed.back = None  # autograd holds what it unpacked; a second backward (retain_graph) copies again
        return out

    def _bring_back(self, item: Offloaded) -> torch.Tensor:
        if item.back is not None:
            return item.back
        if item.device.type == "cpu":
            item.back = item.host.clone()
            return item.back
        _, prefetch = self._cuda_streams(item.device)
        prefetch.wait_event(item.copied)  # the host copy is complete
        with torch.cuda.stream(prefetch):
            item.back = item.host.to(item.device, non_blocking=True)
            item.arrived = torch.cuda.Event()
            item.arrived.record(prefetch)
        return item.back

    def _prefetch(self, layer: int) -> None:
        """Start bringing back every tensor ``layer`` saved, once, while the layer after it runs backward."""
        for ref in self._by_layer.pop(layer, []):
            item = ref()
            if item is not None:
                self._bring_back(item)

    def _cuda_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]


def _local(p: torch.Tensor) -> torch.Tensor:
    """An FSDP2 parameter's local shard (a DTensor has no storage of its own), else the parameter."""
    return p.to_local() if hasattr(p, "to_local") else p


def build_offloader(model: nn.Module, enabled: bool) -> AbstractContextManager[object]:
    """The context to enter around every forward: an :class:`ActivationOffloader` of ``model`` when
    ``enabled`` (build it once per run: it hooks the decoder layers), else one that does nothing."""
    return ActivationOffloader(model) if enabled else nullcontext()
