"""Memory of the active subnetwork: torchinfo's estimate plus the measured peak of one forward.

torchinfo runs on the exported plain ViT of each k (``export_subnetwork``): it counts the
parameters of the modules it walks, which for the sliced model would be the full model's.
``activations_mb`` is torchinfo's forward/backward pass size (outputs of layers with parameters,
counted twice for their gradients: a training-time estimate); ``total_mb`` = input + activations +
parameters, torchinfo's "Estimated Total Size".

The measured ``peak_mb`` is the memory needed to hold the k-head subnetwork's weights and run one
inference forward of batch B, above the baseline before the weights were created:
  * CUDA: ``torch.cuda.max_memory_allocated`` (peak stats reset first) minus the allocation before.
  * CPU: peak resident set size growth in a fresh Python process (``peak_rss.py``), so that the
    allocator's cache from earlier work can neither hide nor inflate it.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Tuple

import torch
import torchinfo

from ..export import export_subnetwork, save_subnetwork
from ..model import HydraViT
from .common import EvalSession, Row, Tool, format_row, run_tool

KEYS = ('heads', 'params_m', 'params_mb', 'activations_mb', 'total_mb', 'peak_mb')


def torchinfo_summary(model: HydraViT, k: int, input_shape: Tuple[int, ...], device: torch.device) -> Row:
    """Parameters (millions, MB), forward/backward activations (MB) and the estimated total (MB).

    ``params_mb`` counts every parameter's bytes; torchinfo 1.8's "Params size" leaves out those held
    by the top module itself (cls_token, pos_embed), so it is not used.
    """
    vit = export_subnetwork(model, k).eval()
    stats = torchinfo.summary(vit, input_size=tuple(input_shape), device=device, mode='eval', verbose=0)
    param_bytes = sum(p.numel() * p.element_size() for p in vit.parameters())
    return {
        'params_m': stats.total_params / 1e6,
        'params_mb': param_bytes / 1e6,
        'activations_mb': stats.total_output_bytes / 1e6,
        'total_mb': (stats.total_input + stats.total_output_bytes + param_bytes) / 1e6,
    }


def peak_memory_mb(model: HydraViT, k: int, input_shape: Tuple[int, ...], device: torch.device) -> float:
    """Measured peak MB of holding the k-head weights and running one forward (see module docstring)."""
    if device.type == 'cuda':
        return _cuda_peak_mb(model, k, input_shape, device)
    with tempfile.TemporaryDirectory() as tmp:
        save_subnetwork(model, k, tmp)
        return _cpu_peak_mb_subprocess(Path(tmp), input_shape, next(model.parameters()).dtype)


def _cuda_peak_mb(model: HydraViT, k: int, input_shape: Tuple[int, ...], device: torch.device) -> float:
    vit = export_subnetwork(model, k).to('cpu').eval()
    dtype = next(vit.parameters()).dtype  # the input follows the model's dtype (--model-dtype)
    with torch.inference_mode():  # CUDA context, cuBLAS workspace and kernels: set up before the baseline
        vit.to(device)(torch.randn(1, *input_shape[1:], device=device, dtype=dtype))
    vit.to('cpu')
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    vit = vit.to(device)
    with torch.inference_mode():
        vit(torch.randn(*input_shape, device=device, dtype=dtype))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del vit
    torch.cuda.empty_cache()
    return peak / 1e6


def _cpu_peak_mb_subprocess(subnetwork_dir: Path, input_shape: Tuple[int, ...],
                            dtype: torch.dtype = torch.float32) -> float:
    # Run as a plain script: the probe imports only torch, timm and safetensors, not this package.
    cmd = [sys.executable, str(Path(__file__).with_name('peak_rss.py')), str(subnetwork_dir),
           json.dumps(list(input_shape)), str(torch.get_num_threads()), str(dtype).replace('torch.', '')]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f'peak memory probe failed:\n{proc.stderr[-2000:]}')
    return float(proc.stdout.strip().splitlines()[-1])


def measure(session: EvalSession) -> List[Row]:
    shape = (session.args.batch_size, *session.input_size)
    print(f'Memory of {session.args.model} on {session.device} (batch {session.args.batch_size}), '
          f'heads {session.heads}', flush=True)
    rows = []
    for k in session.heads:
        row = {'heads': k, **torchinfo_summary(session.model, k, shape, session.device)}
        row['peak_mb'] = peak_memory_mb(session.model, k, shape, session.device)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


TOOL = Tool(
    description='Parameters, torchinfo memory estimate and measured peak memory per head count.\n\n'
                '  python validate_memory.py [DATA] --model hydravit_dyn_patch16_224 --heads 3 6 12 [-b 1]',
    keys=KEYS,
    data_required=False,
    default_batch_size=1,
    measure=measure,
)


def main(argv=None) -> List[Row]:
    return run_tool(TOOL, argv)

