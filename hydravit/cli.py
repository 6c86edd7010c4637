"""Argument plumbing shared by every entry point: head lists, model building, checkpoint loading."""
import argparse
import numbers
import sys
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

import timm
import torch
from timm.utils import ParseKwargs

from . import model as _model  # noqa: F401  registers the hydravit models with timm
from .checkpoint import (
    NonFiniteWeightsError,
    check_state_dict_matches,
    extract_state_dict,
    load_checkpoint_file,
    resample_pos_embed,
)

DEFAULT_EVAL_HEADS = (3, 6, 12)
DEFAULT_MODEL = 'hydravit_dyn_patch16_224'


def parse_heads(values: Iterable, num_heads: int, flag: str = '--heads') -> List[int]:
    """Validate a list of head counts: ints in 1..num_heads, no duplicates, at least one."""
    values = list(values)
    if not values:
        raise ValueError(f'{flag}: give at least one head count in 1..{num_heads}')
    bad = [v for v in values
           if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not 1 <= v <= num_heads]
    if bad:
        raise ValueError(f'{flag}: head counts must be ints in 1..{num_heads}, got {bad}')
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f'{flag}: duplicate head counts {dupes}')
    return [int(v) for v in values]


def recorded_heads(checkpoint: Optional[dict]) -> Optional[list]:
    """The head counts a checkpoint records it was trained on, unchecked, else None.

    ``heads`` (written by hydravit.train), else ``args.heads``: the official HydraViT code saves timm train.py's
    ``args`` (an argparse.Namespace; a plain dict in some copies) and nothing else about the heads.
    """
    if not isinstance(checkpoint, dict):
        return None
    heads = checkpoint.get('heads')
    if heads is None:
        args = checkpoint.get('args')
        heads = args.get('heads') if isinstance(args, dict) else getattr(args, 'heads', None)
    if isinstance(heads, numbers.Integral) and not isinstance(heads, bool):
        heads = [heads]
    return list(heads) if isinstance(heads, (list, tuple)) and heads else None


def checked_recorded_heads(checkpoint: Optional[dict], num_heads: int, source: str = 'the checkpoint'
                           ) -> Optional[List[int]]:
    """``recorded_heads`` checked against a ``num_heads``-head model, else None (none recorded).

    Raises ``ValueError`` naming ``source`` (the file), the key (``heads`` / ``args.heads``) and ``--heads``: a
    recorded set that is not one of this model's (``[3, 6, 20]``, ``['3', '6']``) says nothing usable, and the
    command line can say instead.
    """
    recorded, problem = _parse_recorded_heads(checkpoint, num_heads, source)
    if problem:
        raise ValueError(f'--heads: {problem}; pass --heads with the head counts it was trained on')
    return recorded


def _parse_recorded_heads(checkpoint: Optional[dict], num_heads: int, source: str) -> Tuple[Optional[List[int]], str]:
    """(the recorded head set, checked; or None) and what is wrong with it ('' when nothing)."""
    recorded = recorded_heads(checkpoint)
    if recorded is None:
        return None, ''
    key = 'heads' if checkpoint.get('heads') is not None else 'args.heads'
    try:
        return parse_heads(recorded, num_heads, flag=f'{key} {recorded!r}'), ''
    except ValueError as e:
        return None, f'{source} records {e}'


def default_heads(num_heads: int, checkpoint: Optional[dict] = None, source: str = 'the checkpoint') -> List[int]:
    """Head set stored with a training checkpoint (``checked_recorded_heads``), else 3 6 12 clipped to the model."""
    recorded = checked_recorded_heads(checkpoint, num_heads, source)
    if recorded is not None:
        return recorded
    return sorted({min(k, num_heads) for k in DEFAULT_EVAL_HEADS})


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """timm-style model arguments used by every entry point."""
    group = parser.add_argument_group('Model')
    group.add_argument('--model', '-m', default=None,
                       help=f"registered model name (default: the checkpoint's 'arch', else {DEFAULT_MODEL})")
    group.add_argument('--checkpoint', default='', help='weights: state dict, timm checkpoint or .safetensors')
    group.add_argument('--use-ema', action='store_true', help='use the EMA weights of a timm checkpoint')
    group.add_argument('--num-classes', type=int, default=None,
                       help='classifier size (default: from the checkpoint, else the model default)')
    group.add_argument('--heads', type=int, nargs='+', default=None,
                       help='head counts to evaluate (default: those stored with the checkpoint, else 3 6 12)')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='input resolution: the model is built at it and a checkpoint\'s position table is '
                            'resampled to it, as timm does (default: the model\'s)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N', help='image input channels (default: 3)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                       help='C H W of the input (e.g. --input-size 3 224 224); sets --in-chans and the resolution')
    group.add_argument('--gp', default=None, metavar='POOL',
                       help='global pool: token, avg, max, avgmax or "" (default: the model\'s)')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='more timm.create_model kwargs, KEY=VALUE')


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def create_model_from_args(args: argparse.Namespace,
                           note: Callable[[str], None] = _stderr) -> Tuple[torch.nn.Module, Optional[dict]]:
    """Build ``args.model`` and load ``args.checkpoint`` (if given) strictly. Returns (model, checkpoint).

    Without ``--model`` the checkpoint's ``arch`` is used (sets ``args.model``). The classifier's shape comes
    from the checkpoint: its class count (unless ``--num-classes``) and, for the separate-classifiers
    variant, the head counts that have a classifier. ``--img-size`` / ``--input-size``, ``--in-chans``, ``--gp``
    and ``--model-kwargs`` go to ``timm.create_model`` as in timm's validate.py; a checkpoint trained at another
    resolution has its position table resampled (``note`` gets the one line saying so). Weights holding NaN or inf
    are refused: ``NonFiniteWeightsError`` (a ``ValueError``), ``--checkpoint: PATH: non-finite values in ...``.
    """
    checkpoint, state_dict = None, None
    if args.checkpoint:
        checkpoint = load_checkpoint_file(args.checkpoint)
        try:  # refuses NaN / inf weights (HydraViT models have no buffers to exempt)
            state_dict = extract_state_dict(checkpoint, getattr(args, 'use_ema', False), source=args.checkpoint)
        except NonFiniteWeightsError as e:
            raise NonFiniteWeightsError(f'--checkpoint: {e}') from e
    if not args.model:  # a training checkpoint names its model
        arch = (checkpoint or {}).get('arch')
        args.model = arch if isinstance(arch, str) else DEFAULT_MODEL
    if not timm.is_model(args.model):
        raise ValueError(f'--model: unknown model {args.model!r}')
    kwargs = {**_input_kwargs(args), **_classifier_kwargs(state_dict or {})}
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    try:
        model = timm.create_model(args.model, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:  # e.g. separate classifiers in the checkpoint, a bad --gp
        source = f'{args.checkpoint}: ' if args.checkpoint else ''
        raise ValueError(f'{source}cannot build {args.model} with {kwargs}: {e}') from e
    if state_dict is not None:
        state_dict, resampled = resample_pos_embed(model, state_dict, source=str(Path(args.checkpoint)))
        check_state_dict_matches(model, state_dict, source=str(Path(args.checkpoint)))
        model.load_state_dict(state_dict, strict=True)
        if resampled:
            note(resampled)
    if hasattr(model, 'trained_heads'):
        model.trained_heads = _trained_heads(args, checkpoint, model.num_heads, note)
    return model, checkpoint


def _trained_heads(args: argparse.Namespace, checkpoint: Optional[dict], num_heads: int,
                   note: Callable[[str], None]) -> Optional[List[int]]:
    """The checkpoint's recorded head set, sorted. A malformed one is an error only when it is needed: with
    ``--heads`` given it is ignored, with one warning line."""
    source = str(getattr(args, 'checkpoint', '') or 'the checkpoint')
    if getattr(args, 'heads', None) is None:
        recorded = checked_recorded_heads(checkpoint, num_heads, source)
    else:
        recorded, problem = _parse_recorded_heads(checkpoint, num_heads, source)
        if problem:
            note(f'warning: {problem}; ignored: --heads {" ".join(map(str, args.heads))} given')
    return None if recorded is None else sorted(recorded)


def _input_kwargs(args: argparse.Namespace) -> dict:
    """create_model kwargs from timm's input flags: --model-kwargs, then --gp, --in-chans / --img-size /
    --input-size (the last wins, as in timm's validate.py)."""
    kwargs = dict(getattr(args, 'model_kwargs', None) or {})
    if getattr(args, 'gp', None) is not None:
        kwargs['global_pool'] = args.gp
    input_size = getattr(args, 'input_size', None)
    in_chans = input_size[0] if input_size else getattr(args, 'in_chans', None)
    img_size = tuple(input_size[1:]) if input_size else getattr(args, 'img_size', None)
    if in_chans is not None:
        kwargs['in_chans'] = in_chans
    if img_size is not None:
        kwargs['img_size'] = img_size
    return kwargs


def _classifier_kwargs(state_dict: dict) -> dict:
    """create_model kwargs that shape the classifier like the one in ``state_dict``."""
    if 'head.weight' in state_dict:
        return {'num_classes': state_dict['head.weight'].shape[0]}
    separate = {}  # head.classifiers.<k>.weight: one classifier per head count
    for key, tensor in state_dict.items():
        parts = key.split('.')
        if len(parts) == 4 and parts[:2] == ['head', 'classifiers'] and parts[3] == 'weight' and parts[2].isdigit():
            separate[int(parts[2])] = tensor.shape[0]
    if not separate:
        return {}
    return {'num_classes': next(iter(separate.values())), 'separate_classifiers': tuple(sorted(separate))}


def resolve_heads(args: argparse.Namespace, model, checkpoint: Optional[dict]) -> List[int]:
    """``--heads`` (or the default head set) checked against ``model``: range, duplicates, and, for the
    separate-classifiers variant, that each k has a classifier. The active head count is left as it was."""
    source = str(getattr(args, 'checkpoint', '') or 'the checkpoint')
    heads = default_heads(model.num_heads, checkpoint, source) if args.heads is None else parse_heads(args.heads,
                                                                                                      model.num_heads)
    current = model.active_heads
    for k in heads:
        model.set_heads(k)  # raises ValueError with the model's own message
    model.set_heads(current)
    return heads
