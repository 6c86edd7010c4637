"""Building what a run needs from its arguments: model, initial weights, device, loss, AMP, learning rate."""
import argparse
import logging
import os
from contextlib import nullcontext
from functools import partial
from typing import Dict, List, Optional, Sequence

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm import utils
from timm.layers import set_fast_norm
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import VisionTransformer
from torch.nn.parallel import DistributedDataParallel

from .. import model as _model  # noqa: F401  registers the hydravit models with timm
from ..checkpoint import check_state_dict_matches, extract_state_dict, load_checkpoint_file, resample_pos_embed
from ..classes import dataset_class_to_idx, recorded_class_names
from ..cli import resolve_heads
from ..export import leading_slice, subnetwork_vit_args
from .config import ConfigError
from .data import mixup_args

_logger = logging.getLogger('train')


def create_train_model(args: argparse.Namespace) -> nn.Module:
    if not timm.is_model(args.model):
        raise ConfigError(f'--model: unknown model {args.model!r}')
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    kwargs = dict(num_classes=args.num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                  global_pool=args.gp, in_chans=in_chans, **args.model_kwargs)
    if args.img_size is not None:
        kwargs['img_size'] = args.img_size
    if args.drop_connect is not None and args.drop_path is None:
        kwargs['drop_path_rate'] = args.drop_connect
    try:
        model = timm.create_model(args.model, **{k: v for k, v in kwargs.items() if v is not None})
    except (TypeError, ValueError) as e:
        raise ConfigError(f'--model {args.model}: cannot build it with these arguments: {e}') from e
    if not hasattr(model, 'set_heads'):
        raise ConfigError(f'--model: {args.model} is not a HydraViT model (it has no set_heads)')
    if args.head_init_scale is not None or args.head_init_bias is not None:
        for m in model.head.modules():
            if isinstance(m, nn.Linear):
                with torch.no_grad():
                    if args.head_init_scale is not None:
                        m.weight.mul_(args.head_init_scale)
                        m.bias.mul_(args.head_init_scale)
                    if args.head_init_bias is not None:
                        m.bias.fill_(args.head_init_bias)
    return model


def resolve_train_heads(args: argparse.Namespace, model: nn.Module, checkpoint: Optional[dict]) -> List[int]:
    """--heads checked against the model (range, duplicates, separate classifiers), or the default set."""
    try:
        heads = resolve_heads(args, model, checkpoint)
    except ValueError as e:
        raise ConfigError(e if str(e).startswith('--heads') else f'--heads: {e}') from e
    return heads


def _split_classifier(state_dict: Dict[str, torch.Tensor], model: nn.Module, source: str) -> Dict[str, torch.Tensor]:
    """Drop classifier tensors made for another number of classes (fine-tuning keeps a fresh head)."""
    expected = model.state_dict()
    dropped = [n for n, t in state_dict.items()
               if n.startswith('head.') and n in expected and expected[n].shape[0] != t.shape[0]]
    if dropped:
        _logger.warning(f'{source}: classifier shape differs from --num-classes, keeping a fresh head ({dropped})')
    return {n: t for n, t in state_dict.items() if n not in dropped}


def load_initial_checkpoint(model: nn.Module, path: str, init_slices: bool,
                            weights: str = 'auto') -> Optional[List[str]]:
    """Full-size weights strictly (classifier excepted), or with ``init_slices`` a narrower ViT into the leading
    slices of every tensor (same head_dim: e.g. DeiT-Tiny, 3 heads x 64, into hydravit_dyn_patch16_224).

    ``weights``: which weights of a training checkpoint: ``auto`` takes the EMA when the checkpoint holds one, as
    timm's ``load_checkpoint`` (and so timm's and the original HydraViT code's ``--initial-checkpoint``) does, else
    the model's; ``ema`` requires the EMA; ``model`` takes the raw weights. One log line says which were taken.

    A checkpoint trained at another resolution has its position embedding resampled to the model's patch grid
    (one log line says so), as timm does for pretrained ViTs; rows are never copied between grids.

    Returns the class names the checkpoint records (hydravit.train, hydravit.convert) when its classifier was loaded,
    else None: ``align_classifier`` then maps its rows onto this run's classes by name.
    """
    if not os.path.isfile(path):
        raise ConfigError(f'--initial-checkpoint: file not found: {path}')
    try:
        checkpoint = load_checkpoint_file(path)
    except ValueError as e:
        raise ConfigError(f'--initial-checkpoint: {e}') from e
    has_ema = isinstance(checkpoint, dict) and any(checkpoint.get(k) is not None
                                                   for k in ('state_dict_ema', 'model_ema'))
    if weights == 'ema' and not has_ema:
        raise ConfigError(f'--initial-checkpoint-weights ema: {path} holds no EMA weights (state_dict_ema)')
    if weights == 'model' and has_ema and not any(checkpoint.get(k) is not None for k in ('state_dict', 'model')):
        raise ConfigError(f'--initial-checkpoint-weights model: {path} holds only EMA weights (state_dict_ema); '
                          f'use --initial-checkpoint-weights ema or auto')
    use_ema = has_ema and weights != 'model'
    try:
        state_dict = extract_state_dict(checkpoint, use_ema, source=path)
        state_dict, resampled = resample_pos_embed(model, state_dict, source=path)
    except (ValueError, KeyError) as e:
        raise ConfigError(f'--initial-checkpoint: {e}') from e
    state_dict = _split_classifier(state_dict, model, path)
    head_loaded = any(n.startswith('head.') for n in state_dict)
    if init_slices:
        _load_leading_slices(model, state_dict, path)
    else:
        _load_full_size(model, state_dict, path)
    if resampled:
        _logger.info(resampled)
    _logger.info(f'--initial-checkpoint: loaded the {"EMA" if use_ema else "model"} weights of {path} '
                 f'(--initial-checkpoint-weights {weights})')
    return recorded_class_names(checkpoint) if head_loaded else None


def align_classifier(model: nn.Module, initial: Sequence[str], names: Optional[Sequence[str]], path: str) -> None:
    """Put the classifier rows that ``--initial-checkpoint`` trained for class ``initial[i]`` where this run's data
    labels that class (``names``, in label order): a fine-tune on the same classes in another order, or on an
    overlapping set, keeps what each row means. Rows of classes the checkpoint did not have keep their fresh
    initialisation (one warning line names them). Nothing changes when the orders agree or the data has no names."""
    if names is None or list(initial) == list(names):
        return
    if len(initial) != len(names):  # only the same count loads the classifier (_split_classifier)
        return
    classifiers = _classifier_linears(model.head)
    new = [n for n in names if n not in initial]
    with torch.no_grad():
        for linear in classifiers:
            old_weight, old_bias = linear.weight.detach().clone(), linear.bias.detach().clone()
            for label, name in enumerate(names):
                if name in initial:
                    linear.weight[label].copy_(old_weight[initial.index(name)])
                    linear.bias[label].copy_(old_bias[initial.index(name)])
                else:
                    nn.init.trunc_normal_(linear.weight[label], std=.02)
                    linear.bias[label].zero_()
    moved = sum(1 for label, name in enumerate(names) if name in initial and initial.index(name) != label)
    _logger.info(f'--initial-checkpoint: classifier rows mapped to this data\'s classes by name ({moved} moved)')
    if new:
        _logger.warning(f'--initial-checkpoint: {path} has no classifier rows for {len(new)} class(es) of this data '
                        f'({", ".join(new[:8])}{", ..." if len(new) > 8 else ""}); they start from a fresh '
                        f'initialisation')


def _classifier_linears(head: nn.Module) -> List[nn.Module]:
    """The linear layer(s) of a HydraViT classifier: the one head, or each of the separate classifiers."""
    return [m for m in head.modules() if isinstance(m, nn.Linear)]


def _load_full_size(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    kept = dict(state_dict)
    for n, fresh in model.state_dict().items():  # a dropped classifier keeps its fresh init
        if n.startswith('head.') and n not in kept:
            kept[n] = fresh
    try:
        check_state_dict_matches(model, kept, source=path)
    except ValueError as e:
        raise ConfigError(f'--initial-checkpoint: {e}\n(for a narrower ViT such as DeiT-Tiny add --init-slices)'
                          ) from e
    model.load_state_dict(kept, strict=True)


def _load_leading_slices(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    missing = sorted(n for n in expected if n not in state_dict and not n.startswith('head.'))
    unexpected = sorted(n for n in state_dict if n not in expected)
    if missing or unexpected:
        raise ConfigError(f'--initial-checkpoint: {path} is not a ViT of this layout; '
                          f'missing {missing[:8]}, unexpected {unexpected[:8]}')
    width = state_dict['cls_token'].shape[-1] if 'cls_token' in state_dict else state_dict['pos_embed'].shape[-1]
    if width % model.head_dim or not 0 < width <= model.embed_dim:
        raise ConfigError(f'--init-slices: embed dim {width} of {path} is not a multiple of head_dim '
                          f'{model.head_dim} up to {model.embed_dim}')
    _check_subnetwork_shapes(model, state_dict, width // model.head_dim, path)
    with torch.no_grad():
        for name, small in state_dict.items():
            target = leading_slice(name, expected[name], small.shape)
            target.copy_(small.reshape(target.shape))
    _logger.info(f'Initialized the leading {width} channels ({width // model.head_dim} heads) from {path}')


def _check_subnetwork_shapes(model: nn.Module, state_dict: Dict[str, torch.Tensor], k: int, path: str) -> None:
    """Every tensor must have exactly the shape of the model's k-head subnetwork: only the width may be narrower
    (a different depth, patch grid or MLP ratio would land rows in the wrong places)."""
    try:
        shapes = {n: tuple(t.shape) for n, t in
                  VisionTransformer(**subnetwork_vit_args(model, k), device='meta').state_dict().items()}
    except ValueError as e:
        raise ConfigError(f'--init-slices: {e}') from e
    bad = [f'{n}: checkpoint {tuple(t.shape)} vs {k}-head subnetwork {shapes.get(n)}'
           for n, t in state_dict.items() if not n.startswith('head.classifiers.') and shapes.get(n) != tuple(t.shape)]
    if bad:
        raise ConfigError(f'--init-slices: {path} is not shaped like the {k}-head subnetwork: '
                          + ', '.join(bad[:4]) + (f', ... ({len(bad)} in all)' if len(bad) > 4 else ''))


def resolve_lr(args: argparse.Namespace) -> None:
    """timm's rule: --lr wins, else lr_base scaled by the global batch size (linear, or sqrt for adaptive opts)."""
    if args.lr is not None:  # as timm: an explicit --lr 0 is a learning rate of 0
        return
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    args.lr = args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)
    if utils.is_primary(args):
        _logger.info(f'Learning rate {args.lr:.3g} from lr_base {args.lr_base} and global batch size {global_batch} '
                     f'({scale} scaling)')


def create_train_loss(args: argparse.Namespace, device: torch.device) -> nn.Module:
    if mixup_args(args) is not None:
        train = BinaryCrossEntropy(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum,
                                   pos_weight=args.bce_pos_weight) if args.bce_loss else SoftTargetCrossEntropy()
    elif args.bce_loss:
        train = BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh,
                                   sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    elif args.smoothing:
        train = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train = nn.CrossEntropyLoss()
    return train.to(device)  # validation: plain cross-entropy in hydravit.evaluation


def create_amp(args: argparse.Namespace, device: torch.device):
    """(autocast context factory, loss scaler or None). GradScaler only for float16."""
    if not args.amp:
        return nullcontext, None
    dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    scaler = utils.NativeScaler(device=device.type) if dtype == torch.float16 else None
    if utils.is_primary(args):
        _logger.info(f'AMP: torch.autocast({device.type}, {args.amp_dtype}), GradScaler: {scaler is not None}')
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler


def check_device(args: argparse.Namespace) -> None:
    """``--device`` is a device torch knows, and CUDA is there when it is asked for."""
    if not args.device:
        return
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ConfigError(f'--device: {e}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'--device: {args.device} requested but CUDA is not available')


def setup_device(args: argparse.Namespace) -> torch.device:
    """CUDA if available else CPU; torchrun env -> process group (nccl on CUDA, gloo on CPU); per-rank seeds."""
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    args.prefetcher = not args.no_prefetcher
    device = utils.init_distributed_device(args)
    if args.distributed:
        _logger.info(f'Process {args.rank}/{args.world_size} on {device} '
                     f'({dist.get_backend()}; heads {"shared" if args.shared_heads else "per rank"})')
    elif utils.is_primary(args):
        _logger.info(f'Training with a single process on {device}')
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    utils.random_seed(args.seed, args.rank)  # per-rank augmentation / dropout streams
    if args.fast_norm:
        set_fast_norm()
    return device


def create_model_ema(args: argparse.Namespace, model: nn.Module) -> Optional[utils.ModelEmaV3]:
    if not args.model_ema:
        return None
    # timm's train.py EMA: it lerps the state_dict() values in place, which are HydraViT's own parameters.
    return utils.ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                            device='cpu' if args.model_ema_force_cpu else None)


def wrap_ddp(args: argparse.Namespace, model: nn.Module, device: torch.device) -> nn.Module:
    if not args.distributed:
        return model
    # separate classifiers: each step uses one of them, the others get no gradient
    ddp_kwargs = dict(find_unused_parameters=bool(getattr(model, 'separate_classifiers', None)))
    if args.no_ddp_bb:
        ddp_kwargs['broadcast_buffers'] = False
    return DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None, **ddp_kwargs)


def compile_model(args: argparse.Namespace, model: nn.Module, num_head_counts: int) -> nn.Module:
    """``--torchcompile BACKEND``: ``torch.compile`` after DDP, as timm's train.py does.

    The active width is an int attribute of the model, which dynamo specializes on and guards: the first step at a
    new k compiles a graph for that width, later steps at that k reuse it, and a k never runs another k's graph.
    Dynamo keeps at most ``recompile_limit`` graphs per function (8 by default) and runs the model uncompiled past
    that, so the limit is raised to two graphs per head count: one for each width, and room for the one dynamo adds
    for a width when the batch size changes (it then makes the batch dimension dynamic).
    """
    if not args.torchcompile:
        return model
    config = torch._dynamo.config
    name = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'  # torch < 2.6
    limit = max(getattr(config, name), 2 * num_head_counts)
    setattr(config, name, limit)
    if utils.is_primary(args):
        _logger.info(f'torch.compile: backend {args.torchcompile}, mode {args.torchcompile_mode or "default"}; one '
                     f'graph per head count (recompile limit {limit}), each compiled at its first step')
    return torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)


def check_dataset_classes(args: argparse.Namespace, dataset) -> None:
    num_dataset_classes = len(dataset_class_to_idx(dataset) or {})  # timm's readers and torchvision's datasets
    if num_dataset_classes > args.num_classes:
        raise ConfigError(f'--num-classes: the dataset has {num_dataset_classes} classes but the model '
                          f'{args.num_classes}; pass --num-classes {num_dataset_classes}')


def describe_step(args: argparse.Namespace) -> str:
    """One line on what a step trains, for the run's first log lines."""
    parts = [f'{args.subnets_per_step} subnetwork(s) per step'
             + (f' ({args.subnet_policy})' if args.subnets_per_step > 1 else '')]
    if args.inplace_kd:
        parts.append(f'in-place KD ({args.kd_chain}, alpha {args.kd_alpha}, tau {args.kd_temperature})')
    if args.teacher:
        parts.append(f'teacher {args.teacher} ({args.teacher_kd} KD from {args.teacher_checkpoint})')
    if args.full_warmup_epochs:
        parts.append(f'{args.full_warmup_epochs} full-width warm-up epoch(s)')
    return ', '.join(parts)
