"""Loading and saving weights safely: no code from a file is ever executed.

Accepted inputs: a plain state dict, a timm checkpoint dict (``state_dict`` / ``state_dict_ema``),
or a ``.safetensors`` file. Pickled files are opened with ``torch.load(weights_only=True)``.
"""
import argparse
import os
from pathlib import Path
from typing import Callable, Dict, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file

PathLike = Union[str, Path]
# timm's train.py stores its argparse.Namespace in checkpoints; it only carries plain attributes.
_SAFE_GLOBALS = [argparse.Namespace]
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DDP and torch.compile wrappers


def load_checkpoint_file(path: PathLike) -> dict:
    """Read a checkpoint without executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.suffix == '.safetensors':
        return load_file(str(path), device='cpu')
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # unpickling refused or corrupt file
        raise ValueError(f'cannot read checkpoint {path} as weights-only: {e}') from e


def extract_state_dict(checkpoint: dict, use_ema: bool = False, source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """The model state dict held by ``checkpoint`` (EMA weights when ``use_ema``)."""
    if use_ema:
        for key in ('state_dict_ema', 'model_ema'):
            if key in checkpoint:
                state_dict = checkpoint[key]
                break
        else:
            raise KeyError(f'{source} has no EMA weights (state_dict_ema); drop --use-ema')
    else:
        state_dict = checkpoint.get('state_dict', checkpoint.get('model', checkpoint))
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f'{source} holds no tensor state dict')
    return {_strip_prefixes(k): v for k, v in state_dict.items()}


def _strip_prefixes(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def check_state_dict_matches(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = 'checkpoint') -> None:
    """Raise ``ValueError`` naming missing/unexpected keys and shape mismatches, if any."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        lines = [f'{source} does not match {type(model).__name__} (another architecture?)']
        for title, items in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', shapes)):
            if items:
                shown = ', '.join(items[:8]) + (f', ... ({len(items)} in all)' if len(items) > 8 else '')
                lines.append(f'  {title}: {shown}')
        raise ValueError('\n'.join(lines))


def load_model_weights(model: nn.Module, path: PathLike, use_ema: bool = False) -> dict:
    """Load weights from ``path`` into ``model`` strictly; returns the raw checkpoint."""
    checkpoint = load_checkpoint_file(path)
    state_dict = extract_state_dict(checkpoint, use_ema, source=str(path))
    check_state_dict_matches(model, state_dict, source=str(path))
    model.load_state_dict(state_dict, strict=True)
    return checkpoint


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename: ``path`` is never left half-written."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj, path: PathLike) -> None:
    """``torch.save`` that never leaves ``path`` half-written."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
