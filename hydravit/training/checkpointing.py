"""Checkpoints for exact resume: ``TrainingState`` owns what a checkpoint holds and restores all of it,
``CheckpointFiles`` writes timm's file layout atomically. Only timm's public API is used.

Everything stored is weights-only loadable (tensors, lists, numbers, strings), so ``torch.load(weights_only=True)``
reads it back and loading never executes code from a file.
"""
import argparse
import logging
import os
import random
import shutil
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint import (
    atomic_torch_save,
    check_state_dict_matches,
    check_training_checkpoint_finite,
    extract_state_dict,
    load_checkpoint_file,
)
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


# --- the files of a run: timm's layout, every write atomic -----------------------------------------------------
class CheckpointFiles:
    """The checkpoint files of one run folder, in timm's ``CheckpointSaver`` layout and ranking.

    ``last.pth.tar`` after every epoch; ``checkpoint-EPOCH.pth.tar`` for the best ``max_history`` epochs by metric
    (ties keep the earlier epoch; epochs without a metric follow, newest first, and never displace a ranked one);
    ``model_best.pth.tar`` for the best; ``recovery-EPOCH-STEP.pth.tar`` mid-epoch (the two newest are kept).
    Unlike timm's saver, no file is ever unlinked before its replacement is in place: each is written (or
    hard-linked) under a temporary name and moved with ``os.replace``, so a kill leaves the previous complete file.
    """

    extension = '.pth.tar'

    def __init__(self, directory: str, decreasing: bool, max_history: int = 10):
        if max_history < 1:
            raise ValueError(f'max_history must be >= 1, got {max_history}')
        self.directory = directory
        self.decreasing = decreasing
        self.max_history = max_history
        self.kept: List[Tuple[str, Optional[float]]] = []  # (file name, metric), best first
        self.best_epoch: Optional[int] = None
        self.best_metric: Optional[float] = None
        self.recovery_files: List[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def epoch_name(self, epoch: int) -> str:
        return f'checkpoint-{epoch}{self.extension}'

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    # bookkeeping, saved in every checkpoint so that a resumed run keeps ranking the same files
    def state_dict(self, epoch: int, metric: Optional[float]) -> dict:
        """The ranking as it will be once the checkpoint of ``epoch`` (being written) is counted."""
        return {'checkpoint_files': [[name, m] for name, m in self.kept], 'best_epoch': self.best_epoch,
                'best_metric': self.best_metric, 'pending': [epoch, metric],
                'directory': os.path.realpath(self.directory)}  # the folder, however a later run reaches it

    def load_state_dict(self, state: dict) -> None:
        """Continue the ranking of a checkpoint written into this folder; files that are gone are dropped."""
        self.kept = [(name, m) for name, m in state.get('checkpoint_files', []) if os.path.exists(self.path(name))]
        self.best_epoch, self.best_metric = state.get('best_epoch'), state.get('best_metric')
        epoch, metric = state.get('pending', (None, None))
        name = None if epoch is None else self.epoch_name(epoch)
        if name and os.path.exists(self.path(name)) and name not in [n for n, _ in self.kept]:
            self._rank(name, epoch, metric, write_best=False)

    # writing
    def save_epoch(self, state: dict, epoch: int, metric: Optional[float]) -> Tuple[Optional[float], Optional[int]]:
        """Write ``state`` as last, and as an epoch checkpoint / model_best if it earns it. Returns (best metric,
        best epoch), None until an epoch with a metric was saved."""
        last = self.path('last' + self.extension)
        atomic_torch_save(state, last)
        worst = self.kept[-1] if self.kept else None
        if len(self.kept) < self.max_history or worst[1] is None or (
                metric is not None and self._better(metric, worst[1])):
            if len(self.kept) >= self.max_history:
                self._remove(self.kept.pop()[0])
            name = self.epoch_name(epoch)
            _duplicate(last, self.path(name))
            self._rank(name, epoch, metric, write_best=True)
        return self.best_metric, self.best_epoch

    def save_recovery(self, state: dict, epoch: int, updates_done: int) -> str:
        """Write a mid-epoch checkpoint (timm's ``recovery-EPOCH-STEP`` name, STEP = updates done - 1)."""
        path = self.path(f'recovery-{epoch}-{updates_done - 1}{self.extension}')
        atomic_torch_save(state, path)
        self.recovery_files.append(path)
        while len(self.recovery_files) > 2:
            self._remove(os.path.basename(self.recovery_files.pop(0)))
        return path

    def _rank(self, name: str, epoch: int, metric: Optional[float], write_best: bool) -> None:
        ranked = sorted([c for c in self.kept if c[1] is not None] + ([(name, metric)] if metric is not None else []),
                        key=lambda c: c[1], reverse=not self.decreasing)  # stable: ties keep the earlier epoch
        unranked = ([(name, None)] if metric is None else []) + [c for c in self.kept if c[1] is None]
        self.kept = ranked + unranked
        _logger.debug('Checkpoints kept (best first): ' + ', '.join(
            f'{n} ({"-" if m is None else f"{m:.4g}"})' for n, m in self.kept))
        if metric is not None and (self.best_metric is None or self._better(metric, self.best_metric)):
            self.best_epoch, self.best_metric = epoch, metric
            if write_best:
                _duplicate(self.path('last' + self.extension), self.path('model_best' + self.extension))

    def _remove(self, name: str) -> None:
        try:
            os.remove(self.path(name))
        except OSError as e:
            _logger.error(f'could not remove old checkpoint {name}: {e}')


def _duplicate(src: str, dst: str) -> None:
    """``dst`` becomes a copy of ``src`` (a hard link where the filesystem allows), never half-written."""
    tmp = f'{dst}.tmp{os.getpid()}'
    try:
        try:
            os.link(src, tmp)
        except (OSError, NotImplementedError):  # no hard links on this filesystem
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- the whole resumable state, saved and restored in one place ----------------------------------------------
@dataclass
class ResumePoint:
    """Where training starts: the epoch, the optimizer steps of it already done, and the RNG states to set once a
    mid-epoch resume has replayed those steps' data."""

    start_epoch: int = 0
    skip_updates: int = 0
    resume_rng: Optional[List[dict]] = None


def epoch_images_done(checkpoint: dict) -> int:
    """Images (all processes together) the checkpoint's epoch had trained on when it was saved; 0 for a checkpoint
    written at the end of an epoch. Checkpoints from before ``images_done`` was stored derive it from their args."""
    updates = int(checkpoint.get('updates_done') or 0)
    if not updates:
        return 0
    if checkpoint.get('images_done') is not None:
        return int(checkpoint['images_done'])
    saved = checkpoint.get('args') if isinstance(checkpoint.get('args'), dict) else {}
    if not saved.get('batch_size'):
        raise ConfigError('--resume: the mid-epoch checkpoint records neither images_done nor its batch size; '
                          'resume from an end-of-epoch checkpoint (last.pth.tar)')
    return updates * int(saved['batch_size']) * int(saved.get('grad_accum_steps') or 1) * int(
        checkpoint.get('world_size') or 1)


def resume_position(checkpoint: dict, path: str, batch_size: int, grad_accum_steps: int,
                    world_size: Optional[int], updates_per_epoch: Optional[int] = None) -> ResumePoint:
    """Where a ``--resume`` checkpoint continues, with the position in a mid-epoch (recovery) checkpoint converted
    from images seen to optimizer steps of this run's batch (``-b`` x ``--grad-accum-steps`` x processes).

    ``ConfigError`` (one line naming the flag) when the images seen are not a whole number of this run's steps, are
    at or past the end of an epoch (``updates_per_epoch``), or were seen on one process and are resumed on several
    or the reverse: one process shuffles an epoch with the RNG, several with a seeded ``DistributedSampler``, so
    the images not yet trained could not be told apart. ``world_size`` None (not known yet, ``--check-only`` under
    torchrun) checks what does not depend on it.
    """
    epoch, images = int(checkpoint['epoch']), epoch_images_done(checkpoint)
    if not images:
        return ResumePoint(epoch + 1, 0)  # the end of an epoch: any batch size or world size starts the next one
    saved_world = int(checkpoint.get('world_size') or 1)
    where = f'--resume: {path} stopped in epoch {epoch} after {images} images'
    if world_size is not None and (saved_world == 1) != (world_size == 1):
        raise ConfigError(f'{where} on {saved_world} process(es), whose image order {world_size} process(es) '
                          f'cannot replay; resume it on {"one process" if saved_world == 1 else "several"}, or '
                          f'from the end-of-epoch last.pth.tar')
    per_step = batch_size * grad_accum_steps * (world_size or 1)
    steps = (f'-b {batch_size} x --grad-accum-steps {grad_accum_steps}'
             + (f' x {world_size} process(es)' if world_size else ''))
    if images % per_step:
        raise ConfigError(f'{where}, not a whole number of optimizer steps of {per_step} images ({steps}); '
                          f'resume with a -b / --grad-accum-steps whose global batch divides {images}, or from '
                          f'the end-of-epoch last.pth.tar')
    skip = images // per_step
    if updates_per_epoch is not None and skip >= updates_per_epoch:
        raise ConfigError(f'{where}, {skip} optimizer steps of {per_step} images ({steps}), but an epoch has '
                          f'only {updates_per_epoch} of them; resume with a smaller -b, or from the end-of-epoch '
                          f'last.pth.tar')
    return ResumePoint(epoch, skip)


def run_layout(heads: Sequence[int], eval_metric: str, val_split: Optional[str], validate_ema: bool) -> dict:
    """What a run folder's ``summary.csv`` columns and checkpoint ranking depend on, by the flag that sets it."""
    return {
        '--heads': ' '.join(map(str, heads)),  # summary columns (in this order) and the mean metrics
        '--val-split': val_split or '(none)',  # which images rank the checkpoints, if any
        '--eval-metric': eval_metric if val_split else '(training loss)',
        '--model-ema': 'EMA validated' if validate_ema else 'no EMA validated',  # eval_ema_* columns, EMA ranks
    }


def continues_run(checkpoint: dict, path: str, folder: Optional[str]) -> bool:
    """Whether a ``--resume`` of ``checkpoint`` (at ``path``) writes into the run folder it was saved in, so it
    continues that folder's summary.csv and checkpoint ranking: ``folder`` is, by real path (symlinks resolved), the
    directory the checkpoint file lies in, or the one its ranking records (a checkpoint copied elsewhere)."""
    if folder is None:
        return False
    target = os.path.realpath(folder)
    saver = checkpoint.get('saver') if isinstance(checkpoint.get('saver'), dict) else {}
    return os.path.dirname(os.path.realpath(path)) == target or saver.get('directory') == target


def check_resume_optimizer(args: argparse.Namespace, checkpoint: dict, optimizer) -> None:
    """Refuse, before anything is written, a ``--resume`` whose optimizer state the optimizer this run builds
    (``optimizer``, not stepped) cannot take: none saved, another ``--opt`` (other per-parameter state, or the same
    keys under other rules: adam / adamw, sgd / momentum), or another split into parameter groups (``--weight-decay``
    0 or not, ``--layer-decay``), which torch refuses or maps onto other parameters. ``--no-resume-opt`` skips it."""
    if args.no_resume_opt:
        return
    afresh = 'or with --no-resume-opt to start the optimizer afresh'
    saved = checkpoint.get('optimizer')
    if not isinstance(saved, dict) or not isinstance(saved.get('param_groups'), list):
        raise ConfigError(f'--resume: {args.resume} holds no optimizer state; resume with --no-resume-opt to start '
                          f'the optimizer afresh')
    saved_args = checkpoint.get('args') if isinstance(checkpoint.get('args'), dict) else {}
    saved_opt = saved_args.get('opt')
    if isinstance(saved_opt, str) and saved_opt.lower() != args.opt.lower():
        raise ConfigError(f'--opt: {args.resume} was trained with --opt {saved_opt}, and its optimizer state is '
                          f'{saved_opt}\'s, not {args.opt}\'s; resume with --opt {saved_opt}, {afresh}')
    sizes = [len(group['params']) for group in saved['param_groups']]
    built = [len(group['params']) for group in optimizer.param_groups]
    if sizes != built:
        flag, key = next(((f, k) for f, k in _GROUP_FLAGS if k in saved_args and saved_args[k] != getattr(args, k)),
                         _GROUP_FLAGS[0])
        raise ConfigError(f'{flag}: {args.resume} holds optimizer state for {len(sizes)} parameter group(s) of '
                          f'{"/".join(map(str, sizes))} tensors, {flag} {_flag_value(getattr(args, key))} builds '
                          f'{len(built)} of {"/".join(map(str, built))}; resume '
                          f'{_with_flag(flag, saved_args.get(key))}, {afresh}')


# the flags that split the parameters into optimizer groups (timm's create_optimizer_v2)
_GROUP_FLAGS = (('--weight-decay', 'weight_decay'), ('--layer-decay', 'layer_decay'), ('--opt-kwargs', 'opt_kwargs'))


def _flag_value(value) -> str:
    if value is None:
        return '(unset)'
    if isinstance(value, dict):
        return ' '.join(f'{k}={v}' for k, v in value.items()) or '(none)'
    return str(value)


def _with_flag(flag: str, value) -> str:
    """'with FLAG VALUE', or 'without FLAG' for a value the flag's absence gives."""
    return f'without {flag}' if value is None or value == {} else f'with {flag} {_flag_value(value)}'


def check_resume_layout(checkpoint: dict, path: str, layout: dict, same_folder: bool) -> None:
    """A resume into the run folder its checkpoint came from must keep summary.csv's columns and what the kept
    checkpoints are ranked by (``run_layout``), else rows would land under another header and ``model_best`` would
    compare unlike numbers. ``ConfigError`` naming the first flag that differs; another folder starts new files."""
    saved_args = checkpoint.get('args')
    if not same_folder or not isinstance(saved_args, dict) or not checkpoint.get('heads'):
        return
    saved = run_layout(checkpoint['heads'], saved_args.get('eval_metric', 'top1'), saved_args.get('val_split'),
                       bool(saved_args.get('model_ema')) and not saved_args.get('model_ema_force_cpu'))
    for flag, value in layout.items():
        if value != saved[flag]:
            raise ConfigError(f'--resume: {flag} gives {value}, but {path} was trained with {saved[flag]}; '
                              f'in its run folder that would change summary.csv columns or the model_best ranking: '
                              f'resume with the same {flag}, or into a new run folder (--experiment NAME)')


def _as_list(value):
    """Tuples and lists compare alike (betas are a tuple when built, may be a list when loaded)."""
    return list(value) if isinstance(value, (list, tuple)) else value


class TrainingState:
    """The one owner of what a checkpoint holds: model, EMA, optimizer, loss scaler, LR scheduler, head sampler,
    every rank's RNG states and the position in the run, plus the run's description (arch, args, heads, classes).

    ``checkpoint()`` assembles it, ``resume()`` restores all of it, so a key written is a key read. Only the model
    weights are read earlier (``load_model_weights``): the EMA is created from the resumed weights.
    """

    def __init__(self, args: argparse.Namespace, model: nn.Module, optimizer, model_ema=None, loss_scaler=None,
                 lr_scheduler=None, sampler: Optional[HeadSampler] = None, heads: Sequence[int] = (),
                 class_names: Optional[List[str]] = None):
        self.args = args
        self.model = model  # the HydraViT itself, not a DDP / compile wrapper
        self.optimizer = optimizer
        self.model_ema = model_ema
        self.loss_scaler = loss_scaler
        self.lr_scheduler = lr_scheduler
        self.sampler = sampler
        self.heads = list(heads)
        self.class_names = class_names
        self.files: Optional[CheckpointFiles] = None  # on the primary rank

    # --- saving ------------------------------------------------------------------------------------------------
    def checkpoint(self, epoch: int, metric: Optional[float] = None, position: Optional[dict] = None) -> dict:
        """Everything needed to resume exactly; weights-only loadable (tensors, lists, numbers, strings)."""
        state = {
            'epoch': epoch,
            'arch': self.args.model,
            'version': 2,  # timm: the epoch stored is the one completed
            'args': plain_args(self.args),
            'state_dict': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'heads': self.heads,
            'class_names': self.class_names,
            'world_size': self.args.world_size,
            'sampler': self.sampler.state_dict() if self.sampler is not None else None,
            'scheduler': plain_state(self.lr_scheduler.state_dict()) if self.lr_scheduler is not None else None,
            **(position or {}),
        }
        if self.model_ema is not None:
            state['state_dict_ema'] = self.model_ema.module.state_dict()
        if self.loss_scaler is not None:
            state[self.loss_scaler.state_dict_key] = self.loss_scaler.state_dict()
        if metric is not None:
            state['metric'] = metric
        if self.files is not None:
            state['saver'] = self.files.state_dict(epoch, metric)
        return state

    def save_epoch(self, epoch: int, metric: Optional[float]) -> Tuple[Optional[float], Optional[int]]:
        """End-of-epoch checkpoint (a collective in DDP: every rank's RNG state is gathered)."""
        position = {'rng_state': gather_rng_states(self.args)}
        if self.files is None:
            return None, None
        return self.files.save_epoch(self.checkpoint(epoch, metric, position), epoch, metric)

    def save_recovery(self, epoch: int, updates_done: int, epoch_rng: Optional[List[dict]]) -> None:
        """Mid-epoch checkpoint (a collective in DDP); resuming from it replays the epoch's data order."""
        args = self.args
        position = {'rng_state': gather_rng_states(args), 'epoch_rng_state': epoch_rng, 'updates_done': updates_done,
                    'images_done': updates_done * args.batch_size * args.grad_accum_steps * args.world_size}
        if self.files is not None:
            self.files.save_recovery(self.checkpoint(epoch, None, position), epoch, updates_done)

    # --- loading -----------------------------------------------------------------------------------------------
    @staticmethod
    def read(path: str, ema: bool = True, optimizer: bool = True) -> dict:
        """A ``--resume`` checkpoint, weights-only; ``ConfigError`` naming the flag when it is not one, or when
        what the resume will use holds NaN or inf: the model weights, the EMA weights (``ema``: --model-ema) and the
        optimizer state (``optimizer``: not --no-resume-opt)."""
        if not os.path.isfile(path):
            raise ConfigError(f'--resume: checkpoint not found: {path}')
        try:
            checkpoint = load_checkpoint_file(path)
        except ValueError as e:
            raise ConfigError(f'--resume: {e}') from e
        if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint or 'epoch' not in checkpoint:
            raise ConfigError(f'--resume: {path} is not a training checkpoint (no state_dict/epoch); '
                              f'use --initial-checkpoint for weights only')
        try:  # the shared check of everything this resume will load
            check_training_checkpoint_finite(checkpoint, path, ema, optimizer)
        except ValueError as e:
            raise ConfigError(f'--resume: {e}') from e
        return checkpoint

    @staticmethod
    def load_model_weights(model: nn.Module, checkpoint: dict, path: str) -> None:
        """The model weights of a ``--resume`` checkpoint, strictly (an error names mismatched keys)."""
        state_dict = extract_state_dict(checkpoint, source=path)
        saved, built = state_dict.get('pos_embed'), getattr(model, 'pos_embed', None)
        if saved is not None and built is not None and saved.shape[:-1] != built.shape[:-1] \
                and saved.shape[-1] == built.shape[-1]:  # the same model at another resolution
            raise ConfigError(f'--resume: {path} was trained with {saved.shape[1]} positions, this run builds '
                              f'{built.shape[1]} (another --img-size / --input-size): resume at the checkpoint\'s '
                              f'resolution, or start a new run from it with --initial-checkpoint, which resamples '
                              f'the position table')
        try:
            check_state_dict_matches(model, state_dict, source=path)
        except ValueError as e:
            raise ConfigError(f'--resume: {e}') from e
        model.load_state_dict(state_dict, strict=True)

    def resume_point(self, checkpoint: Optional[dict], updates_per_epoch: Optional[int] = None) -> ResumePoint:
        """Where training starts: ``--start-epoch``, else the checkpoint's position converted to this run's batch
        (``resume_position``; ``ConfigError`` when it cannot be), else the beginning."""
        args = self.args
        if args.start_epoch is not None:
            return ResumePoint(args.start_epoch, 0)
        if checkpoint is None:
            return ResumePoint()
        return resume_position(checkpoint, args.resume, args.batch_size, args.grad_accum_steps, args.world_size,
                               updates_per_epoch)

    def resume(self, checkpoint: Optional[dict], point: ResumePoint, updates_per_epoch: int) -> ResumePoint:
        """Restore everything but the model weights from ``checkpoint`` (None: a fresh start), position the LR
        schedule at ``point`` (from ``resume_point``), and set this rank's RNGs. Call last before training: nothing
        may draw random numbers after it. ``--no-resume-opt`` keeps the position, a mid-epoch checkpoint's data
        order, the EMA and the checkpoint ranking, and skips optimizer, scaler, sampler, scheduler and RNG streams."""
        if checkpoint is not None:
            self._restore_ema(checkpoint)
            if not self.args.no_resume_opt:
                self._restore_optimization(checkpoint)
            self._restore_files(checkpoint)
        self._position_schedule(point, updates_per_epoch)
        if checkpoint is not None:
            point.resume_rng = self._restore_rng(checkpoint, point.skip_updates, not self.args.no_resume_opt)
        return point

    def _restore_ema(self, checkpoint: dict) -> None:
        if self.model_ema is None:
            return
        if checkpoint.get('state_dict_ema') is None:
            _logger.warning('--resume: checkpoint has no EMA weights; the EMA restarts from the model')
            return
        self.model_ema.module.load_state_dict(extract_state_dict(checkpoint, use_ema=True, source=self.args.resume))

    def _restore_optimization(self, checkpoint: dict) -> None:
        # torch restores the saved groups' hyperparameters too; this run's flags (args.yaml) are the ones to train with
        built = [{key: group[key] for key in self._flag_hyperparameters() if key in group}
                 for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        self._reapply_hyperparameters(built)
        if self.loss_scaler is not None and self.loss_scaler.state_dict_key in checkpoint:
            self.loss_scaler.load_state_dict(checkpoint[self.loss_scaler.state_dict_key])
        if self.sampler is not None and checkpoint.get('sampler'):
            try:
                self.sampler.load_state_dict(checkpoint['sampler'])
            except ValueError as e:
                _logger.warning(f'--resume: {e}; the head sampler restarts from --seed')
        if self.lr_scheduler is not None and checkpoint.get('scheduler'):
            load_nested_states(self.lr_scheduler, checkpoint['scheduler'])

    def _flag_hyperparameters(self) -> List[str]:
        """Optimizer group entries set by this run's flags (not counters such as Lookahead's or Adan's steps;
        the learning rate is the scheduler's)."""
        return ['weight_decay', 'momentum', 'betas', 'eps', 'lr_scale', *getattr(self.args, 'opt_kwargs', {})]

    def _reapply_hyperparameters(self, built: List[dict]) -> None:
        changed = set()
        for group, values in zip(self.optimizer.param_groups, built, strict=True):
            for key, value in values.items():
                if _as_list(group.get(key)) != _as_list(value):
                    changed.add(f'{key} {group.get(key)} -> {value}')
                    group[key] = value
        if changed:
            _logger.info(f'--resume: optimizer state restored with this run\'s {", ".join(sorted(changed))}')

    def _position_schedule(self, point: ResumePoint, updates_per_epoch: int) -> None:
        """The schedule is a function of the arguments and the position, so --epochs may change on resume."""
        if self.lr_scheduler is None or not (point.start_epoch > 0 or point.skip_updates):
            return
        if self.args.sched_on_updates:
            self.lr_scheduler.step_update(point.start_epoch * updates_per_epoch + point.skip_updates)
        else:
            self.lr_scheduler.step(point.start_epoch)

    def _restore_files(self, checkpoint: dict) -> None:
        """Keep ranking the checkpoints of the same run folder (a resume into another folder starts afresh)."""
        if self.files is not None and checkpoint.get('saver') and continues_run(checkpoint, self.args.resume,
                                                                                self.files.directory):
            self.files.load_state_dict(checkpoint['saver'])

    def _restore_rng(self, checkpoint: dict, skip_updates: int, streams: bool) -> Optional[List[dict]]:
        """Set this rank's RNGs to the resume point: for a mid-epoch resume, always the epoch's start (its data
        order is the position); else, with ``streams``, the saved state. Returns the states to set once a mid-epoch
        resume has replayed the skipped steps (None without ``streams``)."""
        resume_rng = checkpoint.get('rng_state') if streams else None
        start_rng = checkpoint.get('epoch_rng_state') if skip_updates else resume_rng
        if start_rng is not None:
            args = self.args
            if len(start_rng) != args.world_size:
                _logger.warning(f'--resume: checkpoint from {len(start_rng)} processes, now {args.world_size}: '
                                f'random streams differ from an uninterrupted run')
            set_rng_state(start_rng[args.rank] if len(start_rng) == args.world_size else start_rng[0])
        return resume_rng
