"""Turn one HydraViT subnetwork into a plain timm ``VisionTransformer`` and back.

The correspondence between a full-size tensor and its k-head part is "leading slice in every
dimension", except for the fused qkv projection whose rows hold q, k and v blocks of width
``embed_dim`` each: there the leading slice is taken inside each block.
"""
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models import VisionTransformer

from .checkpoint import atomic_write, check_finite, to_json
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


def model_vit_args(model: HydraViT) -> Dict:
    """kwargs of a timm ``VisionTransformer`` shaped like ``model`` now, at full width.

    Read from the modules, not from the constructor's arguments: timm's mutators (``set_input_size``,
    ``reset_classifier``, ``prune_intermediate_layers``) change the model after it is built. Raises ``ValueError``
    when the model holds something these kwargs cannot describe, so an export is exact or refused.
    """
    embed = model.patch_embed
    args = dict(
        model.vit_args,  # what no mutator changes: mlp_ratio, qkv_bias, class/register tokens, ...
        img_size=tuple(embed.img_size) if embed.img_size is not None else None,
        patch_size=tuple(embed.patch_size),
        in_chans=embed.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        # timm keeps the norm placement chosen at construction when the pooling changes later
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        num_heads=model.num_heads,
    )
    if isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity):
        args['final_norm'] = False  # pruned by prune_intermediate_layers(prune_norm=True)
    _check_args_describe(model, args)
    return args


def _check_args_describe(model: HydraViT, args: Dict) -> None:
    """Raise ``ValueError`` unless a full-width ``VisionTransformer(**args)`` has ``model``'s keys and shapes."""
    try:
        vit = VisionTransformer(**args, device='meta')
    except (TypeError, AssertionError, ValueError) as e:
        raise ValueError(f'this HydraViT cannot be described as a timm VisionTransformer: {e}') from e
    expected = {n: tuple(t.shape) for n, t in vit.state_dict().items()}
    actual = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if model.separate_classifiers:  # one classifier per k in the model, the k-th becomes the ViT's head
        expected = {n: v for n, v in expected.items() if not n.startswith('head.')}
        actual = {n: v for n, v in actual.items() if not n.startswith('head.')}
    differ = sorted(n for n in expected.keys() | actual.keys() if expected.get(n) != actual.get(n))
    if differ:
        shown = ', '.join(f'{n}: model {actual.get(n)} vs ViT {expected.get(n)}' for n in differ[:4])
        raise ValueError(f'this HydraViT does not match a timm VisionTransformer of its arguments ({shown}'
                         f'{", ..." if len(differ) > 4 else ""}); it cannot be exported')


def subnetwork_vit_args(model: HydraViT, k: int) -> Dict:
    """kwargs of a timm ``VisionTransformer`` with the shape of ``model``'s k-head subnetwork (as it is now:
    resolution, classifier and pooling included)."""
    _check_heads(model, k)
    return dict(model_vit_args(model), embed_dim=k * model.head_dim, num_heads=k)


def subnetwork_state_dict(model: HydraViT, k: int) -> Dict[str, torch.Tensor]:
    """State dict (views into ``model``'s tensors) of the k-head subnetwork, in timm ViT layout."""
    shapes = {n: t.shape for n, t in VisionTransformer(**subnetwork_vit_args(model, k), device='meta')
              .state_dict().items()}
    full = model.state_dict()
    if model.separate_classifiers:
        for suffix in ('weight', 'bias'):
            full[f'head.{suffix}'] = full[f'head.classifiers.{k}.{suffix}']
    return {n: leading_slice(n, full[n], s).reshape(s) for n, s in shapes.items()}


def finite_subnetwork_state_dict(model: HydraViT, k: int) -> Dict[str, torch.Tensor]:
    """``subnetwork_state_dict``, refused with ``NonFiniteWeightsError`` when a tensor holds NaN or inf: every
    export (timm folder, ONNX) goes through here, so none writes weights that cannot compute anything."""
    state_dict = subnetwork_state_dict(model, k)
    check_finite(state_dict, type(model).__name__, where=f'k={k} subnetwork')
    return state_dict


def export_subnetwork(model: HydraViT, k: int) -> VisionTransformer:
    """A standalone timm ``VisionTransformer`` equal to ``model`` run with ``k`` heads (``NonFiniteWeightsError``
    if its weights hold NaN or inf)."""
    ref = next(model.parameters())
    vit = VisionTransformer(**subnetwork_vit_args(model, k), device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        vit.load_state_dict({n: t.clone() for n, t in finite_subnetwork_state_dict(model, k).items()}, strict=True)
    vit.pretrained_cfg = _pretrained_cfg(model, vit)
    return vit.train(model.training)


def save_subnetwork(model: HydraViT, k: int, out_dir: Union[str, Path],
                    label_names: Optional[Sequence[str]] = None) -> Path:
    """Write the k-head subnetwork as ``config.json`` + ``model.safetensors`` (``NonFiniteWeightsError`` and
    nothing written if its weights hold NaN or inf).

    The folder loads with stock timm: ``timm.create_model('local-dir:OUT_DIR', pretrained=True)``. ``label_names``
    (the class names in label order, e.g. those the checkpoint records) are written as timm's ``label_names``, which
    timm puts in ``model.pretrained_cfg['label_names']``: what label i means, whichever reader labels the data.
    """
    out_dir = Path(out_dir)
    args = subnetwork_vit_args(model, k)
    check_label_names(label_names, args['num_classes'])
    state_dict = {n: t.detach().to('cpu').contiguous() for n, t in finite_subnetwork_state_dict(model, k).items()}
    out_dir.mkdir(parents=True, exist_ok=True)  # after the checks: a refused export leaves no folder behind
    cfg_keys = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode', 'first_conv', 'classifier')
    full_cfg = _pretrained_cfg(model)
    pretrained_cfg = {key: full_cfg[key] for key in cfg_keys if key in full_cfg}
    pretrained_cfg['fixed_input_size'] = True
    config = {
        'architecture': TIMM_ARCHITECTURE,
        'num_classes': args['num_classes'],
        'num_features': args['embed_dim'],
        'model_args': {n: v for n, v in args.items() if n != 'num_classes'},
        'pretrained_cfg': pretrained_cfg,
        'hydravit': {'heads': k, 'source_heads': model.num_heads},
    }
    if label_names is not None:
        config['label_names'] = [str(name) for name in label_names]
    atomic_write(out_dir / 'model.safetensors', lambda p: save_file(state_dict, str(p), metadata={'format': 'pt'}))
    atomic_write(out_dir / 'config.json', lambda p: p.write_text(to_json(config, indent=2) + '\n'))
    return out_dir


def check_label_names(label_names: Optional[Sequence[str]], num_classes: int) -> None:
    """Raise ``ValueError`` unless ``label_names`` (or None) names each of ``num_classes`` labels once."""
    if label_names is None:
        return
    if len(label_names) != num_classes or len(set(label_names)) != len(label_names):
        raise ValueError(f'label names must name each of the {num_classes} classes once, got {len(label_names)} '
                         f'({len(set(label_names))} distinct)')


def _pretrained_cfg(model: HydraViT, vit: Optional[VisionTransformer] = None) -> Dict:
    """The model's pretrained_cfg with the input size it runs at now (``set_input_size`` leaves the cfg as built,
    and data configs resolved from an exported model must feed it the resolution it was exported at)."""
    cfg = dict(model.pretrained_cfg)
    img_size = (vit or model).patch_embed.img_size
    if img_size is not None:
        cfg['input_size'] = (model.patch_embed.proj.in_channels, *img_size)
    return cfg


def _check_heads(model: HydraViT, k: int) -> None:
    current = model.active_heads
    model.set_heads(k)  # validates k (range, separate classifiers) with the model's own message
    model.set_heads(current)
