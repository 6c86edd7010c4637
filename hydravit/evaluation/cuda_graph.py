"""CUDA graphs of an inference forward, one per key (e.g. a head count): serving at small batches without the CPU's
per-op dispatch cost.

At batch 1 a ViT forward is bound by the CPU launching a few hundred kernels, not by the GPU running them. A captured
``torch.cuda.CUDAGraph`` replays all of them with one launch. ``GraphCache`` holds one graph per key; the evaluation
tools (``validate_throughput.py --cuda-graph``), the deploy tools and the ``ElasticRunner`` use it.

* **Capture** (``capture(key, example)``, or the first call with a new key): the forward is warmed up ``warmup``
  times on a side stream (cudnn autotuning, lazy initialization, HydraViT's per-width parameter blocks), then one
  call is captured, reading a static input buffer of ``example``'s shape, dtype and device.
* **Replay** (``cache(key, x)``): ``x`` is copied into that key's static input buffer, the graph is replayed, and a
  clone of the static output is returned (with ``clone_output=False`` the static output itself, which the next replay
  of the same key overwrites). Switching keys is a dictionary lookup: nothing is recompiled or recaptured.
* **Refused**: a batch whose shape, dtype or device differs from the one captured for its key raises ``ValueError``
  (the graph's kernels are fixed to the captured shapes; copying such a batch in would answer wrongly or fail), and
  ``CudaGraphBackend`` refuses a device that is not CUDA.
* **Memory**: each graph has a private memory pool that holds its forward's intermediate tensors at the captured
  batch, plus the static input and output, for as long as the graph is kept (``release(key)`` / ``clear()`` free
  them). With private pools any replay order is safe.
* **Weights**: replays read the parameters' storage as it was at capture. In-place updates (``load_state_dict``,
  an optimizer step) are seen by later replays; moving or casting the model (``.to()``) is not: ``clear()`` and
  capture again.
* Inference only: capture and replays run under ``torch.inference_mode()``; the returned clone is a plain tensor
  (the static output itself is an inference tensor).
  The forward may enter ``torch.autocast`` itself; autocast's weight-cast cache is off during warm-up and capture,
  since a cast cached outside the graph would be freed while the graph still reads it.

The capture/replay mechanism is a ``GraphBackend``: ``CudaGraphBackend`` on a GPU; tests inject their own to check the
dispatch (which graph runs for which key, buffers, refusals) on the CPU.
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Iterator, List, Optional, Protocol, Tuple

import torch

Forward = Callable[[Hashable, torch.Tensor], torch.Tensor]  # (key, batch) -> output, e.g. set_heads(k) then model(x)
Signature = Tuple[Tuple[int, ...], torch.dtype, torch.device]


class GraphBackend(Protocol):
    """How a call is captured and replayed."""

    def capture(self, fn: Callable[[], torch.Tensor], warmup: int) -> Tuple[Callable[[], None], torch.Tensor]:
        """Warm ``fn`` up ``warmup`` times, capture one call; returns ``(replay, static_output)``: ``replay()`` reruns
        the captured work, reading the same input buffers and writing ``static_output``."""
        ...


class CudaGraphBackend:
    """``torch.cuda.CUDAGraph`` capture on ``device``: warm-up on a side stream, capture with ``torch.cuda.graph`` on
    that same stream (a private memory pool per graph); replays run on the caller's current stream. Raises
    ``ValueError`` for a device that is not CUDA."""

    def __init__(self, device: torch.device) -> None:
        device = torch.device(device)
        if device.type != 'cuda':
            raise ValueError(f'CUDA graphs need a CUDA device, got {device}')
        self.device = device

    def capture(self, fn: Callable[[], torch.Tensor], warmup: int) -> Tuple[Callable[[], None], torch.Tensor]:
        with torch.cuda.device(self.device):  # torch.cuda.graph captures on the current device
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # captured on the warm-up stream: per-stream library handles and workspaces (cuBLAS) already exist there
            with torch.cuda.graph(graph, stream=side):
                static_output = fn()
        return graph.replay, static_output


@dataclass
class _Graph:
    replay: Callable[[], None]
    static_input: torch.Tensor
    static_output: torch.Tensor

    @property
    def signature(self) -> Signature:
        return signature(self.static_input)


def signature(x: torch.Tensor) -> Signature:
    """What a graph is fixed to: the input's shape, dtype and device."""
    return tuple(x.shape), x.dtype, x.device


def describe(sig: Signature) -> str:
    shape, dtype, device = sig
    return f'shape {tuple(shape)}, {str(dtype).replace("torch.", "")} on {device}'


class GraphCache:
    """One captured graph of ``forward`` per key; ``cache(key, x)`` replays the key's graph on ``x``.

    Args:
        forward: ``forward(key, x) -> Tensor``, what is captured for ``key`` (it sets up the key itself, e.g.
            ``model.set_heads(k)``, and may enter ``torch.autocast``); one tensor in, one tensor out.
        device: where the graphs run (ignored when ``backend`` is given).
        warmup: untimed calls before each capture (at least 1).
        clone_output: return a clone of the static output (default) or the static output itself.
        backend: the capture mechanism (default ``CudaGraphBackend(device)``, which refuses a non-CUDA device).

    See the module docstring for capture, memory and what is refused.
    """

    def __init__(self, forward: Forward, device: torch.device, warmup: int = 3, clone_output: bool = True,
                 backend: Optional[GraphBackend] = None) -> None:
        if warmup < 1:
            raise ValueError(f'warmup must be >= 1 (a first call must not be captured cold), got {warmup}')
        self.forward = forward
        self.warmup = warmup
        self.clone_output = clone_output
        self.backend = backend if backend is not None else CudaGraphBackend(device)
        self._graphs: Dict[Hashable, _Graph] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self) -> List[Hashable]:
        return list(self._graphs)

    def signature_of(self, key: Hashable) -> Signature:
        """The (shape, dtype, device) the graph of ``key`` was captured for; ``KeyError`` if none was."""
        return self._graphs[key].signature

    def capture(self, key: Hashable, example: torch.Tensor) -> None:
        """Capture the graph of ``key`` for batches like ``example`` (replacing one captured before)."""
        if not isinstance(example, torch.Tensor):
            raise TypeError(f'a graph is captured from one tensor, got {type(example).__name__}')
        with torch.inference_mode(), _autocast_cache_disabled():
            static_input = example.detach().clone()
            replay, static_output = self.backend.capture(lambda: self.forward(key, static_input), self.warmup)
        if not isinstance(static_output, torch.Tensor):
            raise TypeError(f'the captured forward must return one tensor, got {type(static_output).__name__}')
        self._graphs[key] = _Graph(replay, static_input, static_output)

    def __call__(self, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        """The output of ``forward(key, x)`` by replaying the key's graph (captured first if there is none yet).

        ``x``: a batch of the shape, dtype and device the key's graph was captured for; raises ``ValueError`` else.
        """
        graph = self._graphs.get(key)
        if graph is None:
            self.capture(key, x)
            graph = self._graphs[key]
        if not isinstance(x, torch.Tensor) or signature(x) != graph.signature:
            got = describe(signature(x)) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'the CUDA graph of {key!r} was captured for {describe(graph.signature)}; got {got} '
                             '(a graph replays fixed shapes: pass batches of the captured shape)')
        with torch.inference_mode():
            graph.static_input.copy_(x)
            graph.replay()
        return graph.static_output.clone() if self.clone_output else graph.static_output  # a clone: a plain tensor

    def release(self, key: Hashable) -> None:
        """Drop the graph of ``key`` and its memory pool (nothing if there is none)."""
        self._graphs.pop(key, None)

    def clear(self) -> None:
        """Drop every graph (e.g. after the model was moved or cast)."""
        self._graphs.clear()


@contextlib.contextmanager
def _autocast_cache_disabled() -> Iterator[None]:
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


def heads_forward(model: torch.nn.Module,
                  forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Forward:
    """``forward(k, x)`` for a ``GraphCache`` keyed by head count: ``model.set_heads(k)``, then ``forward(x)``
    (default ``model(x)``)."""
    call = forward if forward is not None else model

    def at_heads(k: Hashable, x: torch.Tensor) -> torch.Tensor:
        model.set_heads(k)
        return call(x)
    return at_heads
