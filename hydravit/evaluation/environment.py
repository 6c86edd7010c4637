"""What a measurement ran on and under which settings, and the CUDA defaults every tool applies.

On CUDA, TF32 matmuls / convolutions and cudnn autotuning are on by default, as the official
throughput script sets them (``--no-tf32`` / ``--no-cudnn-benchmark`` turn them off). Every result
row records ``SETTINGS_KEYS`` so that numbers from different settings are never mixed up.
"""
import argparse
import datetime
import os
import platform
from pathlib import Path
from typing import Dict, Union

import torch

SETTINGS_KEYS = ('device_name', 'dtype', 'tf32', 'compile')


def add_cuda_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('CUDA')
    group.add_argument('--no-tf32', action='store_true',
                       help='CUDA: full fp32 matmuls and convolutions (default: TF32, as the official scripts)')
    group.add_argument('--no-cudnn-benchmark', action='store_true',
                       help='CUDA: do not let cudnn autotune its kernels (default: torch.backends.cudnn.benchmark)')


def configure_cuda(tf32: bool = True, cudnn_benchmark: bool = True) -> None:
    """Process-wide TF32 and cudnn autotuning switches (no effect on CPU work)."""
    torch.set_float32_matmul_precision('high' if tf32 else 'highest')  # 'high' = TF32 matmuls
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark


def apply_cuda_args(args: argparse.Namespace, device: torch.device) -> None:
    """``configure_cuda`` from ``--no-tf32`` / ``--no-cudnn-benchmark`` when the work runs on CUDA."""
    if device.type == 'cuda':
        configure_cuda(not getattr(args, 'no_tf32', False), not getattr(args, 'no_cudnn_benchmark', False))


def tf32_enabled(device: torch.device) -> bool:
    """Whether fp32 matmuls run as TF32 on ``device`` (never on CPU)."""
    return device.type == 'cuda' and torch.get_float32_matmul_precision() != 'highest'


def cpu_name() -> str:
    # platform.processor() is empty or just the architecture on most Linux systems; /proc/cpuinfo names the model.
    cpuinfo = Path('/proc/cpuinfo')
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors='replace').splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine() or 'unknown CPU'


def device_name(device: torch.device) -> str:
    """GPU name on CUDA, the CPU model otherwise."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return cpu_name()


def compute_dtype(args: argparse.Namespace) -> str:
    """The forward's compute dtype: the autocast dtype with ``--amp``, else the weights' (``--model-dtype``)."""
    return args.amp_dtype if getattr(args, 'amp', False) else (getattr(args, 'model_dtype', None) or 'float32')


def settings_row(args: argparse.Namespace, device: torch.device) -> Dict[str, Union[str, bool]]:
    """The ``SETTINGS_KEYS`` columns of every result row."""
    return {
        'device_name': device_name(device),
        'dtype': compute_dtype(args),
        'tf32': tf32_enabled(device),
        'compile': bool(getattr(args, 'compile', False) or getattr(args, 'torchcompile', None)),
    }


def device_info(args: argparse.Namespace, device: torch.device) -> Dict[str, Union[str, int, bool]]:
    """Where and how a device profile was measured (the ``device`` object of a profile)."""
    return {
        'name': device_name(device),
        'type': device.type,
        'threads': torch.get_num_threads(),
        'cpu_count': os.cpu_count(),
        'torch': torch.__version__,
        'dtype': compute_dtype(args),
        'tf32': tf32_enabled(device),
        'cudnn_benchmark': device.type == 'cuda' and torch.backends.cudnn.benchmark,
        'compile': bool(getattr(args, 'compile', False) or getattr(args, 'torchcompile', None)),
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    }
