"""Turn a trained ViT into a HydraViT whose first k heads work: importance-ordered heads, MLP units and channels.

A ViT computes the same function after three kinds of permutation applied consistently: in each block the order of
the attention heads (their q, k, v rows of ``qkv`` and the matching input columns of ``proj``), in each block the
order of the MLP hidden units (``fc1`` rows and bias, ``fc2`` columns), and one order of the residual-stream
channels for the whole network (patch-embedding outputs, class / register tokens, position table, every LayerNorm,
the input columns of ``qkv`` and ``fc1``, the output rows of ``proj`` and ``fc2``, the final norm, the classifier's
input). A HydraViT slice keeps the first k heads, the first ``k * head_dim`` channels and the first
``k * hidden / H`` MLP units of every block, so putting the most important ones first turns a trained ViT into a
starting point for every k (DynaBERT, NeurIPS'20, reorders heads and neurons the same way before width-adaptive
training; it keeps the hidden width, HydraViT does not).

Importance scores (``SCORES``), higher is kept longer:

* ``magnitude``: weight norms, no data (Once-for-All sorts channels by the L1 norm of their weights). A head: the L1
  norm of its q, k, v rows plus that of its ``proj`` columns; an MLP unit: its ``fc1`` row plus its ``fc2`` column;
  a channel: every weight row or column that reads or writes it (each tensor's norms divided by their mean, so that
  no tensor dominates by size).
* ``taylor``: first-order Taylor importance on calibration images (Molchanov et al. 2017; Michel et al., NeurIPS'19,
  "Are Sixteen Heads Really Better than One?"; DynaBERT's code): a mask of ones multiplies each head's output (the
  input of ``proj``), each MLP unit (the input of ``fc2``) and each residual channel (the input of every block and of
  the final norm); the score is ``|dL/dmask|`` summed over batches, with L the cross-entropy against the source's
  own predictions (so no class mapping between the images and the model is needed).

Sources: a timm ``VisionTransformer`` (``deit_small_patch16_224``, ``vit_base_patch16_224``, ...) or a HydraViT
(a run trained with ``--heads 12`` only is a plain ViT). The result is a checkpoint in timm's layout for the
registered ``hydravit_*`` model of the same geometry.
"""
import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import VisionTransformer
from timm.utils import ParseKwargs

from .checkpoint import (
    NonFiniteWeightsError,
    atomic_torch_save,
    check_model_finite,
    check_state_dict_matches,
    extract_state_dict,
    load_checkpoint_file,
    write_json,
)
from .classes import check_class_folders, dataset_class_to_idx, match_classes, recorded_class_names
from .export import leading_slice
from .model import HydraViT

__all__ = [
    'SCORES', 'Importance', 'check_convertible', 'convert_state_dict', 'grow_state_dict', 'importance',
    'magnitude_importance', 'orders_from', 'permute_state_dict', 'target_model_name', 'taylor_importance',
]

_logger = logging.getLogger(__name__)
SCORES = ('magnitude', 'taylor')
FULL_WIDTH_TOLERANCE = 1e-4  # max |logit difference|, fp32: the permutation must preserve the function


@dataclass
class Importance:
    """Scores per block and head ``(depth, H)``, per block and MLP unit ``(depth, hidden)``, per channel ``(D,)``."""

    heads: torch.Tensor
    mlp: torch.Tensor
    channels: torch.Tensor


@dataclass
class Orders:
    """Permutations, most important first: ``heads[b]``, ``mlp[b]`` per block, one ``channels`` for the network."""

    heads: List[torch.Tensor]
    mlp: List[torch.Tensor]
    channels: torch.Tensor


# --- geometry --------------------------------------------------------------------------------------
def check_convertible(vit: nn.Module) -> None:
    """Raise ``ValueError`` naming what a HydraViT cannot express: a non-ViT, qk-norm, layer scale, a pre-norm,
    attention pooling, an MLP norm, a gated MLP, or a width that does not split into heads."""
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f'not a timm VisionTransformer: {type(vit).__name__} cannot be sliced by heads')
    problems = []
    if not isinstance(vit.norm_pre, nn.Identity):
        problems.append('a pre-norm (norm_pre)')
    if getattr(vit, 'attn_pool', None) is not None:
        problems.append("attention pooling (global_pool='map')")
    for i, block in enumerate(vit.blocks):
        attn, mlp = block.attn, block.mlp
        if not isinstance(getattr(attn, 'q_norm', nn.Identity()), nn.Identity):
            problems.append(f'qk_norm (block {i})')
        if not isinstance(getattr(attn, 'norm', nn.Identity()), nn.Identity):
            problems.append(f'an attention output norm (block {i})')
        if not all(isinstance(getattr(block, n, nn.Identity()), nn.Identity) for n in ('ls1', 'ls2')):
            problems.append(f'layer scale (block {i})')
        if not hasattr(mlp, 'fc1') or not hasattr(mlp, 'fc2') or hasattr(mlp, 'fc1_g'):
            problems.append(f'an MLP other than fc1 -> act -> fc2 (block {i})')
        elif not isinstance(getattr(mlp, 'norm', nn.Identity()), nn.Identity):
            problems.append(f'an MLP norm (block {i})')
        if problems:
            break
    if problems:
        raise ValueError('HydraViT cannot express ' + ', '.join(problems))


def source_vit_args(vit: VisionTransformer) -> Dict:
    """The HydraViT kwargs of ``vit``'s geometry."""
    block = vit.blocks[0]
    return dict(
        img_size=tuple(vit.patch_embed.img_size), patch_size=tuple(vit.patch_embed.patch_size),
        in_chans=vit.patch_embed.proj.in_channels, num_classes=vit.num_classes, global_pool=vit.global_pool,
        embed_dim=vit.embed_dim, depth=len(vit.blocks), num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / vit.embed_dim, qkv_bias=block.attn.qkv.bias is not None,
        class_token=vit.cls_token is not None, no_embed_class=vit.no_embed_class,
        reg_tokens=vit.num_reg_tokens, fc_norm=not isinstance(vit.fc_norm, nn.Identity),
    )


def target_model_name(vit: VisionTransformer, num_heads: Optional[int] = None) -> str:
    """The registered ``hydravit_*`` model with ``vit``'s patch size, width, depth, heads and MLP ratio; with
    ``num_heads``, that many heads of ``vit``'s head width (the model ``grow_state_dict`` fills).

    Raises ``ValueError`` naming what differs from the closest registered one (same head count) when none fits.
    """
    src = source_vit_args(vit)
    if num_heads is not None:
        src.update(embed_dim=src['embed_dim'] // src['num_heads'] * num_heads, num_heads=num_heads)
    keys = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio')
    candidates = []
    for name in timm.list_models('hydravit_*'):
        target = timm.create_model(name, num_classes=1, device='meta')
        got = {k: v for k, v in source_vit_args(target).items() if k in keys}
        diff = [f'{k} {src[k]} vs {got[k]}' for k in keys if src[k] != got[k]]
        if not diff:
            return name
        candidates.append((len(diff), name, diff))
    _, name, diff = min(candidates)
    head_dim = src['embed_dim'] // src['num_heads']
    raise ValueError(f'no registered HydraViT has this geometry (head_dim {head_dim}); closest {name}: '
                     + ', '.join(diff))


# --- scores ----------------------------------------------------------------------------------------
def _balanced(norms: torch.Tensor) -> torch.Tensor:
    return norms / norms.mean().clamp_min(1e-12)


def magnitude_importance(state_dict: Dict[str, torch.Tensor], depth: int, num_heads: int) -> Importance:
    """Weight-norm scores from a timm-layout state dict (no data)."""
    sd = {n: t.detach().float().abs() for n, t in state_dict.items()}
    heads, mlp = [], []
    channels = torch.zeros(sd['patch_embed.proj.weight'].shape[0])

    def add(name: str, dim: int) -> None:
        t = sd.get(name)
        if t is not None:
            channels.add_(_balanced(t.movedim(dim, 0).flatten(1).sum(1) if t.dim() > 1 else t))

    for b in range(depth):
        p = f'blocks.{b}.'
        qkv, proj = sd[p + 'attn.qkv.weight'], sd[p + 'attn.proj.weight']
        heads.append(_balanced(qkv.unflatten(0, (3, num_heads, -1)).sum((0, 2, 3)))
                     + _balanced(proj.unflatten(1, (num_heads, -1)).sum((0, 2))))
        mlp.append(_balanced(sd[p + 'mlp.fc1.weight'].sum(1)) + _balanced(sd[p + 'mlp.fc2.weight'].sum(0)))
        for name, dim in (('attn.qkv.weight', 1), ('attn.proj.weight', 0), ('mlp.fc1.weight', 1),
                          ('mlp.fc2.weight', 0), ('norm1.weight', 0), ('norm2.weight', 0)):
            add(p + name, dim)
    for name, dim in (('patch_embed.proj.weight', 0), ('norm.weight', 0), ('fc_norm.weight', 0),
                      ('head.weight', 1)):
        add(name, dim)
    return Importance(torch.stack(heads), torch.stack(mlp), channels)


def taylor_importance(vit: VisionTransformer, batches: Sequence[torch.Tensor]) -> Importance:
    """First-order Taylor scores ``sum_batches |dL/dmask|`` of head, MLP-unit and channel masks (module doc).

    ``batches``: image tensors ``(B, C, H, W)`` on ``vit``'s device. The model's parameters get no gradient.
    """
    depth, num_heads = len(vit.blocks), vit.blocks[0].attn.num_heads
    device = next(vit.parameters()).device
    head_mask = torch.ones(depth, num_heads, device=device, requires_grad=True)
    mlp_mask = torch.ones(depth, vit.blocks[0].mlp.fc1.out_features, device=device, requires_grad=True)
    channel_mask = torch.ones(vit.embed_dim, device=device, requires_grad=True)
    hooks = []
    for b, block in enumerate(vit.blocks):
        hooks.append(block.attn.proj.register_forward_pre_hook(_scale_heads(head_mask, b, num_heads)))
        hooks.append(block.mlp.fc2.register_forward_pre_hook(_scale_last(lambda b=b: mlp_mask[b])))
        hooks.append(block.register_forward_pre_hook(_scale_last(lambda: channel_mask)))
    hooks.append(vit.norm.register_forward_pre_hook(_scale_last(lambda: channel_mask)))
    scores = [torch.zeros_like(m) for m in (head_mask, mlp_mask, channel_mask)]
    was_training, requires = vit.training, [p.requires_grad for p in vit.parameters()]
    vit.eval().requires_grad_(False)
    try:
        for images in batches:
            logits = vit(images)
            loss = F.cross_entropy(logits, logits.detach().argmax(1))
            grads = torch.autograd.grad(loss, (head_mask, mlp_mask, channel_mask))
            for total, grad in zip(scores, grads, strict=True):
                total.add_(grad.abs())
    finally:
        for hook in hooks:
            hook.remove()
        vit.train(was_training)
        for p, flag in zip(vit.parameters(), requires, strict=True):
            p.requires_grad_(flag)
    return Importance(*(s.cpu() for s in scores))


def _scale_heads(mask: torch.Tensor, block: int, num_heads: int) -> Callable:
    def hook(module, args):
        x = args[0]
        return (x * mask[block].repeat_interleave(x.shape[-1] // num_heads),) + tuple(args[1:])
    return hook


def _scale_last(mask: Callable[[], torch.Tensor]) -> Callable:
    def hook(module, args):
        return (args[0] * mask(),) + tuple(args[1:])
    return hook


def importance(score: str, vit: VisionTransformer, batches: Sequence[torch.Tensor]) -> Importance:
    """Scores of ``score`` (one of ``SCORES``) for ``vit``; ``batches`` is only read by data-driven scores."""
    if score == 'magnitude':
        return magnitude_importance(vit.state_dict(), len(vit.blocks), vit.blocks[0].attn.num_heads)
    if score == 'taylor':
        return taylor_importance(vit, batches)
    raise ValueError(f'unknown importance score {score!r}; choose from {SCORES}')


def orders_from(scores: Importance, channels: bool = True) -> Orders:
    """Descending, stable (ties keep the original order): the same scores always give the same permutation.

    ``channels=False`` keeps the residual channels in their original order (heads and MLP units still sorted).
    """
    def order(t: torch.Tensor) -> torch.Tensor:
        return torch.sort(t, descending=True, stable=True).indices
    channel_order = order(scores.channels) if channels else torch.arange(len(scores.channels))
    return Orders([order(h) for h in scores.heads], [order(m) for m in scores.mlp], channel_order)


# --- permuting ---------------------------------------------------------------------------------------
def permute_state_dict(state_dict: Dict[str, torch.Tensor], orders: Orders, num_heads: int) -> Dict[str, torch.Tensor]:
    """A new timm-layout state dict computing the same function, with heads, MLP units and channels in ``orders``.

    Raises ``ValueError`` for a key this function does not know how to permute (so no tensor is left behind).
    """
    ch = orders.channels
    out = {}
    for name, t in state_dict.items():
        out[name] = _permute_one(name, t, orders, ch, num_heads)
    return out


def _permute_one(name: str, t: torch.Tensor, orders: Orders, ch: torch.Tensor, num_heads: int) -> torch.Tensor:
    if name.startswith('blocks.'):
        b, rest = int(name.split('.')[1]), name.split('.', 2)[2]
        heads, mlp = orders.heads[b], orders.mlp[b]
        if rest == 'attn.qkv.weight':
            return _rows_by_head(t, heads, num_heads)[:, ch]
        if rest == 'attn.qkv.bias':
            return _rows_by_head(t, heads, num_heads)
        if rest == 'attn.proj.weight':
            return t[ch][:, _expand_heads(heads, t.shape[1] // num_heads)]
        if rest == 'mlp.fc1.weight':
            return t[mlp][:, ch]
        if rest == 'mlp.fc1.bias':
            return t[mlp]
        if rest == 'mlp.fc2.weight':
            return t[ch][:, mlp]
        if rest in ('attn.proj.bias', 'mlp.fc2.bias', 'norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias'):
            return t[ch]
    elif name in ('patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias',
                  'fc_norm.weight', 'fc_norm.bias'):
        return t[ch]
    elif name in ('cls_token', 'reg_token', 'pos_embed'):
        return t[..., ch]
    elif name == 'head.weight':
        return t[:, ch]
    elif name == 'head.bias':
        return t
    raise ValueError(f'{name}: not a tensor of a plain ViT, cannot be permuted')


def _expand_heads(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head order -> order of the ``H * head_dim`` rows (or columns) those heads own."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _rows_by_head(t: torch.Tensor, heads: torch.Tensor, num_heads: int) -> torch.Tensor:
    # timm's fused layout: rows (q|k|v, head, head_dim); permute the head axis of all three alike
    blocks = t.unflatten(0, (3, num_heads, -1))
    return blocks[:, heads].flatten(0, 2)


def convert_state_dict(vit: VisionTransformer, score: str, batches: Sequence[torch.Tensor],
                       channels: bool = True) -> tuple:
    """``(state_dict, orders)``: ``vit``'s weights permuted by the importance ``score``, in timm's layout
    (``channels=False``: heads and MLP units only, residual channels kept in place)."""
    check_convertible(vit)
    orders = orders_from(importance(score, vit, batches), channels=channels)
    state_dict = {n: t.detach().cpu() for n, t in vit.state_dict().items()}
    return permute_state_dict(state_dict, orders, vit.blocks[0].attn.num_heads), orders


def grow_state_dict(state_dict: Dict[str, torch.Tensor], model: HydraViT) -> Dict[str, torch.Tensor]:
    """``model``'s state dict with the ViT ``state_dict`` (timm layout, fewer heads of ``model``'s head width, same
    depth, MLP ratio and tokens) written into the leading part of every tensor: ``model`` run with the ViT's head
    count computes what the ViT does; the other heads, channels and MLP units keep ``model``'s initialization.

    Progressive growing, the reverse of shrinking a ViT: a DeiT-Small (6 heads of 64) fills the first 6 heads of a
    12-head HydraViT-Base, to be trained with the sandwich. Raises ``ValueError`` when the keys differ or a tensor
    does not fit inside the model's; that the two agree in everything but width (image size, classes, tokens) is the
    caller's to ensure, as ``main`` does by building ``model`` from the source's kwargs.
    """
    full = {n: t.detach().clone() for n, t in model.state_dict().items()}
    differ = sorted(full.keys() ^ state_dict.keys())
    if differ:
        raise ValueError(f'the ViT and the HydraViT to grow it into have different keys: {", ".join(differ[:4])}'
                         f'{", ..." if len(differ) > 4 else ""}')
    for name, small in state_dict.items():
        part = leading_slice(name, full[name], small.shape)
        part.copy_(small.reshape(part.shape))
    return full


# --- command line ------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog='python -m hydravit.convert', description=__doc__.split('\n\n')[0],
        epilog='Example: python -m hydravit.convert data/digits --model hydravit_dyn_patch4_32 '
               '--checkpoint output/k12/model_best.pth.tar -o converted.pth --report')
    parser.add_argument('data', metavar='DATA', help='image folder; its train split gives the calibration images')
    parser.add_argument('--model', '-m', required=True, help='timm ViT or registered HydraViT of the checkpoint')
    parser.add_argument('--checkpoint', required=True, help='weights: .pth / .pth.tar, .safetensors or local-dir:DIR')
    parser.add_argument('--use-ema', action='store_true', help='the EMA weights of a timm training checkpoint')
    parser.add_argument('-o', '--output', required=True, help='converted checkpoint to write (timm layout)')
    parser.add_argument('--num-classes', type=int, default=None, help='classifier size (default: the checkpoint\'s)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='create_model kwargs of --model for the checkpoint (e.g. embed_dim=96 num_heads=6)')
    parser.add_argument('--grow-heads', type=int, default=None, metavar='N',
                        help='a HydraViT of N heads of the source\'s head width: the converted source fills its first '
                             'heads, channels and MLP units, the rest are newly initialized (--seed); train it next')
    parser.add_argument('--score', choices=SCORES, default='magnitude',
                        help='importance score (default: magnitude: needs no data, and within one std of taylor '
                             'zero-shot on the digits, docs/training.md)')
    parser.add_argument('--channels', choices=('score', 'original'), default='score',
                        help='residual channels: sorted by the score (default) or kept in their original order')
    parser.add_argument('--calib-images', type=int, default=256, help='calibration images (default: 256)')
    parser.add_argument('-b', '--batch-size', type=int, default=32)
    parser.add_argument('--seed', type=int, default=0,
                        help='which calibration images are drawn (and, with --grow-heads, the new weights)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--report', action='store_true',
                        help='top-1 per k on the validation split: converted vs the source sliced in its own order')
    parser.add_argument('--heads', type=int, nargs='+', default=None, help='head counts of --report (default: all)')
    parser.add_argument('--report-file', default='', metavar='FILE',
                        help='with --report: also write its rows as JSON (order -> {k: top-1})')
    args = parser.parse_args(argv)
    if args.report_file and not args.report:
        parser.error('--report-file: only with --report')
    from .evaluation.common import UsageError, check_output_file  # the tools' own check of files written last
    try:
        for flag, path in (('-o/--output', args.output), ('--report-file', args.report_file)):
            if path:
                check_output_file(path, flag)
    except UsageError as e:
        parser.error(str(e))
    for flag in ('calib_images', 'batch_size'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be >= 1')
    if args.num_classes is not None and args.num_classes < 1:
        parser.error('--num-classes must be >= 1')
    if not args.checkpoint.startswith('local-dir:') and not Path(args.checkpoint).is_file():
        parser.error(f'--checkpoint: file not found: {args.checkpoint}')
    if not Path(args.data).is_dir():
        parser.error(f'DATA: not a folder: {args.data}')
    if not timm.is_model(args.model):
        parser.error(f'--model: unknown model {args.model!r}')
    if 'in_chans' in args.model_kwargs:  # DATA's images are read as RGB and the target model takes 3 channels
        parser.error('--model-kwargs: in_chans is not supported (calibration images are RGB)')
    return args


def load_source(args: argparse.Namespace) -> VisionTransformer:
    """The source ViT with its weights (strict), on the CPU, in eval mode; a HydraViT comes back as a timm ViT."""
    if args.checkpoint.startswith('local-dir:'):
        kwargs = dict(args.model_kwargs, **({} if args.num_classes is None else {'num_classes': args.num_classes}))
        model = timm.create_model(args.checkpoint, pretrained=True, **kwargs).eval()
        check_model_finite(model, f'--checkpoint: {args.checkpoint}')  # timm read it: the one check, by hand
        return model
    try:
        state_dict = extract_state_dict(load_checkpoint_file(args.checkpoint), use_ema=args.use_ema,
                                        source=args.checkpoint)
    except NonFiniteWeightsError as e:
        raise NonFiniteWeightsError(f'--checkpoint: {e}') from e
    num_classes = args.num_classes or (state_dict['head.weight'].shape[0] if 'head.weight' in state_dict else 0)
    try:
        model = timm.create_model(args.model, **dict(args.model_kwargs, num_classes=num_classes))
    except TypeError as e:  # a keyword --model does not take
        raise ValueError(f'--model-kwargs: {e}') from e
    # the calibration images follow the model's data config: at the image size the kwargs gave, not the default
    if model.patch_embed.img_size is not None:
        model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, *model.patch_embed.img_size))
    check_state_dict_matches(model, state_dict, source=f'--checkpoint {args.checkpoint} (--model {args.model})')
    model.load_state_dict(state_dict, strict=True)
    if isinstance(model, HydraViT):  # its own layout already; a plain ViT makes the permutation code simpler
        vit = VisionTransformer(**model.vit_args)
        vit.load_state_dict(model.state_dict(), strict=True)
        vit.pretrained_cfg = dict(model.pretrained_cfg)
        model = vit
    return model.eval()


def source_class_names(args: argparse.Namespace) -> Optional[List[str]]:
    """The class names the source checkpoint records (a hydravit.train run, or an earlier conversion), else None.

    Read apart from ``load_source`` (the checkpoint is read twice) so that the source's loading stays one function.
    """
    if args.checkpoint.startswith('local-dir:') or Path(args.checkpoint).suffix == '.safetensors':
        return None  # neither format records class names
    return recorded_class_names(load_checkpoint_file(args.checkpoint))


def labelled_dataset(args: argparse.Namespace, split: str, class_names: Optional[List[str]] = None):
    """timm's folder dataset of DATA's ``split`` (DATA itself without that folder), labelled by ``class_names``
    (the source's classes, matched by folder name) when given, else by the folders' sorted order.

    Raises ``ValueError`` naming DATA for no images, images outside class folders, or a class the source was
    not trained on.
    """
    from timm.data import create_dataset
    root = Path(args.data) / split if (Path(args.data) / split).is_dir() else Path(args.data)
    try:
        dataset = create_dataset('', root=str(root), is_training=False)
    except RuntimeError as e:  # timm: "Found 0 images in subfolders of ROOT. Supported image extensions are ..."
        raise ValueError(f'DATA: {e}') from e
    if len(dataset) == 0:
        raise ValueError(f'DATA: no images in {root}')
    try:
        check_class_folders(dataset)
        found = dataset_class_to_idx(dataset)
        mapping = match_classes(class_names, found, f'DATA ({root})')[0] if class_names else None
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith('DATA') else f'DATA: {e}') from e
    return dataset if mapping is None else create_dataset('', root=str(root), is_training=False, class_map=mapping)


def calibration_batches(args: argparse.Namespace, model: nn.Module, split: str, count: Optional[int],
                        class_names: Optional[List[str]] = None) -> List:
    """``(images, targets)`` batches of DATA's ``split`` (``count`` images drawn with ``--seed``, or all), labelled
    by ``class_names`` (see ``labelled_dataset``)."""
    from timm.data import create_transform, resolve_data_config
    dataset = labelled_dataset(args, split, class_names)
    cfg = resolve_data_config({}, model=model)
    dataset.transform = create_transform(cfg['input_size'], interpolation=cfg['interpolation'], mean=cfg['mean'],
                                         std=cfg['std'], crop_pct=cfg['crop_pct'], crop_mode=cfg.get('crop_mode'))
    if count is not None and count < len(dataset):
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:count]
        dataset = torch.utils.data.Subset(dataset, indices.tolist())
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    return [(x.to(args.device), y.to(args.device)) for x, y in loader]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    started = time.perf_counter()
    try:
        vit = load_source(args)
        check_convertible(vit)
        source_heads = vit.blocks[0].attn.num_heads
        if args.grow_heads is not None and args.grow_heads <= source_heads:
            raise ValueError(f'--grow-heads: {args.grow_heads} must exceed the source\'s {source_heads} heads')
        target = target_model_name(vit, args.grow_heads)
        heads = args.grow_heads or source_heads
        if args.report and args.heads and not all(1 <= k <= heads for k in args.heads):
            raise ValueError(f'--heads: each in 1..{heads} (the converted model\'s heads), got {args.heads}')
        class_names = source_class_names(args)
        if args.report:  # its labels must mean the source's classes: checked before any work
            labelled_dataset(args, report_split(args), class_names)
        vit = vit.to(args.device)
        batches = calibration_batches(args, vit, 'train', args.calib_images)  # labels unused: no class names
    except (ValueError, KeyError) as e:  # KeyError: --use-ema on a checkpoint without EMA weights
        print(f'error: {e.args[0] if isinstance(e, KeyError) else e}', file=sys.stderr)
        return 2
    _logger.info(f'{args.model}: {len(batches)} calibration batches ({args.calib_images} images max), '
                 f'score {args.score} [{time.perf_counter() - started:.0f}s]')
    state_dict, _ = convert_state_dict(vit, args.score, [x for x, _ in batches], channels=args.channels == 'score')
    torch.manual_seed(args.seed)  # the grown part's initialization
    model = timm.create_model(target, **target_kwargs(vit)).to(args.device).eval()
    if args.grow_heads is not None:
        state_dict = grow_state_dict(state_dict, model)
        _logger.info(f'grown: the first {source_heads} of {args.grow_heads} heads hold the converted source')
    model.load_state_dict(state_dict, strict=True)
    diff = full_width_difference(vit, model, [x for x, _ in batches], source_heads)
    _logger.info(f'max |logit difference| against the source at its {source_heads} heads: {diff:.2e} '
                 f'(tolerance {FULL_WIDTH_TOLERANCE:g})')
    if not diff <= FULL_WIDTH_TOLERANCE:
        print(f'error: the converted model differs from the source at its {source_heads} heads (max |diff| '
              f'{diff:.2e}); nothing written', file=sys.stderr)
        return 1
    meta = {'source_model': args.model, 'source_checkpoint': args.checkpoint, 'score': args.score,
            'channels': args.channels,
            'calib_images': args.calib_images, 'seed': args.seed, 'model_kwargs': target_kwargs(vit),
            'grow_heads': args.grow_heads}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    converted = {'arch': target, 'state_dict': state_dict, 'hydravit_convert': meta}
    if class_names:  # the source's classes, so that every tool labels data by them
        converted['class_names'] = class_names
    atomic_torch_save(converted, args.output)
    _logger.info(f'wrote {args.output}: {target}, load with --model {target} --checkpoint {args.output}')
    if args.report:
        rows = report_zero_shot(args, vit, model, target, class_names)
        if args.report_file:
            report = {'score': args.score, 'channels': args.channels, 'seed': args.seed, 'top1': rows}
            write_json(args.report_file, report, indent=1)  # a NaN top-1 becomes null, never a bare NaN
    return 0


def target_kwargs(vit: VisionTransformer) -> Dict:
    """kwargs that give the registered target the source's classifier, pooling, tokens and input size."""
    src = source_vit_args(vit)
    return {k: src[k] for k in ('img_size', 'num_classes', 'global_pool', 'qkv_bias', 'class_token',
                                'no_embed_class', 'reg_tokens', 'fc_norm')}


@torch.no_grad()
def full_width_difference(vit: nn.Module, model: HydraViT, batches: Sequence[torch.Tensor],
                          heads: Optional[int] = None) -> float:
    """Max |logit difference| of ``model`` run with ``heads`` (default: all) against ``vit``."""
    model.set_heads(model.num_heads if heads is None else heads)
    try:
        return max(float((vit(x) - model(x)).abs().max()) for x in batches)
    finally:
        model.set_heads(model.num_heads)


def report_split(args: argparse.Namespace) -> str:
    """The split ``--report`` evaluates: DATA's validation (or val) folder, else train."""
    return next((s for s in ('validation', 'val') if (Path(args.data) / s).is_dir()), 'train')


def report_zero_shot(args: argparse.Namespace, vit: VisionTransformer, converted: HydraViT,
                     target: str, class_names: Optional[List[str]] = None) -> Dict[str, Dict[int, float]]:
    """Top-1 (%) per k on the validation split, printed and returned: the converted model against the source sliced
    in its original order (``{'original order': {k: top1}, 'converted': {k: top1}}``). Labels are the source's
    ``class_names`` matched by folder name when it records them, else the folders' sorted order."""
    from .evaluation.accuracy import evaluate_heads
    split = report_split(args)
    batches = calibration_batches(args, vit, split, None, class_names)
    width = {'embed_dim': vit.embed_dim, 'num_heads': vit.blocks[0].attn.num_heads}  # the source's, when grown
    original = timm.create_model(target, **target_kwargs(vit), **width).to(args.device).eval()
    original.load_state_dict(vit.state_dict(), strict=True)
    heads = args.heads or list(range(1, converted.num_heads + 1))
    rows = {}
    for name, model in (('original order', original), ('converted', converted)):
        ks = [k for k in heads if k <= model.num_heads]  # a grown model has heads the source has not
        rows[name] = {r['heads']: r['top1'] for r in evaluate_heads(model, batches, ks, torch.device(args.device))}
    print(f'zero-shot top-1 (%) on {split} ({sum(len(y) for _, y in batches)} images), score {args.score}, '
          f'channels {args.channels}')
    print('k'.rjust(16) + ''.join(f'{k:>8}' for k in heads))
    for name, row in rows.items():
        print(name.rjust(16) + ''.join(f'{row[k]:8.2f}' if k in row else ' ' * 8 for k in heads))
    return rows


if __name__ == '__main__':
    sys.exit(main())
