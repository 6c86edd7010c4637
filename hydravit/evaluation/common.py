"""What the four evaluation tools share: arguments, model/data setup, and result files.

Every tool measures one row of numbers per head count k; ``run_tool`` parses the command line,
builds the model once, validates everything before any work starts, and writes the rows, each with
the settings it was measured under (``environment.SETTINGS_KEYS``: device name, dtype, TF32, compile).
"""
import argparse
import contextlib
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from timm.data import create_dataset, create_loader, resolve_data_config

from ..checkpoint import atomic_write
from ..cli import add_model_args, create_model_from_args, resolve_heads
from ..model import HydraViT
from .environment import SETTINGS_KEYS, add_cuda_args, apply_cuda_args, settings_row

Row = Dict[str, float]
RESULT_SUFFIXES = ('.json', '.csv')


class UsageError(ValueError):
    """Bad user input; reported as ``prog: error: ...`` without a traceback."""


@dataclass
class EvalSession:
    """Everything a tool needs: the parsed arguments, the model (eval mode, on ``device``), the head counts."""

    args: argparse.Namespace
    model: HydraViT
    heads: List[int]
    device: torch.device
    data_config: Dict
    checkpoint: Optional[dict] = None

    @property
    def input_size(self) -> tuple:
        return tuple(self.data_config['input_size'])


# --- arguments ---------------------------------------------------------------------------------------
def create_parser(description: str, data_required: bool, default_batch_size: int) -> argparse.ArgumentParser:
    """Parser with the arguments every tool shares (names follow timm's validate.py)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        'data', metavar='DATA', nargs=None if data_required else '?', default=None,
        help='image folder in ImageFolder layout, or a root holding a val/validation split folder'
             + ('' if data_required else ' (optional: without it the input is random of the model\'s input size)'))
    add_model_args(parser)
    parser.add_argument('-b', '--batch-size', type=int, default=default_batch_size, metavar='N',
                        help=f'batch size (default: {default_batch_size})')
    parser.add_argument('--device', default=None, help='torch device (default: cuda if available, else cpu)')
    parser.add_argument('--results-file', default='', metavar='FILE',
                        help='write the per-k rows to FILE: .json (list of objects) or .csv (header + one row per k)')
    add_data_args(parser)
    add_cuda_args(parser)
    return parser


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """timm's dataset and preprocessing arguments (used when DATA is given)."""
    group = parser.add_argument_group('Data')
    group.add_argument('--dataset', default='', help='timm dataset name (default: image folder)')
    group.add_argument('--split', default='validation', help='dataset split (default: validation)')
    group.add_argument('-j', '--workers', type=int, default=min(4, os.cpu_count() or 1), metavar='N',
                       help='data loading processes (default: min(4, CPU count))')
    group.add_argument('--crop-pct', type=float, default=None, help='center crop fraction (default: model cfg)')
    group.add_argument('--crop-mode', default=None, help='crop mode: center, squash or border (default: model cfg)')
    group.add_argument('--interpolation', default='', help='resize interpolation (default: model cfg)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='normalization mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='normalization std')
    group.add_argument('--log-freq', type=int, default=10, metavar='N', help='batches between progress lines')


def add_amp_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Mixed precision')
    group.add_argument('--amp', action='store_true', help='run the forward under torch.autocast')
    group.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'),
                       help='autocast dtype (default: bfloat16)')


def autocast(args: argparse.Namespace, device: torch.device):
    """``torch.autocast`` context when ``--amp`` is set, else a no-op."""
    if not getattr(args, 'amp', False):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, args.amp_dtype))


# --- setup -------------------------------------------------------------------------------------------
def create_session(args: argparse.Namespace, all_heads: bool = False) -> EvalSession:
    """Check the arguments, build the model and load its weights. Raises ``UsageError`` on bad input.

    ``all_heads``: without ``--heads``, use every head count the model can run (the sweep) instead of
    the checkpoint's head set.
    """
    if args.batch_size < 1:
        raise UsageError(f'-b/--batch-size must be >= 1, got {args.batch_size}')
    if args.results_file and Path(args.results_file).suffix.lower() not in RESULT_SUFFIXES:
        raise UsageError(f'--results-file must end in .json or .csv, got {args.results_file!r}')
    if args.data is not None and not args.dataset and not Path(args.data).is_dir():
        raise UsageError(f'DATA: no such folder: {args.data}')
    device = resolve_device(args.device)
    apply_cuda_args(args, device)
    try:
        model, checkpoint = create_model_from_args(args)
    except FileNotFoundError as e:
        raise UsageError(f'--checkpoint: {e}') from e
    except KeyError as e:  # e.g. --use-ema on a checkpoint without EMA weights
        raise UsageError(str(e.args[0])) from e
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from e
    if not isinstance(model, HydraViT):
        raise UsageError(f'--model: {args.model} is not a HydraViT model')
    heads = _select_heads(args, model, checkpoint, all_heads)
    data_config = resolve_data_config(vars(args), model=model)
    return EvalSession(args, model.eval().to(device), heads, device, data_config, checkpoint)


def resolve_device(name: Optional[str]) -> torch.device:
    if not name:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f'--device: {e}') from e
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device: {name} requested but CUDA is not available')
    return device


def runnable_heads(model: HydraViT) -> List[int]:
    """Every head count the model can run (all of 1..H, or those with a separate classifier)."""
    return list(model.separate_classifiers or range(1, model.num_heads + 1))


def _select_heads(args, model: HydraViT, checkpoint: Optional[dict], all_heads: bool) -> List[int]:
    if args.heads is None and (all_heads or (model.separate_classifiers and not (checkpoint or {}).get('heads'))):
        return runnable_heads(model)  # every k, or every k that has a classifier
    try:
        heads = resolve_heads(args, model, checkpoint)
    except ValueError as e:
        raise UsageError(str(e) if str(e).startswith(('--heads', 'checkpoint')) else f'--heads: {e}') from e
    return heads


def create_eval_dataset(session: EvalSession):
    """timm dataset for DATA; raises ``UsageError`` when it is empty or has more classes than the model."""
    args = session.args
    try:
        dataset = create_dataset(args.dataset, root=args.data, split=args.split, is_training=False)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise UsageError(f'DATA: {e}') from e
    if len(dataset) == 0:
        raise UsageError(f'DATA: no images found in {args.data}')
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    num_classes = session.model.num_classes
    if class_to_idx and len(class_to_idx) > num_classes:
        raise UsageError(f'DATA has {len(class_to_idx)} classes but the model predicts {num_classes}: '
                         'pass --num-classes or a checkpoint trained on this data')
    return dataset


def create_eval_loader(session: EvalSession, dataset, batch_size: Optional[int] = None):
    """Deterministic evaluation loader with the model's (or the flags') preprocessing."""
    cfg = session.data_config
    return create_loader(
        dataset,
        input_size=cfg['input_size'],
        batch_size=batch_size or session.args.batch_size,
        use_prefetcher=False,  # normalization in the transform: one code path on CPU and GPU
        interpolation=cfg['interpolation'],
        mean=cfg['mean'],
        std=cfg['std'],
        num_workers=session.args.workers,
        crop_pct=cfg['crop_pct'],
        crop_mode=cfg['crop_mode'],
        pin_memory=session.device.type == 'cuda',
        device=session.device,
    )


# --- results -----------------------------------------------------------------------------------------
def round_row(row: Row) -> Row:
    """Floats to 6 significant digits: enough for 1e-3 GMACs of a tiny model and for 99.875% top-1."""
    return {key: float(f'{v:.6g}') if isinstance(v, float) else v for key, v in row.items()}


def write_results(rows: Sequence[Row], path, keys: Optional[Sequence[str]] = None) -> Path:
    """Write ``rows`` as JSON (list of objects) or CSV (header + one row each), atomically."""
    path = Path(path)
    keys = list(keys or rows[0].keys())
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, 'w', newline='') as f:
            if path.suffix.lower() == '.csv':
                writer = csv.DictWriter(f, fieldnames=keys, extrasaction='ignore')
                writer.writeheader()
                writer.writerows(rows)
            else:
                json.dump([{key: row.get(key) for key in keys} for row in rows], f, indent=4)
                f.write('\n')
    atomic_write(path, write)
    return path


def read_results(path) -> List[Row]:
    """Rows of a results file written by ``write_results`` (CSV values parsed back to numbers and booleans)."""
    path = Path(path)
    if path.suffix.lower() == '.json':
        return json.loads(path.read_text())
    with open(path, newline='') as f:
        return [{key: _parse_value(v) for key, v in row.items()} for row in csv.DictReader(f)]


def _parse_value(text: str):
    if text == '':
        return None
    if text in ('True', 'False'):  # how csv writes the settings' booleans (tf32, compile)
        return text == 'True'
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def report(rows: Sequence[Row], keys: Sequence[str], results_file: str = '') -> None:
    """Write the results file (if asked) and print the ``--result`` JSON block as timm's validate.py does."""
    rows = [{key: row[key] for key in keys} for row in rows]
    if results_file:
        write_results(rows, results_file, keys)
    print(f'--result\n{json.dumps(rows, indent=4)}')


def format_row(row: Row) -> str:
    return '  '.join(f'{key} {value:.4g}' if isinstance(value, float) else f'{key} {value}'
                     for key, value in row.items())


# --- running a tool ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tool:
    """One evaluation tool: its arguments, its result keys, and how it measures all head counts."""

    description: str
    keys: Sequence[str]
    data_required: bool
    default_batch_size: int
    measure: Callable[[EvalSession], Iterable[Row]]
    add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None
    check_args: Optional[Callable[[argparse.Namespace], None]] = None


def run_tool(tool: Tool, argv: Optional[Sequence[str]] = None) -> List[Row]:
    """Command-line entry: parse, set up (all errors before work starts), measure, report."""
    parser = create_parser(tool.description, tool.data_required, tool.default_batch_size)
    if tool.add_args is not None:
        tool.add_args(parser)
    args = parser.parse_args(argv)
    try:
        if tool.check_args is not None:
            tool.check_args(args)
        session = create_session(args)
        settings = settings_row(args, session.device)
        rows = [round_row({**row, **settings}) for row in tool.measure(session)]
    except UsageError as e:
        parser.error(str(e))
    report(rows, (*tool.keys, *SETTINGS_KEYS), args.results_file)
    sys.stdout.flush()
    return rows
