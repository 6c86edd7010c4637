"""Device profile: what the device is, and one row of costs (and accuracy) per head count.

    python -m hydravit.deploy profile [DATA] --model M [--checkpoint C] [--use-ema] [-b B] [--amp]
        [--model-dtype float32|bfloat16|float16] [--cuda-graph] [--heads ...] [--accuracy FILE] -o profile.json

Every number comes from the evaluation core (``hydravit.evaluation``): the same stages as the sweep
(accuracy, batch-1 latency and batch-B throughput, DeepSpeed MACs, measured peak memory). The file
is one JSON object ``{"device": {...}, "model": {...}, "rows": [...], "batch_latency": [...],
"cascade_records": {...}}`` (schema in docs/deploy.md). ``batch_latency``: each k's mean and p90 call time at batch
sizes 1, 2, 4, ... up to -b (what a cascade's sub-batches cost); ``cascade_records`` (with DATA): each image's
prediction and confidence at every k, from one pass, so ``pick`` evaluates any cascade exactly. Both are optional
on reading: a profile written before them still loads (``pick`` then searches fixed k only).
"""
import argparse
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..checkpoint import atomic_write, to_json
from ..evaluation import memory, sweep, throughput
from ..evaluation.cascade import CascadeRecords, collect_records
from ..evaluation.common import (
    EvalSession,
    Row,
    UsageError,
    autocast,
    check_output_file,
    create_eval_dataset,
    create_eval_loader,
    create_parser,
    create_session,
    format_row,
    read_results,
    round_row,
    write_results,
)
from ..evaluation.environment import device_info

PROFILE_KEYS = ('heads', 'embed_dim', 'top1', 'gmacs', 'params_m', 'latency_ms_median', 'latency_ms_p90',
                'throughput', 'peak_mb')
BATCH_LATENCY_KEYS = ('heads', 'batch_size', 'latency_ms_mean', 'latency_ms_p90')
SCORE_DIGITS = 6  # significant digits of the stored confidences (keeps the file small; exits are fitted on them)


class ProfileError(ValueError):
    """A profile file that does not follow the schema."""


def create_profile_parser() -> argparse.ArgumentParser:
    parser = create_parser(__doc__, data_required=False, default_batch_size=256)
    parser.prog = 'python -m hydravit.deploy profile'
    throughput.add_args(parser)
    throughput.add_serving_args(parser)
    group = parser.add_argument_group('Profile')
    group.add_argument('-o', '--output', default='profile.json', metavar='FILE',
                       help='profile JSON to write (default: profile.json)')
    group.add_argument('--accuracy', default='', metavar='FILE',
                       help='top-1 per k from a sweep or validate.py results file (.csv/.json) instead of DATA')
    group.add_argument('--memory-batch-size', type=int, default=1, metavar='N',
                       help='batch size of the peak-memory forward (default: 1)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = create_profile_parser()
    args = parser.parse_args(argv)
    try:
        accuracy = _check_args(args)
        session = create_session(args, trained_only=True)
        loader = create_eval_loader(session, create_eval_dataset(session)) if args.data else None
        if accuracy is not None:
            _check_accuracy_covers(accuracy, session.heads, args.accuracy)
    except UsageError as e:
        parser.error(str(e))
    profile = build_profile(session, loader, accuracy)
    write_profile(profile, args.output)
    if args.results_file:
        write_results(profile['rows'], args.results_file, PROFILE_KEYS)
    for row in profile['rows']:
        print(format_row(row))
    print(f'Wrote {args.output} ({len(profile["rows"])} head counts on {profile["device"]["name"]})')
    return profile


def _check_args(args: argparse.Namespace) -> Optional[Dict[int, float]]:
    """Everything about the flags that can fail, before the model is built. Returns --accuracy's top-1 per k."""
    throughput.check_args(args)
    if Path(args.output).suffix.lower() != '.json':
        raise UsageError(f'-o/--output must end in .json, got {args.output!r}')
    check_output_file(args.output, '-o/--output')
    if args.memory_batch_size < 1:
        raise UsageError(f'--memory-batch-size must be >= 1, got {args.memory_batch_size}')
    if not args.accuracy:
        return None
    if args.data:
        raise UsageError('--accuracy: give DATA or --accuracy, not both (top-1 comes from one of them)')
    return load_accuracy(args.accuracy)


def load_accuracy(path: str) -> Dict[int, float]:
    """top1 per head count from a sweep / validate.py results file."""
    if not Path(path).is_file():
        raise UsageError(f'--accuracy: no such file: {path}')
    try:
        rows = read_results(path)
    except (ValueError, OSError) as e:
        raise UsageError(f'--accuracy: cannot read {path}: {e}') from e
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise UsageError(f'--accuracy: {path} holds no result rows')
    usable = [r for r in rows if isinstance(r.get('heads'), int) and isinstance(r.get('top1'), (int, float))
              and math.isfinite(r['top1'])]  # a CSV's 'nan' parses as a float
    if len(usable) != len(rows):
        raise UsageError(f'--accuracy: every row of {path} needs numeric heads and a finite top1 (a sweep or '
                         'validate.py results file)')
    return {int(r['heads']): float(r['top1']) for r in usable}


def _check_accuracy_covers(accuracy: Dict[int, float], heads: Sequence[int], source: str) -> None:
    missing = [k for k in heads if k not in accuracy]
    if missing:
        known = sorted(accuracy)
        raise UsageError(f'--accuracy: {source} has no top1 for heads {missing}; '
                         f'profile only the heads it has with --heads {" ".join(map(str, known))}')


def build_profile(session: EvalSession, loader=None, accuracy: Optional[Dict[int, float]] = None) -> dict:
    """Measure every head count of the session; returns the profile object (see the module docstring)."""
    args, model = session.args, session.model
    memory_shape = (args.memory_batch_size, *session.input_size)
    records = None
    if loader is not None:  # one pass: every k on every image; top-1 per k and the cascade records come from it
        print(f'[records] accuracy and confidence of heads {session.heads} (one data pass)', flush=True)
        records = collect_records(model, loader, session.heads, session.device,
                                  amp_autocast=lambda: autocast(args, session.device),
                                  prepare_input=session.prepare_input)
        accuracy = {k: 100. * int(records.correct(k).sum()) / records.num_images for k in session.heads}
    batch = throughput.input_batch(session)
    sizes = latency_batch_sizes(args.batch_size)
    stages = [
        sweep.throughput_stage(session, batch),
        sweep.macs_stage(session),
        ('peak memory', lambda k: {'peak_mb': memory.peak_memory_mb(model, k, memory_shape, session.device)}),
        (f'latency at batch sizes {sizes}',
         lambda k: {'batch_latency': throughput.benchmark_batch_sizes(session, k, batch, sizes)}),
    ]
    results = sweep.measure_stages(session, stages)
    rows, batch_latency = [], []
    for k in session.heads:
        row = results[k]
        row['embed_dim'] = k * model.head_dim
        row['top1'] = accuracy[k] if accuracy is not None else None
        rows.append(round_row({key: row[key] for key in PROFILE_KEYS}))
        batch_latency += [round_row(r) for r in row['batch_latency']]
    profile = {'device': device_info(args, session.device), 'model': _model_info(session), 'rows': rows,
               'batch_latency': batch_latency}
    if records is not None:
        profile['cascade_records'] = records_state(records)
    return profile


def latency_batch_sizes(batch_size: int) -> List[int]:
    """The batch sizes each k is timed at for cascades: powers of two below ``batch_size``, and ``batch_size``."""
    return [1 << i for i in range(max(batch_size - 1, 0).bit_length()) if 1 << i < batch_size] + [batch_size]


def records_state(records: CascadeRecords) -> dict:
    """``records.state_dict()`` with confidences rounded to ``SCORE_DIGITS`` significant digits."""
    state = records.state_dict()
    state['scores'] = {rule: {k: [float(f'{v:.{SCORE_DIGITS}g}') for v in values] for k, values in per_k.items()}
                       for rule, per_k in state['scores'].items()}
    return state


def _model_info(session: EvalSession) -> dict:
    """What rebuilds the profiled model for re-measuring (``pick --verify``) and how it was measured."""
    args, model = session.args, session.model
    return {
        'name': args.model,
        'checkpoint': args.checkpoint or None,
        'use_ema': bool(args.use_ema),
        'num_classes': model.num_classes,
        'num_heads': model.num_heads,
        'trained_heads': model.trained_heads,  # null: random weights or no record
        'separate_classifiers': model.separate_classifiers,
        'input_size': list(session.input_size),
        'batch_size': args.batch_size,
        'memory_batch_size': args.memory_batch_size,
        'accuracy_from': args.accuracy or args.data or None,
        # how the latencies were measured, for re-measuring them the same way (pick --verify)
        'model_dtype': str(session.model_dtype).replace('torch.', ''),
        'amp_dtype': args.amp_dtype if args.amp else None,
        'cuda_graph': bool(args.cuda_graph),
        'channels_last': bool(args.channels_last),
    }


# --- the file --------------------------------------------------------------------------------------------
def write_profile(profile: dict, path) -> Path:
    """Check ``profile`` against the schema (a NaN or inf row value is refused) and write it as JSON."""
    check_profile(profile, str(path))
    # Indented, but the per-image records on one line each: thousands of numbers, one per line, would bloat the file.
    placeholder = '"@cascade_records@"'
    text = to_json({**profile, 'cascade_records': '@cascade_records@'} if 'cascade_records' in profile else profile,
                   indent=2)  # any other non-finite number (device info) as null
    if 'cascade_records' in profile:
        text = text.replace(placeholder, to_json(profile['cascade_records']), 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text + '\n'))
    return path


def read_profile(path) -> dict:
    """Load and check a profile file; raises ``ProfileError`` naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f'no such file: {path}')
    try:
        profile = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f'{path} is not JSON: {e}') from e
    check_profile(profile, str(path))
    return profile


def check_profile(profile, source: str = 'profile') -> None:
    """Raise ``ProfileError`` unless ``profile`` follows the schema (rows: see ``PROFILE_KEYS``)."""
    if not isinstance(profile, dict) or not isinstance(profile.get('device'), dict):
        raise ProfileError(f'{source}: expected an object with "device" and "rows"')
    rows = profile.get('rows')
    if not isinstance(rows, list) or not rows:
        raise ProfileError(f'{source}: "rows" must be a non-empty list')
    for i, row in enumerate(rows):
        _check_row(row, f'{source}: row {i}')
    heads = [row['heads'] for row in rows]
    if len(set(heads)) != len(heads):
        raise ProfileError(f'{source}: duplicate heads in rows: {heads}')
    with_top1 = [row['heads'] for row in rows if row['top1'] is not None]
    if with_top1 and len(with_top1) != len(rows):
        raise ProfileError(f'{source}: top1 is given for heads {with_top1} only; give it for every row or none')
    if 'batch_latency' in profile:
        batch_latency(profile, source)
    if 'cascade_records' in profile:
        cascade_records(profile, source)


def batch_latency(profile: dict, source: str = 'profile') -> Optional[Dict[int, Dict[int, tuple]]]:
    """``{k: {batch_size: (mean_ms, p90_ms)}}`` from the profile's ``batch_latency`` rows (None when it has none:
    written before cascades); every k of the rows at the same batch sizes, 1 among them. ``ProfileError`` if not."""
    table = profile.get('batch_latency')
    if table is None:
        return None
    heads = [row['heads'] for row in profile['rows']]
    if not isinstance(table, list):
        raise ProfileError(f'{source}: "batch_latency" must be a list of rows')
    out: Dict[int, Dict[int, tuple]] = {k: {} for k in heads}
    for i, row in enumerate(table):
        where = f'{source}: batch_latency row {i}'
        if not isinstance(row, dict) or any(key not in row for key in BATCH_LATENCY_KEYS):
            raise ProfileError(f'{where} needs {list(BATCH_LATENCY_KEYS)}')
        k, b = row['heads'], row['batch_size']
        if k not in out or not isinstance(b, int) or isinstance(b, bool) or b < 1 or b in out[k]:
            raise ProfileError(f'{where}: heads must be a profiled k and batch_size a new int >= 1 for it, '
                               f'got heads {k!r}, batch_size {b!r}')
        values = (row['latency_ms_mean'], row['latency_ms_p90'])
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf for v in values):
            raise ProfileError(f'{where}: latencies must be finite numbers >= 0, got {list(values)}')
        out[k][b] = tuple(float(v) for v in values)
    sizes = {k: sorted(v) for k, v in out.items()}
    if len({tuple(v) for v in sizes.values()}) != 1 or 1 not in sizes[heads[0]]:
        raise ProfileError(f'{source}: batch_latency must time every k at the same batch sizes, 1 among them, '
                           f'got {sizes}')
    return out


def cascade_records(profile: dict, source: str = 'profile') -> Optional[CascadeRecords]:
    """The profile's per-image records (None when it has none: written before cascades, or without DATA); they must
    cover every profiled k. ``ProfileError`` if they do not load."""
    state = profile.get('cascade_records')
    if state is None:
        return None
    try:
        records = CascadeRecords.from_state_dict(state)
        n = records.num_images
        sizes = {len(v) for per_k in (records.pred, records.top5, *records.scores.values()) for v in per_k.values()}
        complete = all(set(per_k) == set(records.heads) for per_k in (records.pred, records.top5,
                                                                     *records.scores.values()))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ProfileError(f'{source}: "cascade_records" does not load: {e}') from e
    heads = [row['heads'] for row in profile['rows']]
    if n == 0 or sizes != {n} or not complete or sorted(records.heads) != sorted(heads):
        raise ProfileError(f'{source}: "cascade_records" must hold every image at every profiled k {heads} '
                           f'(records: {records.heads}, {n} images)')
    return records


def _check_row(row, where: str) -> None:
    if not isinstance(row, dict):
        raise ProfileError(f'{where} is not an object')
    missing = [key for key in PROFILE_KEYS if key not in row]
    if missing:
        raise ProfileError(f'{where} lacks {missing}')
    if not isinstance(row['heads'], int) or isinstance(row['heads'], bool) or row['heads'] < 1:
        raise ProfileError(f'{where}: heads must be an int >= 1, got {row["heads"]!r}')
    for key in PROFILE_KEYS[1:]:
        value = row[key]
        if key == 'top1' and value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
            raise ProfileError(f'{where} (heads {row["heads"]}): {key} must be a finite number >= 0, got {value!r}')


def profile_rows(profile) -> List[Row]:
    """The rows of a profile file or object (checked against the schema)."""
    if isinstance(profile, dict):
        check_profile(profile)
        return profile['rows']
    return read_profile(profile)['rows']
