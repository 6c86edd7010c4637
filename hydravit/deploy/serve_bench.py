"""serve-bench: a stream of batches under a background CPU load that comes and goes, served once at
the fixed largest k and once by the ElasticRunner.

    python -m hydravit.deploy serve-bench --model hydravit_dyn_patch4_32 -b 16 --budget-ms 20 \\
        [--duration 35] [--load-schedule off:10 on:15 off:10] [--load-procs N] [-o output/serve-bench] \\
        [--amp | --model-dtype bfloat16] [--cuda-graph]

Before the runs, every k is timed at batch B without load (the evaluation core's
``benchmark_latency``); those latencies are the runner's profile. Each run lasts ``--duration``
seconds and follows the same load schedule. The report: share of calls within budget (overall, while
the load is on, while it is off), mean k, the time the runner needs after each load ends to be back
at the k it started from (the largest k that fits without load), and the runner's own cost per call
(a runner around a model that does nothing, against the mean model call). Writes
``serve_bench.json`` (settings, calibration, summaries, every call) and ``serve_bench.png``.
With ``--cuda-graph`` (CUDA only) the calibration times graph replays and both runners serve from one CUDA graph
per k, captured when the runner is built.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..checkpoint import atomic_write
from ..evaluation import throughput
from ..evaluation.common import (
    EvalSession,
    Row,
    UsageError,
    add_amp_args,
    autocast,
    create_parser,
    create_session,
    round_row,
    write_results,
)
from ..evaluation.cuda_graph import GraphCache, heads_forward
from ..evaluation.environment import device_info
from .load import CpuLoad, Segment, load_on, load_windows, parse_schedule, total_seconds
from .runtime import ElasticRunner

DEFAULT_SCHEDULE = ('off:10', 'on:15', 'off:10')
SUMMARY_KEYS = ('run', 'calls', 'within_budget', 'within_budget_load', 'within_budget_no_load', 'mean_k',
                'mean_k_load', 'latency_ms_p90', 'recovery_s')
History = List[Tuple[float, int, float]]


def create_serve_bench_parser() -> argparse.ArgumentParser:
    parser = create_parser(__doc__, data_required=False, default_batch_size=1)
    parser.prog = 'python -m hydravit.deploy serve-bench'
    add_amp_args(parser)
    throughput.add_serving_args(parser)
    group = parser.add_argument_group('Serving benchmark')
    group.add_argument('--budget-ms', type=float, required=True, metavar='MS', help='latency budget per batch')
    group.add_argument('--duration', type=float, default=None, metavar='SEC',
                       help='seconds per run (default: the load schedule\'s length)')
    group.add_argument('--load-schedule', nargs='+', default=list(DEFAULT_SCHEDULE), metavar='STATE:SEC',
                       help='background load segments, on:SEC / off:SEC (default: off:10 on:15 off:10)')
    group.add_argument('--load-procs', type=int, default=None, metavar='N',
                       help='busy-looping processes while the load is on (default: one per CPU core)')
    group.add_argument('--calibration-time', type=float, default=0.5, metavar='SEC',
                       help='seconds of timing per k before the runs (default: 0.5)')
    group.add_argument('--log-every', type=float, default=5., metavar='SEC', help='seconds between progress lines')
    group.add_argument('-o', '--output', default='output/serve-bench', metavar='DIR',
                       help='folder for serve_bench.json and serve_bench.png (default: output/serve-bench)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = create_serve_bench_parser()
    args = parser.parse_args(argv)
    try:
        schedule = _check_args(args)
        session = create_session(args, all_heads=True)
        batch = throughput.input_batch(session)
    except UsageError as e:
        parser.error(str(e))
    try:
        result = run_benchmark(session, batch, schedule)
    except KeyboardInterrupt:
        print('serve-bench: interrupted; the background load is stopped', file=sys.stderr)
        raise SystemExit(130) from None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / 'serve_bench.json', lambda tmp: tmp.write_text(json.dumps(result) + '\n'))
    png = plot_serve_bench(result, out / 'serve_bench.png')
    if args.results_file:
        write_results(result['summary'], args.results_file, SUMMARY_KEYS)
    print(format_summary(result))
    print(f'Wrote {out / "serve_bench.json"} and {png}')
    return result


def _check_args(args: argparse.Namespace) -> List[Segment]:
    throughput.check_serving_args(args)
    if args.budget_ms <= 0:
        raise UsageError(f'--budget-ms must be > 0, got {args.budget_ms:g}')
    try:
        schedule = parse_schedule(args.load_schedule)
    except ValueError as e:
        raise UsageError(f'--load-schedule: {e}') from e
    if args.duration is None:
        args.duration = total_seconds(schedule)
    if args.duration <= 0:
        raise UsageError(f'--duration must be > 0, got {args.duration:g}')
    if args.load_procs is None:
        args.load_procs = len(_cpu_cores())
    if args.load_procs < 0:
        raise UsageError(f'--load-procs must be >= 0, got {args.load_procs}')
    for flag, value in (('--calibration-time', args.calibration_time), ('--log-every', args.log_every)):
        if value <= 0:
            raise UsageError(f'{flag} must be > 0, got {value:g}')
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f'-o/--output: {args.output} exists and is not a folder')
    return schedule


def _cpu_cores() -> set:
    return os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else set(range(os.cpu_count() or 1))


# --- the benchmark ---------------------------------------------------------------------------------------
def run_benchmark(session: EvalSession, batch: torch.Tensor, schedule: Sequence[Segment]) -> dict:
    """Calibrate, then the fixed and the elastic run; returns everything the report and the plot need."""
    args, model, heads = session.args, session.model, session.heads
    forward = _forward(session)
    calibration = calibrate(session, batch, forward)
    _warn_about_budget(calibration, args.budget_ms)
    runs = {}
    for name, run_heads in (('fixed', [max(heads)]), ('elastic', heads)):
        runner = ElasticRunner(model, args.budget_ms, heads=run_heads, profile=calibration, max_history=None,
                               forward=forward, cuda_graph=args.cuda_graph, example_input=batch)
        start_k = runner.active_heads
        _stream(runner, batch, args, schedule, name)
        runs[name] = {'start_k': start_k, 'history': [list(entry) for entry in runner.history]}
    overhead_us = runner_overhead_us(heads, args.budget_ms, calibration, batch)
    target_k = runs['elastic']['start_k']  # the largest k that fits without load, per the calibration
    summary = [summarize(name, run['history'], args.budget_ms, schedule, args.duration,
                         target_k if name == 'elastic' else None) for name, run in runs.items()]
    mean_call_ms = float(np.mean([ms for _, _, ms in runs['elastic']['history']]))
    return {
        'device': device_info(args, session.device),
        'settings': {'model': args.model, 'batch_size': batch.shape[0], 'budget_ms': args.budget_ms,
                     'duration_s': args.duration, 'load_schedule': args.load_schedule, 'load_procs': args.load_procs,
                     'heads': heads, 'checkpoint': args.checkpoint or None,
                     'model_dtype': str(session.model_dtype).replace('torch.', ''), 'cuda_graph': args.cuda_graph},
        'calibration': calibration,
        'summary': summary,
        'overhead': {'runner_us_per_call': overhead_us, 'mean_call_ms': mean_call_ms,
                     'share_of_call': overhead_us / 1e3 / mean_call_ms,
                     'share_of_fastest_call': overhead_us / 1e3 / min(r['latency_ms_median'] for r in calibration)},
        'runs': runs,
    }


def _forward(session: EvalSession):
    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(session.args, session.device):
            return session.model(x)
    return forward


def calibrate(session: EvalSession, batch: torch.Tensor, forward) -> List[Row]:
    """Latency (median, p90) of every k at the stream's batch, without load: the runner's profile. With
    ``--cuda-graph``, of graph replays (each k's graph is captured before it is timed and freed after)."""
    args, model = session.args, session.model
    print(f'Calibrating {args.model} at batch {batch.shape[0]} on {session.device}: heads {session.heads}'
          f'{" (CUDA graphs)" if args.cuda_graph else ""}', flush=True)
    rows = []
    with torch.inference_mode():
        for k in session.heads:
            model.set_heads(k)
            stats = throughput.benchmark_latency(_calibration_call(session, k, batch, forward), session.device,
                                                 warmup=3, budget_s=args.calibration_time)
            rows.append(round_row({'heads': k, **stats}))
            print(f'  k={k:<3d} latency median {stats["latency_ms_median"]:8.3f} ms  p90 '
                  f'{stats["latency_ms_p90"]:8.3f} ms', flush=True)
    return rows


def _calibration_call(session: EvalSession, k: int, batch: torch.Tensor, forward) -> Callable[[], torch.Tensor]:
    """One call at k: the forward, or the replay of k's CUDA graph (``--cuda-graph``), captured here."""
    if not session.args.cuda_graph:
        return lambda: forward(batch)
    graphs = GraphCache(heads_forward(session.model, forward), session.device)
    graphs.capture(k, batch)
    return lambda: graphs(k, batch)


def _warn_about_budget(calibration: Sequence[Row], budget_ms: float) -> None:
    low, high = calibration[0]['latency_ms_p90'], calibration[-1]['latency_ms_p90']
    if not low < budget_ms < high:
        print(f'note: the budget {budget_ms:g} ms is not between the p90 of the smallest k ({low:.3g} ms) and of '
              f'the largest ({high:.3g} ms) without load; the comparison is most telling when it is', flush=True)


def _stream(runner: ElasticRunner, batch: torch.Tensor, args: argparse.Namespace,
            schedule: Sequence[Segment], name: str) -> None:
    """Back-to-back calls for ``args.duration`` seconds while the load follows ``schedule``."""
    print(f'[{name}] {args.duration:g} s, heads {runner.heads}, budget {args.budget_ms:g} ms, load '
          f'{" ".join(args.load_schedule)} with {args.load_procs} processes', flush=True)
    next_log, logged = args.log_every, 0
    with CpuLoad(schedule, args.load_procs) as load, torch.inference_mode():  # the runner's forward autocasts
        while (t := runner.clock() - runner.t0) < args.duration:
            load.update(t)
            runner(batch)
            if t >= next_log:
                recent = list(runner.history)[logged:]
                logged = len(runner.history)
                within = np.mean([ms <= args.budget_ms for _, _, ms in recent])
                print(f'[{name}] {t:5.1f}/{args.duration:g} s  load {"on " if load.running else "off"}  '
                      f'k={runner.active_heads:<3d} calls {len(runner.history):6d}  within budget {within:6.1%} '
                      f'(last {args.log_every:g} s)', flush=True)
                next_log += args.log_every


class _NoOpModel:
    """Stands in for the model so that a runner's calls time the runner's own work only."""

    def __init__(self, num_heads: int) -> None:
        self.num_heads = num_heads

    def set_heads(self, k: int) -> None:
        pass

    def __call__(self, x):
        return x


def runner_overhead_us(heads: Sequence[int], budget_ms: float, calibration: Sequence[Row], x,
                       calls: int = 20000) -> float:
    """Median microseconds of one runner call around a model that does nothing (bookkeeping and timing)."""
    runner = ElasticRunner(_NoOpModel(max(heads)), budget_ms, heads=heads, profile=calibration)
    stats = throughput.benchmark_latency(lambda: runner(x), torch.device('cpu'), warmup=1000, iters=calls)
    return stats['latency_ms_median'] * 1e3


# --- the report ------------------------------------------------------------------------------------------
def summarize(name: str, history: History, budget_ms: float, schedule: Sequence[Segment], duration: float,
              target_k: Optional[int] = None) -> Row:
    """Share within budget, mean k, p90 and, given ``target_k``, the longest time it took after a load ended to be
    back at ``target_k`` (None when it never was)."""
    on = [load_on(schedule, t) for t, _, _ in history]
    ks = np.array([k for _, k, _ in history], dtype=float)
    within = np.array([ms <= budget_ms for _, _, ms in history])
    on = np.array(on, dtype=bool)
    ends = [end for _, end in load_windows(schedule) if end < duration] if target_k is not None else []
    recovery = [_recovery(history, end, target_k) for end in ends]
    return round_row({
        'run': name,
        'calls': len(history),
        'within_budget': float(within.mean()),
        'within_budget_load': float(within[on].mean()) if on.any() else None,
        'within_budget_no_load': float(within[~on].mean()) if (~on).any() else None,
        'mean_k': float(ks.mean()),
        'mean_k_load': float(ks[on].mean()) if on.any() else None,
        'latency_ms_p90': float(np.percentile([ms for _, _, ms in history], 90)),
        'recovery_s': max(recovery) if recovery and None not in recovery else None,
    })


def _recovery(history: History, load_end: float, target_k: int) -> Optional[float]:
    """Seconds from ``load_end`` to the first call at ``target_k`` or above (None if it never gets there)."""
    return next((t - load_end for t, k, _ in history if t >= load_end and k >= target_k), None)


SUMMARY_COLUMNS = (  # key, header, format of a present value
    ('run', 'run', '{}'), ('calls', 'calls', '{:d}'), ('within_budget', 'within', '{:.1%}'),
    ('within_budget_load', 'load on', '{:.1%}'), ('within_budget_no_load', 'load off', '{:.1%}'),
    ('mean_k', 'mean k', '{:.2f}'), ('mean_k_load', 'k load', '{:.2f}'), ('latency_ms_p90', 'p90 ms', '{:.2f}'),
    ('recovery_s', 'recovery s', '{:.2f}'),
)


def format_summary(result: dict) -> str:
    settings, device, overhead = result['settings'], result['device'], result['overhead']
    table = [[title for _, title, _ in SUMMARY_COLUMNS]]
    table += [['-' if row[key] is None else fmt.format(row[key]) for key, _, fmt in SUMMARY_COLUMNS]
              for row in result['summary']]
    widths = [max(len(line[i]) for line in table) for i in range(len(SUMMARY_COLUMNS))]
    lines = [f'Budget {settings["budget_ms"]:g} ms at batch {settings["batch_size"]} on {device["name"]} '
             f'({device["threads"]} threads); load {" ".join(settings["load_schedule"])}, '
             f'{settings["load_procs"]} processes']
    lines += ['  '.join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in table]
    lines.append(f'runner overhead: {overhead["runner_us_per_call"]:.1f} us per call = '
                 f'{overhead["share_of_call"]:.3%} of the mean call ({overhead["mean_call_ms"]:.2f} ms), '
                 f'{overhead["share_of_fastest_call"]:.3%} of the fastest k\'s')
    return '\n'.join(lines)


def plot_serve_bench(result: dict, path, dpi: int = 80) -> Path:
    """Latency per call (top) and k per call (bottom) over time, both runs, load periods shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings, budget = result['settings'], result['settings']['budget_ms']
    fig = Figure(figsize=(11, 6), dpi=dpi, layout='constrained')
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    styles = {'fixed': dict(color='tab:red', label=f'fixed k={max(settings["heads"])}'),
              'elastic': dict(color='tab:blue', label='ElasticRunner')}
    for name, run in result['runs'].items():
        t, k, ms = (np.array(col) for col in zip(*run['history'], strict=True))
        top.plot(t, ms, '.', markersize=1.5, alpha=.4, **styles[name])
        bottom.step(t, k, where='post', linewidth=1.2, **styles[name])
    for ax in (top, bottom):
        for start, end in load_windows(parse_schedule(settings['load_schedule'])):
            ax.axvspan(start, min(end, settings['duration_s']), color='0.85', zorder=0)
        ax.grid(alpha=.3)
    top.axhline(budget, color='k', linestyle='--', linewidth=1, label=f'budget {budget:g} ms')
    top.set_yscale('log')  # the fixed k under load runs many times over the budget
    top.set_ylabel('latency per call (ms, log)')
    top.legend(loc='upper right', fontsize='small', markerscale=8)
    bottom.set_ylabel('k (heads)')
    bottom.set_xlabel(f'seconds (grey: {settings["load_procs"]} busy-looping processes)')
    summary = {row['run']: row for row in result['summary']}
    fig.suptitle(f'{settings["model"]}, batch {settings["batch_size"]}: within budget '
                 f'{summary["fixed"]["within_budget"]:.0%} fixed vs {summary["elastic"]["within_budget"]:.0%} '
                 f'elastic ({result["device"]["name"]})', fontsize='medium')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
