#!/usr/bin/env python3
"""Dispatched aten ops of the sliced HydraViT against the dedicated timm ViT of the same shape, per head count.

What a sliced call costs beyond the dedicated model's, counted rather than timed, so any machine gives the same
figures (docs/benchmarks.md). For each k: the ops of one inference forward (``torch.inference_mode``, after a
warm-up call) and of one training step (forward + backward, on a step that follows an in-place parameter update),
all ops and those that are not views, and the bytes the non-view ops allocate. The dedicated model is
``hydravit.export_subnetwork(model, k)``: the same weights in a plain timm ``VisionTransformer``.

Targets (issue 17): inference forward at most 1.05x the dedicated ViT's ops, all ops counted; training step at most
one extra non-view op per parameter tensor of the model (the gradient scatter of a sliced leaf), plus, since issue 21
(qkv kept in timm's layout so that ``state_dict()`` hands out the parameters), one per qkv projection: the sum of
the q, k and v blocks' input gradients (docs/benchmarks.md).

    python scripts/count_ops.py --markdown            # ViT-B geometry, batch 2, k = 3 6 12
    python scripts/count_ops.py --model hydravit_dyn_patch4_32 --ks 3 6 12
"""
import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import hydravit  # noqa: E402  registers the models with timm
from hydravit.checkpoint import write_json  # noqa: E402
from hydravit.cli import parse_heads  # noqa: E402
from hydravit.evaluation.opcount import inference_ops, training_step_ops  # noqa: E402
from hydravit.layers import SliceableQKV  # noqa: E402

INFERENCE_TARGET = 1.05  # all ops, sliced / dedicated
MIB = 2 ** 20


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', '-m', default='hydravit_dyn_patch16_224', help='registered HydraViT model')
    parser.add_argument('--ks', type=int, nargs='+', default=[3, 6, 12], help='head counts to compare')
    parser.add_argument('-b', '--batch-size', type=int, default=2, help='batch of random images')
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--markdown', action='store_true', help='print the table as markdown')
    parser.add_argument('--output-json', default='', help='write every count (per op too) here')
    args = parser.parse_args(argv)
    if not timm.is_model(args.model):
        parser.error(f'--model: unknown model {args.model!r}')
    if args.batch_size < 1 or args.num_classes < 1:
        parser.error('--batch-size and --num-classes must be >= 1')
    return args


def count_k(hydra: torch.nn.Module, k: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Counts of both models at head count k, and whether the targets hold."""
    hydra.set_heads(k)
    dedicated = hydravit.export_subnetwork(hydra, k)
    counts = {}
    for name, model in (('sliced', hydra), ('dedicated', dedicated)):
        counts[name] = {'inference': vars(inference_ops(model, x)), 'training': vars(training_step_ops(model, x, y))}
    param_tensors = sum(1 for _ in hydra.parameters())
    qkv_layers = sum(1 for m in hydra.modules() if isinstance(m, SliceableQKV))
    inference_ratio = counts['sliced']['inference']['total'] / counts['dedicated']['inference']['total']
    extra_non_view = counts['sliced']['training']['non_view'] - counts['dedicated']['training']['non_view']
    return {
        'k': k, 'counts': counts, 'param_tensors': param_tensors, 'qkv_layers': qkv_layers,
        'inference_ratio': inference_ratio, 'inference_met': inference_ratio <= INFERENCE_TARGET,
        'training_extra_non_view': extra_non_view, 'training_met': extra_non_view <= param_tensors + qkv_layers,
    }


def format_table(results: List[dict], markdown: bool) -> str:
    header = ['k', 'call', 'ops', 'sliced', 'dedicated', 'sliced/dedicated', 'target', 'met']
    rows = []
    for r in results:
        c = r['counts']
        for call, metric, label in (('inference', 'total', 'all'), ('inference', 'non_view', 'non-view'),
                                    ('training', 'total', 'all'), ('training', 'non_view', 'non-view')):
            s, d = c['sliced'][call][metric], c['dedicated'][call][metric]
            target, met = '', ''
            if (call, metric) == ('inference', 'total'):
                target, met = f'<= {INFERENCE_TARGET:.2f}x', 'yes' if r['inference_met'] else 'no'
            if (call, metric) == ('training', 'non_view'):
                target = f'<= dedicated + {r["param_tensors"]} + {r["qkv_layers"]}'
                met = 'yes' if r['training_met'] else 'no'
            rows.append([str(r['k']), 'forward' if call == 'inference' else 'fwd+bwd', label, str(s), str(d),
                         f'{s / d:.3f}', target, met])
        s, d = (c[v]['training']['allocated_bytes'] / MIB for v in ('sliced', 'dedicated'))
        rows.append([str(r['k']), 'fwd+bwd', 'MiB allocated', f'{s:.1f}', f'{d:.1f}', f'{s / d:.3f}', '', ''])
    if markdown:
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
        lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    else:
        widths = [max(len(cell) for cell in col) for col in zip(header, *rows, strict=True)]
        lines = ['  '.join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in [header] + rows]
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    hydra = timm.create_model(args.model, num_classes=args.num_classes)
    try:
        ks = parse_heads(args.ks, hydra.num_heads, flag='--ks')
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    size = hydra.patch_embed.img_size
    x = torch.randn(args.batch_size, 3, *size)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    started = time.perf_counter()
    results = []
    for i, k in enumerate(ks):
        print(f'[{time.perf_counter() - started:5.1f}s] k={k} ({i + 1}/{len(ks)}): counting', file=sys.stderr,
              flush=True)
        results.append(count_k(hydra, k, x, y))
    print(format_table(results, args.markdown))
    if args.output_json:
        payload = {'command': ' '.join(['python', *sys.argv]), 'torch': torch.__version__, 'timm': timm.__version__,
                   'results': results}
        write_json(args.output_json, payload, indent=2)  # valid JSON: a non-finite number as null
    return 0 if all(r['inference_met'] and r['training_met'] for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
