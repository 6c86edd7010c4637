"""Batch-1 latency and batch-B throughput per head count.

Timing excludes warm-up (and, with ``--compile``, compilation; with ``--cuda-graph``, the capture), runs under
``torch.inference_mode`` and is synchronized with the device: CUDA events on GPU, ``time.perf_counter`` on CPU.
Each measurement runs a fixed number of iterations, or for a time budget with ``--bench-time``.
``--model-dtype`` casts the model once (and every input with it) instead of autocasting each call;
``--cuda-graph`` times replays of one CUDA graph per head count and batch size (``cuda_graph.GraphCache``; a
replay includes copying the batch into the graph's input buffer and cloning its output).
``time_call`` and ``benchmark_latency`` are the timing primitives of the whole package (the deploy
tools and the elastic runtime time with them too).
"""
import argparse
import statistics
import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..export import export_subnetwork
from .common import (
    EvalSession,
    Row,
    Tool,
    UsageError,
    add_amp_args,
    add_precision_args,
    autocast,
    create_eval_dataset,
    create_eval_loader,
    format_row,
    resolve_device,
    run_tool,
)
from .cuda_graph import GraphCache

KEYS = ('heads', 'batch_size', 'latency_ms_median', 'latency_ms_p90', 'throughput')


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int,
               budget_s: Optional[float] = None) -> List[float]:
    """Milliseconds of each timed call of ``fn`` after ``warmup`` untimed calls.

    Runs ``iters`` calls, or as many as fit in ``budget_s`` seconds (at least one) when given.
    """
    for _ in range(warmup):
        fn()
    times: List[float] = []
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    while (len(times) < iters) if deadline is None else (not times or time.perf_counter() < deadline):
        times.append(time_call(fn, device)[1])
    return times


def time_call(fn: Callable[[], object], device: torch.device,
              clock: Callable[[], float] = time.perf_counter) -> Tuple[object, float]:
    """``(fn(), milliseconds)`` of one call, synchronized with the device.

    CUDA: events around the call, waiting for the end event. Elsewhere: ``clock`` (seconds) before and
    after; a caller may inject a fake clock to test what it does with the timings.
    """
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end)
    start = clock()
    out = fn()
    return out, (clock() - start) * 1e3


def latency_stats(times_ms: Sequence[float]) -> Row:
    """Median and 90th percentile of call times (ms)."""
    return {'latency_ms_median': statistics.median(times_ms), 'latency_ms_p90': float(np.percentile(times_ms, 90))}


def benchmark_latency(fn: Callable[[], object], device: torch.device, warmup: int = 10, iters: int = 50,
                      budget_s: Optional[float] = None) -> Row:
    """``latency_stats`` of ``fn`` timed by ``time_calls`` (same warm-up, count and budget rules)."""
    return latency_stats(time_calls(fn, device, warmup, iters, budget_s))


def benchmark_heads(session: EvalSession, k: int, batch: torch.Tensor) -> Row:
    """Latency (batch 1) and throughput (the whole ``batch``) of the k-head subnetwork."""
    args, device = session.args, session.device
    runner = _runner(session, k)
    single = batch[:1]

    def forward(x):
        with torch.inference_mode(), autocast(args, device):
            return runner(x)

    if getattr(args, 'cuda_graph', False):
        forward = _graphed(forward, device, (single, batch))
    bench = dict(device=device, warmup=args.num_warm_iter, iters=args.num_bench_iter, budget_s=args.bench_time)
    latency = benchmark_latency(lambda: forward(single), **bench)
    batch_times = time_calls(lambda: forward(batch), **bench)
    return {
        'heads': k,
        'batch_size': batch.shape[0],
        **latency,
        'throughput': batch.shape[0] * len(batch_times) / (sum(batch_times) / 1e3),
    }


def benchmark_batch_sizes(session: EvalSession, k: int, batch: torch.Tensor, sizes: Sequence[int]) -> List[Row]:
    """Mean and p90 time (ms) of one call of the k-head subnetwork on the first b images of ``batch``, for each b of
    ``sizes`` (what a cascade's stages see: sub-batches of any size), timed like ``benchmark_heads``. Rows:
    ``heads``, ``batch_size``, ``latency_ms_mean``, ``latency_ms_p90``."""
    args, device = session.args, session.device
    examples = [batch[:b] for b in sizes]
    bench = dict(device=device, warmup=args.num_warm_iter, iters=args.num_bench_iter, budget_s=args.bench_time)
    rows, runner = [], None
    for x in examples:
        if runner is None or args.compile:  # a fresh compile per size: dynamo's recompile limit would fall back
            runner = _runner(session, k)

        def forward(inp, runner=runner):
            with torch.inference_mode(), autocast(args, device):
                return runner(inp)

        call = _graphed(forward, device, (x,)) if getattr(args, 'cuda_graph', False) else forward
        times = time_calls(lambda call=call, x=x: call(x), **bench)
        rows.append({'heads': k, 'batch_size': x.shape[0], 'latency_ms_mean': statistics.fmean(times),
                     'latency_ms_p90': float(np.percentile(times, 90))})
    return rows


def _graphed(forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
             examples: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward`` replayed from one CUDA graph per batch size of ``examples``, all captured before any timing (the
    graphs are freed with the returned function)."""
    graphs = GraphCache(lambda _, x: forward(x), device)
    for x in examples:
        graphs.capture(x.shape[0], x)
    return lambda x: graphs(x.shape[0], x)


def _runner(session: EvalSession, k: int) -> torch.nn.Module:
    """The module to time: the sliced model at k heads, or its export; compiled for this k if asked."""
    model = session.model
    model.set_heads(k)
    module = export_subnetwork(model, k).eval() if session.args.exported else model
    if session.args.compile:
        torch._dynamo.reset()  # a fresh compile per head count: no guard failures or recompile limits
        module = torch.compile(module, dynamic=False)
    return module


def input_batch(session: EvalSession) -> torch.Tensor:
    """First batch of DATA (repeated to fill the batch size) if given, else random of the model's input size."""
    batch_size = session.args.batch_size
    if session.args.data is None:
        return session.prepare_input(torch.randn(batch_size, *session.input_size))
    images, _ = next(iter(create_eval_loader(session, create_eval_dataset(session, labels=False))))
    repeats = -(-batch_size // images.shape[0])
    return session.prepare_input(images.repeat(repeats, 1, 1, 1)[:batch_size])


def measure(session: EvalSession) -> List[Row]:
    batch = input_batch(session)
    args = session.args
    print(f'Benchmarking {args.model} on {session.device} (batch {args.batch_size}, '
          f'amp {args.amp_dtype if args.amp else "off"}, model dtype {str(session.model_dtype)[6:]}, '
          f'compile {"on" if args.compile else "off"}, '
          f'CUDA graphs {"on" if getattr(args, "cuda_graph", False) else "off"}), '
          f'heads {session.heads}', flush=True)
    rows = []
    for k in session.heads:
        rows.append(benchmark_heads(session, k, batch))
        print(format_row(rows[-1]), flush=True)
    return rows


def add_args(parser: argparse.ArgumentParser) -> None:
    add_amp_args(parser)
    group = parser.add_argument_group('Benchmark')
    group.add_argument('--num-warm-iter', type=int, default=10, metavar='N', help='untimed warm-up calls')
    group.add_argument('--num-bench-iter', type=int, default=50, metavar='N', help='timed calls per measurement')
    group.add_argument('--bench-time', type=float, default=None, metavar='SEC',
                       help='time budget per measurement instead of --num-bench-iter')
    group.add_argument('--compile', '--torchcompile', dest='compile', action='store_true',
                       help='torch.compile the model for each head count (compile time is part of warm-up)')
    group.add_argument('--exported', action='store_true',
                       help='time the exported plain timm ViT of each k instead of the sliced HydraViT')


def add_serving_args(parser: argparse.ArgumentParser) -> None:
    """``--model-dtype`` / ``--channels-last`` (the evaluation core's, as in timm's validate.py) and
    ``--cuda-graph``: how a model is served at small batches. The tools that take them: validate_throughput.py and
    the deploy tools."""
    add_precision_args(parser)
    parser.add_argument('--cuda-graph', action='store_true',
                        help='CUDA only: time (or serve) replays of one CUDA graph per head count, captured before '
                             'any timing (see docs/evaluation.md); not with --compile')


def add_tool_args(parser: argparse.ArgumentParser) -> None:
    """validate_throughput.py's flags: the benchmark's and the serving ones."""
    add_args(parser)
    add_serving_args(parser)


def check_serving_args(args: argparse.Namespace) -> None:
    """``--cuda-graph`` needs a CUDA device (``--device``, or the default one) and excludes ``--compile``; raises
    ``UsageError`` naming the flag, before any model is built."""
    if not getattr(args, 'cuda_graph', False):
        return
    if getattr(args, 'compile', False):
        raise UsageError('--cuda-graph: cannot be combined with --compile (each replaces the eager forward; '
                         'choose one)')
    device = resolve_device(args.device)
    if device.type != 'cuda':
        raise UsageError(f'--cuda-graph: CUDA graphs need a CUDA device, got {device}'
                         + ('' if args.device else ' (no GPU is available)'))


def check_args(args: argparse.Namespace) -> None:
    """The benchmark and serving flags; ``UsageError`` naming the flag."""
    check_serving_args(args)
    if args.num_warm_iter < 0:
        raise UsageError(f'--num-warm-iter must be >= 0, got {args.num_warm_iter}')
    if args.num_bench_iter < 1:
        raise UsageError(f'--num-bench-iter must be >= 1, got {args.num_bench_iter}')
    if args.bench_time is not None and args.bench_time <= 0:
        raise UsageError(f'--bench-time must be > 0, got {args.bench_time}')
    if args.compile and args.num_warm_iter < 1:
        raise UsageError('--compile needs --num-warm-iter >= 1 so that compilation is not timed')


TOOL = Tool(
    description='Batch-1 latency and batch-B throughput per head count.\n\n'
                '  python validate_throughput.py [DATA] --model hydravit_dyn_patch16_224 -b 512 --heads 3 6 12',
    keys=KEYS,
    data_required=False,
    default_batch_size=256,
    add_args=add_tool_args,
    measure=measure,
    check_args=check_args,
)


def main(argv=None) -> List[Row]:
    return run_tool(TOOL, argv)
