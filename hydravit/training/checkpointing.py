"""Checkpoints for exact resume: RNG states, an atomic timm CheckpointSaver, and the resume position.

Everything stored is weights-only loadable (tensors, lists, numbers, strings), so ``torch.load(weights_only=True)``
reads it back and loading never executes code from a file.
"""
import argparse
import logging
import os
import random
import shutil
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from timm import utils
from timm.utils import checkpoint_saver

from ..checkpoint import atomic_torch_save, check_state_dict_matches, extract_state_dict, load_checkpoint_file
from .config import ConfigError, plain_args
from .sampler import HeadSampler

_logger = logging.getLogger('train')


# --- RNG state, as weights-only-loadable values --------------------------------------------------------------
def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python ``random`` states as tensors, lists and numbers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'name': name, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
        'python': {'version': version, 'state': list(py_state), 'gauss_next': gauss_next},
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    np_state = state['numpy']
    np.random.set_state((np_state['name'], np_state['keys'].numpy().astype(np.uint32), np_state['pos'],
                         np_state['has_gauss'], np_state['cached_gaussian']))
    py = state['python']
    random.setstate((py['version'], tuple(py['state']), py['gauss_next']))
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def gather_rng_states(args: argparse.Namespace) -> List[dict]:
    """Every rank's RNG state (a collective in DDP: all ranks must call it)."""
    state = rng_state()
    if not args.distributed:
        return [state]
    states = [None] * args.world_size
    dist.all_gather_object(states, state)
    return states


# --- checkpoints ----------------------------------------------------------------------------------------------
def plain_state(obj):
    """A scheduler's state with nested objects reduced to their own state dicts (weights-only loadable)."""
    if isinstance(obj, dict):
        return {k: plain_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_state(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if hasattr(obj, 'state_dict'):
        return {'__state_dict__': plain_state(obj.state_dict())}
    return str(obj)


def load_nested_states(target, state: dict) -> None:
    """Restore the stateful objects inside a scheduler (e.g. plateau tracking). The schedule itself is a
    function of the arguments and the position, recomputed on resume, so --epochs can be changed."""
    for key, value in state.items():
        if isinstance(value, dict) and '__state_dict__' in value and hasattr(getattr(target, key, None),
                                                                                'load_state_dict'):
            getattr(target, key).load_state_dict(value['__state_dict__'])


class AtomicCheckpointSaver(utils.CheckpointSaver):
    """timm's CheckpointSaver whose files are never missing or half-written, holding HydraViT's full state.

    timm unlinks ``last``/``model_best`` before renaming onto them (for Windows); here every file is written
    under a temporary name and moved into place with ``os.replace``, so a kill at any moment leaves the
    previous complete file. ``extra_state()`` adds sampler, scheduler, RNG and run info to every checkpoint.
    """

    def __init__(self, *args, extra_state: Callable[[], dict], **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_state = extra_state

    def _replace(self, src, dst):
        os.replace(src, dst)

    def _track_checkpoint(self, *args, **kwargs):
        # timm logs the whole ranked list ("Current checkpoints:" and one line per file) at INFO on every save;
        # here it is one DEBUG line per save.
        timm_logger = logging.getLogger(checkpoint_saver.__name__)
        level = timm_logger.level
        timm_logger.setLevel(logging.WARNING)
        try:
            super()._track_checkpoint(*args, **kwargs)
        finally:
            timm_logger.setLevel(level)
        _logger.debug('Checkpoints kept (best first): ' + ', '.join(
            f'{os.path.basename(path)} ({"-" if metric is None else f"{metric:.4g}"})'
            for path, metric in self.checkpoint_files))

    def _duplicate(self, src, dst):
        tmp = dst + '.tmp'
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.link(src, tmp)
        except (OSError, NotImplementedError):  # no hard links on this filesystem
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)

    def _save(self, save_path, epoch, metric=None):
        state = {
            'epoch': epoch,
            'arch': self.args.model,
            'version': 2,
            'state_dict': utils.get_state_dict(self.model, self.unwrap_fn),
            'optimizer': self.optimizer.state_dict(),
            'args': plain_args(self.args),
        }
        if self.model_ema is not None:
            state['state_dict_ema'] = utils.get_state_dict(self.model_ema, self.unwrap_fn)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        state.update(self.extra_state())
        atomic_torch_save(state, save_path)


def load_resume_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f'--resume: checkpoint not found: {path}')
    try:
        checkpoint = load_checkpoint_file(path)
    except ValueError as e:
        raise ConfigError(f'--resume: {e}') from e
    if 'state_dict' not in checkpoint or 'epoch' not in checkpoint:
        raise ConfigError(f'--resume: {path} is not a training checkpoint (no state_dict/epoch); '
                          f'use --initial-checkpoint for weights only')
    return checkpoint


def restore_rng(args, resume_ckpt: Optional[dict], skip_updates: int) -> Optional[List[dict]]:
    """Set this rank's RNGs to the resume point (the epoch start for a mid-epoch resume). Returns the states
    to set once a mid-epoch resume has replayed the skipped steps."""
    if resume_ckpt is None or args.no_resume_opt:
        return None
    resume_rng = resume_ckpt.get('rng_state')
    start_rng = resume_ckpt.get('epoch_rng_state') if skip_updates else resume_rng
    if start_rng is not None:
        if len(start_rng) != args.world_size:
            _logger.warning(f'--resume: checkpoint from {len(start_rng)} processes, now {args.world_size}: '
                            f'random streams differ from an uninterrupted run')
        set_rng_state(start_rng[args.rank] if len(start_rng) == args.world_size else start_rng[0])
    return resume_rng


def restore_training_state(args, checkpoint: dict, optimizer, loss_scaler, model_ema, sampler: HeadSampler) -> None:
    if model_ema is not None:
        if 'state_dict_ema' in checkpoint:
            model_ema.module.load_state_dict(extract_state_dict(checkpoint, use_ema=True, source=args.resume))
        else:
            _logger.warning('--resume: checkpoint has no EMA weights; the EMA restarts from the model')
    if args.no_resume_opt:
        return
    optimizer.load_state_dict(checkpoint['optimizer'])
    if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
        loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
    if 'sampler' in checkpoint:
        try:
            sampler.load_state_dict(checkpoint['sampler'])
        except ValueError as e:
            _logger.warning(f'--resume: {e}; the head sampler restarts from --seed')


def resume_position(checkpoint: dict):
    """(start epoch, optimizer steps of it already done): recovery checkpoints resume mid-epoch."""
    if checkpoint.get('updates_done'):
        return int(checkpoint['epoch']), int(checkpoint['updates_done'])
    return int(checkpoint['epoch']) + 1, 0


def load_resume_weights(model, checkpoint: dict, path: str) -> None:
    """The model weights of a ``--resume`` checkpoint, strictly (an error names mismatched keys)."""
    state_dict = extract_state_dict(checkpoint, source=path)
    try:
        check_state_dict_matches(model, state_dict, source=path)
    except ValueError as e:
        raise ConfigError(f'--resume: {e}') from e
    model.load_state_dict(state_dict, strict=True)
