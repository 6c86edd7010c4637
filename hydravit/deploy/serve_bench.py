"""serve-bench: goodput of three serving policies on real labelled images under a background CPU load that comes
and goes.

    python -m hydravit.deploy serve-bench DATA --checkpoint C [--use-ema] -b 16 --budget-ms 20 [--min-top1 A] \\
        [--repeats 3] [--duration 35] [--load-schedule off:10 on:15 off:10] [--load-procs N] \\
        [-o output/serve-bench] [--amp | --model-dtype bfloat16] [--cuda-graph]

DATA's validation images are replayed in batches of B, with their labels, back to back for ``--duration`` seconds
while ``--load-procs`` busy-looping processes run during the schedule's ``on`` segments. Three policies serve the
same schedule:

* ``pick``: the fixed k that ``python -m hydravit.deploy pick`` chooses on this device without load: the most
  accurate k whose p90 latency at batch B is within the budget (and whose top-1 meets ``--min-top1``);
* ``largest``: the fixed largest k served;
* ``elastic``: the ``ElasticRunner`` over the served k, with the ``--min-top1`` floor.

The served k are those the checkpoint was trained on (or ``--heads``). Before the runs every k is calibrated on
this device without load: latency at batch B (the runner's profile and pick's input) and top-1 on DATA. Per policy
the report gives the share of calls within budget (overall, load on, load off), the accuracy of its answers,
goodput (requests answered correctly and within the budget, over all requests; a request is one image, answered
by its batch's call), the mean k, the time the runner needed after each load to be back at the k it held before,
and the runner's own cost per call. ``--repeats N`` runs the whole schedule N times, the policies' order rotated,
and reports mean +- std over the repeats. ``OUTPUT/serve_bench.json`` keeps the settings, the calibration, every
call of every run and the summaries; ``OUTPUT/serve_bench.png`` plots the first repeat.
"""
import argparse
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..checkpoint import write_json
from ..evaluation import throughput
from ..evaluation.accuracy import evaluate_heads
from ..evaluation.common import (
    EvalSession,
    Row,
    UsageError,
    add_amp_args,
    autocast,
    create_eval_dataset,
    create_eval_loader,
    create_parser,
    create_session,
    round_row,
    warn,
    write_results,
)
from ..evaluation.cuda_graph import GraphCache, heads_forward
from ..evaluation.environment import device_info
from .load import CpuLoad, Segment, load_on, load_windows, parse_schedule, total_seconds
from .pick import NoFit, choose
from .runtime import ElasticRunner

DEFAULT_SCHEDULE = ('off:10', 'on:15', 'off:10')
POLICIES = ('pick', 'largest', 'elastic')
# One call: seconds since the run started, k, latency (ms), correct answers, images in the batch.
Call = Tuple[float, int, float, int, int]
Batch = Tuple[torch.Tensor, torch.Tensor]
SUMMARY_KEYS = ('policy', 'k', 'calls', 'images', 'within_budget', 'within_budget_load', 'within_budget_no_load',
                'top1', 'top1_load', 'goodput', 'goodput_load', 'goodput_no_load', 'mean_k', 'mean_k_load',
                'latency_ms_p90', 'recovery_s', 'runner_us_per_call', 'outside_heads')
ROLLING_S = 2.  # the plot's rolling accuracy and goodput: over the calls of the last 2 s


def create_serve_bench_parser() -> argparse.ArgumentParser:
    parser = create_parser(__doc__, data_required=True, default_batch_size=16)
    parser.prog = 'python -m hydravit.deploy serve-bench'
    add_amp_args(parser)
    throughput.add_serving_args(parser)
    group = parser.add_argument_group('Serving benchmark')
    group.add_argument('--budget-ms', type=float, required=True, metavar='MS', help='latency budget per batch')
    group.add_argument('--min-top1', type=float, default=None, metavar='PCT',
                       help='accuracy floor: no policy serves a k whose calibrated top-1 on DATA is below it')
    group.add_argument('--repeats', type=int, default=1, metavar='N',
                       help='run the whole schedule N times, the policies\' order rotated; mean +- std (default: 1)')
    group.add_argument('--duration', type=float, default=None, metavar='SEC',
                       help='seconds per run (default: the load schedule\'s length)')
    group.add_argument('--load-schedule', nargs='+', default=list(DEFAULT_SCHEDULE), metavar='STATE:SEC',
                       help='background load segments, on:SEC / off:SEC (default: off:10 on:15 off:10)')
    group.add_argument('--load-procs', type=int, default=None, metavar='N',
                       help='busy-looping processes while the load is on (default: one per CPU core)')
    group.add_argument('--max-images', type=int, default=2048, metavar='N',
                       help='replay a seeded random sample of at most N images of DATA, held in memory (default: '
                            '2048)')
    group.add_argument('--calibration-time', type=float, default=0.5, metavar='SEC',
                       help='seconds of latency timing per k before the runs (default: 0.5)')
    group.add_argument('--log-every', type=float, default=5., metavar='SEC', help='seconds between progress lines')
    group.add_argument('-o', '--output', default='output/serve-bench', metavar='DIR',
                       help='folder for serve_bench.json and serve_bench.png (default: output/serve-bench)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = create_serve_bench_parser()
    args = parser.parse_args(argv)
    try:
        schedule = _check_args(args)
        session = create_session(args, trained_only=True)
        batches = replay_batches(session)
    except UsageError as e:
        parser.error(str(e))
    try:
        result = run_benchmark(session, batches, schedule)
    except NoFit as e:
        parser.error(f'--budget-ms / --min-top1: {e} (calibrated at batch {args.batch_size} without load)')
    except KeyboardInterrupt:
        print('serve-bench: interrupted; the background load is stopped', file=sys.stderr)
        raise SystemExit(130) from None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / 'serve_bench.json', result)  # non-finite numbers as null: valid JSON
    png = plot_serve_bench(result, out / 'serve_bench.png')
    if args.results_file:
        write_results(result['summary'], args.results_file, _aggregate_keys())
    print(format_summary(result))
    print(f'Wrote {out / "serve_bench.json"} and {png}')
    return result


def _check_args(args: argparse.Namespace) -> List[Segment]:
    throughput.check_serving_args(args)
    if args.budget_ms <= 0:
        raise UsageError(f'--budget-ms must be > 0, got {args.budget_ms:g}')
    if args.min_top1 is not None and not 0 <= args.min_top1 <= 100:
        raise UsageError(f'--min-top1 is a top-1 in %, 0..100, got {args.min_top1:g}')
    if args.max_images < 1:
        raise UsageError(f'--max-images must be >= 1, got {args.max_images}')
    if args.repeats < 1:
        raise UsageError(f'--repeats must be >= 1, got {args.repeats}')
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


def replay_batches(session: EvalSession) -> List[Batch]:
    """A seeded random sample of DATA (``--max-images``, all of it when smaller) in a seeded random order, in
    batches of ``-b`` with their labels, on the device and in the model's dtype: loaded once, so no call waits on
    decoding, and every policy sees the same images in the same order (an image folder is read class by class,
    and a policy that makes fewer calls would otherwise see fewer classes). The sample is cut to whole batches:
    every call has the same shape, as a CUDA graph needs. ``UsageError`` when DATA has less than one batch."""
    args = session.args
    dataset = create_eval_dataset(session)
    loader = create_eval_loader(session, dataset)  # gives the dataset the model's preprocessing
    count = min(len(dataset), args.max_images) // args.batch_size * args.batch_size
    if count == 0:
        raise UsageError(f'-b/--batch-size {args.batch_size}: DATA has only {len(dataset)} images')
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:count].tolist()
    sample = DataLoader(Subset(loader.dataset, order), batch_size=args.batch_size, num_workers=args.workers)
    batches = [(session.prepare_input(images), target.to(session.device)) for images, target in sample]
    print(f'Replaying {count} of the {len(dataset)} images of {args.data} (seed {args.seed}) in {len(batches)} '
          f'batches of {args.batch_size}', flush=True)
    return batches


# --- the benchmark ---------------------------------------------------------------------------------------
def run_benchmark(session: EvalSession, batches: Sequence[Batch], schedule: Sequence[Segment]) -> dict:
    """Calibrate, choose the fixed policies' k, then ``--repeats`` rounds of the three policies; returns everything
    the report and the plot need. Raises ``NoFit`` when no k fits the budget (and floor) without load."""
    args = session.args
    forward = _forward(session)
    calibration = calibrate(session, batches, forward)
    _warn_about_budget(calibration, args.budget_ms)
    policies = policy_heads(calibration, args.budget_ms, args.min_top1)
    print('Policies: ' + '; '.join(f'{name} k={" ".join(map(str, heads))}' for name, heads in policies.items()),
          flush=True)
    repeats = []
    for r in range(args.repeats):
        order = POLICIES[r % len(POLICIES):] + POLICIES[:r % len(POLICIES)]
        runs = {}
        for name in order:
            runner = ElasticRunner(session.model, args.budget_ms, heads=policies[name], profile=calibration,
                                   min_top1=args.min_top1 if name == 'elastic' else None, max_history=None,
                                   forward=forward, cuda_graph=args.cuda_graph, example_input=batches[0][0])
            runs[name] = {'heads': runner.heads, 'start_k': runner.active_heads,
                          'calls': _stream(runner, batches, args, schedule, f'{name} {r + 1}/{args.repeats}')}
        repeats.append({'order': list(order), 'runs': runs})
    overhead = {name: runner_overhead_us(heads, args.budget_ms, calibration, batches[0][0])
                for name, heads in policies.items()}
    for rep in repeats:
        rep['summary'] = [summarize(name, rep['runs'][name]['calls'], args.budget_ms, schedule, args.duration,
                                    rep['runs'][name]['heads'], overhead[name]) for name in POLICIES]
    return {
        'device': device_info(args, session.device),
        'settings': {'model': args.model, 'checkpoint': args.checkpoint or None, 'data': str(args.data),
                     'batch_size': args.batch_size, 'batches': len(batches), 'budget_ms': args.budget_ms,
                     'min_top1': args.min_top1, 'duration_s': args.duration, 'repeats': args.repeats,
                     'load_schedule': args.load_schedule, 'load_procs': args.load_procs, 'heads': session.heads,
                     'model_dtype': str(session.model_dtype).replace('torch.', ''), 'cuda_graph': args.cuda_graph},
        'calibration': calibration,
        'policies': policies,
        'summary': aggregate([rep['summary'] for rep in repeats]),
        'repeats': repeats,
    }


def _forward(session: EvalSession) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(session.args, session.device):
            return session.model(x)
    return forward


def calibrate(session: EvalSession, batches: Sequence[Batch], forward) -> List[Row]:
    """Per served k, without load: latency (median, p90) at the stream's batch, the runner's profile, with
    ``--cuda-graph`` of graph replays (each k's graph captured before it is timed and freed after); and top-1 (%)
    on the replayed images (the evaluation core's one-pass validator)."""
    args, model = session.args, session.model
    batch = batches[0][0]
    print(f'Calibrating {args.model} at batch {batch.shape[0]} on {session.device}: heads {session.heads}'
          f'{" (CUDA graphs)" if args.cuda_graph else ""}', flush=True)
    accuracy = evaluate_heads(model, batches, session.heads, session.device,
                              amp_autocast=lambda: autocast(args, session.device), prepare_input=lambda x: x)
    rows = []
    with torch.inference_mode():
        for k, acc in zip(session.heads, accuracy, strict=True):
            model.set_heads(k)
            stats = throughput.benchmark_latency(_calibration_call(session, k, batch, forward), session.device,
                                                 warmup=3, budget_s=args.calibration_time)
            rows.append(round_row({'heads': k, **stats, 'top1': acc['top1']}))
            print(f'  k={k:<3d} latency median {stats["latency_ms_median"]:8.3f} ms  p90 '
                  f'{stats["latency_ms_p90"]:8.3f} ms  top-1 {acc["top1"]:6.2f} %', flush=True)
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
        warn(f'the budget {budget_ms:g} ms is not between the p90 of the smallest k ({low:.3g} ms) and of the '
             f'largest ({high:.3g} ms) without load; the comparison is most telling when it is')


def policy_heads(calibration: Sequence[Row], budget_ms: float, min_top1: Optional[float]) -> Dict[str, List[int]]:
    """The k each policy may serve: pick's choice for the budget (``pick.choose`` on the calibration), the largest
    k at or above the floor, and every k for the runner (which applies the floor itself)."""
    bounds = {'max_latency_ms': budget_ms, **({'min_top1': min_top1} if min_top1 is not None else {})}
    chosen = choose(calibration, bounds)['heads']  # NoFit also when no k reaches the floor
    allowed = [row['heads'] for row in calibration if min_top1 is None or row['top1'] >= min_top1]
    return {'pick': [chosen], 'largest': [max(allowed)], 'elastic': [row['heads'] for row in calibration]}


def _stream(runner: ElasticRunner, batches: Sequence[Batch], args: argparse.Namespace,
            schedule: Sequence[Segment], label: str) -> List[Call]:
    """Back-to-back calls over the replayed batches for ``args.duration`` seconds while the load follows
    ``schedule``; returns every call."""
    print(f'[{label}] {args.duration:g} s, heads {runner.heads}, budget {args.budget_ms:g} ms, load '
          f'{" ".join(args.load_schedule)} with {args.load_procs} processes', flush=True)
    calls: List[Call] = []
    next_log, logged = args.log_every, 0
    with CpuLoad(schedule, args.load_procs) as load, torch.inference_mode():  # the runner's forward autocasts
        while (t := runner.clock() - runner.t0) < args.duration:
            load.update(t)
            images, target = batches[len(calls) % len(batches)]
            logits = runner(images)
            t_call, k, ms = runner.history[-1]
            calls.append((t_call, k, ms, int((logits.argmax(-1) == target).sum()), target.shape[0]))
            if t >= next_log:
                recent = summarize_calls(calls[logged:], args.budget_ms)
                logged = len(calls)
                print(f'[{label}] {t:5.1f}/{args.duration:g} s  load {"on " if load.running else "off"}  '
                      f'k={runner.active_heads:<3d} calls {len(calls):6d}  last {args.log_every:g} s: within '
                      f'budget {recent["within_budget"]:5.1f} %  top-1 {recent["top1"]:5.1f} %  goodput '
                      f'{recent["goodput"]:5.1f} %', flush=True)
                next_log += args.log_every
    return calls


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
def summarize_calls(calls: Sequence[Call], budget_ms: float) -> Row:
    """Shares (%) of a set of calls: within budget (of calls), top-1 and goodput (of the images they answered)."""
    if not calls:
        return {'within_budget': None, 'top1': None, 'goodput': None}
    ms, correct, images = (np.array(col, dtype=float) for col in list(zip(*calls, strict=True))[2:])
    within = ms <= budget_ms
    return {'within_budget': 100. * within.mean(), 'top1': 100. * correct.sum() / images.sum(),
            'goodput': 100. * correct[within].sum() / images.sum()}


def summarize(name: str, calls: Sequence[Call], budget_ms: float, schedule: Sequence[Segment], duration: float,
              heads: Sequence[int], runner_us: Optional[float] = None) -> Row:
    """One policy's run: shares overall, with the load on and off; mean k; p90; recovery (the runner only)."""
    on = np.array([load_on(schedule, call[0]) for call in calls], dtype=bool)
    ks = np.array([call[1] for call in calls], dtype=float)
    parts = {'': summarize_calls(calls, budget_ms),
             '_load': summarize_calls([c for c, o in zip(calls, on, strict=True) if o], budget_ms),
             '_no_load': summarize_calls([c for c, o in zip(calls, on, strict=True) if not o], budget_ms)}
    windows = load_windows(schedule)
    since = [0.] + [end for _, end in windows[:-1]]
    recovery = [_recovery(calls, s, start, end) for s, (start, end) in zip(since, windows, strict=True)
                if end < duration] if len(heads) > 1 else []
    return round_row({
        'policy': name,
        'k': heads[0] if len(heads) == 1 else None,
        'calls': len(calls),
        'images': int(sum(call[4] for call in calls)),
        **{f'within_budget{suffix}': part['within_budget'] for suffix, part in parts.items()},
        'top1': parts['']['top1'], 'top1_load': parts['_load']['top1'],
        **{f'goodput{suffix}': part['goodput'] for suffix, part in parts.items()},
        'mean_k': float(ks.mean()),
        'mean_k_load': float(ks[on].mean()) if on.any() else None,
        'latency_ms_p90': float(np.percentile([call[2] for call in calls], 90)),
        'recovery_s': max(recovery) if recovery and None not in recovery else None,
        'runner_us_per_call': runner_us,
        'outside_heads': int(sum(call[1] not in heads for call in calls)),
    })


def _recovery(calls: Sequence[Call], since: float, load_start: float, load_end: float) -> Optional[float]:
    """Seconds from ``load_end`` to the first call back at the k held before the load: the k of most calls from
    ``since`` (the previous load's end, or 0) to ``load_start``. None if it never gets back, or nothing ran before
    the load."""
    before = Counter(call[1] for call in calls if since <= call[0] < load_start)
    if not before:
        return None
    held = before.most_common(1)[0][0]
    return next((t - load_end for t, k, *_ in calls if t >= load_end and k >= held), None)


def aggregate(summaries: Sequence[Sequence[Row]]) -> List[Row]:
    """Per policy, the mean and the sample std (``KEY_std``; 0 for one repeat) of every numeric column over the
    repeats; a column that is None in any repeat stays None."""
    rows = []
    for name in POLICIES:
        runs = [row for summary in summaries for row in summary if row['policy'] == name]
        out: Row = {'policy': name, 'repeats': len(runs)}
        for key in SUMMARY_KEYS[1:]:
            values = [run[key] for run in runs]
            if any(v is None for v in values):
                out[key], out[f'{key}_std'] = None, None
            else:
                out[key] = float(np.mean(values))
                out[f'{key}_std'] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.
        rows.append(round_row(out))
    return rows


def _aggregate_keys() -> List[str]:
    return ['policy', 'repeats'] + [name for key in SUMMARY_KEYS[1:] for name in (key, f'{key}_std')]


SUMMARY_COLUMNS = (  # key, header, format of a present value
    ('k', 'k', '{:.0f}'), ('calls', 'calls', '{:.0f}'), ('within_budget', 'within %', '{:.1f}'),
    ('within_budget_load', 'load on', '{:.1f}'), ('within_budget_no_load', 'load off', '{:.1f}'),
    ('top1', 'top-1 %', '{:.2f}'), ('goodput', 'goodput %', '{:.1f}'), ('goodput_load', 'load on', '{:.1f}'),
    ('goodput_no_load', 'load off', '{:.1f}'), ('mean_k', 'mean k', '{:.2f}'), ('mean_k_load', 'k load', '{:.2f}'),
    ('recovery_s', 'recovery s', '{:.2f}'), ('runner_us_per_call', 'runner us', '{:.1f}'),
)


def _cell(row: Row, key: str, fmt: str) -> str:
    if row[key] is None:
        return '-'
    spread = row.get(f'{key}_std')
    return fmt.format(row[key]) + (f' ± {fmt.format(spread)}' if row['repeats'] > 1 and spread else '')


def format_summary(result: dict) -> str:
    """The aggregated table, one line per policy, then the targets' comparison of the runner against pick."""
    settings, device = result['settings'], result['device']
    table = [['policy'] + [title for _, title, _ in SUMMARY_COLUMNS]]
    table += [[row['policy']] + [_cell(row, key, fmt) for key, _, fmt in SUMMARY_COLUMNS] for row in result['summary']]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    floor = 'none' if settings['min_top1'] is None else f'{settings["min_top1"]:g} %'
    lines = [f'Budget {settings["budget_ms"]:g} ms at batch {settings["batch_size"]} on {device["name"]} '
             f'({device["threads"]} threads); load {" ".join(settings["load_schedule"])}, {settings["load_procs"]} '
             f'processes; {settings["repeats"]} repeat(s), mean ± std; top-1 floor {floor}']
    lines += ['  '.join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in table]
    lines += targets(result)
    return '\n'.join(lines)


def targets(result: dict) -> List[str]:
    """The runner against pick's fixed k: goodput under load (above?), without load (within 1 p.p.?), and calls at
    a k outside the served set."""
    by = {row['policy']: row for row in result['summary']}
    elastic, fixed = by['elastic'], by['pick']
    lines = []
    for key, what, holds in (('goodput_load', 'under load', lambda d: d > 0),
                             ('goodput_no_load', 'without load', lambda d: d >= -1.)):
        if elastic[key] is None or fixed[key] is None:
            continue
        diff = elastic[key] - fixed[key]
        target = 'above pick' if key == 'goodput_load' else 'within 1 p.p. of pick'
        lines.append(f'goodput {what}: elastic {elastic[key]:.1f} % vs pick (k={fixed["k"]:.0f}) {fixed[key]:.1f} % '
                     f'({diff:+.1f} p.p.; target {target}: {"met" if holds(diff) else "MISSED"})')
    outside = sum(row['outside_heads'] for row in result['summary'])
    lines.append(f'calls at a k outside the served set: {outside:.0f} '
                 f'(target 0: {"met" if outside == 0 else "MISSED"})')
    return lines


def rolling(calls: Sequence[Call], budget_ms: float, seconds: float = ROLLING_S) -> Tuple[np.ndarray, ...]:
    """(t, top-1 %, goodput %) over the calls of the last ``seconds`` before each call."""
    t, ms, correct, images = (np.array([call[i] for call in calls], dtype=float) for i in (0, 2, 3, 4))
    cum = [np.concatenate([[0.], np.cumsum(v)]) for v in (correct, correct * (ms <= budget_ms), images)]
    end = np.arange(1, len(t) + 1)
    start = np.searchsorted(t, t - seconds, side='right')
    n = cum[2][end] - cum[2][start]
    return t, 100. * (cum[0][end] - cum[0][start]) / n, 100. * (cum[1][end] - cum[1][start]) / n


def plot_serve_bench(result: dict, path, dpi: int = 80) -> Path:
    """The first repeat: latency per call, k per call, rolling top-1 and goodput, per policy; load shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings, budget = result['settings'], result['settings']['budget_ms']
    fig = Figure(figsize=(11, 8), dpi=dpi, layout='constrained')
    FigureCanvasAgg(fig)
    latency, heads, accuracy = fig.subplots(3, 1, sharex=True)
    colors = {'pick': 'tab:orange', 'largest': 'tab:red', 'elastic': 'tab:blue'}
    for name, run in result['repeats'][0]['runs'].items():
        style = dict(color=colors[name], label=name + (f' k={run["heads"][0]}' if len(run['heads']) == 1 else ''))
        t, acc, good = rolling(run['calls'], budget)
        latency.plot(t, [call[2] for call in run['calls']], '.', markersize=1.5, alpha=.4, **style)
        heads.step(t, [call[1] for call in run['calls']], where='post', linewidth=1.2, **style)
        accuracy.plot(t, good, linewidth=1.2, **style)
        accuracy.plot(t, acc, linewidth=.8, linestyle=':', color=colors[name])
    for ax in (latency, heads, accuracy):
        for start, end in load_windows(parse_schedule(settings['load_schedule'])):
            ax.axvspan(start, min(end, settings['duration_s']), color='0.85', zorder=0)
        ax.grid(alpha=.3)
    latency.axhline(budget, color='k', linestyle='--', linewidth=1, label=f'budget {budget:g} ms')
    latency.set_yscale('log')  # a fixed k under load runs many times over the budget
    latency.set_ylabel('latency per call (ms, log)')
    latency.legend(loc='upper right', fontsize='small', markerscale=8)
    heads.set_ylabel('k (heads)')
    accuracy.set_ylabel(f'goodput (solid), top-1 (dotted)\n%, last {ROLLING_S:g} s')
    accuracy.set_xlabel(f'seconds (grey: {settings["load_procs"]} busy-looping processes)')
    by = {row['policy']: row for row in result['summary']}
    fig.suptitle(f'{settings["model"]}, batch {settings["batch_size"]}, budget {budget:g} ms: goodput under load '
                 + ', '.join(f'{name} {by[name]["goodput_load"]:.1f} %' for name in POLICIES
                             if by[name]['goodput_load'] is not None)
                 + f' ({result["device"]["name"]}; first of {settings["repeats"]} repeats)', fontsize='medium')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
