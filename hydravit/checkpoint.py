"""Loading and saving weights safely: no code from a file is ever executed.

Accepted inputs: a plain state dict, a timm checkpoint dict (``state_dict`` / ``state_dict_ema``),
or a ``.safetensors`` file. Pickled files are opened with ``torch.load(weights_only=True)``.
"""
import argparse
import os
import pickle
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

PathLike = Union[str, Path]
# timm's train.py stores its argparse.Namespace in checkpoints; it only carries plain attributes.
_SAFE_GLOBALS = [argparse.Namespace]
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DDP and torch.compile wrappers


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
