"""serve-bench: goodput of five serving policies on real labelled images under a background CPU load that comes
and goes.

    python -m hydravit.deploy serve-bench DATA --checkpoint C [--use-ema] -b 16 --budget-ms 20 [--min-top1 A] \\
        [--repeats 3] [--duration 35] [--load-schedule off:10 on:15 off:10] [--load-procs N] \\
        [-o output/serve-bench] [--amp | --model-dtype bfloat16] [--cuda-graph]

DATA's validation images are replayed in batches of B, with their labels, back to back for ``--duration`` seconds
while ``--load-procs`` busy-looping processes run during the schedule's ``on`` segments. Five policies serve the
same schedule:

* ``pick``: the fixed k that ``python -m hydravit.deploy pick`` chooses on this device without load: the most
  accurate k whose p90 latency at batch B is within the budget (and whose top-1 meets ``--min-top1``);
* ``largest``: the fixed largest k served;
* ``elastic``: the ``ElasticRunner`` over the served k, with the ``--min-top1`` floor;
* ``pick-cascade``: the operating point (a cascade over the served k, or a fixed k) pick's rule chooses without load;
* ``elastic-cascade``: the ``ElasticCascadeRunner`` over the operating points, with the floor; a point more costly
  than another is kept only when it answers at least one more calibration image right (``min_gain``).

With more than one served k, DATA is split (seeded) into two disjoint random halves: every calibrated figure (top-1,
pick's choices, the floor, the cascades' thresholds and latencies) comes from the first, every served call from the
second. With one k nothing is fitted and the same images are calibrated and served.

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
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..checkpoint import write_json
from ..evaluation import throughput
from ..evaluation.accuracy import evaluate_heads
from ..evaluation.cascade import (
    CascadeRecords,
    CascadeSpec,
    cascade_candidates,
    cascade_latency,
    collect_records,
    evaluate_cascade,
    exit_stages,
    fit_spec,
    latency_draws,
    nearest_rank,
)
from ..evaluation.common import (
    EvalSession,
    Row,
    UsageError,
    add_amp_args,
    autocast,
    check_output_folder,
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
from .cascade import CascadeOutput, CascadeRunner, default_buckets, eager_stages, graph_stages
from .load import CpuLoad, Segment, load_on, load_windows, parse_schedule, total_seconds
from .pick import NoFit, choose
from .runtime import OBJECTIVES, ElasticCascadeRunner, ElasticRunner, OperatingPoint, operating_frontier

DEFAULT_SCHEDULE = ('off:10', 'on:15', 'off:10')
POLICIES = ('pick', 'largest', 'elastic', 'pick-cascade', 'elastic-cascade')
RERUN_CAP_QUANTILE = 0.9  # a cascade's re-runs per batch are capped where 9 in 10 of those batches stay
# One call: seconds since the run started, k (a cascade policy: the operating point's index), latency (ms), correct
# answers, images in the batch; a cascade policy's calls add the mean k that answered the batch's images.
Call = Tuple[float, ...]
Batch = Tuple[torch.Tensor, torch.Tensor]
LatencyTable = Dict[int, Dict[int, Tuple[float, float]]]  # k -> sub-batch size -> (median ms, p90 ms)
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
    group.add_argument('--objective', choices=OBJECTIVES, default='p90',
                       help='the load-driven policies\' rule (ElasticRunner and ElasticCascadeRunner alike): hold '
                            'the p90 latency within the budget, or choose the level of highest expected goodput '
                            '(HeadController; default: p90)')
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
        batches, fit = replay_batches(session)
    except UsageError as e:
        parser.error(str(e))
    try:
        result = run_benchmark(session, batches, schedule, fit)
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
    check_output_folder(args.output, '-o/--output')
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


def replay_batches(session: EvalSession) -> Tuple[List[Batch], List[Batch]]:
    """``(served, fit)``: batches of ``-b`` with their labels, on the device and in the model's dtype, loaded once
    (no call waits on decoding; every policy sees the same images in the same order, whereas an image folder is
    read class by class).

    With more than one served k there is something to fit (the cascades' thresholds, pick's k, the floor), so DATA
    is split, seeded, into two disjoint random halves: every calibrated figure comes from the first (``fit``),
    every served call from the second. With one k nothing is fitted and every image is served (``fit`` is
    ``served``). Each part is a seeded random sample of at most ``--max-images``; the served part is cut to whole
    batches (every call has the same shape, as a CUDA graph needs). ``UsageError`` when it has less than one
    batch."""
    args = session.args
    dataset = create_eval_dataset(session)
    loader = create_eval_loader(session, dataset)  # gives the dataset the model's preprocessing
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed)).tolist()
    split = len(session.heads) > 1
    fit_part, served_part = (order[:len(order) // 2], order[len(order) // 2:]) if split else ([], order)
    count = min(len(served_part), args.max_images) // args.batch_size * args.batch_size
    if count == 0:
        served_note = f', {len(served_part)} of them served (the other half calibrates)' if split else ''
        raise UsageError(f'-b/--batch-size {args.batch_size}: DATA has only {len(dataset)} images{served_note}')
    served = _load(session, loader.dataset, served_part[:count])
    fit = _load(session, loader.dataset, fit_part[:args.max_images]) if split else served
    fit_note = (f'; calibrating on {sum(t.shape[0] for _, t in fit)} other images (a disjoint half)' if split
                else '; calibrating on the same images (one k: nothing is fitted)')
    print(f'Replaying {count} of the {len(dataset)} images of {args.data} (seed {args.seed}) in {len(served)} '
          f'batches of {args.batch_size}{fit_note}', flush=True)
    return served, fit


def _load(session: EvalSession, dataset, indices: Sequence[int]) -> List[Batch]:
    sample = DataLoader(Subset(dataset, list(indices)), batch_size=session.args.batch_size,
                        num_workers=session.args.workers)
    return [(session.prepare_input(images), target.to(session.device)) for images, target in sample]


# --- the benchmark ---------------------------------------------------------------------------------------
def run_benchmark(session: EvalSession, batches: Sequence[Batch], schedule: Sequence[Segment],
                  fit: Optional[Sequence[Batch]] = None) -> dict:
    """Calibrate on ``fit`` (default: the served ``batches``), choose the fixed policies' k and cascade, then
    ``--repeats`` rounds of the five policies; returns everything the report and the plot need. Raises ``NoFit``
    when no k fits the budget (and floor) without load."""
    args = session.args
    fit = batches if fit is None else fit
    forward = _forward(session)
    calibration = calibrate(session, batches, forward, fit)
    _warn_about_budget(calibration, args.budget_ms)
    policies = policy_heads(calibration, args.budget_ms, args.min_top1)
    points = cascade_points(session, fit, forward, calibration, batches[0][0].shape[0])
    chosen = pick_cascade(points, args.budget_ms, args.min_top1)
    # The load-driven cascade's levels differ by at least one calibration image (operating_frontier's min_gain),
    # as the ElasticRunner's head counts do. NoFit above covers the floor.
    fit_images = sum(t.shape[0] for _, t in fit)
    one_image = 100 / fit_images
    cascades = {'pick-cascade': [chosen], 'elastic-cascade': operating_frontier(points, args.min_top1, one_image)}
    policies.update({name: [p.spec.name for p in served] for name, served in cascades.items()})
    print('Policies: ' + '; '.join(f'{name} k={" ".join(map(str, policies[name]))}' for name in POLICIES[:3])
          + f'; pick-cascade {chosen.spec.name}; elastic-cascade {len(cascades["elastic-cascade"])} operating '
          'points', flush=True)
    stages = cascade_stages(session, forward, batches[0][0])
    repeats = []
    for r in range(args.repeats):
        order = POLICIES[r % len(POLICIES):] + POLICIES[:r % len(POLICIES)]
        runs = {}
        for name in order:
            label = f'{name} {r + 1}/{args.repeats}'
            if name in cascades:
                runner = ElasticCascadeRunner(CascadeRunner(stages, cascades[name][0].spec,
                                                            _buckets(args, args.batch_size)),
                                              args.budget_ms, cascades[name], max_history=None,
                                              objective=args.objective if name == 'elastic-cascade' else 'p90')
                runs[name] = {'heads': list(range(len(runner.points))), 'start_k': runner.controller.k,
                              'calls': _stream(runner, batches, args, schedule, label)}
                continue
            runner = ElasticRunner(session.model, args.budget_ms, heads=policies[name], profile=calibration,
                                   min_top1=args.min_top1 if name == 'elastic' else None, max_history=None,
                                   forward=forward, cuda_graph=args.cuda_graph, example_input=batches[0][0],
                                   objective=args.objective if name == 'elastic' else 'p90')
            runs[name] = {'heads': runner.heads, 'start_k': runner.active_heads,
                          'calls': _stream(runner, batches, args, schedule, label)}
        repeats.append({'order': list(order), 'runs': runs})
    overhead = {name: runner_overhead_us(heads, args.budget_ms, calibration, batches[0][0])
                for name, heads in policies.items() if name not in cascades}
    overhead.update({name: cascade_overhead_us(served, args.budget_ms, batches[0][0])
                     for name, served in cascades.items()})
    for rep in repeats:
        rep['summary'] = [summarize(name, rep['runs'][name]['calls'], args.budget_ms, schedule, args.duration,
                                    rep['runs'][name]['heads'], overhead[name], cascade=name in cascades)
                          for name in POLICIES]
    return {
        'device': device_info(args, session.device),
        'settings': {'model': args.model, 'checkpoint': args.checkpoint or None, 'data': str(args.data),
                     'batch_size': args.batch_size, 'batches': len(batches), 'budget_ms': args.budget_ms,
                     'min_top1': args.min_top1, 'objective': args.objective, 'duration_s': args.duration,
                     'repeats': args.repeats,
                     'load_schedule': args.load_schedule, 'load_procs': args.load_procs, 'heads': session.heads,
                     'model_dtype': str(session.model_dtype).replace('torch.', ''), 'cuda_graph': args.cuda_graph,
                     'fit_images': fit_images, 'fit_disjoint': fit is not batches},
        'calibration': calibration,
        'operating_points': [_point_row(p) for p in points],
        'policies': policies,
        'summary': aggregate([rep['summary'] for rep in repeats]),
        'repeats': repeats,
    }


def _forward(session: EvalSession) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(session.args, session.device):
            return session.model(x)
    return forward


def calibrate(session: EvalSession, batches: Sequence[Batch], forward, fit: Optional[Sequence[Batch]] = None
              ) -> List[Row]:
    """Per served k, without load: latency (median, p90) at the stream's batch, the runner's profile, with
    ``--cuda-graph`` of graph replays (each k's graph captured before it is timed and freed after); and top-1 (%)
    on the ``fit`` images (default: the replayed ones; the evaluation core's one-pass validator)."""
    args, model = session.args, session.model
    batch = batches[0][0]
    print(f'Calibrating {args.model} at batch {batch.shape[0]} on {session.device}: heads {session.heads}'
          f'{" (CUDA graphs)" if args.cuda_graph else ""}', flush=True)
    accuracy = evaluate_heads(model, batches if fit is None else fit, session.heads, session.device,
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


def cascade_points(session: EvalSession, fit: Sequence[Batch], forward, calibration: Sequence[Row],
                   batch_size: int) -> List[OperatingPoint]:
    """The operating points of the cascade policies, all calibrated on the ``fit`` images without load: every
    served k as a fixed width (its calibrated top-1 and latency, the latencies non-decreasing in k:
    ``monotone_in_k``), and the cascades of ``pick``'s search space
    (``cascade_candidates``: ladders over at most 4 of the served k, each at 9 exit shares; few, since a selection
    over many overfits small sets) under the entropy rule, their thresholds fitted on the fit images
    (``fit_spec``), each with its re-runs capped (``capped_point``). The cascades are evaluated exactly from the
    per-image records on seeded batches of the fit images (``latency_draws``: whole rounds), without running the
    model again."""
    by_k = {row['heads']: row for row in calibration}
    if len(by_k) < 2:
        return [OperatingPoint(CascadeSpec((k,)), row['top1'], row['latency_ms_median'], row['latency_ms_p90'])
                for k, row in by_k.items()]
    args = session.args
    records = collect_records(session.model, fit, session.heads, session.device,
                              amp_autocast=lambda: autocast(args, session.device), prepare_input=lambda x: x)
    example = next(images for images, _ in fit)
    table = monotone_in_k(sub_batch_latency(session, forward, calibration, example, batch_size))
    points = [OperatingPoint(CascadeSpec((k,)), by_k[k]['top1'], *table[k][batch_size]) for k in by_k]
    draws = latency_draws(records.num_images, batch_size, args.seed)
    specs = dict.fromkeys(fit_spec(records, recipe, 'entropy') for recipe in cascade_candidates(session.heads)
                          if len(recipe.ladder) > 1)  # equal thresholds fitted from two shares: one point
    return points + [capped_point(records, spec, draws, table, _buckets(args, batch_size)) for spec in specs]


def capped_point(records: CascadeRecords, spec: CascadeSpec, draws: torch.Tensor, table: LatencyTable,
                 buckets: Optional[Sequence[int]] = None) -> OperatingPoint:
    """``spec`` as an operating point: the images that go on past each stage but the last capped, stage by stage,
    at their ``RERUN_CAP_QUANTILE`` over ``draws`` (``(M, B)`` record indices), so the one batch in ten that would
    re-run more is answered partly at the earlier stage instead of running over the budget
    (``CascadeSpec.rerun_cap``; no cap where none binds). Top-1: of the draws' answers; latency: the evaluation
    core's ``cascade_latency`` on the draws with ``table`` (``sub_batch_latency``): the median of the batches' summed
    medians and the p90 of their summed p90s."""
    caps = [1.] * (len(spec.ladder) - 1)
    for s in range(len(caps)):
        went_on = (exit_stages(records, replace(spec, rerun_cap=tuple(caps)), draws) > s).sum(1)
        cap = int(nearest_rank(went_on.tolist(), RERUN_CAP_QUANTILE))
        caps[s] = cap / draws.shape[1] if cap < went_on.max() else 1.
    spec = replace(spec, rerun_cap=tuple(caps) if min(caps, default=1.) < 1 else ())
    top1 = evaluate_cascade(records, spec, {k: 0. for k in spec.ladder}, draws).top1
    _, median, p90 = cascade_latency(exit_stages(records, spec, draws), spec.ladder, table, buckets)
    return OperatingPoint(spec, top1, median, p90)


def sub_batch_latency(session: EvalSession, forward, calibration: Sequence[Row], example: torch.Tensor,
                      batch_size: int) -> LatencyTable:
    """Per served k: ``{size: (median ms, p90 ms)}`` at the sub-batch sizes a cascade's later stages see
    (the powers of two below the batch, and the batch itself, whose figures are the calibration's), measured like
    ``calibrate`` for half of ``--calibration-time`` each."""
    sizes = default_buckets(batch_size)
    example = example[:1].expand(batch_size, *example.shape[1:]).contiguous()  # the fit part may be smaller
    table = {}
    with torch.inference_mode():
        for row in calibration:
            k = row['heads']
            session.model.set_heads(k)
            measured = [throughput.benchmark_latency(_calibration_call(session, k, example[:n], forward),
                                                     session.device, warmup=3,
                                                     budget_s=session.args.calibration_time / 2)
                        for n in sizes[:-1]] + [row]
            table[k] = {n: (m['latency_ms_median'], m['latency_ms_p90']) for n, m in zip(sizes, measured, strict=True)}
    return table


def monotone_in_k(table: LatencyTable) -> LatencyTable:
    """``table`` with each size's median and p90 made non-decreasing in k (a running maximum), as the
    ElasticRunner's seed costs are: a larger k never costs less, and a noisy calibration that says so (k = 4's p90
    under k = 3's) would order the operating points wrongly, so that the load-driven cascade steps "down" to a
    dearer width."""
    out: LatencyTable = {}
    previous: Dict[int, Tuple[float, float]] = {}
    for k in sorted(table):
        out[k] = {n: (max(median, previous.get(n, (0., 0.))[0]), max(p90, previous.get(n, (0., 0.))[1]))
                  for n, (median, p90) in table[k].items()}
        previous = out[k]
    return out


def _buckets(args: argparse.Namespace, batch_size: int) -> Optional[List[int]]:
    """Sub-batch sizes a cascade's stages are padded to: with ``--cuda-graph`` one graph per k and bucket (a graph
    has a fixed shape); eager calls take any size."""
    return default_buckets(batch_size) if args.cuda_graph else None


def cascade_stages(session: EvalSession, forward, example: torch.Tensor) -> Dict[int, Callable]:
    """One stage callable per served k for a ``CascadeRunner``: ``set_heads(k)`` then ``forward``, or with
    ``--cuda-graph`` the replay of the graph of (k, bucket), all captured here from ``example``'s first rows."""
    if not session.args.cuda_graph:
        return eager_stages(session.model, session.heads, forward)
    return graph_stages(session.model, session.heads, example, forward=forward)[0]


def pick_cascade(points: Sequence[OperatingPoint], budget_ms: float, min_top1: Optional[float]) -> OperatingPoint:
    """What ``pick`` would choose among the operating points for the budget without load: the most accurate one
    whose calibrated p90 is within ``budget_ms`` (and top-1 at or above the floor), the cheaper on ties
    (``pick.choose``); ``NoFit`` when none."""
    ranked = sorted(points, key=lambda p: (p.latency_ms_p90, p.latency_ms))  # operating_frontier's order
    rows = [{'heads': i, 'top1': p.top1, 'latency_ms_p90': p.latency_ms_p90} for i, p in enumerate(ranked)]
    bounds = {'max_latency_ms': budget_ms, **({'min_top1': min_top1} if min_top1 is not None else {})}
    return ranked[choose(rows, bounds)['heads']]


def _point_row(point: OperatingPoint) -> Row:
    return round_row({'cascade': point.spec.name, 'ladder': list(point.spec.ladder), 'rule': point.spec.rule,
                      'thresholds': list(point.spec.thresholds), 'rerun_cap': list(point.spec.rerun_cap),
                      'top1': point.top1,
                      'latency_ms_median': point.latency_ms, 'latency_ms_p90': point.latency_ms_p90})


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


def _stream(runner, batches: Sequence[Batch], args: argparse.Namespace, schedule: Sequence[Segment],
            label: str) -> List[Call]:
    """Back-to-back calls of ``runner`` (an ``ElasticRunner`` or ``ElasticCascadeRunner``) over the replayed batches
    for ``args.duration`` seconds while the load follows ``schedule``; returns every call."""
    served = (f'heads {runner.heads}' if isinstance(runner, ElasticRunner)
              else f'{len(runner.points)} operating point(s) from {runner.points[0].spec.name}')
    print(f'[{label}] {args.duration:g} s, {served}, budget {args.budget_ms:g} ms, load '
          f'{" ".join(args.load_schedule)} with {args.load_procs} processes', flush=True)
    calls: List[Call] = []
    next_log, logged = args.log_every, 0
    with CpuLoad(schedule, args.load_procs) as load, torch.inference_mode():  # the runner's forward autocasts
        while (t := runner.clock() - runner.t0) < args.duration:
            load.update(t)
            images, target = batches[len(calls) % len(batches)]
            calls.append(_record(runner, runner(images), target))
            if t >= next_log:
                recent = summarize_calls(calls[logged:], args.budget_ms)
                logged = len(calls)
                print(f'[{label}] {t:5.1f}/{args.duration:g} s  load {"on " if load.running else "off"}  '
                      f'{_serving(runner)} calls {len(calls):6d}  last {args.log_every:g} s: within '
                      f'budget {recent["within_budget"]:5.1f} %  top-1 {recent["top1"]:5.1f} %  goodput '
                      f'{recent["goodput"]:5.1f} %', flush=True)
                next_log += args.log_every
    return calls


def _record(runner, out, target: torch.Tensor) -> Call:
    """The call just made: its history entry, correct answers, images; a cascade's adds its mean answering k."""
    t_call, level, ms = runner.history[-1]
    if not isinstance(out, CascadeOutput):
        return (t_call, level, ms, int((out.argmax(-1) == target).sum()), target.shape[0])
    ladder = torch.tensor(runner.points[level].spec.ladder, dtype=torch.float32, device=out.stage.device)
    return (t_call, level, ms, int((out.logits.argmax(-1) == target).sum()), target.shape[0],
            float(ladder[out.stage].mean()))


def _serving(runner) -> str:
    if isinstance(runner, ElasticRunner):
        return f'k={runner.active_heads:<3d}'
    return f'point {runner.controller.k} ({runner.point.spec.name})'


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


def cascade_overhead_us(points: Sequence[OperatingPoint], budget_ms: float, x: torch.Tensor,
                        calls: int = 5000) -> float:
    """Median microseconds of one ``ElasticCascadeRunner`` call around stages that do nothing but return fixed
    logits (bookkeeping, timing, the exit rule and the sub-batch gathering)."""
    logits = torch.zeros(x.shape[0], 2, device=x.device)
    stages = {k: (lambda images: logits[:images.shape[0]]) for p in points for k in p.spec.ladder}
    runner = ElasticCascadeRunner(CascadeRunner(stages, points[0].spec), budget_ms, points)
    stats = throughput.benchmark_latency(lambda: runner(x), torch.device('cpu'), warmup=200, iters=calls)
    return stats['latency_ms_median'] * 1e3


# --- the report ------------------------------------------------------------------------------------------
def summarize_calls(calls: Sequence[Call], budget_ms: float) -> Row:
    """Shares (%) of a set of calls: within budget (of calls), top-1 and goodput (of the images they answered)."""
    if not calls:
        return {'within_budget': None, 'top1': None, 'goodput': None}
    ms, correct, images = (np.array([call[i] for call in calls], dtype=float) for i in (2, 3, 4))
    within = ms <= budget_ms
    return {'within_budget': 100. * within.mean(), 'top1': 100. * correct.sum() / images.sum(),
            'goodput': 100. * correct[within].sum() / images.sum()}


def summarize(name: str, calls: Sequence[Call], budget_ms: float, schedule: Sequence[Segment], duration: float,
              heads: Sequence[int], runner_us: Optional[float] = None, cascade: bool = False) -> Row:
    """One policy's run: shares overall, with the load on and off; mean k; p90; recovery (the runners only).
    ``cascade``: ``heads`` are operating-point indices, ``k`` is None and the mean k is that of the answers."""
    on = np.array([load_on(schedule, call[0]) for call in calls], dtype=bool)
    ks = np.array([call[5] if cascade else call[1] for call in calls], dtype=float)
    parts = {'': summarize_calls(calls, budget_ms),
             '_load': summarize_calls([c for c, o in zip(calls, on, strict=True) if o], budget_ms),
             '_no_load': summarize_calls([c for c, o in zip(calls, on, strict=True) if not o], budget_ms)}
    windows = load_windows(schedule)
    since = [0.] + [end for _, end in windows[:-1]]
    recovery = [_recovery(calls, s, start, end) for s, (start, end) in zip(since, windows, strict=True)
                if end < duration] if len(heads) > 1 else []
    return round_row({
        'policy': name,
        'k': heads[0] if len(heads) == 1 and not cascade else None,
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
    cascade = by['elastic-cascade']
    for key, what, target, diff, met in cascade_targets(result['summary']):
        lines.append(f'goodput {what}: elastic-cascade {cascade[key]:.1f} % vs elastic {elastic[key]:.1f} % '
                     f'({diff:+.1f} p.p.; target {target} elastic: {"met" if met else "MISSED"})')
    lines.append(f'pick-cascade serves {result["policies"]["pick-cascade"][0]}')
    outside = sum(row['outside_heads'] for row in result['summary'])
    lines.append(f'calls at a k outside the served set: {outside:.0f} '
                 f'(target 0: {"met" if outside == 0 else "MISSED"})')
    return lines


def cascade_targets(summary: Sequence[Row]) -> List[Tuple[str, str, str, float, bool]]:
    """The load-driven cascade against the ElasticRunner (issue 22): goodput under load above it, without load not
    below it. One ``(key, 'under load' | 'without load', 'above' | 'not below', difference in p.p., met)`` per
    segment kind the run had."""
    by = {row['policy']: row for row in summary}
    cascade, elastic = by['elastic-cascade'], by['elastic']
    out = []
    for key, what, target, holds in (('goodput_load', 'under load', 'above', lambda d: d > 0),
                                     ('goodput_no_load', 'without load', 'not below', lambda d: d >= 0)):
        if cascade[key] is not None and elastic[key] is not None:
            diff = cascade[key] - elastic[key]
            out.append((key, what, target, diff, holds(diff)))
    return out


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
    colors = {'pick': 'tab:orange', 'largest': 'tab:red', 'elastic': 'tab:blue', 'pick-cascade': 'tab:olive',
              'elastic-cascade': 'tab:green'}
    for name, run in result['repeats'][0]['runs'].items():
        fixed = result['policies'][name][0] if name == 'pick-cascade' else f'k={run["heads"][0]}'
        style = dict(color=colors[name], label=name + (f' {fixed}' if len(run['heads']) == 1 else ''))
        t, acc, good = rolling(run['calls'], budget)
        latency.plot(t, [call[2] for call in run['calls']], '.', markersize=1.5, alpha=.4, **style)
        # a cascade's calls: the mean k that answered the batch's images
        heads.step(t, [call[5] if len(call) > 5 else call[1] for call in run['calls']], where='post',
                   linewidth=1.2, **style)
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
    heads.set_ylabel('k (heads; cascades: mean\nk of the answers)')
    accuracy.set_ylabel(f'goodput (solid), top-1 (dotted)\n%, last {ROLLING_S:g} s')
    accuracy.set_xlabel(f'seconds (grey: {settings["load_procs"]} busy-looping processes)')
    by = {row['policy']: row for row in result['summary']}
    # Two lines: on one, five policies' figures ran past the figure's edges.
    fig.suptitle(f'{settings["model"]}, batch {settings["batch_size"]}, budget {budget:g} ms, '
                 f'{result["device"]["name"]}; plotted: the first of {settings["repeats"]} repeats\n'
                 f'goodput under load (mean of the repeats): '
                 + ', '.join(f'{name} {by[name]["goodput_load"]:.1f} %' for name in POLICIES
                             if by[name]['goodput_load'] is not None), fontsize='medium')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
