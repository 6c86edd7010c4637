"""Loading and saving weights safely: no code from a file is ever executed.

Accepted inputs: a plain state dict, a timm checkpoint dict (``state_dict`` / ``state_dict_ema``),
or a ``.safetensors`` file. Pickled files are opened with ``torch.load(weights_only=True)``.
"""
import argparse
import math
import os
import pickle
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

PathLike = Union[str, Path]
# timm's train.py stores its argparse.Namespace in checkpoints; it only carries plain attributes.
_SAFE_GLOBALS = [argparse.Namespace]
# What wrappers put in front of every key: DDP / DataParallel / timm's ModelEma ('module.'), torch.compile
# ('_orig_mod.'), FSDP and activation-checkpoint wrappers. They nest in any order (timm compiles after DDP:
# '_orig_mod.module.'), so they are stripped until none is left.
_WRAPPER_PREFIXES = ('module.', '_orig_mod.', '_fsdp_wrapped_module.', '_checkpoint_wrapped_module.')


def load_checkpoint_file(path: PathLike) -> dict:
    """Read a checkpoint without executing code from it.

    Raises ``FileNotFoundError``, or ``ValueError`` naming the file: "truncated or corrupt" when it cannot be
    parsed at all (an interrupted copy or save), "weights-only" when it holds objects other than tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.suffix == '.safetensors':
        try:
            return load_file(str(path), device='cpu')
        except SafetensorError as e:
            raise ValueError(_corrupt_message(path, e)) from e
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(e) or _plain_pickle(path)
        if refused is None:  # garbage where the pickle should be
            raise ValueError(_corrupt_message(path, e)) from e
        raise ValueError(f'cannot read checkpoint {path} weights-only: {refused}; loading it otherwise could run '
                         f'code from the file') from e
    except MemoryError:
        raise
    # A cut-off file fails in many ways, none of which says so: EOFError, OSError "[Errno 22] Invalid argument",
    # RuntimeError from the zip reader ("failed finding central directory"), KeyError from the pickle.
    except Exception as e:
        raise ValueError(_corrupt_message(path, e)) from e


def _refused_global(error: pickle.UnpicklingError) -> Optional[str]:
    """The weights-only unpickler's refusal of a class or function (the sentence naming it), else None."""
    lines = [line for line in str(error).splitlines() if 'GLOBAL' in line]
    return f'it holds objects other than tensors ({_first_sentence(lines[0])})' if lines else None


def _plain_pickle(path: Path) -> Optional[str]:
    """A whole pickle written by ``pickle.dump`` (protocol 3+) rather than ``torch.save``: the weights-only
    unpickler stops at its first opcode, as it would on garbage, so the file's header tells them apart."""
    with open(path, 'rb') as f:
        head = f.read(2)
    if len(head) == 2 and head[0] == 0x80 and 3 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        return f'a plain pickle (protocol {head[1]}), not a torch checkpoint of tensors'
    return None


def _first_sentence(text: str) -> str:
    """torch's messages run to several sentences of advice; the first one says what happened."""
    return text.strip().split('. ')[0].rstrip('.')[:160]


def _corrupt_message(path: Path, error: Exception) -> str:
    if isinstance(error, pickle.UnpicklingError):
        reason = 'not a torch checkpoint: unpickling failed'
    else:
        detail = _first_sentence(str(error).splitlines()[0]) if str(error).strip() else ''
        reason = type(error).__name__ + (f': {detail}' if detail else '')
    return (f'checkpoint {path} is truncated or corrupt ({path.stat().st_size:,} bytes; {reason}); '
            f'copy or save it again')


def extract_state_dict(checkpoint: dict, use_ema: bool = False, source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """The model state dict held by ``checkpoint`` (EMA weights when ``use_ema``), wrapper prefixes removed.

    The keys are looked up as timm's ``load_checkpoint`` does (``state_dict_ema`` / ``model_ema`` for EMA, else
    ``state_dict`` / ``model``, else the dict itself), except that asking for EMA weights a checkpoint does not
    hold is an error here rather than a silent fall-back to the model weights.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{source} holds no state dict (a {type(checkpoint).__name__})')
    if use_ema:
        key = next((k for k in ('state_dict_ema', 'model_ema') if checkpoint.get(k) is not None), None)
        if key is None:
            raise KeyError(f'{source} has no EMA weights (state_dict_ema); drop --use-ema')
        state_dict = checkpoint[key]
    else:
        key = next((k for k in ('state_dict', 'model') if checkpoint.get(k) is not None), None)
        state_dict = checkpoint if key is None else checkpoint[key]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f'{source} holds no tensor state dict')
    return strip_wrapper_prefixes(state_dict, source)


def strip_wrapper_prefixes(state_dict: Dict[str, torch.Tensor], source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """``state_dict`` with the prefixes of any nesting of DDP, DataParallel, ModelEma, torch.compile, FSDP and
    checkpoint wrappers removed from its keys. Raises ``ValueError`` if two keys become one."""
    cleaned: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = _strip_prefixes(key)
        if name in cleaned:
            raise ValueError(f'{source}: key {key!r} is {name!r} once wrapper prefixes are removed, which the '
                             f'state dict already holds (two models in one file?)')
        cleaned[name] = value
    return cleaned


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
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


def resample_pos_embed(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                       source: str = 'checkpoint') -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """``state_dict`` with its ``pos_embed`` resampled to ``model``'s patch grid when the grids differ (a checkpoint
    trained at another resolution), as timm does for pretrained ViTs: ``resample_abs_pos_embed``, bicubic,
    antialiased, prefix tokens kept. Returns (state dict, the sentence to log, or None when nothing changed).

    The checkpoint's grid is taken as square; ``ValueError`` when its position count is not a square.
    """
    pos, target = state_dict.get('pos_embed'), getattr(model, 'pos_embed', None)
    if pos is None or target is None or pos.dim() != 3 or pos.shape[1] == target.shape[1]:
        return state_dict, None
    kernel = state_dict.get('patch_embed.proj.weight')
    if kernel is None or kernel.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
        return state_dict, None  # another patch size: another architecture, which the strict check names
    prefix = 0 if getattr(model, 'no_embed_class', False) else model.num_prefix_tokens
    positions = pos.shape[1] - prefix
    side = math.isqrt(max(positions, 0))
    new_grid = list(model.patch_embed.grid_size)
    if positions <= 0 or side * side != positions:
        raise ValueError(f'{source}: pos_embed holds {pos.shape[1]} positions ({prefix} prefix), not a square '
                         f'patch grid; cannot resample it to the model\'s {new_grid[0]}x{new_grid[1]} grid')
    resampled = resample_abs_pos_embed(pos, new_size=new_grid, old_size=[side, side], num_prefix_tokens=prefix)
    message = (f'{source}: position embedding resampled from a {side}x{side} to a {new_grid[0]}x{new_grid[1]} '
               f'patch grid (the checkpoint was trained at another resolution; bicubic, as timm does)')
    return {**state_dict, 'pos_embed': resampled}, message


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
