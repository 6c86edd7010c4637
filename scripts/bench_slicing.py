#!/usr/bin/env python3
"""Speed and memory of a sliced HydraViT subnetwork against a dedicated timm ViT of the same shape.

For each head count k the sliced model (``set_heads(k)`` on the full HydraViT) and a plain timm
``VisionTransformer`` holding the same weights (``hydravit.export_subnetwork``) are timed in one
process, interleaved: every repetition times both models back to back (which one goes first
alternates), so drifting load from other processes hits both alike. Reported are medians over
repetitions, their ratio sliced/dedicated, and the median of the per-repetition ratios:

* eval throughput (inference_mode, ``--batch-size``), img/s
* latency at batch 1 (eval), ms
* forward + backward in train mode (cross-entropy on random labels), ms per step
* the AdamW step, reported apart: by the method's definition it updates all parameters of the
  full model at every k, so it has no dedicated counterpart to match
* peak memory of one training step (fwd + bwd + AdamW), each model in a fresh spawned process:
  peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA
* with ``--cuda-graph`` (CUDA): latency at batch 1 of replaying one CUDA graph of each model per k
  (``hydravit.evaluation.cuda_graph``, captured before timing)

``--metrics`` picks the timed phases (eval, latency, train). ``--compile`` times both models compiled
(inductor, ``dynamic=False``): after ``torch._dynamo.reset()`` per k, each model compiles one graph per k
and phase (eval at -b, eval at batch 1, train), compile time excluded by the warm-up; memory is measured
eager. Every time comes from the evaluation core's ``time_call`` (CUDA events on GPU, synchronized per
call), under its ``autocast`` helper (``--amp``, ``--amp-dtype``).

Progress goes to stderr; the summary (plain or ``--markdown``) to stdout. Small and quick:
``python scripts/bench_slicing.py --model hydravit_dyn_patch4_32 --batch-size 8 --reps 3``
(docs/benchmarks.md lists the commands behind its numbers).
"""
import argparse
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import hydravit  # noqa: E402  registers the models with timm
from hydravit.checkpoint import write_json  # noqa: E402
from hydravit.cli import parse_heads  # noqa: E402
from hydravit.evaluation.common import add_amp_args, autocast  # noqa: E402
from hydravit.evaluation.cuda_graph import GraphCache  # noqa: E402
from hydravit.evaluation.throughput import time_call  # noqa: E402
from hydravit.export import subnetwork_vit_args  # noqa: E402

VARIANTS = ('sliced', 'dedicated')
MIB = 2 ** 20

# metric -> (label, unit, whether higher is better, target on sliced/dedicated or None)
METRICS = {
    'eval_img_s': ('eval throughput', 'img/s', True, 0.97),
    'latency_ms': ('latency, batch 1', 'ms', False, 1.10),
    'fwd_bwd_ms': ('forward+backward', 'ms', False, 1.05),
    'adamw_ms': ('AdamW step', 'ms', False, None),
    'latency_graph_ms': ('latency, batch 1, CUDA graph', 'ms', False, 1.03),
}
COMPILED_TARGETS = {'fwd_bwd_ms': 1.03}  # compiled, both models run the same fused kernels
PHASES = ('eval', 'latency', 'train')  # --metrics


def target_of(metric: str, compiled: bool) -> Optional[float]:
    """The target on sliced/dedicated for ``metric`` (None: reported, no target)."""
    return COMPILED_TARGETS.get(metric, METRICS[metric][3]) if compiled else METRICS[metric][3]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', '-m', default='hydravit_dyn_patch16_224', help='registered HydraViT model')
    parser.add_argument('--img-size', type=int, default=None, help='input size (default: the model\'s)')
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--ks', type=int, nargs='+', default=[3, 6, 12], help='head counts to compare')
    parser.add_argument('-b', '--batch-size', type=int, default=32, help='batch for throughput, fwd+bwd, memory')
    parser.add_argument('--reps', type=int, default=7, help='timed repetitions for eval throughput and latency')
    parser.add_argument('--train-reps', type=int, default=None,
                        help='timed repetitions for forward+backward / AdamW (default: --reps)')
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed calls per model before each phase (at least one is always made)')
    parser.add_argument('--min-time', type=float, default=0.5,
                        help='seconds one repetition should last: fast calls are repeated within a repetition')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    add_amp_args(parser)
    parser.add_argument('--metrics', nargs='+', choices=PHASES, default=list(PHASES),
                        help='timed phases: eval (throughput at -b), latency (batch 1), train (forward+backward, '
                             'AdamW) (default: all)')
    parser.add_argument('--compile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                        help='torch.compile both models with BACKEND (default: inductor), one graph per k and '
                             'phase; compile time is part of the warm-up')
    parser.add_argument('--cuda-graph', action='store_true',
                        help='CUDA: also time batch-1 latency replaying one CUDA graph per k of each model')
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch\'s)')
    parser.add_argument('--clock', choices=('wall', 'process'), default='wall',
                        help='CPU only: "process" times CPU time of this process (use with --threads 1 on a '
                             'machine shared with other jobs)')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--no-speed', action='store_true', help='skip the timings (measure memory only)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output-json', default='', help='write all samples, medians and ratios here')
    parser.add_argument('--markdown', action='store_true', help='print the summary as markdown tables')
    args = parser.parse_args(argv)
    if args.train_reps is None:
        args.train_reps = args.reps
    for flag in ('batch_size', 'reps', 'train_reps', 'num_classes'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be >= 1')
    if args.no_speed and args.no_memory:
        parser.error('--no-speed with --no-memory leaves nothing to measure')
    if args.warmup < 0 or args.min_time < 0:
        parser.error('--warmup and --min-time must be >= 0')
    if args.threads is not None and args.threads < 1:
        parser.error('--threads must be >= 1')
    if args.img_size is not None and args.img_size < 1:
        parser.error('--img-size must be >= 1')
    if not timm.is_model(args.model):
        parser.error(f'--model: unknown model {args.model!r}')
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f'--device: {e}')
    if args.device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available')
    if args.device.type not in ('cpu', 'cuda'):
        parser.error('--device: only cpu and cuda are supported')
    if args.clock == 'process' and args.device.type != 'cpu':
        parser.error('--clock process: only for --device cpu (GPU timings use CUDA events)')
    if args.cuda_graph and args.device.type != 'cuda':
        parser.error(f'--cuda-graph: CUDA graphs need --device cuda, got {args.device}')
    if args.cuda_graph and args.compile:
        parser.error('--cuda-graph: cannot be combined with --compile (time graphs and compiled models apart)')
    if args.compile and args.warmup < 1:
        parser.error('--compile needs --warmup >= 1 so that compilation is not timed')
    args.metrics = [phase for phase in PHASES if phase in args.metrics]  # in the order they run, once each
    return args


# --- timing ---------------------------------------------------------------------------------------
# A measured call runs once and returns milliseconds per metric, each timed by the core's ``time_call``.
Call = Callable[[], List[float]]


def interleave(calls: Dict[str, Call], metrics: List[str], reps: int, warmup: int, min_time: float,
               label: str, started: float) -> Dict[str, Dict[str, list]]:
    """Run ``calls`` alternately and return per-repetition seconds per call: ``{variant: {metric: [s, ...]}}``."""

    def run(name: str, iters: int) -> List[float]:
        totals = [0.] * len(metrics)
        for _ in range(iters):
            for i, ms in enumerate(calls[name]()):
                totals[i] += ms
        return [t / iters / 1e3 for t in totals]

    # The last warmup call (at least one call) also calibrates how many calls one repetition needs,
    # so that fast calls are not timer noise.
    for _ in range(max(warmup, 1)):
        probe = {name: sum(run(name, 1)) for name in calls}
    iters = max(1, math.ceil(min_time / max(max(probe.values()), 1e-9)))
    eta = reps * iters * sum(probe.values())
    progress(f'{label}: {reps} reps x {iters} call(s) per model, about {eta:.0f}s', started)
    samples = {name: {m: [] for m in metrics} for name in calls}
    names = list(calls)
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            for metric, seconds in zip(metrics, run(name, iters), strict=True):
                samples[name][metric].append(seconds)
        first = metrics[0]
        shown = '  '.join(f'{n} {samples[n][first][-1] * 1e3:.1f} ms' for n in names)
        progress(f'{label}: rep {rep + 1}/{reps}  {shown}', started)
    return samples


def progress(msg: str, started: float) -> None:
    elapsed = time.perf_counter() - started
    print(f'[{elapsed // 60:3.0f}m{elapsed % 60:02.0f}s] {msg}', file=sys.stderr, flush=True)


# --- the measured calls ---------------------------------------------------------------------------
Forward = Callable[[torch.Tensor], torch.Tensor]


def eval_forward(model: nn.Module, args: argparse.Namespace) -> Forward:
    """The model's inference forward under ``--amp`` (the core's autocast helper)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(args, x.device):
            return model(x)
    return forward


def graphed(forward: Forward, x: torch.Tensor) -> Forward:
    """``forward`` replayed from a CUDA graph captured here for batches like ``x``."""
    graphs = GraphCache(lambda _, batch: forward(batch), x.device)
    graphs.capture('x', x)
    return lambda batch: graphs('x', batch)


def eval_call(forward: Forward, x: torch.Tensor, clock: Callable[[], float]) -> Call:
    return lambda: [time_call(lambda: forward(x), x.device, clock)[1]]


def train_call(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               args: argparse.Namespace, clock: Callable[[], float]) -> Call:
    """One training step, timed as forward+backward and the optimizer step."""

    def forward_backward() -> None:
        with autocast(args, x.device):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    def call() -> List[float]:
        optimizer.zero_grad(set_to_none=True)
        return [time_call(forward_backward, x.device, clock)[1], time_call(optimizer.step, x.device, clock)[1]]
    return call


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- peak memory, in a fresh process per measurement ------------------------------------------------
def build_variant(spec: dict) -> nn.Module:
    """The full HydraViT set to k, or only the dedicated ViT (the HydraViT's memory must not count for it)."""
    if spec['variant'] == 'dedicated':
        return timm.models.VisionTransformer(**spec['vit_args'])
    hydra = timm.create_model(spec['model'], **spec['create_kwargs'])
    hydra.set_heads(spec['k'])
    return hydra


def current_rss() -> int:
    """Resident set size in bytes (Linux /proc; elsewhere the peak so far, which only over-counts the base)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process in bytes.

    Linux's VmHWM belongs to the process's own address space. ``ru_maxrss`` is only a fallback: Linux
    carries it across fork+exec, so in a spawned child it starts at the parent's RSS at spawn time.
    """
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024  # bytes on macOS, KiB on Linux


def sync(device: torch.device) -> None:
    """Wait for the GPU before reading its memory statistics."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def warm_runtime(device: torch.device, amp: argparse.Namespace) -> None:
    """One tiny training step: what torch loads lazily on a first step must not count as the model's memory."""
    layer = nn.Linear(8, 8).to(device)
    optimizer = make_optimizer(layer)
    with autocast(amp, device):
        loss = layer(torch.randn(2, 8, device=device)).float().sum()
    loss.backward()
    optimizer.step()


def memory_child(conn, spec: dict) -> None:
    """Builds one model, warms the optimizer state with a batch-1 step, then measures one full step."""
    try:
        device = torch.device(spec['device'])
        if spec['threads']:
            torch.set_num_threads(spec['threads'])
        torch.manual_seed(0)
        cuda = device.type == 'cuda'
        amp = argparse.Namespace(amp=spec['amp'], amp_dtype=spec['amp_dtype'])
        warm_runtime(device, amp)
        base = torch.cuda.memory_allocated(device) if cuda else current_rss()
        model = build_variant(spec).to(device).train()
        optimizer = make_optimizer(model)
        size = spec['img_size']
        # An unmeasured batch-1 step allocates AdamW's state, then the measured step runs.
        for measured, batch in ((False, 1), (True, spec['batch_size'])):
            x = torch.randn(batch, 3, size, size, device=device)
            y = torch.randint(0, spec['num_classes'], (batch,), device=device)
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if measured:
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device) if cuda else current_rss()
            with autocast(amp, device):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            sync(device)
        peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
        conn.send({'peak_total': peak - base, 'peak_step_increase': peak - before, 'held_before_step': before - base})
    except Exception as e:  # reported by the parent with the variant it belongs to
        conn.send({'error': f'{type(e).__name__}: {e}'})
    finally:
        conn.close()


def measure_memory(spec: dict) -> Dict[str, int]:
    ctx = mp.get_context('spawn')
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=memory_child, args=(child, spec))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {'error': 'the measuring process died without a result (out of memory?)'}
    proc.join()
    if 'error' in result:
        raise RuntimeError(f'memory of {spec["variant"]} k={spec["k"]}: {result["error"]}')
    return result


# --- driver -----------------------------------------------------------------------------------------
def median_ratio(sliced: list, dedicated: list) -> float:
    return statistics.median(s / d for s, d in zip(sliced, dedicated, strict=True))


def summarize(samples: Dict[str, Dict[str, list]], batch: Dict[str, int], compiled: bool = False) -> Dict[str, dict]:
    """Medians per variant in the reported units, the ratio of medians and the median paired ratio."""
    out = {}
    for metric, (_, _, higher, _) in METRICS.items():
        if metric not in samples['sliced']:
            continue
        if metric == 'eval_img_s':
            values = {v: [batch[metric] / s for s in samples[v][metric]] for v in VARIANTS}
        else:
            values = {v: [s * 1e3 for s in samples[v][metric]] for v in VARIANTS}
        medians = {v: statistics.median(values[v]) for v in VARIANTS}
        ratio = medians['sliced'] / medians['dedicated']
        target = target_of(metric, compiled)
        entry = dict(medians, ratio=ratio, paired_ratio=median_ratio(values['sliced'], values['dedicated']),
                     samples=values, target=target)
        if target is not None:
            entry['met'] = ratio >= target if higher else ratio <= target
        out[metric] = entry
    return out


def bench_k(hydra: nn.Module, k: int, args: argparse.Namespace, clock: Callable[[], float], started: float) -> dict:
    """All measurements for head count k."""
    hydra.set_heads(k)
    result = {'k': k, 'embed_dim': k * hydra.head_dim,
              'params': {'sliced': count_params(hydra), 'dedicated': hydra.subnetwork_params(k)}}
    if not args.no_speed:
        result.update(bench_speed(hydra, k, args, clock, started))
    if not args.no_memory:
        result['memory'] = bench_memory(hydra, k, args, started)
    return result


def bench_memory(hydra: nn.Module, k: int, args: argparse.Namespace, started: float) -> Dict[str, dict]:
    """Peak memory of one training step of each variant, each in a fresh process."""
    memory = {}
    for variant in VARIANTS:
        progress(f'k={k} memory: {variant} training step in a fresh process', started)
        memory[variant] = measure_memory(dict(
            model=args.model, create_kwargs=create_kwargs(args), variant=variant, k=k,
            vit_args=subnetwork_vit_args(hydra, k), device=str(args.device), threads=args.threads,
            img_size=args.img_size, batch_size=args.batch_size, num_classes=args.num_classes, amp=args.amp,
            amp_dtype=args.amp_dtype,
        ))
    return memory


def compiled(models: Dict[str, nn.Module], backend: str) -> Dict[str, nn.Module]:
    """Both models under ``torch.compile`` (inductor), fresh for this k: ``torch._dynamo.reset()`` first, and a
    recompile limit that fits one graph per phase of both models (past it dynamo would silently run eagerly)."""
    torch._dynamo.reset()
    config = torch._dynamo.config
    name = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'  # torch < 2.6
    setattr(config, name, max(getattr(config, name), 4 * len(PHASES)))
    return {v: torch.compile(m, backend=backend, dynamic=False) for v, m in models.items()}


def bench_speed(hydra: nn.Module, k: int, args: argparse.Namespace, clock: Callable[[], float],
                started: float) -> dict:
    """Interleaved timings of the sliced model (already set to k) and its exported twin, eager or compiled."""
    device = args.device
    dedicated = hydravit.export_subnetwork(hydra, k).to(device)
    plain = {'sliced': hydra, 'dedicated': dedicated}
    size = args.img_size
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    x1 = x[:1].clone()
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    for m in plain.values():
        m.eval()
    with torch.inference_mode():
        max_diff = (hydra(x1) - dedicated(x1)).abs().max().item()
    progress(f'k={k}: embed {k * hydra.head_dim}, dedicated ViT equals the slice (max |diff| {max_diff:.1e})',
             started)
    models = compiled(plain, args.compile) if args.compile else plain
    common = dict(warmup=args.warmup, min_time=args.min_time, started=started)
    samples = {v: {} for v in VARIANTS}

    def measure(calls: Dict[str, Call], metrics: List[str], reps: int, label: str) -> None:
        got = interleave(calls, metrics, reps, label=label, **common)
        for v in VARIANTS:
            samples[v].update(got[v])

    forwards = {v: eval_forward(m, args) for v, m in models.items()}
    for phase, metric, batch_x in (('eval', 'eval_img_s', x), ('latency', 'latency_ms', x1)):
        if phase in args.metrics:
            measure({v: eval_call(f, batch_x, clock) for v, f in forwards.items()}, [metric], args.reps,
                    f'k={k} {phase} b{batch_x.shape[0]}')
    if args.cuda_graph:  # eager models, one graph each, captured before timing and freed after
        measure({v: eval_call(graphed(f, x1), x1, clock) for v, f in forwards.items()}, ['latency_graph_ms'],
                args.reps, f'k={k} latency b1 CUDA graph')
    if 'train' in args.metrics:
        optimizers = {v: make_optimizer(m.train()) for v, m in plain.items()}
        measure({v: train_call(models[v], optimizers[v], x, y, args, clock) for v in VARIANTS},
                ['fwd_bwd_ms', 'adamw_ms'], args.train_reps, f'k={k} train b{args.batch_size}')
        hydra.zero_grad(set_to_none=True)
        del optimizers
    del dedicated, models, plain, forwards
    return {'max_abs_diff': max_diff,
            'metrics': summarize(samples, {'eval_img_s': args.batch_size}, compiled=bool(args.compile))}


def create_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {'num_classes': args.num_classes}
    if args.img_size is not None:
        kwargs['img_size'] = args.img_size
    return kwargs


def environment(args: argparse.Namespace) -> dict:
    env = {
        'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
        'platform': platform.platform(), 'cpu_count': os.cpu_count(), 'threads': torch.get_num_threads(),
        'device': str(args.device), 'processor': platform.processor(),
    }
    if args.device.type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(args.device)
    return env


# --- reporting --------------------------------------------------------------------------------------
def format_report(results: List[dict], args: argparse.Namespace, markdown: bool) -> str:
    lines = []

    def table(header: List[str], rows: List[List[str]]) -> None:
        if markdown:
            lines.append('| ' + ' | '.join(header) + ' |')
            lines.append('|' + '|'.join('---' if i == 0 else '---:' for i in range(len(header))) + '|')
            lines.extend('| ' + ' | '.join(r) + ' |' for r in rows)
        else:
            widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
            for r in [header] + rows:
                lines.append('  '.join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        lines.append('')

    precision = {'eval_img_s': 2, 'latency_ms': 2, 'fwd_bwd_ms': 0, 'adamw_ms': 1, 'latency_graph_ms': 3}
    rows = []
    for r in results:
        for metric, (label, unit, higher, _) in METRICS.items():
            m = r.get('metrics', {}).get(metric)
            target = None if m is None else m['target']
            if target is None:
                continue
            bound = f'>= {target:.2f}' if higher else f'<= {target:.2f}'
            p = precision[metric]
            rows.append([str(r['k']), f'{label} ({unit})', f'{m["sliced"]:.{p}f}', f'{m["dedicated"]:.{p}f}',
                         f'{m["ratio"]:.3f}', f'{m["paired_ratio"]:.3f}', bound, 'yes' if m['met'] else 'no'])
    table(['k', 'metric', 'sliced', 'dedicated', 'sliced/dedicated', 'paired ratio', 'target', 'met'], rows)

    rows = []
    for r in results:
        m = r.get('metrics', {}).get('adamw_ms')
        if m is not None:
            rows.append([str(r['k']), f'{m["sliced"]:.1f}', f'{r["params"]["sliced"] / 1e6:.2f} M',
                         f'{m["dedicated"]:.1f}', f'{r["params"]["dedicated"] / 1e6:.2f} M'])
    if rows:
        table(['k', 'AdamW step sliced (ms)', 'params updated', 'AdamW step dedicated (ms)', 'params updated'], rows)

    rows = []
    for r in results:
        mem = r.get('memory')
        if mem is None:
            continue
        s, d = mem['sliced'], mem['dedicated']
        rows.append([str(r['k']), f'{s["peak_total"] / MIB:.0f}', f'{d["peak_total"] / MIB:.0f}',
                     f'{s["peak_total"] / d["peak_total"]:.2f}', f'{s["held_before_step"] / MIB:.0f}',
                     f'{d["held_before_step"] / MIB:.0f}', f'{s["peak_step_increase"] / MIB:.0f}',
                     f'{d["peak_step_increase"] / MIB:.0f}'])
    if rows:
        how = 'max_memory_allocated' if args.device.type == 'cuda' else 'peak RSS'
        table(['k', f'peak sliced (MiB, {how})', 'peak dedicated (MiB)', 'sliced/dedicated',
               'held before step: sliced', 'dedicated', 'step increase: sliced', 'dedicated'], rows)
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    hydra = timm.create_model(args.model, **create_kwargs(args))
    try:
        ks = parse_heads(args.ks, hydra.num_heads, flag='--ks')
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    args.img_size = hydra.patch_embed.img_size[0]
    hydra = hydra.to(args.device)
    clock = time.process_time if args.clock == 'process' else time.perf_counter  # CPU only; CUDA: events
    progress(f'{args.model} on {args.device} ({torch.get_num_threads()} threads), {args.img_size}px, '
             f'batch {args.batch_size}, ks {ks}, amp {args.amp_dtype if args.amp else "off"}, '
             f'{f"compiled ({args.compile})" if args.compile else "eager"}, phases {" ".join(args.metrics)}'
             f'{" + CUDA graph latency" if args.cuda_graph else ""}, {args.clock} clock', started)
    results = [bench_k(hydra, k, args, clock, started) for k in ks]
    progress('done', started)
    if args.output_json:
        payload = {'command': ' '.join(sys.argv), 'args': {k: str(v) if isinstance(v, torch.device) else v
                                                         for k, v in vars(args).items()},
                   'environment': environment(args), 'results': results}
        write_json(args.output_json, payload, indent=2)  # valid JSON: a non-finite number as null
    print(format_report(results, args, args.markdown))


if __name__ == '__main__':
    main()
