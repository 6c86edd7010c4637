"""The external teacher of ``--teacher``: any timm model, read from a local file weights-only, frozen."""
import argparse
import os
from typing import Optional

import timm
import torch.nn as nn

from ..checkpoint import load_model_weights
from ..cli import parse_heads
from .config import ConfigError


def create_teacher(args: argparse.Namespace, num_classes: int) -> Optional[nn.Module]:
    """``--teacher MODEL`` built with ``--teacher-kwargs``, loaded strictly from ``--teacher-checkpoint``, set to
    ``--teacher-heads`` when it is a HydraViT, in eval mode with ``requires_grad`` off. None without --teacher.
    Raises ConfigError naming the flag (unknown model, missing or mismatched file, non-finite weights, other class
    count)."""
    if not args.teacher:
        return None
    if not timm.is_model(args.teacher):
        raise ConfigError(f'--teacher: unknown model {args.teacher!r} (any timm-registered model name)')
    if not os.path.isfile(args.teacher_checkpoint):
        raise ConfigError(f'--teacher-checkpoint: file not found: {args.teacher_checkpoint}')
    teacher = _build(args.teacher, args.teacher_kwargs)
    teacher_classes = getattr(teacher, 'num_classes', None)
    if teacher_classes != num_classes:
        raise ConfigError(f'--teacher: {args.teacher} has {teacher_classes} classes, the student {num_classes} '
                          f'(set num_classes with --teacher-kwargs)')
    _load_weights(teacher, args.teacher_checkpoint)
    if args.teacher_heads is not None:
        _set_teacher_heads(teacher, args.teacher_heads)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _build(name: str, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f'--teacher-kwargs: cannot build {name} with {kwargs}: {e}') from e


def _load_weights(teacher: nn.Module, path: str) -> None:
    try:
        load_model_weights(teacher, path)
    except (ValueError, KeyError) as e:
        raise ConfigError(f'--teacher-checkpoint: {e}') from e


def _set_teacher_heads(teacher: nn.Module, heads: int) -> None:
    if not hasattr(teacher, 'set_heads'):
        raise ConfigError(f'--teacher-heads: {type(teacher).__name__} is not a HydraViT model (no set_heads)')
    try:
        teacher.set_heads(parse_heads([heads], teacher.num_heads, flag='--teacher-heads')[0])
    except ValueError as e:
        raise ConfigError(str(e)) from e
