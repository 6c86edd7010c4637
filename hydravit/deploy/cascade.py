"""Serve a confidence cascade: run the narrowest width on a batch, re-run only its unconfident images wider.

``CascadeRunner(stages, spec)`` is a callable on a batch ``(B, C, H, W)``: stage 1 runs every image at ``ladder[0]``
heads; the images whose confidence does not pass the stage's threshold (``hydravit.evaluation.cascade``: entropy
``<=`` T or top-1 probability ``>=`` T) are gathered into a sub-batch and run at the next width, and so on; the last
stage answers every image that reaches it. Each image's logits come from the stage where it exited, exactly the
logits that width gives it alone (the model has no batch-coupled layer). A spec's ``rerun_cap`` bounds each later
stage's sub-batch (``floor(share * B)`` images of the batch of B, the least confident go on): a serving runtime uses
it to bound a call's latency whatever the batch holds.

``stages`` maps each k of the ladder to a callable ``images -> logits``; one builder per backend:

* ``eager_stages(model, ladder)``: ``model.set_heads(k)`` then ``model(images)``.
* ``compiled_stages(model, ladder)``: the same through one ``torch.compile`` of the model. The active width is an int
  attribute dynamo guards, so each k gets its own graph; a sub-batch of a new size makes dynamo recompile that k once
  with a symbolic batch size (automatic dynamic shapes), or, with ``dynamic=False`` and the runner's ``buckets``, once
  per (k, bucket). The recompile limit is raised to fit them all (past it dynamo would silently run eagerly).
* ``graph_stages(model, ladder, example)``: one CUDA graph per (k, bucket) (``evaluation.cuda_graph.GraphCache``),
  all captured at construction from ``example`` (a batch of the largest size the runner will see, on the GPU), so no
  served call pays a capture. **Buckets**: graphs replay fixed shapes, so the runner pads each (sub-)batch of n images
  up to the smallest bucket >= n with copies of its first image and drops those rows from the output; by default
  (``default_buckets``) the buckets are the powers of two below the example's batch size plus that size, which bounds
  the padding to under 2x the images and the graphs to at most ``log2(B) + 2`` per k (each with a private memory pool
  holding that k's activations at that batch: restrict ``buckets`` for large B). Use the returned buckets for the runner
  (``graph_cascade`` does both). Refused off CUDA (``ValueError``).
* ``onnx_stages(paths, ladder)``: one onnxruntime session per k on the files ``scripts/export.py --format onnx``
  writes (``FOLDER/k{K}.onnx``); the exit rule runs in Python on their logits. The batch axis is dynamic: no buckets.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..evaluation.cascade import CascadeSpec, bucket_size, cap_reruns, confidence, exits
from ..evaluation.cuda_graph import GraphBackend, GraphCache

Stage = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CascadeOutput:
    """``logits``: ``(B, num_classes)``, each row from the stage that answered it; ``stage``: ``(B,)`` stage index
    (0-based) of each answer; ``batch_sizes``: images each stage ran (padding excluded)."""

    logits: torch.Tensor
    stage: torch.Tensor
    batch_sizes: list


def eager_stages(model: torch.nn.Module, ladder: Sequence[int],
                 forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[int, Stage]:
    """One callable per k: ``model.set_heads(k)`` then ``forward(images)`` (default ``model(images)``, e.g. the model
    under ``torch.autocast`` or compiled) without autograd."""
    call = forward if forward is not None else model

    def stage(k: int) -> Stage:
        def run(images: torch.Tensor) -> torch.Tensor:
            model.set_heads(k)
            with torch.inference_mode():
                return call(images)
        return run
    return {k: stage(k) for k in ladder}


def compiled_stages(model: torch.nn.Module, ladder: Sequence[int], backend: str = 'inductor',
                    mode: Optional[str] = None, dynamic: Optional[bool] = None,
                    buckets: Optional[Sequence[int]] = None) -> Dict[int, Stage]:
    """``eager_stages`` through one ``torch.compile`` of ``model``: a graph per k (and per batch shape, see the
    module doc). ``buckets``: the runner's buckets, when given, size the recompile limit for ``dynamic=False``."""
    from ..evaluation.accuracy import raise_recompile_limit
    shapes = len(buckets) if buckets and dynamic is False else 2  # automatic dynamic: a static, then a symbolic graph
    raise_recompile_limit(len(ladder) * shapes + 1)
    return eager_stages(model, ladder, torch.compile(model, backend=backend, mode=mode, dynamic=dynamic))


def default_buckets(max_batch: int) -> List[int]:
    """The powers of two below ``max_batch``, and ``max_batch``: padding stays under 2x the images."""
    if max_batch < 1:
        raise ValueError(f'the largest batch must be >= 1, got {max_batch}')
    return [2 ** i for i in range(max_batch.bit_length()) if 2 ** i < max_batch] + [max_batch]


def graph_stages(model: torch.nn.Module, ladder: Sequence[int], example: torch.Tensor,
                 buckets: Optional[Sequence[int]] = None,
                 forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, warmup: int = 3,
                 backend: Optional[GraphBackend] = None) -> Tuple[Dict[int, Stage], List[int]]:
    """One CUDA graph per (k, bucket), all captured here from slices of ``example`` (``(B, C, H, W)`` on the GPU, B
    the largest batch to serve). Returns the stages and the buckets (default ``default_buckets(B)``) to give the
    runner. A stage refuses a batch whose size is not a captured bucket (``ValueError``) rather than capture while
    serving. ``backend`` replaces the CUDA capture (tests); without it a non-CUDA ``example`` is refused."""
    buckets = sorted(set(buckets)) if buckets else default_buckets(example.shape[0])
    if buckets[-1] > example.shape[0] or buckets[0] < 1:
        raise ValueError(f'buckets must be within 1..{example.shape[0]} (the example batch), got {buckets}')
    call = forward if forward is not None else model

    def at(key: Tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        model.set_heads(key[0])
        return call(x)
    graphs = GraphCache(at, example.device, warmup=warmup, backend=backend)
    for k in ladder:
        for b in buckets:
            graphs.capture((k, b), example[:b])

    def stage(k: int) -> Stage:
        def run(images: torch.Tensor) -> torch.Tensor:
            if (k, images.shape[0]) not in graphs:
                raise ValueError(f'no CUDA graph of k={k} for a batch of {images.shape[0]}: pad to one of the '
                                 f'buckets {buckets} (CascadeRunner(..., buckets=...))')
            return graphs((k, images.shape[0]), images)
        return run
    return {k: stage(k) for k in ladder}, buckets


def graph_cascade(model: torch.nn.Module, spec: CascadeSpec, example: torch.Tensor,
                  buckets: Optional[Sequence[int]] = None, **kwargs) -> 'CascadeRunner':
    """A ``CascadeRunner`` over ``graph_stages`` with the buckets they were captured for."""
    stages, buckets = graph_stages(model, spec.ladder, example, buckets, **kwargs)
    return CascadeRunner(stages, spec, buckets)


def onnx_paths(folder: Union[str, Path], ladder: Sequence[int]) -> Dict[int, Path]:
    """The files ``scripts/export.py --format onnx -o FOLDER`` writes for ``ladder``: ``FOLDER/k{K}.onnx``."""
    return {k: Path(folder) / f'k{k}.onnx' for k in ladder}


def onnx_stages(paths: Union[str, Path, Mapping[int, Union[str, Path]]], ladder: Sequence[int],
                threads: int = 0) -> Dict[int, Stage]:
    """One onnxruntime session per k (``deploy.onnx.onnx_session``). ``paths``: a folder of ``k{K}.onnx`` files or a
    map k -> file. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file whose recorded head
    count (``hydravit.heads``, written by the export) is not its k."""
    from .onnx import INPUT_NAME, OUTPUT_NAME, onnx_session
    paths = onnx_paths(paths, ladder) if isinstance(paths, (str, Path)) else {k: Path(p) for k, p in paths.items()}
    sessions = {}
    for k in ladder:
        if k not in paths or not paths[k].is_file():
            raise FileNotFoundError(f'no ONNX file for k={k}: {paths.get(k, "not given")}')
        session = onnx_session(paths[k], threads)
        recorded = session.get_modelmeta().custom_metadata_map.get('hydravit.heads')
        if recorded is not None and int(recorded) != k:
            raise ValueError(f'{paths[k]} holds the k={recorded} subnetwork, not k={k}')
        sessions[k] = session

    def stage(k: int) -> Stage:
        def run(images: torch.Tensor) -> torch.Tensor:
            feed = images.detach().to('cpu', torch.float32).contiguous().numpy()
            (logits,) = sessions[k].run([OUTPUT_NAME], {INPUT_NAME: feed})
            return torch.from_numpy(logits).to(images.device)
        return run
    return {k: stage(k) for k in ladder}


class CascadeRunner:
    """Runs ``spec`` (a ``CascadeSpec``) on batches with one stage callable per k of its ladder (see module doc).

    ``spec`` can be replaced between calls (``runner.spec = other_spec``, thresholds and re-run caps with it): the
    load controller does so to trade accuracy for latency.
    """

    def __init__(self, stages: Dict[int, Stage], spec: CascadeSpec, buckets: Optional[Sequence[int]] = None) -> None:
        missing = [k for k in spec.ladder if k not in stages]
        if missing:
            raise ValueError(f'no stage callable for head count(s) {missing} of the ladder {list(spec.ladder)}')
        self.stages = stages
        self.spec = spec
        self.buckets = sorted(buckets) if buckets else None

    def __call__(self, images: torch.Tensor) -> CascadeOutput:
        spec, n = self.spec, images.shape[0]
        index = torch.arange(n, device=images.device)
        stage = torch.full((n,), len(spec.ladder) - 1, dtype=torch.long, device=images.device)
        logits, sizes = None, []
        for s, k in enumerate(spec.ladder):
            sub = images if s == 0 else images.index_select(0, index)
            out = self._run(k, sub)
            sizes.append(sub.shape[0])
            if logits is None:
                logits = out.new_empty((n, out.shape[1]))
            if s == len(spec.ladder) - 1:
                logits[index] = out
                break
            values = confidence(out, spec.rule)
            leave = ~cap_reruns(values, spec.rule, ~exits(values, spec.rule, spec.thresholds[s]),
                                spec.rerun_limit(s, n))
            logits[index[leave]] = out[leave]
            stage[index[leave]] = s
            index = index[~leave]
            if index.numel() == 0:
                break
        return CascadeOutput(logits, stage, sizes)

    def _run(self, k: int, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        size = bucket_size(n, self.buckets)
        if size > n:  # fixed-shape backends: pad with copies of the first image, drop their rows after
            images = torch.cat([images, images[:1].expand(size - n, *images.shape[1:])])
        return self.stages[k](images)[:n]
