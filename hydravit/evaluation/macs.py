"""MACs, FLOPs and parameter count of the active subnetwork, from DeepSpeed's flops profiler.

DeepSpeed counts the operations of the functional calls it patches (``F.linear``, ``F.layer_norm``,
``F.conv2d``, ``F.scaled_dot_product_attention``, ...). HydraViT's layers call exactly these on the
sliced tensors, so the sliced model profiles to the same MACs as the exported plain ViT (checked in
the tests). Its FLOPs differ by DeepSpeed's conventions alone: below full width the qkv projection is one
``torch.baddbmm`` over the q, k and v blocks, whose bias DeepSpeed counts once per output column (3·k·head_dim FLOPs
a block), where it counts no bias for ``F.linear``: 288 FLOPs in 4.2 MFLOPs at k = 1 of the small model.
DeepSpeed's parameter count, however, sums every parameter of the profiled modules: the
full model's. The reported ``params_m`` is therefore the subnetwork's own (``subnetwork_params``).
"""
import os
from typing import List, Tuple

import torch

from ..model import HydraViT
from .common import EvalSession, Row, Tool, format_row, run_tool

KEYS = ('heads', 'gmacs', 'gflops', 'params_m')


def _import_profiler():
    # DeepSpeed picks its accelerator at import time; without a GPU it must be told to use the CPU.
    if not torch.cuda.is_available():
        os.environ.setdefault('DS_ACCELERATOR', 'cpu')
    from deepspeed.profiling.flops_profiler import get_model_profile
    return get_model_profile


def profile_module(module: torch.nn.Module, input_shape: Tuple[int, ...]) -> Tuple[float, float]:
    """(MACs, FLOPs) of one forward of ``module`` on an input of ``input_shape``, per DeepSpeed."""
    get_model_profile = _import_profiler()
    with torch.no_grad():
        flops, macs, _ = get_model_profile(
            module, input_shape=tuple(input_shape), print_profile=False, detailed=False, as_string=False)
    return float(macs), float(flops)


def profile_heads(model: HydraViT, k: int, input_size: Tuple[int, ...], batch_size: int = 1) -> Row:
    """Per-image GMACs / GFLOPs and the parameter count (millions) of the k-head subnetwork."""
    model.set_heads(k)
    macs, flops = profile_module(model, (batch_size, *input_size))
    return {
        'heads': k,
        'gmacs': macs / batch_size / 1e9,
        'gflops': flops / batch_size / 1e9,
        'params_m': model.subnetwork_params(k) / 1e6,
    }


def measure(session: EvalSession) -> List[Row]:
    print(f'Profiling {session.args.model} with DeepSpeed (input {session.input_size}, '
          f'batch {session.args.batch_size}), heads {session.heads}', flush=True)
    rows = []
    for k in session.heads:
        rows.append(profile_heads(session.model, k, session.input_size, session.args.batch_size))
        print(format_row(rows[-1]), flush=True)
    return rows


TOOL = Tool(
    description='GMACs / GFLOPs (per image, DeepSpeed flops profiler) and parameters per head count.\n\n'
                '  python validate_macs.py [DATA] --model hydravit_dyn_patch16_224 -b 1 --heads 3 6 12',
    keys=KEYS,
    data_required=False,
    default_batch_size=1,
    measure=measure,
)


def main(argv=None) -> List[Row]:
    return run_tool(TOOL, argv)
