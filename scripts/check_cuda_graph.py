#!/usr/bin/env python3
"""The CUDA-graph serving path on a GPU: right answers, refusals, and batch-1 latency eager against graphs.

For each model dtype (``--model-dtypes``), the HydraViT is cast once and served by an ``ElasticRunner`` with
``cuda_graph=True`` (one graph per k, captured at construction). The runner is switched between the head counts in a
mixed order (3, 12, 6, 3, 12 for the defaults) on fresh random batches, and every output is compared with the eager
forward at that k (relative max |diff| within ``--rtol-float32`` / ``--rtol-low``); a batch of another shape must be
refused; the memory the graphs hold is printed. Then the batch-1 latency of each k is timed eager and replayed (the
evaluation core's ``time_calls``), and ``validate_throughput.py --cuda-graph`` runs once through its command line.
Exits 1 when an output differs or a refusal is missing; ``scripts/gpu_check.sh`` runs it as its ``cuda-graph`` step.

    python scripts/check_cuda_graph.py --model hydravit_dyn_patch16_224 --heads 3 6 12
"""
import argparse
import statistics
import sys
from pathlib import Path
from typing import List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import hydravit  # noqa: E402, F401  registers the models
from hydravit.deploy import ElasticRunner  # noqa: E402
from hydravit.evaluation import throughput  # noqa: E402
from hydravit.evaluation.environment import configure_cuda  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='hydravit_dyn_patch16_224', help='registered HydraViT model')
    parser.add_argument('--heads', type=int, nargs='+', default=[3, 6, 12], help='head counts to serve')
    parser.add_argument('-b', '--batch-size', type=int, default=1, help='served batch size (default: 1)')
    parser.add_argument('--model-dtypes', nargs='+', default=['float32', 'bfloat16'],
                        choices=('float32', 'bfloat16', 'float16'), help='model dtypes to check')
    parser.add_argument('--iters', type=int, default=50, help='timed calls per k and mode')
    parser.add_argument('--rtol-float32', type=float, default=1e-3,
                        help='largest max|graph - eager| / max|eager| for float32 (TF32 matmuls)')
    parser.add_argument('--rtol-low', type=float, default=2e-2, help='the same for bfloat16 / float16')
    parser.add_argument('--device', default='cuda', help=argparse.SUPPRESS)  # another device: tests with a fake backend
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('CUDA graphs need a GPU: CUDA is not available')
    if not timm.is_model(args.model):
        parser.error(f'--model: unknown model {args.model!r}')
    if args.batch_size < 1 or args.iters < 1:
        parser.error('-b/--batch-size and --iters must be >= 1')
    return args


def check_dtype(args: argparse.Namespace, dtype_name: str, device: torch.device) -> bool:
    """Outputs and refusals of the graph-served runner at one model dtype; prints one line per check."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = timm.create_model(args.model).to(device=device, dtype=dtype).eval()
    shape = (args.batch_size, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    example = torch.randn(shape, device=device, dtype=dtype)
    before = _reserved_mb(device)
    runner = ElasticRunner(model, 1e9, heads=args.heads, cuda_graph=True, example_input=example)
    held = _reserved_mb(device) - before
    print(f'{dtype_name}: {len(args.heads)} graphs captured at construction hold {held:.0f} MB (CUDA memory '
          'reserved)', flush=True)
    rtol = args.rtol_float32 if dtype == torch.float32 else args.rtol_low
    ok = True
    order = sorted(args.heads)[:1] + sorted(args.heads)[::-1] + sorted(args.heads)[:1] + sorted(args.heads)[-1:]
    with torch.inference_mode():
        for k in order:
            runner.controller.k = k  # what the controller does on a step: the next call switches to k's graph
            x = torch.randn(shape, device=device, dtype=dtype)
            served = runner(x)
            model.set_heads(k)
            expected = model(x)
            diff = ((served.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
            good = diff <= rtol and served.shape == expected.shape
            ok &= good
            print(f'{dtype_name} k={k:<2d} graph vs eager: relative max |diff| {diff:.1e} (<= {rtol:g}): '
                  f'{"ok" if good else "MISMATCH"}', flush=True)
        try:
            runner(torch.randn((args.batch_size + 1, *shape[1:]), device=device, dtype=dtype))
            print(f'{dtype_name}: a batch of another shape was NOT refused', flush=True)
            ok = False
        except ValueError as e:
            print(f'{dtype_name}: another batch shape refused: {e}', flush=True)
        time_heads(runner, model, example, args, dtype_name, device)
    return ok


def _reserved_mb(device: torch.device) -> float:
    return torch.cuda.memory_reserved(device) / 1e6 if device.type == 'cuda' else 0.


def time_heads(runner: ElasticRunner, model, x: torch.Tensor, args: argparse.Namespace, dtype_name: str,
               device: torch.device) -> None:
    """Median batch latency per k, eager against graph replay."""
    for k in sorted(args.heads):
        model.set_heads(k)
        eager = statistics.median(throughput.time_calls(lambda: model(x), device, warmup=10, iters=args.iters))
        graph = statistics.median(throughput.time_calls(lambda k=k: runner.graphs(k, x), device, warmup=10,
                                                        iters=args.iters))
        print(f'{dtype_name} k={k:<2d} batch {x.shape[0]} latency median: eager {eager:.3f} ms, CUDA graph '
              f'{graph:.3f} ms (speed-up {eager / graph:.2f}x)', flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    configure_cuda()
    ok = all([check_dtype(args, name, device) for name in args.model_dtypes])
    print('validate_throughput.py --cuda-graph --model-dtype bfloat16:', flush=True)
    throughput.main(['--model', args.model, '--heads', *map(str, args.heads), '-b', '64', '--cuda-graph',
                     '--model-dtype', 'bfloat16', '--num-bench-iter', str(args.iters), '--device', args.device])
    print(f'CUDA graphs: {"all outputs equal the eager forward" if ok else "FAILED"}', flush=True)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
