"""HydraViT training loop: epochs, optimizer steps, validation, checkpoints and logs.

What one optimizer step computes (which subnetworks, which losses, the teacher) is ``objective.StepObjective``;
this module runs it. Built on timm's library APIs (data, Mixup/CutMix, optimizer and scheduler factories,
ModelEmaV3, CheckpointSaver, losses); argument names follow timm's ``train.py``. Run
``python -m hydravit.train --help``, or ``./distributed_train.sh NPROC DATA_DIR ...`` for torchrun.
See docs/training.md.
"""
import argparse
import csv
import glob
import logging
import os
import sys
import time
from datetime import datetime
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from timm import utils
from timm.data import resolve_data_config
from timm.models import model_parameters, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from ..checkpoint import newest_finite_checkpoint
from ..evaluation.accuracy import evaluate_heads
from .builders import (
    align_classifier,
    check_dataset_classes,
    check_device,
    compile_model,
    create_amp,
    create_model_ema,
    create_train_loss,
    create_train_model,
    describe_step,
    load_initial_checkpoint,
    resolve_lr,
    resolve_train_heads,
    setup_device,
    wrap_ddp,
)
from .checkpointing import (
    CheckpointFiles,
    TrainingState,
    check_resume_layout,
    check_resume_optimizer,
    continues_run,
    gather_rng_states,
    resume_position,
    rng_state,
    run_layout,
    set_rng_state,
)
from .config import PROG, ConfigError, check_eval_metric, is_check_only, parse_args
from .data import check_data_dir, create_datasets, create_loaders, disable_mixup_after, train_class_names
from .objective import StepLosses, StepObjective, no_sync_unless
from .report import (
    EpochMeters,
    format_final_table,
    format_seconds,
    format_table,
    header_layout,
    heads_metrics,
    summary_header,
    summary_keys,
)
from .sampler import HeadSampler
from .teacher import create_teacher

_logger = logging.getLogger('train')
DEFAULT_OUTPUT = './output/train'  # --output's default, as timm's train.py


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the message says what to do, naming only a checkpoint that exists and
    holds finite weights (``divergence_advice``)."""


def divergence_advice(files: Optional[CheckpointFiles], resumed_from: Optional[str]) -> str:
    """What to do after a non-finite loss. The newest checkpoint of the run folder is not necessarily good (the
    weights can go bad in the step before an epoch's save, and the loss only shows it at the next step), so each
    one is read and checked, newest first; none is named unless one holds finite weights."""
    remedy = 'lower --lr, set --clip-grad, or check the data'
    if files is None:  # not the primary process: that one names the checkpoints
        return remedy[0].upper() + remedy[1:]
    # last.pth.tar first: among files of the same time (hard links of one save) it is the one to name
    written = sorted(glob.glob(os.path.join(glob.escape(files.directory), '*' + files.extension)),
                     key=lambda p: os.path.basename(p) != 'last' + files.extension)
    found = newest_finite_checkpoint(written)
    if found is None:
        none = (f'No checkpoint in {files.directory} holds finite weights ({len(written)} checked)' if written
                else f'No checkpoint was written in {files.directory}')
        start = f' (the run started from --resume {resumed_from})' if resumed_from else ''
        return f'{none}{start}; {remedy}'
    path, checkpoint = found
    where = (f'epoch {checkpoint.get("epoch")}, {checkpoint["updates_done"]} updates in'
             if checkpoint.get('updates_done') else f'end of epoch {checkpoint.get("epoch")}')
    return f'The last checkpoint with finite weights is {path} ({where}); resume from it with --resume and {remedy}'

# --- one training epoch -------------------------------------------------------------------------------------
class Trainer:
    """State shared by the epoch and validation loops. What a step computes is ``objective``'s business."""

    def __init__(self, args, model, state: TrainingState, objective: StepObjective, amp_autocast, device,
                 num_epochs):
        self.args = args
        self.state = state  # what checkpoints hold: saved and restored there, and only there
        self.model = model  # possibly DDP-wrapped and/or compiled
        self.module = state.model  # the HydraViT itself: validation, EMA updates
        self.model_ema = state.model_ema
        self.optimizer = state.optimizer
        self.loss_scaler = state.loss_scaler
        self.lr_scheduler = state.lr_scheduler
        self.objective = objective
        self.sampler = objective.sampler
        self.amp_autocast = amp_autocast
        self.device = device
        self.heads = state.heads
        self.num_epochs = num_epochs
        self.run_start = time.time()
        self.epoch_rng: Optional[List[dict]] = None  # every rank's RNG states at the start of this epoch
        self.step_time = utils.AverageMeter()  # seconds per optimizer step of the last epoch
        # head counts torch.compile has a graph for (None: eager): a step with a new one compiles first
        self.compiled_heads: Optional[set] = set() if args.torchcompile else None

    def save_checkpoint(self, epoch: int, metric: Optional[float]):
        """End-of-epoch checkpoint (a collective in DDP). Returns (best_metric, best_epoch)."""
        return self.state.save_epoch(epoch, metric)

    def _check_finite(self, losses: StepLosses, epoch: int, update_idx: int) -> None:
        bad = (~torch.isfinite(losses.total)).float()
        if self.args.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise NonFiniteLossError(f'loss is {losses.total.item()} at epoch {epoch}, update {update_idx} '
                                     f'(k={losses.heads}); nothing more is saved. '
                                     + divergence_advice(self.state.files, self.args.resume or None))

    def train_one_epoch(self, epoch: int, loader, mixup_fn, skip_updates: int = 0,
                        resume_rng: Optional[List[dict]] = None) -> Dict[str, float]:
        args, model = self.args, self.model
        disable_mixup_after(args, epoch, loader, mixup_fn)
        accum_steps = args.grad_accum_steps
        num_batches = len(loader)
        updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
        num_updates = epoch * updates_per_epoch + skip_updates
        meters = EpochMeters()
        model.train()
        self.optimizer.zero_grad()
        update_start = time.time()
        update_samples, losses, heads, compiling = 0, None, [], []
        sync = no_sync_unless(model)
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
                heads = self.objective.draw(epoch)  # one head set per optimizer step (see docs/training.md)
                losses = StepLosses.zeros(self.device)
                compiling = self._new_compiled_heads(heads)
            if not args.prefetcher:
                input, target = input.to(self.device), target.to(self.device)
                if mixup_fn is not None:
                    input, target = mixup_fn(input, target)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            self.objective.micro_batch(model, input, target, heads, self.amp_autocast, self._backward, sync,
                                       last_micro_batch=need_update, divisor=window, losses=losses)
            update_samples += input.size(0)
            if not need_update:
                continue
            self._check_finite(losses, epoch, update_idx)
            self._step()
            num_updates += 1
            if self.model_ema is not None:
                self.model_ema.update(self.module, step=num_updates)
            if args.synchronize_step and self.device.type == 'cuda':
                torch.cuda.synchronize()
            meters.update(losses, update_samples, time.time() - update_start)
            if compiling and utils.is_primary(args):
                _logger.info(f'torch.compile: first step at k={",".join(map(str, compiling))} took '
                             f'{meters.update_time.val:.1f} s, compiling included')
            update_start = time.time()
            if update_idx % args.log_interval == 0 or update_idx == updates_per_epoch - 1:
                self._log_progress(epoch, update_idx, updates_per_epoch, meters, update_samples, heads)
            if args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0 \
                    and update_idx + 1 < updates_per_epoch:
                self.save_recovery(epoch, update_idx + 1)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step_update(num_updates=num_updates, metric=meters.loss.avg)
            update_samples = 0
        if hasattr(self.optimizer, 'sync_lookahead'):
            self.optimizer.sync_lookahead()
        self.step_time = meters.update_time
        return meters.epoch_metrics(args, self.device)

    def _new_compiled_heads(self, heads: Sequence[int]) -> List[int]:
        """The head counts of this step that torch.compile has no graph for yet (announced: compiling is slow)."""
        if self.compiled_heads is None:
            return []
        new = [k for k in heads if k not in self.compiled_heads]
        self.compiled_heads.update(new)
        if new and utils.is_primary(self.args):
            _logger.info(f'torch.compile: compiling the graph for k={",".join(map(str, new))} (first step at this '
                         f'width)')
        return new

    def _backward(self, loss: torch.Tensor, need_update: bool) -> None:
        args = self.args
        second_order = getattr(self.optimizer, 'is_second_order', False)
        if self.loss_scaler is not None:
            # the scaler steps the optimizer itself when need_update (after unscale + clip)
            clip_params = model_parameters(self.model, exclude_head='agc' in args.clip_mode)
            self.loss_scaler(loss, self.optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                             parameters=clip_params, create_graph=second_order, need_update=need_update)
            return
        loss.backward(create_graph=second_order)

    def _step(self) -> None:
        if self.loss_scaler is None:
            if self.args.clip_grad is not None:
                utils.dispatch_clip_grad(model_parameters(self.model, exclude_head='agc' in self.args.clip_mode),
                                         value=self.args.clip_grad, mode=self.args.clip_mode)
            self.optimizer.step()
        self.optimizer.zero_grad()

    def _log_progress(self, epoch, update_idx, updates_per_epoch, meters: 'EpochMeters', samples, heads) -> None:
        if not utils.is_primary(self.args):
            return
        lrs = [g['lr'] for g in self.optimizer.param_groups]
        per_update = meters.update_time.avg
        left_epoch = per_update * (updates_per_epoch - update_idx - 1)
        left_run = left_epoch + per_update * updates_per_epoch * (self.num_epochs - epoch - 1)
        rate = samples * self.args.world_size / max(meters.update_time.val, 1e-9)
        kd = f' (CE {meters.ce.avg:#.3g}, KD {meters.kd.avg:#.3g})' if self.objective.distills else ''
        _logger.info(
            f'Train: {epoch}/{self.num_epochs - 1} [{update_idx + 1:>4d}/{updates_per_epoch} '
            f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
            f'Loss: {meters.loss.val:#.3g} ({meters.loss.avg:#.3g}){kd}  {rate:>7.1f} img/s  '
            f'LR: {sum(lrs) / len(lrs):.3e}  k: {",".join(map(str, heads))}  '
            f'ETA: epoch {format_seconds(left_epoch)}, run {format_seconds(left_run)}  '
            f'k-hist: {self.sampler.format_histogram()}')

    def save_recovery(self, epoch: int, updates_done: int) -> None:
        """Mid-epoch checkpoint (a collective in DDP); resuming from it replays the epoch's data order."""
        self.state.save_recovery(epoch, updates_done, self.epoch_rng)

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
        metrics = heads_metrics(rows)
        if utils.is_primary(self.args):
            _logger.info(format_table(model, self.heads, metrics, label))
        return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    check_only = is_check_only(argv)
    if not logging.getLogger().handlers:  # keep the caller's logging (tests, notebooks) if configured
        # --check-only runs before the workers, which log the same warnings again: it prints errors only
        utils.setup_default_logging(default_level=logging.ERROR if check_only else logging.INFO)
    try:
        args, args_text = parse_args(argv)
        if args.check_only:
            prepare_run(args)
            return 0
        return train(args, args_text)
    except ConfigError as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        _logger.error(f'Stopping: {e}')
        return 1


def train(args: argparse.Namespace, args_text: str) -> int:
    # all checks; nothing read or written yet
    resume_ckpt, model, heads, sampler, teacher, initial_classes = prepare_run(args)
    device = setup_device(args)
    primary = utils.is_primary(args)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if primary:
        _logger.info(f'Model {safe_model_name(args.model)}: {model.num_heads} heads x {model.head_dim}, '
                     f'{sum(p.numel() for p in model.parameters()):,} params; training k in {heads} '
                     f'with probabilities {[round(p, 4) for p in sampler.probs]}; {describe_step(args)}')
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    input_img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')
    dataset_train, dataset_val = create_datasets(args, input_img_mode)
    check_dataset_classes(args, dataset_train)
    class_names = train_class_names(dataset_train)
    check_resume_classes(args, resume_ckpt, class_names)
    if initial_classes is not None and resume_ckpt is None:  # before the optimizer and the EMA copy the classifier
        align_classifier(model, initial_classes, class_names, args.initial_checkpoint)
    for net in (model, teacher):
        if net is not None:
            net.to(device=device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    resolve_lr(args)
    optimizer = create_train_optimizer(args, model)
    amp_autocast, loss_scaler = create_amp(args, device)
    model_ema = create_model_ema(args, model)
    module = model
    model = compile_model(args, wrap_ddp(args, model, device), len(heads))

    # data
    loader_train, loader_val, mixup_fn = create_loaders(args, dataset_train, dataset_val, data_config, device)
    objective = create_objective(args, sampler, create_train_loss(args, device), teacher)
    eval_metric = args.eval_metric if loader_val is not None else 'loss'
    decreasing = eval_metric.startswith('loss')

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing), updates_per_epoch=updates_per_epoch)
    state = TrainingState(args, module, optimizer, model_ema, loss_scaler, lr_scheduler, sampler, heads, class_names)
    point = state.resume_point(resume_ckpt, updates_per_epoch)  # may refuse: before anything is written
    trainer = Trainer(args, model, state, objective, amp_autocast, device, num_epochs)
    output_dir = create_output(args, args_text, data_config, state, decreasing) if primary else None
    state.resume(resume_ckpt, point, updates_per_epoch)  # last: it sets the RNGs training starts from
    if primary:
        trim_summary(os.path.join(output_dir, 'summary.csv'), point.start_epoch)
        _logger.info(f'Output: {output_dir}; {num_epochs} epochs of {updates_per_epoch} optimizer steps '
                     f'(batch {args.batch_size} x {args.world_size} processes x {args.grad_accum_steps} accum)')
    validate_ema = model_ema is not None and not args.model_ema_force_cpu
    return run_epochs(trainer, args, loader_train, loader_val, dataset_train, mixup_fn, point.start_epoch,
                      point.skip_updates, point.resume_rng, output_dir, eval_metric, validate_ema)


def prepare_run(args: argparse.Namespace):
    """Every check that needs no data: (resume checkpoint, model with initial weights, heads, sampler, teacher, the
    class names of --initial-checkpoint's classifier when it was loaded and the checkpoint records them)."""
    args.data_dir = args.data_dir or args.data
    check_device(args)
    resume_ckpt = (TrainingState.read(args.resume, ema=bool(args.model_ema), optimizer=not args.no_resume_opt)
                   if args.resume else None)
    utils.random_seed(args.seed, 0)  # same initial weights on every rank and every run with this --seed
    model = create_train_model(args)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    heads = resolve_train_heads(args, model, resume_ckpt)
    check_eval_metric(args.eval_metric, heads)
    if resume_ckpt is not None:
        check_resume(args, resume_ckpt, heads)
        if not args.no_resume_opt:  # a throwaway optimizer, never stepped: its parameter groups are what matters
            placeholder = argparse.Namespace(**{**vars(args), 'lr': 1e-3 if args.lr is None else args.lr})
            check_resume_optimizer(args, resume_ckpt, create_train_optimizer(placeholder, model))
    check_summary_columns(args, resume_ckpt, heads)
    sampler = HeadSampler(heads, args.weights, seed=args.seed)
    try:
        sampler.check_step(args.subnets_per_step, args.subnet_policy)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    teacher = create_teacher(args, model.num_classes)
    check_data_dir(args)
    if args.drop_p != -1:
        _logger.info('--drop-p is accepted for compatibility and has no effect: --heads sampling sets the width')
    initial_classes = None
    if args.initial_checkpoint:
        initial_classes = load_initial_checkpoint(model, args.initial_checkpoint, args.init_slices,
                                                  args.initial_checkpoint_weights)
    if resume_ckpt is not None:
        TrainingState.load_model_weights(model, resume_ckpt, args.resume)
    return resume_ckpt, model, heads, sampler, teacher, initial_classes


def check_resume(args: argparse.Namespace, checkpoint: dict, heads: List[int]) -> None:
    """Refuse, before anything is read or written, a --resume whose position this run's batch cannot continue
    (``resume_position``) or that would change its run folder's summary columns or ranking (``run_layout``)."""
    if args.start_epoch is None:
        # torchrun's workers know the world size; --check-only before them does not, a plain run is one process
        world_size = int(os.environ['WORLD_SIZE']) if 'WORLD_SIZE' in os.environ else None if args.check_only else 1
        resume_position(checkpoint, args.resume, args.batch_size, args.grad_accum_steps, world_size)
    layout = run_layout(heads, args.eval_metric, args.val_split, validates_ema(args))
    check_resume_layout(checkpoint, args.resume, layout, continues_run(checkpoint, args.resume, run_folder(args)))


def create_train_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory with timm's train.py arguments, plus --opt-kwargs."""
    return create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)


def validates_ema(args: argparse.Namespace) -> bool:
    """Whether the EMA weights are validated (summary.csv's eval_ema_* columns; they rank the checkpoints)."""
    return bool(args.model_ema and not args.model_ema_force_cpu)


def check_summary_columns(args: argparse.Namespace, resume_ckpt: Optional[dict], heads: List[int]) -> None:
    """Refuse, before anything is written, a run that would append rows to its run folder's summary.csv under
    another header: one starting past epoch 0 (--resume, --start-epoch) keeps the rows of the epochs before it
    (``trim_summary``), however the folder is reached (a symlink, a checkpoint copied from elsewhere)."""
    folder = run_folder(args)
    start = first_epoch(args, resume_ckpt)
    path = os.path.join(folder, 'summary.csv') if folder else None
    if not start or path is None or not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    expected = summary_header(heads, validates_ema(args))
    if not rows or rows[0] == expected or not any(row and _row_epoch(row) < start for row in rows[1:]):
        return
    saved, layout = header_layout(rows[0]), header_layout(expected)
    flag = next((f for f in layout if layout[f] != saved[f]), None)
    what = (f'{flag} gives {layout[flag]}, but {path} was written with {saved[flag]}' if flag else
            f'{path} holds other columns than this run writes ({len(rows[0])}, not {len(expected)})')
    raise ConfigError(f'{what}; its rows of the epochs before {start} would stay under that header: '
                      f'{f"use the same {flag}" if flag else "start at epoch 0"}, or a new run folder '
                      f'(--experiment NAME)')


def _row_epoch(row: List[str]) -> float:
    try:
        return float(row[0])
    except ValueError:  # not a row of epochs: kept as the header would be
        return float('-inf')


def first_epoch(args: argparse.Namespace, resume_ckpt: Optional[dict]) -> int:
    """The epoch this run starts at: --start-epoch, else a --resume checkpoint's (the one it stopped in, or the
    next after an end-of-epoch checkpoint), else 0."""
    if args.start_epoch is not None:
        return args.start_epoch
    if resume_ckpt is None:
        return 0
    return int(resume_ckpt['epoch']) + (0 if resume_ckpt.get('updates_done') else 1)


def run_folder(args: argparse.Namespace) -> Optional[str]:
    """The run folder named by --output / --experiment, or None: without --experiment each run gets a new one."""
    return os.path.join(args.output or DEFAULT_OUTPUT, args.experiment) if args.experiment else None


def check_resume_classes(args: argparse.Namespace, resume_ckpt: Optional[dict],
                         class_names: Optional[List[str]]) -> None:
    """A resumed run must train the classes its checkpoint was trained on, in the same label order."""
    saved = (resume_ckpt or {}).get('class_names')
    if saved and class_names and list(saved) != list(class_names):
        differ = sorted(set(saved) ^ set(class_names)) or ['same names, other order']
        raise ConfigError(f'--resume: the checkpoint was trained on other classes than {args.data_dir} holds '
                          f'(differ: {", ".join(map(str, differ[:8]))})')


def create_objective(args: argparse.Namespace, sampler: HeadSampler, base_loss: nn.Module,
                     teacher: Optional[nn.Module]) -> StepObjective:
    return StepObjective(
        sampler, base_loss, num_subnets=args.subnets_per_step, policy=args.subnet_policy,
        shared_heads=args.shared_heads, world_size=args.world_size, rank=args.rank, inplace_kd=args.inplace_kd,
        kd_chain=args.kd_chain, kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature, teacher=teacher,
        teacher_kd=args.teacher_kd, full_warmup_epochs=args.full_warmup_epochs)


def create_output(args, args_text: str, data_config, state: TrainingState, decreasing: bool) -> str:
    """Run folder, args.yaml, class_map.txt and the checkpoint files (rank 0)."""
    exp_name = args.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'),
                                             safe_model_name(args.model), str(data_config['input_size'][-1])])
    output_dir = utils.get_outdir(args.output or DEFAULT_OUTPUT, exp_name)
    state.files = CheckpointFiles(output_dir, decreasing=decreasing, max_history=args.checkpoint_hist)
    with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
        f.write(args_text)
    if state.class_names:  # timm's class-map format: line i names label i (validate.py --class-map)
        with open(os.path.join(output_dir, 'class_map.txt'), 'w', encoding='utf-8') as f:
            f.write(''.join(f'{name}\n' for name in state.class_names))
    return output_dir


def trim_summary(path: str, start_epoch: int) -> None:
    """Drop summary.csv rows of epochs at or after ``start_epoch``: a resumed run writes them again (and a fresh run
    into an old folder starts a new file)."""
    if not os.path.exists(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    keep = [row for row in rows[1:] if row and int(float(row[0])) < start_epoch]
    if len(keep) == len(rows) - 1:
        return
    with open(path, 'w', newline='') as f:
        if keep:
            csv.writer(f).writerows([rows[0], *keep])


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
                _logger.info(f'Epoch {epoch} done in {format_seconds(time.time() - epoch_start)} '
                             f'({trainer.step_time.count} steps, {trainer.step_time.avg:.3f} s/step); '
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
                summary = os.path.join(output_dir, 'summary.csv')
                # said explicitly: timm < 1.0.31 writes no header unless told to
                utils.update_summary(epoch, train_metrics, row, filename=summary, lr=sum(lrs) / len(lrs),
                                     write_header=not os.path.exists(summary) or os.path.getsize(summary) == 0)
            best_metric, best_epoch = trainer.save_checkpoint(epoch, latest_metric)
            if trainer.lr_scheduler is not None:
                trainer.lr_scheduler.step(epoch + 1, latest_metric)
    except KeyboardInterrupt:
        if primary:
            _logger.warning('Interrupted: the last complete checkpoint is last.pth.tar in the run folder')
        return 130
    if primary and final_metrics is not None:
        _logger.info(format_final_table(trainer.module, trainer.heads, final_metrics))
    if primary and output_dir is not None:
        _logger.info(final_checkpoints_line(output_dir, eval_metric, best_metric, best_epoch, num_epochs - 1,
                                            time.time() - trainer.run_start))
    if args.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def final_checkpoints_line(output_dir: str, eval_metric: str, best_metric: Optional[float],
                           best_epoch: Optional[int], last_epoch: int, seconds: float) -> str:
    """The run's last line: where its best and last checkpoints are."""
    best = ''
    if best_metric is not None:
        best = (f'best {os.path.join(output_dir, "model_best.pth.tar")} ({eval_metric} {best_metric:.4f}, '
                f'epoch {best_epoch}); ')
    return (f'*** Done in {format_seconds(seconds)}. Checkpoints: {best}'
            f'last {os.path.join(output_dir, "last.pth.tar")} (epoch {last_epoch})')


if __name__ == '__main__':
    sys.exit(main())
