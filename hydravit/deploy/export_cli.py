"""Export HydraViT subnetworks: as plain timm ViTs (config.json + model.safetensors) or as ONNX.

    python scripts/export.py --model hydravit_dyn_patch16_224 --checkpoint C --use-ema --heads 3 -o out/k3
    python scripts/export.py [DATA] --checkpoint C --use-ema --heads 3 6 12 --format onnx -o out/onnx

timm format: load with stock timm, no hydravit import: ``timm.create_model('local-dir:out/k3', pretrained=True)``.
ONNX: one file per k (OUTPUT/k{K}.onnx, or OUTPUT itself when it ends in .onnx and one k is given),
checked with onnxruntime against PyTorch on a random batch and, when DATA is given, on a real one
(max |diff| <= 1e-4, else exit 1 and the file is removed); prints both runtimes' batch-1 latency.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..classes import class_names, read_class_map
from ..cli import add_model_args
from ..evaluation import throughput
from ..evaluation.common import (
    EvalSession,
    UsageError,
    add_data_args,
    check_output_file,
    check_output_folder,
    create_session,
)
from ..export import check_label_names, export_subnetwork, save_subnetwork
from . import onnx

FORMATS = ('timm', 'onnx')


def create_export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog='python scripts/export.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('data', metavar='DATA', nargs='?', default=None,
                        help='--format onnx: image folder whose first batch is a second parity check')
    add_model_args(parser)
    parser.add_argument('--output', '-o', required=True,
                        help='timm: a folder (OUTPUT/k{K} for several heads); onnx: OUTPUT/k{K}.onnx, or a .onnx file')
    parser.add_argument('--format', default='timm', choices=FORMATS, help='timm (default) or onnx')
    parser.add_argument('--opset', type=int, default=onnx.DEFAULT_OPSET,
                        help=f'ONNX opset (default {onnx.DEFAULT_OPSET}, at least {onnx.MIN_OPSET})')
    parser.add_argument('-b', '--batch-size', type=int, default=8, metavar='N',
                        help='batch size of the ONNX parity checks (default: 8)')
    add_data_args(parser)
    parser.set_defaults(device='cpu', results_file='')  # exports and checks run on the CPU
    return parser


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    parser = create_export_parser()
    args = parser.parse_args(argv)
    try:
        _check_args(args)
        session = create_session(args)
        outputs = output_paths(args, session.heads)
        batches = parity_batches(session) if args.format == 'onnx' else {}
        label_names = export_label_names(session)
    except UsageError as e:
        parser.error(str(e))
    if args.format == 'timm':
        return [_export_timm(session.model, k, out, label_names) for k, out in outputs.items()]
    failures = [f for k, out in outputs.items()
                for f in _export_onnx(session, k, out, batches, args.opset, label_names)]
    if failures:
        sys.exit('export: ' + '; '.join(failures))
    return list(outputs.values())


def _check_args(args: argparse.Namespace) -> None:
    if args.format == 'timm' and args.data:
        raise UsageError('DATA: only --format onnx uses DATA (its parity check on real images)')
    if args.format != 'onnx':
        return
    missing = onnx.missing_requirements()
    if missing:
        raise UsageError(f'--format onnx needs {", ".join(missing)}: pip install "hydravit[deploy]" '
                         '(or pip install -r requirements.txt)')
    if args.opset < onnx.MIN_OPSET:
        raise UsageError(f'--opset must be >= {onnx.MIN_OPSET}, got {args.opset}')


def output_paths(args: argparse.Namespace, heads: Sequence[int]) -> Dict[int, Path]:
    """Where each head count goes (see the module docstring); ``UsageError`` when one cannot be written."""
    outputs = _output_paths(args, heads)
    check = check_output_folder if args.format == 'timm' else check_output_file
    for out in outputs.values():
        check(str(out), '--output')
    return outputs


def _output_paths(args: argparse.Namespace, heads: Sequence[int]) -> Dict[int, Path]:
    out = Path(args.output)
    if args.format == 'timm':
        return {k: out if len(heads) == 1 else out / f'k{k}' for k in heads}
    if out.suffix.lower() == '.onnx':
        if len(heads) > 1:
            raise UsageError(f'--output: a .onnx file holds one head count; give a folder for --heads '
                             f'{" ".join(map(str, heads))}')
        return {heads[0]: out}
    return {k: out / f'k{k}.onnx' for k in heads}


def parity_batches(session: EvalSession) -> Dict[str, torch.Tensor]:
    """A random batch and, with DATA, DATA's first batch (repeated to the batch size)."""
    batches = {'random': torch.randn(session.args.batch_size, *session.input_size)}
    if session.args.data:
        batches['DATA'] = throughput.input_batch(session)
    return batches


def export_label_names(session: EvalSession) -> Optional[List[str]]:
    """The class names to write with an export (timm's ``label_names``): those the checkpoint records, else
    ``--class-map``'s, else None. ``create_session`` checked that ``--class-map`` agrees with recorded names."""
    args, num_classes = session.args, session.model.num_classes
    names = session.class_names
    if names is None and args.class_map:
        try:
            names = class_names(read_class_map(args.class_map, args.data or ''))
            check_label_names(names, num_classes)
        except (ValueError, OSError) as e:
            raise UsageError(f'--class-map: {args.class_map} must name the model\'s {num_classes} classes in label '
                             f'order (0..{num_classes - 1}): {e}') from e
    return names if names is not None and len(names) == num_classes else None


def _export_timm(model, k: int, out: Path, label_names: Optional[List[str]]) -> Path:
    save_subnetwork(model, k, out, label_names)
    print(f'heads={k}: embed_dim={k * model.head_dim} params={model.subnetwork_params(k):,} -> {out}')
    return out


def _export_onnx(session: EvalSession, k: int, out: Path, batches: Dict[str, torch.Tensor], opset: int,
                 label_names: Optional[List[str]]) -> List[str]:
    """Export, check and time one head count; returns what failed (the file is removed if anything did)."""
    model = session.model
    onnx.export_onnx(model, k, out, session.input_size, opset, label_names)
    stored, params = onnx.initializer_count(out), model.subnetwork_params(k)
    print(f'heads={k}: embed_dim={k * model.head_dim} params={params:,} -> {out} '
          f'({out.stat().st_size / 1e6:.2f} MB, opset {opset}; initializers {stored:,} = {stored / params:.1%} '
          f'of the subnetwork)', flush=True)
    vit = export_subnetwork(model, k).eval()
    ort_session = onnx.onnx_session(out, threads=torch.get_num_threads())
    diffs = {name: onnx.max_abs_diff(ort_session, vit, batch) for name, batch in batches.items()}
    print('  max |onnxruntime - PyTorch|: ' + ', '.join(f'{name} batch {d:.2e}' for name, d in diffs.items())
          + f' (tolerance {onnx.TOLERANCE:g})', flush=True)
    latency = onnx.compare_latency(ort_session, vit, batches['random'])
    print('  batch-1 latency, median / p90: ' + ', '.join(
        f'{name} {s["latency_ms_median"]:.3g} / {s["latency_ms_p90"]:.3g} ms' for name, s in latency.items()),
        flush=True)
    failures = [f'k={k}: max |diff| {d:.2e} > {onnx.TOLERANCE:g} on the {name} batch'
                for name, d in diffs.items() if not d <= onnx.TOLERANCE]
    if stored > 1.01 * params:
        failures.append(f'k={k}: the file stores {stored:,} numbers, more than the subnetwork\'s {params:,}')
    if failures:
        out.unlink()
        failures[-1] += f' ({out} removed)'
    return failures
