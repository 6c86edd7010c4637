"""HydraViT training: each optimizer step trains the subnetwork of the first k heads, k drawn by a HeadSampler.

The loop is built on timm's library APIs (data, Mixup/CutMix, optimizer and scheduler factories, ModelEmaV3,
CheckpointSaver, losses); argument names follow timm's ``train.py``. Run ``python -m hydravit.train --help``,
or ``./distributed_train.sh NPROC DATA_DIR ...`` for torchrun. See docs/training.md.
"""
import argparse
import logging
import os
import random
import shutil
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from datetime import datetime, timedelta
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm import utils
from timm.data import resolve_data_config
from timm.layers import set_fast_norm
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import model_parameters, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from torch.nn.parallel import DistributedDataParallel

from . import model as _model  # noqa: F401  registers the hydravit models with timm
from .checkpoint import atomic_torch_save, check_state_dict_matches, extract_state_dict, load_checkpoint_file
from .cli import resolve_heads
from .data import check_data_dir, create_datasets, create_loaders, mixup_args
from .evaluation.accuracy import evaluate_heads
from .export import leading_slice
from .sampler import HeadSampler
from .train_config import ConfigError, check_eval_metric, parse_args, plain_args

_logger = logging.getLogger('train')
PROG = 'python -m hydravit.train'


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf."""


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
def _plain_state(obj):
    """A scheduler's state with nested objects reduced to their own state dicts (weights-only loadable)."""
    if isinstance(obj, dict):
        return {k: _plain_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_state(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if hasattr(obj, 'state_dict'):
        return {'__state_dict__': _plain_state(obj.state_dict())}
    return str(obj)


def _load_nested_states(target, state: dict) -> None:
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


# --- model ------------------------------------------------------------------------------------------------
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


def load_initial_checkpoint(model: nn.Module, path: str, init_slices: bool) -> None:
    """Full-size weights strictly (classifier excepted), or with ``init_slices`` a narrower ViT into the leading
    slices of every tensor (same head_dim: e.g. DeiT-Tiny, 3 heads x 64, into hydravit_dyn_patch16_224)."""
    if not os.path.isfile(path):
        raise ConfigError(f'--initial-checkpoint: file not found: {path}')
    try:
        state_dict = extract_state_dict(load_checkpoint_file(path), source=path)
    except (ValueError, KeyError) as e:
        raise ConfigError(f'--initial-checkpoint: {e}') from e
    state_dict = _split_classifier(state_dict, model, path)
    expected = model.state_dict()
    if not init_slices:
        kept = dict(state_dict)
        for n in expected:  # a dropped classifier keeps its fresh init
            if n.startswith('head.') and n not in kept:
                kept[n] = expected[n]
        try:
            check_state_dict_matches(model, kept, source=path)
        except ValueError as e:
            raise ConfigError(f'--initial-checkpoint: {e}\n(for a narrower ViT such as DeiT-Tiny add --init-slices)'
                              ) from e
        model.load_state_dict(kept, strict=True)
        return
    _load_leading_slices(model, state_dict, path)


def _load_leading_slices(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    missing = sorted(n for n in expected if n not in state_dict and not n.startswith('head.'))
    unexpected = sorted(n for n in state_dict if n not in expected)
    if missing or unexpected:
        raise ConfigError(f'--initial-checkpoint: {path} is not a ViT of this layout; '
                          f'missing {missing[:8]}, unexpected {unexpected[:8]}')
    width = state_dict['cls_token'].shape[-1] if 'cls_token' in state_dict else None
    if width is not None and width % model.head_dim:
        raise ConfigError(f'--init-slices: embed dim {width} of {path} is not a multiple of head_dim '
                          f'{model.head_dim}')
    with torch.no_grad():
        for name, small in state_dict.items():
            try:
                target = leading_slice(name, expected[name], small.shape)
            except ValueError as e:
                raise ConfigError(f'--init-slices: {e}') from e
            target.copy_(small.reshape(target.shape))
    _logger.info(f'Initialized the leading {width} channels ({(width or 0) // model.head_dim} heads) from {path}')


# --- one training epoch -------------------------------------------------------------------------------------
class Trainer:
    """State shared by the epoch and validation loops."""

    def __init__(self, args, model, model_ema, optimizer, loss_scaler, lr_scheduler, sampler, saver,
                 train_loss_fn, amp_autocast, device, heads, num_epochs):
        self.args = args
        self.model = model  # possibly DDP-wrapped
        self.module = model.module if isinstance(model, DistributedDataParallel) else model
        self.model_ema = model_ema
        self.optimizer = optimizer
        self.loss_scaler = loss_scaler
        self.lr_scheduler = lr_scheduler
        self.sampler = sampler
        self.saver = saver
        self.train_loss_fn = train_loss_fn
        self.amp_autocast = amp_autocast
        self.device = device
        self.heads = heads
        self.num_epochs = num_epochs
        self.run_start = time.time()
        self.epoch_rng: Optional[List[dict]] = None  # every rank's RNG states at the start of this epoch
        self.position: dict = {}  # RNG states (and mid-epoch position) of the checkpoint being written

    def checkpoint_state(self) -> dict:
        """What a checkpoint holds beyond model/EMA/optimizer/scaler: enough for an exact resume."""
        return {
            'heads': list(self.heads),
            'sampler': self.sampler.state_dict(),
            'scheduler': _plain_state(self.lr_scheduler.state_dict()) if self.lr_scheduler else None,
            'world_size': self.args.world_size,
            **self.position,
        }

    def save_checkpoint(self, epoch: int, metric: Optional[float]):
        """End-of-epoch checkpoint (a collective in DDP). Returns (best_metric, best_epoch)."""
        self.position = {'rng_state': gather_rng_states(self.args)}
        if self.saver is None:
            return None, None
        return self.saver.save_checkpoint(epoch, metric=metric)

    def _draw_heads(self) -> int:
        ks = self.sampler.sample(self.args.world_size)
        if self.args.shared_heads:
            ks = [ks[0]] * len(ks)
        self.sampler.record(ks)
        k = ks[self.args.rank]
        self.module.set_heads(k)
        return k

    def _check_finite(self, loss_sum: torch.Tensor, epoch: int, update_idx: int, k: int) -> None:
        bad = (~torch.isfinite(loss_sum)).float()
        if self.args.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise NonFiniteLossError(f'loss is {loss_sum.item()} at epoch {epoch}, update {update_idx} (k={k})')

    def train_one_epoch(self, epoch: int, loader, mixup_fn, skip_updates: int = 0,
                        resume_rng: Optional[List[dict]] = None) -> Dict[str, float]:
        args, model, optimizer = self.args, self.model, self.optimizer
        if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            if args.prefetcher and getattr(loader, 'mixup_enabled', False):
                loader.mixup_enabled = False
            elif mixup_fn is not None:
                mixup_fn.mixup_enabled = False
        second_order = getattr(optimizer, 'is_second_order', False)
        accum_steps = args.grad_accum_steps
        num_batches = len(loader)
        updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
        num_updates = epoch * updates_per_epoch + skip_updates
        losses_m, update_time_m = utils.AverageMeter(), utils.AverageMeter()
        model.train()
        optimizer.zero_grad()
        update_start = time.time()
        update_samples, loss_sum, k = 0, torch.zeros((), device=self.device), self.module.active_heads
        for batch_idx, (input, target) in enumerate(loader):
            update_idx = batch_idx // accum_steps
            if update_idx < skip_updates:  # fast-forward a resumed epoch: same data, no compute
                if batch_idx == skip_updates * accum_steps - 1 and resume_rng is not None:
                    set_rng_state(resume_rng[args.rank if len(resume_rng) == args.world_size else 0])
                    update_start = time.time()
                continue
            window = min(accum_steps, num_batches - update_idx * accum_steps)  # last window may be short
            need_update = (batch_idx + 1) % accum_steps == 0 or batch_idx == num_batches - 1
            if batch_idx % accum_steps == 0:
                k = self._draw_heads()  # one k per optimizer step (see docs/training.md)
                loss_sum = torch.zeros((), device=self.device)
            if not args.prefetcher:
                input, target = input.to(self.device), target.to(self.device)
                if mixup_fn is not None:
                    input, target = mixup_fn(input, target)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            sync = nullcontext() if need_update or not hasattr(model, 'no_sync') else model.no_sync()
            with sync:
                with self.amp_autocast():
                    output = model(input)
                    loss = self.train_loss_fn(output, target)
                loss_sum = loss_sum + loss.detach()
                self._backward(loss / window, need_update, second_order)
            update_samples += input.size(0)
            if not need_update:
                continue
            self._check_finite(loss_sum, epoch, update_idx, k)
            self._step(need_update=True)
            num_updates += 1
            if self.model_ema is not None:
                self.model_ema.update(self.module, step=num_updates)
            if args.synchronize_step and self.device.type == 'cuda':
                torch.cuda.synchronize()
            losses_m.update(loss_sum.item() / window, update_samples)
            update_time_m.update(time.time() - update_start)
            update_start = time.time()
            if update_idx % args.log_interval == 0 or update_idx == updates_per_epoch - 1:
                self._log_progress(epoch, update_idx, updates_per_epoch, losses_m, update_time_m, update_samples, k)
            if args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0 \
                    and update_idx + 1 < updates_per_epoch:
                self.save_recovery(epoch, update_idx + 1)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)
            update_samples = 0
        if hasattr(optimizer, 'sync_lookahead'):
            optimizer.sync_lookahead()
        loss_avg = losses_m.avg
        if args.distributed:
            loss_avg = utils.reduce_tensor(torch.tensor(loss_avg, device=self.device), args.world_size).item()
        return OrderedDict(loss=loss_avg)

    def _backward(self, loss: torch.Tensor, need_update: bool, second_order: bool) -> None:
        args = self.args
        clip_params = model_parameters(self.model, exclude_head='agc' in args.clip_mode)
        if self.loss_scaler is not None:
            # the scaler steps the optimizer itself when need_update (after unscale + clip)
            self.loss_scaler(loss, self.optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                             parameters=clip_params, create_graph=second_order, need_update=need_update)
            return
        loss.backward(create_graph=second_order)

    def _step(self, need_update: bool) -> None:
        if self.loss_scaler is None:
            if self.args.clip_grad is not None:
                utils.dispatch_clip_grad(model_parameters(self.model, exclude_head='agc' in self.args.clip_mode),
                                         value=self.args.clip_grad, mode=self.args.clip_mode)
            self.optimizer.step()
        self.optimizer.zero_grad()

    def _log_progress(self, epoch, update_idx, updates_per_epoch, losses_m, update_time_m, samples, k) -> None:
        if not utils.is_primary(self.args):
            return
        lrs = [g['lr'] for g in self.optimizer.param_groups]
        per_update = update_time_m.avg
        left_epoch = per_update * (updates_per_epoch - update_idx - 1)
        left_run = left_epoch + per_update * updates_per_epoch * (self.num_epochs - epoch - 1)
        rate = samples * self.args.world_size / max(update_time_m.val, 1e-9)
        _logger.info(
            f'Train: {epoch}/{self.num_epochs - 1} [{update_idx + 1:>4d}/{updates_per_epoch} '
            f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
            f'Loss: {losses_m.val:#.3g} ({losses_m.avg:#.3g})  {rate:>7.1f} img/s  LR: {sum(lrs) / len(lrs):.3e}  '
            f'k: {k}  ETA: epoch {_fmt_seconds(left_epoch)}, run {_fmt_seconds(left_run)}  '
            f'k-hist: {self.sampler.format_histogram()}')

    def save_recovery(self, epoch: int, updates_done: int) -> None:
        """Mid-epoch checkpoint (a collective in DDP); resuming from it replays the epoch's data order."""
        self.position = {'rng_state': gather_rng_states(self.args), 'epoch_rng_state': self.epoch_rng,
                         'updates_done': updates_done}
        if self.saver is not None:
            self.saver.save_recovery(epoch, batch_idx=updates_done - 1)

    # --- validation ---------------------------------------------------------------------------------------
    def validate_heads(self, model: nn.Module, loader, label: str) -> Dict[str, float]:
        """top-1/top-5/loss for every head count; keys loss_k3, top1_k3, ..., plus means top1/top5/loss."""
        model.eval()
        # Starting a DataLoader iterator draws from the global RNG: validating must not shift training's random
        # streams, or a run validated at other epochs (e.g. resumed) would diverge from an uninterrupted one.
        state = rng_state()
        try:
            rows = evaluate_heads(model, loader, self.heads, self.device, self.amp_autocast,
                                  distributed=self.args.distributed)
        finally:
            set_rng_state(state)
        metrics = OrderedDict()
        for row in rows:
            for name in ('loss', 'top1', 'top5'):
                metrics[f'{name}_k{row["heads"]}'] = row[name]
        for name in ('top1', 'top5', 'loss'):
            metrics[name] = sum(row[name] for row in rows) / len(rows)
        if utils.is_primary(self.args):
            _logger.info(format_table(model, self.heads, metrics, label))
        return metrics


def format_table(model: nn.Module, heads: Sequence[int], metrics: Dict[str, float], label: str) -> str:
    lines = [f'Per-k validation ({label}):',
             f'{"k":>4} {"embed":>6} {"params":>11} {"top1":>7} {"top5":>7} {"loss":>7}']
    for k in heads:
        lines.append(f'{k:>4} {k * model.head_dim:>6} {model.subnetwork_params(k):>11,} '
                     f'{metrics[f"top1_k{k}"]:>7.2f} {metrics[f"top5_k{k}"]:>7.2f} {metrics[f"loss_k{k}"]:>7.4f}')
    lines.append(f'{"mean":>4} {"":>6} {"":>11} {metrics["top1"]:>7.2f} {metrics["top5"]:>7.2f} '
                 f'{metrics["loss"]:>7.4f}')
    return '\n'.join(lines)


def format_final_table(model: nn.Module, heads: Sequence[int], metrics: Dict[str, float]) -> str:
    """Last validation, model and EMA side by side."""
    with_ema = f'ema_top1_k{heads[0]}' in metrics
    lines = ['Final per-k top-1 / top-5 (last validation):',
             f'{"k":>4} {"embed":>6} {"params":>11} {"top1":>7} {"top5":>7}'
             + (f' {"EMA top1":>9} {"EMA top5":>9}' if with_ema else '')]
    for k in heads:
        line = (f'{k:>4} {k * model.head_dim:>6} {model.subnetwork_params(k):>11,} '
                f'{metrics[f"top1_k{k}"]:>7.2f} {metrics[f"top5_k{k}"]:>7.2f}')
        if with_ema:
            line += f' {metrics[f"ema_top1_k{k}"]:>9.2f} {metrics[f"ema_top5_k{k}"]:>9.2f}'
        lines.append(line)
    return '\n'.join(lines)


def _fmt_seconds(seconds: float) -> str:
    return str(timedelta(seconds=int(max(0.0, seconds))))


# --- setup --------------------------------------------------------------------------------------------------
def resolve_lr(args: argparse.Namespace) -> None:
    """timm's rule: --lr wins, else lr_base scaled by the global batch size (linear, or sqrt for adaptive opts)."""
    if args.lr:
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


def summary_keys(heads: Sequence[int], with_ema: bool) -> List[str]:
    keys = [f'{m}_k{k}' for k in heads for m in ('top1', 'top5', 'loss')] + ['top1', 'top5', 'loss']
    return keys + (['ema_' + key for key in keys] if with_ema else [])


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:  # keep the caller's logging (tests, notebooks) if configured
        utils.setup_default_logging()
    try:
        args, args_text = parse_args(argv)
        return train(args, args_text)
    except ConfigError as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        _logger.error(f'Stopping: {e}. Nothing was saved for this epoch; the last good checkpoint is '
                      f'last.pth.tar in the run folder. Lower --lr, set --clip-grad, or check the data.')
        return 1


def train(args: argparse.Namespace, args_text: str) -> int:
    resume_ckpt, model, heads, sampler = prepare_run(args)  # all checks; nothing read or written yet
    device = setup_device(args)
    primary = utils.is_primary(args)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if primary:
        _logger.info(f'Model {safe_model_name(args.model)}: {model.num_heads} heads x {model.head_dim}, '
                     f'{sum(p.numel() for p in model.parameters()):,} params; training k in {heads} '
                     f'with probabilities {[round(p, 4) for p in sampler.probs]}')
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    resolve_lr(args)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    amp_autocast, loss_scaler = create_amp(args, device)
    model_ema = None
    if args.model_ema:
        model_ema = utils.ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                                     device='cpu' if args.model_ema_force_cpu else None)
    if resume_ckpt is not None:
        restore_training_state(args, resume_ckpt, optimizer, loss_scaler, model_ema, sampler)
    if args.distributed:
        # separate classifiers: each step uses one of them, the others get no gradient
        ddp_kwargs = dict(find_unused_parameters=bool(getattr(model, 'separate_classifiers', None)))
        if args.no_ddp_bb:
            ddp_kwargs['broadcast_buffers'] = False
        model = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None, **ddp_kwargs)

    # data
    input_img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')
    dataset_train, dataset_val = create_datasets(args, input_img_mode)
    num_dataset_classes = len(getattr(getattr(dataset_train, 'reader', None), 'class_to_idx', {}) or {})
    if num_dataset_classes > args.num_classes:
        raise ConfigError(f'--num-classes: the dataset has {num_dataset_classes} classes but the model '
                          f'{args.num_classes}; pass --num-classes {num_dataset_classes}')
    loader_train, loader_val, mixup_fn = create_loaders(args, dataset_train, dataset_val, data_config, device)
    train_loss_fn = create_train_loss(args, device)
    eval_metric = args.eval_metric if loader_val is not None else 'loss'
    decreasing = eval_metric.startswith('loss')

    # schedule and position
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing), updates_per_epoch=updates_per_epoch)
    start_epoch, skip_updates = 0, 0
    if resume_ckpt is not None:
        start_epoch, skip_updates = resume_position(resume_ckpt)
        if resume_ckpt.get('scheduler') and not args.no_resume_opt:
            _load_nested_states(lr_scheduler, resume_ckpt['scheduler'])
    if args.start_epoch is not None:
        start_epoch, skip_updates = args.start_epoch, 0
    if start_epoch > 0 or skip_updates:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch + skip_updates)
        else:
            lr_scheduler.step(start_epoch)

    trainer = Trainer(args, model, model_ema, optimizer, loss_scaler, lr_scheduler, sampler, None,
                      train_loss_fn, amp_autocast, device, heads, num_epochs)
    output_dir = None
    if primary:  # the first file written by the run
        output_dir = create_output(args, args_text, data_config, trainer, resume_ckpt, decreasing, start_epoch)
        _logger.info(f'Output: {output_dir}; {num_epochs} epochs of {updates_per_epoch} optimizer steps '
                     f'(batch {args.batch_size} x {args.world_size} processes x {args.grad_accum_steps} accum)')
    resume_rng = restore_rng(args, resume_ckpt, skip_updates)
    validate_ema = model_ema is not None and not args.model_ema_force_cpu
    return run_epochs(trainer, args, loader_train, loader_val, dataset_train, mixup_fn, start_epoch, skip_updates,
                      resume_rng, output_dir, eval_metric, validate_ema)


def prepare_run(args: argparse.Namespace):
    """Every check that needs no data: (resume checkpoint, model with initial weights, heads, sampler)."""
    args.data_dir = args.data_dir or args.data
    resume_ckpt = load_resume_checkpoint(args.resume) if args.resume else None
    utils.random_seed(args.seed, 0)  # same initial weights on every rank and every run with this --seed
    model = create_train_model(args)
    heads = resolve_train_heads(args, model, resume_ckpt)
    check_eval_metric(args.eval_metric, heads)
    sampler = HeadSampler(heads, args.weights, seed=args.seed)
    check_data_dir(args)
    if args.drop_p != -1:
        _logger.info('--drop-p is accepted for compatibility and has no effect: --heads sampling sets the width')
    if args.initial_checkpoint:
        load_initial_checkpoint(model, args.initial_checkpoint, args.init_slices)
    if resume_ckpt is not None:
        state_dict = extract_state_dict(resume_ckpt, source=args.resume)
        try:
            check_state_dict_matches(model, state_dict, source=args.resume)
        except ValueError as e:
            raise ConfigError(f'--resume: {e}') from e
        model.load_state_dict(state_dict, strict=True)
    return resume_ckpt, model, heads, sampler


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


def create_output(args, args_text: str, data_config, trainer: 'Trainer', resume_ckpt, decreasing: bool,
                  start_epoch: int) -> str:
    """Run folder, args.yaml and the checkpoint saver (rank 0)."""
    exp_name = args.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'),
                                             safe_model_name(args.model), str(data_config['input_size'][-1])])
    output_dir = utils.get_outdir(args.output or './output/train', exp_name)
    trainer.saver = AtomicCheckpointSaver(
        model=trainer.model, optimizer=trainer.optimizer, args=args, model_ema=trainer.model_ema,
        amp_scaler=trainer.loss_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=decreasing,
        max_history=args.checkpoint_hist, extra_state=trainer.checkpoint_state)
    if resume_ckpt is not None and resume_ckpt.get('saver') and \
            os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(output_dir):
        trainer.saver.load_state_dict(resume_ckpt['saver'])  # keep ranking checkpoints of the same run
    with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
        f.write(args_text)
    utils.trim_summary(os.path.join(output_dir, 'summary.csv'), start_epoch)
    return output_dir


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


def run_epochs(trainer: Trainer, args, loader_train, loader_val, dataset_train, mixup_fn, start_epoch: int,
               skip_updates: int, resume_rng, output_dir, eval_metric: str, validate_ema: bool) -> int:
    primary = utils.is_primary(args)
    num_epochs = trainer.num_epochs
    best_metric, best_epoch, final_metrics = None, None, None
    keys = summary_keys(trainer.heads, validate_ema)
    try:
        for epoch in range(start_epoch, num_epochs):
            if hasattr(dataset_train, 'set_epoch'):
                dataset_train.set_epoch(epoch)
            elif args.distributed and hasattr(loader_train.sampler, 'set_epoch'):
                loader_train.sampler.set_epoch(epoch)
            trainer.epoch_rng = gather_rng_states(args) if args.recovery_interval else None
            epoch_start = time.time()
            train_metrics = trainer.train_one_epoch(epoch, loader_train, mixup_fn, skip_updates, resume_rng)
            skip_updates, resume_rng = 0, None
            if primary:
                _logger.info(f'Epoch {epoch} done in {_fmt_seconds(time.time() - epoch_start)}; '
                             f'k trained so far: {trainer.sampler.histogram()}')
            eval_metrics, latest_metric = None, None
            last = epoch == num_epochs - 1
            if loader_val is not None and ((epoch + 1) % args.eval_interval == 0 or last):
                eval_metrics = trainer.validate_heads(trainer.module, loader_val, f'model, epoch {epoch}')
                ranking = eval_metrics
                if validate_ema:
                    ema_metrics = trainer.validate_heads(trainer.model_ema.module, loader_val, f'EMA, epoch {epoch}')
                    eval_metrics.update(('ema_' + key, value) for key, value in ema_metrics.items())
                    ranking = ema_metrics
                latest_metric = ranking[eval_metric]
                final_metrics = eval_metrics
            elif loader_val is None:
                latest_metric = train_metrics['loss']
            if output_dir is not None:
                lrs = [g['lr'] for g in trainer.optimizer.param_groups]
                row = eval_metrics if eval_metrics is not None else {key: '' for key in keys}
                utils.update_summary(epoch, train_metrics, row, filename=os.path.join(output_dir, 'summary.csv'),
                                     lr=sum(lrs) / len(lrs))
            best_metric, best_epoch = trainer.save_checkpoint(epoch, latest_metric)
            if trainer.lr_scheduler is not None:
                trainer.lr_scheduler.step(epoch + 1, latest_metric)
    except KeyboardInterrupt:
        if primary:
            _logger.warning('Interrupted: the last complete checkpoint is last.pth.tar in the run folder')
        return 130
    if primary and final_metrics is not None:
        _logger.info(format_final_table(trainer.module, trainer.heads, final_metrics))
    if primary and best_metric is not None:
        _logger.info(f'*** Best {eval_metric}: {best_metric:.4f} (epoch {best_epoch}); run took '
                     f'{_fmt_seconds(time.time() - trainer.run_start)}; checkpoints in {output_dir}')
    if args.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
