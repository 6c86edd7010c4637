"""Loading and saving weights safely: no code from a file is ever executed.

Accepted inputs: a plain state dict, a timm checkpoint dict (``state_dict`` / ``state_dict_ema``),
or a ``.safetensors`` file. Pickled files are opened with ``torch.load(weights_only=True)``.

Weights holding NaN or inf are refused by ``extract_state_dict``, which every loader goes through (``check_finite``
gives the one line: ``PATH: non-finite values in TENSOR (KEY; N of M NaN/inf)``). JSON results are written with
``to_json`` / ``write_json``: a non-finite number becomes ``null``, never a bare ``NaN``.
"""
import argparse
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Iterable, Mapping, Optional, Tuple, Union

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


def extract_state_dict(checkpoint: dict, use_ema: bool = False, source: str = 'checkpoint',
                       buffers: Collection[str] = ()) -> Dict[str, torch.Tensor]:
    """The model state dict held by ``checkpoint`` (EMA weights when ``use_ema``), wrapper prefixes removed.

    The keys are looked up as timm's ``load_checkpoint`` does (``state_dict_ema`` / ``model_ema`` for EMA, else
    ``state_dict`` / ``model``, else the dict itself), except that asking for EMA weights a checkpoint does not
    hold is an error here rather than a silent fall-back to the model weights.

    Every loader reads weights through here, so every one refuses non-finite weights: ``NonFiniteWeightsError``
    names the first tensor holding NaN or inf (see ``check_finite``; ``buffers``: the target model's buffer
    names, which are not checked).
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
        ema_key = next((k for k in ('state_dict_ema', 'model_ema') if isinstance(checkpoint.get(k), dict)), None)
        if key is None and ema_key is not None:  # not a bare state dict: one that holds the EMA weights only
            raise ValueError(f'{source} holds only EMA weights ({ema_key}), no model weights (state_dict)')
        state_dict = checkpoint if key is None else checkpoint[key]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f'{source} holds no tensor state dict')
    state_dict = strip_wrapper_prefixes(state_dict, source)
    check_finite(state_dict, source, where=key or '', skip=buffers)
    return state_dict


class NonFiniteWeightsError(ValueError):
    """Weights holding NaN or inf (a diverged run's checkpoint): unusable for evaluation, export or training."""


def check_finite(tensors: Mapping[str, Any], source: str, where: str = '', skip: Collection[str] = ()) -> None:
    """Raise ``NonFiniteWeightsError`` naming the first floating-point tensor of ``tensors`` that holds NaN or inf,
    in one line: ``SOURCE: non-finite values in NAME (WHERE; N of M NaN/inf)``, plus how many more tensors do.

    Integer and bool tensors (indices, step counts) and the names in ``skip`` (buffers, which may hold an inf mask
    on purpose) are not checked; nor are values that are not tensors.
    """
    bad = [name for name, t in tensors.items() if name not in skip and _has_non_finite(t)]
    if not bad:
        return
    tensor = tensors[bad[0]]
    count = int((~torch.isfinite(tensor)).sum())
    detail = f'{where}; ' if where else ''
    more = f', and in {len(bad) - 1} more tensor{"s" if len(bad) > 2 else ""}' if len(bad) > 1 else ''
    raise NonFiniteWeightsError(f'{source}: non-finite values in {bad[0]} ({detail}{count:,} of {tensor.numel():,} '
                                f'NaN/inf){more}')


def _has_non_finite(value: Any) -> bool:
    if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
        return False
    return value.device.type != 'meta' and not bool(torch.isfinite(value).all())


def check_model_finite(model: nn.Module, source: str, where: str = '') -> None:
    """``check_finite`` over ``model``'s state dict, its buffers skipped (weights built or loaded another way than
    ``extract_state_dict``: timm's ``local-dir:`` folders, a model about to be exported)."""
    check_finite(model.state_dict(), source, where, skip=buffer_names(model))


def buffer_names(model: nn.Module) -> set:
    """The state-dict names of ``model``'s buffers."""
    return {name for name, _ in model.named_buffers()}


def check_optimizer_finite(optimizer_state: Any, source: str) -> None:
    """Refuse an optimizer state dict whose per-parameter state (``exp_avg``, ``exp_avg_sq``, momentum, ...) holds
    NaN or inf: resuming from it would poison every later step. Tensors are named ``exp_avg_sq of parameter 12``
    (the optimizer's own parameter index)."""
    per_param = optimizer_state.get('state', {}) if isinstance(optimizer_state, dict) else {}
    named = {f'{name} of parameter {index}': value for index, values in per_param.items()
             if isinstance(values, dict) for name, value in values.items()}
    check_finite(named, source, where='optimizer')


def check_training_checkpoint_finite(checkpoint: dict, source: str, ema: bool = True, optimizer: bool = True) -> None:
    """Raise ``NonFiniteWeightsError`` (or ``ValueError`` for no state dict) unless a training checkpoint's model
    weights, its EMA weights when it holds them (``ema``) and its optimizer state (``optimizer``) are all finite."""
    extract_state_dict(checkpoint, source=source)
    if ema and checkpoint.get('state_dict_ema') is not None:
        extract_state_dict(checkpoint, use_ema=True, source=source)
    if optimizer:
        check_optimizer_finite(checkpoint.get('optimizer'), source)


def finite_training_checkpoint(path: PathLike) -> Optional[dict]:
    """The checkpoint at ``path`` if it reads and its model, EMA and optimizer state are all finite, else None."""
    try:
        checkpoint = load_checkpoint_file(path)
        if not isinstance(checkpoint, dict):
            return None
        check_training_checkpoint_finite(checkpoint, str(path))
    except (ValueError, KeyError, FileNotFoundError):
        return None
    return checkpoint


def newest_finite_checkpoint(paths: Iterable[PathLike]) -> Optional[Tuple[Path, dict]]:
    """(path, checkpoint) of the most recently written of ``paths`` whose weights are all finite, else None.

    A run that diverges can write a checkpoint after its weights went bad and before its loss shows it, so the
    newest file is not necessarily a good one: each is read and checked, newest first (files of the same time, such
    as hard links of one save, in the order given).
    """
    existing = [Path(p) for p in paths if Path(p).is_file()]
    for path in sorted(existing, key=lambda p: p.stat().st_mtime_ns, reverse=True):  # stable: ties keep the order
        checkpoint = finite_training_checkpoint(path)
        if checkpoint is not None:
            return path, checkpoint
    return None


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
    """Load weights from ``path`` into ``model`` strictly; returns the raw checkpoint. Non-finite weights are
    refused (``NonFiniteWeightsError``), the model's buffers excepted."""
    checkpoint = load_checkpoint_file(path)
    state_dict = extract_state_dict(checkpoint, use_ema, source=str(path), buffers=buffer_names(model))
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


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, through dicts, lists and tuples.

    JSON has no NaN or Infinity: ``json.dumps`` writes them as bare tokens that strict parsers (``jq``, browsers,
    other languages) reject, so a value that could not be measured is written as ``null``.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    return obj


def to_json(obj: Any, indent: Optional[int] = None) -> str:
    """Valid JSON text of ``obj``: non-finite floats become ``null`` (``json_safe``), never a bare NaN."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path: PathLike, obj: Any, indent: Optional[int] = None) -> Path:
    """Write ``obj`` as valid JSON (``to_json``, a final newline) atomically; creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(to_json(obj, indent) + '\n'))
    return path
