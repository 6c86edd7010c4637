"""Turn one HydraViT subnetwork into a plain timm ``VisionTransformer`` and back.

The correspondence between a full-size tensor and its k-head part is "leading slice in every
dimension", except for the fused qkv projection whose rows hold q, k and v blocks of width
``embed_dim`` each: there the leading slice is taken inside each block.
"""
import json
from pathlib import Path
from typing import Dict, Sequence, Union

import torch
from safetensors.torch import save_file
from timm.models import VisionTransformer

from .checkpoint import atomic_write
from .model import HydraViT

# A stock timm entry point that builds a plain VisionTransformer from kwargs (all overridden).
TIMM_ARCHITECTURE = 'vit_base_patch16_224'


def _is_qkv(name: str) -> bool:
    return name.endswith('attn.qkv.weight') or name.endswith('attn.qkv.bias')


def leading_slice(name: str, full: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """View of the part of ``full`` that a narrower ViT tensor of ``shape`` corresponds to.

    For qkv tensors the view has shape ``(3, shape[0] // 3, *shape[1:])``; otherwise ``shape``.
    """
    if len(shape) != full.dim() or any(n > m for n, m in zip(shape, full.shape, strict=True)):
        raise ValueError(f'{name}: shape {tuple(shape)} does not fit inside {tuple(full.shape)}')
    if _is_qkv(name):
        if shape[0] % 3:
            raise ValueError(f'{name}: first dim {shape[0]} is not a multiple of 3')
        blocks = full.unflatten(0, (3, full.shape[0] // 3))
        return blocks[(slice(None),) + tuple(slice(0, n) for n in (shape[0] // 3, *shape[1:]))]
    return full[tuple(slice(0, n) for n in shape)]


def subnetwork_vit_args(model: HydraViT, k: int) -> Dict:
    """kwargs of a timm ``VisionTransformer`` with the shape of ``model``'s k-head subnetwork."""
    _check_heads(model, k)
    return dict(model.vit_args, embed_dim=k * model.head_dim, num_heads=k)


def subnetwork_state_dict(model: HydraViT, k: int) -> Dict[str, torch.Tensor]:
    """State dict (views into ``model``'s tensors) of the k-head subnetwork, in timm ViT layout."""
    shapes = {n: t.shape for n, t in VisionTransformer(**subnetwork_vit_args(model, k), device='meta')
              .state_dict().items()}
    full = model.state_dict()
    if model.separate_classifiers:
        for suffix in ('weight', 'bias'):
            full[f'head.{suffix}'] = full[f'head.classifiers.{k}.{suffix}']
    return {n: leading_slice(n, full[n], s).reshape(s) for n, s in shapes.items()}


def export_subnetwork(model: HydraViT, k: int) -> VisionTransformer:
    """A standalone timm ``VisionTransformer`` equal to ``model`` run with ``k`` heads."""
    ref = next(model.parameters())
    vit = VisionTransformer(**subnetwork_vit_args(model, k), device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        vit.load_state_dict({n: t.clone() for n, t in subnetwork_state_dict(model, k).items()}, strict=True)
    vit.pretrained_cfg = dict(model.pretrained_cfg)
    return vit.train(model.training)


def save_subnetwork(model: HydraViT, k: int, out_dir: Union[str, Path]) -> Path:
    """Write the k-head subnetwork as ``config.json`` + ``model.safetensors``.

    The folder loads with stock timm: ``timm.create_model('local-dir:OUT_DIR', pretrained=True)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = subnetwork_vit_args(model, k)
    state_dict = {n: t.detach().to('cpu').contiguous() for n, t in subnetwork_state_dict(model, k).items()}
    cfg_keys = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode', 'first_conv', 'classifier')
    pretrained_cfg = {key: model.pretrained_cfg[key] for key in cfg_keys if key in model.pretrained_cfg}
    pretrained_cfg['fixed_input_size'] = True
    config = {
        'architecture': TIMM_ARCHITECTURE,
        'num_classes': args['num_classes'],
        'num_features': args['embed_dim'],
        'model_args': {n: v for n, v in args.items() if n != 'num_classes'},
        'pretrained_cfg': pretrained_cfg,
        'hydravit': {'heads': k, 'source_heads': model.num_heads},
    }
    atomic_write(out_dir / 'model.safetensors', lambda p: save_file(state_dict, str(p), metadata={'format': 'pt'}))
    atomic_write(out_dir / 'config.json', lambda p: p.write_text(json.dumps(config, indent=2) + '\n'))
    return out_dir


def _check_heads(model: HydraViT, k: int) -> None:
    current = model.active_heads
    model.set_heads(k)  # validates k (range, separate classifiers) with the model's own message
    model.set_heads(current)
