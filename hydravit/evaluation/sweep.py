"""All four measurements for every head count, one CSV, and the trade-off plots.

    python scripts/sweep.py DATA --model hydravit_dyn_patch4_32 --checkpoint C -o output/sweep

The model is built and the data read once: accuracy for all head counts comes from one data pass.
MACs and memory are per image (batch 1; memory's batch is ``--memory-batch-size``); throughput
and accuracy use ``-b``.
"""
import argparse
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..checkpoint import to_json
from . import accuracy, macs, memory, throughput
from .common import (
    EvalSession,
    Row,
    UsageError,
    check_output_folder,
    create_eval_dataset,
    create_eval_loader,
    create_parser,
    create_session,
    format_row,
    read_results,
    round_row,
    write_results,
)
from .environment import SETTINGS_KEYS, settings_row
from .plot import RAM_KEYS, check_reference, plot_tradeoff

# One column per key, in the order the tools define them (params_m appears once), then the settings.
SWEEP_KEYS = tuple(dict.fromkeys(accuracy.KEYS + macs.KEYS + memory.KEYS + throughput.KEYS)) + SETTINGS_KEYS

# A measurement of one head count: k -> its columns.
Stage = Tuple[str, Callable[[int], Row]]


def create_sweep_parser() -> argparse.ArgumentParser:
    parser = create_parser(__doc__, data_required=True, default_batch_size=256)
    throughput.add_args(parser)
    group = parser.add_argument_group('Sweep')
    group.add_argument('-o', '--output', default='output/sweep', metavar='DIR',
                       help='folder for sweep.csv and tradeoff.png (default: output/sweep)')
    group.add_argument('--reference', default='', metavar='CSV',
                       help='reference points for the plots: columns name, top1 and any of gmacs, throughput, '
                            'total_mb, peak_mb (e.g. docs/deit_reference.csv)')
    group.add_argument('--memory-batch-size', type=int, default=1, metavar='N', help='batch size of the memory run')
    group.add_argument('--ram-key', default='total_mb', choices=tuple(RAM_KEYS),
                       help='RAM axis of the plot (default: total_mb, the torchinfo estimate)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> List[Row]:
    parser = create_sweep_parser()
    args = parser.parse_args(argv)
    try:
        throughput.check_args(args)
        if args.memory_batch_size < 1:
            raise UsageError(f'--memory-batch-size must be >= 1, got {args.memory_batch_size}')
        check_output_folder(args.output, '-o/--output')
        reference = _load_reference(args.reference)
        session = create_session(args, all_heads=True)
        loader = create_eval_loader(session, create_eval_dataset(session))
    except UsageError as e:
        parser.error(str(e))
    out_dir = Path(args.output)
    csv_path = Path(args.results_file) if args.results_file else out_dir / 'sweep.csv'
    rows = run_sweep(session, loader)
    write_results(rows, csv_path, SWEEP_KEYS)
    png = plot_tradeoff(rows, out_dir / 'tradeoff.png', reference, args.ram_key,
                        title=f'{args.model} ({session.device.type}, batch {args.batch_size})')
    print(f'Wrote {csv_path} and {png}')
    print(f'--result\n{to_json(rows, indent=4)}')
    return rows


def run_sweep(session: EvalSession, loader) -> List[Row]:
    """Accuracy (one data pass), throughput, MACs and memory for each of ``session.heads``."""
    args, model = session.args, session.model
    memory_shape = (args.memory_batch_size, *session.input_size)
    stages = [
        throughput_stage(session, throughput.input_batch(session)),
        macs_stage(session),
        ('memory', lambda k: {**memory.torchinfo_summary(model, k, memory_shape, session.device),
                              'peak_mb': memory.peak_memory_mb(model, k, memory_shape, session.device)}),
    ]
    results = measure_stages(session, stages, loader)
    rows = [round_row({key: results[k][key] for key in SWEEP_KEYS}) for k in session.heads]
    for row in rows:
        print(format_row(row))
    return rows


def throughput_stage(session: EvalSession, batch) -> Stage:
    return 'throughput', lambda k: throughput.benchmark_heads(session, k, batch)


def macs_stage(session: EvalSession) -> Stage:
    return 'MACs', lambda k: macs.profile_heads(session.model, k, session.input_size)


def measure_stages(session: EvalSession, stages: Sequence[Stage], loader=None) -> Dict[int, Row]:
    """Accuracy of every head count in one data pass (when ``loader`` is given), then each stage for
    each head count, with a progress line per step. Returns k -> all columns, settings included."""
    heads = session.heads
    total = len(stages) + (loader is not None)
    results: Dict[int, Row] = {k: {'heads': k, **settings_row(session.args, session.device)} for k in heads}
    if loader is not None:
        print(f'[1/{total}] accuracy of heads {heads}', flush=True)
        for row in accuracy.evaluate_accuracy(session, loader, heads, session.args.log_freq):
            results[row['heads']].update(row)
    for stage, (name, measure) in enumerate(stages, total - len(stages) + 1):
        start = time.perf_counter()
        for i, k in enumerate(heads, 1):
            results[k].update(measure(k))
            eta = (time.perf_counter() - start) / i * (len(heads) - i)
            print(f'[{stage}/{total}] {name} k={k} ({i}/{len(heads)}, ETA {eta:.0f}s)', flush=True)
    return results


def _load_reference(path: str) -> List[Row]:
    if not path:
        return []
    if not Path(path).is_file():
        raise UsageError(f'--reference: no such file: {path}')
    rows = read_results(path)
    problem = check_reference(rows, path)
    if problem:
        raise UsageError(f'--reference: {problem}')
    return rows


def plot_main(argv: Optional[Sequence[str]] = None) -> Path:
    """Re-draw the plots from a sweep CSV (``scripts/plot_tradeoff.py``)."""
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description='Plot top-1 against GMACs, throughput and RAM from a sweep CSV.')
    parser.add_argument('sweep_csv', metavar='SWEEP_CSV', help='sweep.csv written by scripts/sweep.py')
    parser.add_argument('-o', '--output', default='', metavar='PNG', help='default: next to SWEEP_CSV')
    parser.add_argument('--reference', default='', metavar='CSV', help='reference points (name, top1, ...)')
    parser.add_argument('--ram-key', default='total_mb', choices=tuple(RAM_KEYS), help='RAM axis')
    parser.add_argument('--title', default='', help='figure title')
    parser.add_argument('--dpi', type=int, default=80, help='PNG resolution')
    args = parser.parse_args(argv)
    try:
        if not Path(args.sweep_csv).is_file():
            raise UsageError(f'SWEEP_CSV: no such file: {args.sweep_csv}')
        rows = read_results(args.sweep_csv)
        missing = [key for key in ('heads', 'top1', 'gmacs', 'throughput', args.ram_key) if rows and key not in rows[0]]
        if not rows or missing:
            raise UsageError(f'SWEEP_CSV: not a sweep result (missing {missing or "rows"})')
        reference = _load_reference(args.reference)
    except UsageError as e:
        parser.error(str(e))
    out = args.output or Path(args.sweep_csv).with_name('tradeoff.png')
    png = plot_tradeoff(rows, out, reference, args.ram_key, title=args.title, dpi=args.dpi)
    print(f'Wrote {png}')
    return png
