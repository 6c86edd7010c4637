"""Peak RSS growth of loading one exported subnetwork and running one forward, in this fresh process.

    python peak_rss.py SUBNETWORK_DIR INPUT_SHAPE_JSON NUM_THREADS [DTYPE]   # prints MB (DTYPE: float32)

Run as a script by ``memory.py``: it imports torch, timm and safetensors only.

SUBNETWORK_DIR is a ``save_subnetwork`` folder. The peak is reset after imports through
``/proc/self/clear_refs`` and read from ``VmHWM`` (Linux); elsewhere ``ru_maxrss`` growth is used,
which misses nothing but may start from a higher import-time peak.
"""
import json
import resource
import sys
from pathlib import Path
from typing import Tuple

import torch
from safetensors.torch import load_file
from timm.models import VisionTransformer


def _proc_status_mb(field: str) -> float:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024 / 1e6  # kB
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        Path('/proc/self/clear_refs').write_text('5')  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    scale = 1 if sys.platform == 'darwin' else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def _warm_up(model_args: dict, num_classes: int, input_shape: Tuple[int, ...]) -> None:
    """One forward of a one-block, one-head ViT of the same input: the thread pools, kernels and lazy
    imports a first forward sets up are process overhead, not the subnetwork's memory."""
    tiny_args = dict(model_args, depth=1, num_heads=1, embed_dim=model_args['embed_dim'] // model_args['num_heads'])
    with torch.inference_mode():
        VisionTransformer(**tiny_args, num_classes=num_classes).eval()(torch.zeros(1, *input_shape[1:]))


def peak_rss_growth_mb(subnetwork_dir: Path, input_shape: Tuple[int, ...],
                       dtype: torch.dtype = torch.float32) -> float:
    """MB of RSS growth; ``dtype``: the input's, that of the saved weights (``--model-dtype``)."""
    config = json.loads((subnetwork_dir / 'config.json').read_text())
    x = torch.randn(*input_shape, dtype=dtype)
    _warm_up(config['model_args'], config['num_classes'], input_shape)
    precise = _reset_peak_rss()
    base = _proc_status_mb('VmRSS') if precise else _maxrss_mb()
    vit = VisionTransformer(**config['model_args'], num_classes=config['num_classes'], device='meta')
    vit.load_state_dict(load_file(str(subnetwork_dir / 'model.safetensors')), assign=True)
    with torch.inference_mode():
        vit.eval()(x)
    peak = _proc_status_mb('VmHWM') if precise else _maxrss_mb()
    return peak - base


if __name__ == '__main__':
    torch.set_num_threads(int(sys.argv[3]))
    dtype = getattr(torch, sys.argv[4]) if len(sys.argv) > 4 else torch.float32
    print(peak_rss_growth_mb(Path(sys.argv[1]), tuple(json.loads(sys.argv[2])), dtype))
