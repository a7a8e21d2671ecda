"""CUDA-graph replay of an eager function, without a compiler.

:class:`GraphedCall` records ``fn(x)`` once per input signature (:func:`signature`) in a CUDA graph and replays it
afterwards: the launches of a small network (the text encoder's ~150 kernels per prompt batch) cost one graph
launch instead of ~150 Python dispatches, with no compile time. ``ldm.fast.optimize`` uses it for the text encoder
(``compile_text="graph"``, the default).

What a captured function may not do is what CUDA graphs forbid: read a device value on the host (``.item()``,
data-dependent shapes), or allocate pinned host memory. ``fn`` must be a pure function of its tensor input and of
the tensors ``state()`` returns (a module's parameters and buffers): the graph holds their addresses, so their
values may change in place (an optimizer step), and when one is replaced or moved (``.half()``, ``.to()``,
``load_state_dict(assign=True)``) the graphs are recorded again.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterable

import torch

log = logging.getLogger(__name__)

WARMUP_CALLS = 2  # eager calls on a side stream before capture: cuBLAS workspaces, cuDNN plans, lazy inits


def signature(x: torch.Tensor) -> tuple:
    """What a recorded graph depends on besides the values: the input's shape, dtype and device, inference mode, and
    autocast on the input's device (a graph recorded without it would replay fp32 kernels under it)."""
    kind = x.device.type
    autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    return tuple(x.shape), x.dtype, x.device, torch.is_inference_mode_enabled(), autocast


def without_autocast_cache(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast as it is, without its cache of cast weights: a graph recorded with a cached cast would read memory
    that autocast frees when its context ends (so the casts are recorded in the graph instead)."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


class GraphedCall:
    """``fn(x) -> Tensor`` replayed from a CUDA graph per input signature; eager where a graph cannot serve.

    Eager (``fn`` called as it is): an input not on a CUDA device, or autograd recording (graphs hold no autograd
    history: training calls stay eager). The result of a replay is a copy (the graph's output buffer is
    overwritten by the next replay, and callers keep results across calls). Threads take turns (a lock around the
    copy in, the replay and the copy out); they are expected to share one CUDA stream, as they do by default.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str = "function",
                 state: Callable[[], Iterable[torch.Tensor]] = tuple) -> None:
        self.fn, self.name, self.state = fn, name, state
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.addresses: tuple[int, ...] = ()
        self.lock = threading.Lock()  # one caller at a time between the copy into the static input and the clone

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" or torch.is_grad_enabled():
            return self.fn(x)
        key = signature(x)
        with self.lock, torch.cuda.device(x.device):  # capture and replay on the input's device, whichever is current
            self.drop_stale_graphs()
            if key not in self.graphs:
                self.graphs[key] = self._capture(x)
            graph, static_x, static_y = self.graphs[key]
            static_x.copy_(x)
            graph.replay()
            return static_y.clone()

    def drop_stale_graphs(self) -> None:
        """Forget the recorded graphs when a tensor of ``state()`` was replaced or moved (their addresses in the
        graphs would be stale)."""
        addresses = tuple(t.data_ptr() for t in self.state())
        if addresses != self.addresses:
            if self.graphs:
                log.info("%s: parameters moved or replaced; recording its CUDA graphs again", self.name)
            self.graphs, self.addresses = {}, addresses

    def _capture(self, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        with without_autocast_cache(x.device.type):
            return self._record(x)

    def _record(self, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """Warm ``fn`` up on a side stream, then record it reading a static copy of ``x``."""
        static_x = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.fn(static_x)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_y = self.fn(static_x)
        except RuntimeError as e:  # an operation CUDA graphs forbid (a host read of a device value, a sync)
            raise RuntimeError(f"GraphedCall({self.name}): recording a CUDA graph for input {tuple(x.shape)} failed; "
                               f"run it eager instead (ldm.fast.optimize(..., compile_text=False)): {e}") from e
        if not isinstance(static_y, torch.Tensor):
            raise TypeError(f"GraphedCall({self.name}): expected a tensor output, got {type(static_y).__name__}")
        log.info("CUDA graph of %s recorded for input %s %s (%d graphs)", self.name, tuple(x.shape),
                 str(x.dtype).removeprefix("torch."), len(self.graphs) + 1)
        return graph, static_x, static_y
