"""Training arguments: timm ``train.py`` names, ``--config FILE.yaml`` defaults, HydraViT flags, early checks.

Two parsers as in timm: the first only reads ``--config``; the YAML's keys become defaults of the second,
so command-line flags override the file. Keys the parser does not know are kept (so a run's
``args.yaml`` round-trips) and reported in a warning; timm features this loop does not implement are
accepted at their neutral value and rejected, naming the flag, otherwise.
"""
import argparse
import logging
import math
import os
import sys
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple

import torch
import yaml
from timm.optim import get_optimizer_info, list_optimizers
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ParseKwargs

from .objective import KD_CHAINS, TEACHER_KD
from .sampler import SUBNET_POLICIES, normalize_weights

_logger = logging.getLogger('train')


class ConfigError(ValueError):
    """A bad flag or config value; the message names the flag."""


# timm train.py keys accepted only at these (neutral) values: the feature is not implemented here.
UNSUPPORTED = {
    'aug_splits': 0, 'jsd_loss': False, 'split_bn': False, 'resplit': False, 'torchscript': False,
    'pretrained': False, 'pretrained_path': None, 'fuser': '', 'bn_momentum': None,
    'bn_eps': None, 'drop_block': None, 'amp_impl': 'native', 'tta': 0, 'log_wandb': False, 'sync_bn': False,
    'device_modules': None, 'save_images': False,
}
EVAL_METRICS = ('top1', 'top5', 'loss')  # mean over the evaluated head counts; or e.g. top1_k12 for one k
PROG = 'python -m hydravit.train'


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: the full usage of ~150 flags would bury the message. Flags
    are matched by their exact names (no abbreviations: ``--amp`` must never be read as another ``--amp-...``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def _config_parser() -> argparse.ArgumentParser:
    """The first-stage parser: what must be known before the YAML file is read."""
    parser = _Parser(prog=PROG, description='Training Config', add_help=False)
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML file whose keys (timm train.py argument names) set defaults')
    parser.add_argument('--check-only', action='store_true', default=False,
                        help='check the arguments, the files they name and the data folder as a run would, print '
                             'only errors, then exit (0: all good, 2: bad input) without writing anything. '
                             'distributed_train.sh runs this once before torchrun starts the workers')
    return parser


def is_check_only(argv: Optional[Sequence[str]] = None) -> bool:
    """Whether ``argv`` asks for ``--check-only`` (read by the first-stage parser, before any YAML)."""
    return _config_parser().parse_known_args(sys.argv[1:] if argv is None else argv)[0].check_only


def build_parser() -> argparse.ArgumentParser:
    """The main parser: timm train.py's arguments plus the HydraViT ones."""
    parser = _Parser(
        prog=PROG, description='HydraViT training (stochastic head sampling on timm)',
        parents=[_config_parser()])
    _add_data_args(parser)
    _add_model_args(parser)
    _add_hydra_args(parser)
    _add_step_args(parser)
    _add_device_args(parser)
    _add_optimizer_args(parser)
    _add_schedule_args(parser)
    _add_augmentation_args(parser)
    _add_ema_args(parser)
    _add_misc_args(parser)
    return parser


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Dataset parameters')
    parser.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (same as --data-dir)')
    group.add_argument('--data-dir', metavar='DIR', default=None, help='path to dataset (root dir)')
    group.add_argument('--dataset', metavar='NAME', default='', help='dataset type (default: ImageFolder/ImageTar)')
    group.add_argument('--train-split', metavar='NAME', default='train', help='train split (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='validation split (default: validation; empty: no validation)')
    group.add_argument('--train-num-samples', default=None, type=int, metavar='N')
    group.add_argument('--val-num-samples', default=None, type=int, metavar='N')
    group.add_argument('--dataset-download', action='store_true', default=False)
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME')
    group.add_argument('--input-img-mode', default=None, type=str)
    group.add_argument('--input-key', default=None, type=str)
    group.add_argument('--target-key', default=None, type=str)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', '-m', default='hydravit_dyn_patch16_224', type=str, metavar='MODEL')
    group.add_argument('--pretrained', action='store_true', default=False, help='not supported: local files only')
    group.add_argument('--pretrained-path', default=None, type=str, help='not supported: use --initial-checkpoint')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='local weights to start from (full-size ViT / HydraViT; see --init-slices)')
    group.add_argument('--initial-checkpoint-weights', default='auto', choices=('auto', 'ema', 'model'),
                       help="which weights of --initial-checkpoint: auto = the EMA when it holds one, as timm's "
                            "load_checkpoint does, else the model's (default: auto)")
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='training checkpoint to continue from exactly (model, EMA, optimizer, RNG, sampler)')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='resume weights only: fresh optimizer, scaler and sampler')
    group.add_argument('--num-classes', type=int, default=None, metavar='N')
    group.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type')
    group.add_argument('--img-size', type=int, default=None, metavar='N')
    group.add_argument('--in-chans', type=int, default=None, metavar='N')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='per-process batch size')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    group.add_argument('--channels-last', action='store_true', default=False)
    group.add_argument('--fuser', default='', type=str)
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N')
    group.add_argument('--grad-checkpointing', action='store_true', default=False)
    group.add_argument('--fast-norm', default=False, action='store_true')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra create_model kwargs, e.g. separate_classifiers="(3,6,12)"')
    group.add_argument('--head-init-scale', default=None, type=float)
    group.add_argument('--head-init-bias', default=None, type=float)
    group.add_argument('--torchscript', action='store_true', default=False)
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor', metavar='BACKEND',
                       help='torch.compile the model with this backend (default when given alone: inductor); one '
                            'graph per head count, see docs/training.md')
    group.add_argument('--torchcompile-mode', type=str, default=None, metavar='MODE',
                       help='torch.compile mode, e.g. max-autotune (default: torch\'s default)')


def _add_hydra_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('HydraViT parameters')
    group.add_argument('--heads', type=int, nargs='+', default=None, metavar='K',
                       help='head counts to sample during training and to validate (default: 3 6 12)')
    group.add_argument('--weights', type=float, nargs='+', default=None, metavar='W',
                       help='sampling weights, one per --heads entry, any positive scale (default: uniform)')
    group.add_argument('--drop-p', type=int, default=-1, metavar='N',
                       help='accepted for compatibility with the original CLI; has no effect (see docs/training.md)')
    group.add_argument('--shared-heads', action='store_true', default=False,
                       help='DDP: all ranks train the same k each step (default: every rank draws its own k)')
    group.add_argument('--init-slices', action='store_true', default=False,
                       help='--initial-checkpoint is a narrower ViT (e.g. DeiT-Tiny): copy it into the leading slices')
    group.add_argument('--eval-interval', type=int, default=1, metavar='N',
                       help='validate every N epochs (and always after the last one)')


def _add_step_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Subnetworks per step and distillation (see docs/training.md)')
    group.add_argument('--subnets-per-step', type=int, default=1, metavar='N',
                       help='distinct head counts trained per optimizer step, gradients summed (default: 1, the paper)')
    group.add_argument('--subnet-policy', default='random', choices=SUBNET_POLICIES,
                       help='random: N weighted draws; sandwich: largest + smallest + N-2 draws; stratified: '
                            'largest + smallest + one draw from each of N-2 strata; largest: largest + N-1 draws '
                            '(default: random)')
    group.add_argument('--inplace-kd', action='store_true', default=False,
                       help='every subnetwork of a step but the largest also learns from a larger one\'s logits')
    group.add_argument('--kd-chain', default='largest', choices=KD_CHAINS,
                       help='in-place KD teacher: the largest subnetwork of the step, or the next larger one')
    group.add_argument('--kd-alpha', type=float, default=0.5, metavar='A',
                       help='loss = (1 - A) * CE + A * KD for distilled subnetworks (default: 0.5)')
    group.add_argument('--kd-temperature', type=float, default=1.0, metavar='T', help='soft KD temperature')
    group.add_argument('--teacher', default='', type=str, metavar='MODEL', help='external teacher: a timm model name')
    group.add_argument('--teacher-checkpoint', default='', type=str, metavar='FILE',
                       help='teacher weights (local file, read weights-only and strictly)')
    group.add_argument('--teacher-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='create_model kwargs of the teacher, e.g. num_classes=10')
    group.add_argument('--teacher-heads', type=int, default=None, metavar='K',
                       help='run a HydraViT teacher at K heads (default: its active head count, all heads)')
    group.add_argument('--teacher-kd', default='soft', choices=TEACHER_KD,
                       help="soft: KL on tempered softmax; hard: DeiT's CE with the teacher's argmax")
    group.add_argument('--full-warmup-epochs', type=int, default=0, metavar='E',
                       help='the first E epochs train only the largest head count of --heads')


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default=None, type=str, help='cuda if available else cpu (default)')
    group.add_argument('--amp', action='store_true', default=False, help='mixed precision (torch.autocast)')
    group.add_argument('--amp-dtype', default='float16', type=str, help='float16 (with GradScaler) or bfloat16')
    group.add_argument('--amp-impl', default='native', type=str, help='native only')
    group.add_argument('--no-ddp-bb', action='store_true', default=False, help='DDP broadcast_buffers off')
    group.add_argument('--synchronize-step', action='store_true', default=False)
    group.add_argument('--local_rank', '--local-rank', default=0, type=int)
    group.add_argument('--device-modules', default=None, type=str, nargs='+')


def _add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M')
    group.add_argument('--weight-decay', type=float, default=2e-5)
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    group.add_argument('--clip-mode', type=str, default='norm', help='norm, value or agc')
    group.add_argument('--layer-decay', type=float, default=None)
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs)


def _add_schedule_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER')
    group.add_argument('--sched-on-updates', action='store_true', default=False)
    group.add_argument('--lr', type=float, default=None, metavar='LR', help='overrides --lr-base if set')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='lr = lr_base * global_batch_size / lr_base_size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE', help='linear or sqrt')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N')
    group.add_argument('--lr-k-decay', type=float, default=1.0)
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR')
    group.add_argument('--epochs', type=int, default=300, metavar='N')
    group.add_argument('--epoch-repeats', type=float, default=0., metavar='N')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    group.add_argument('--warmup-prefix', action='store_true', default=False)
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')


def _add_augmentation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False)
    group.add_argument('--train-crop-mode', type=str, default=None)
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO')
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--vflip', type=float, default=0.)
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT')
    group.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT')
    group.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT')
    group.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT')
    group.add_argument('--aa', type=str, default=None, metavar='NAME', help='AutoAugment / RandAugment policy')
    group.add_argument('--aug-repeats', type=float, default=0)
    group.add_argument('--aug-splits', type=int, default=0)
    group.add_argument('--jsd-loss', action='store_true', default=False)
    group.add_argument('--bce-loss', action='store_true', default=False)
    group.add_argument('--bce-sum', action='store_true', default=False)
    group.add_argument('--bce-target-thresh', type=float, default=None)
    group.add_argument('--bce-pos-weight', type=float, default=None)
    group.add_argument('--reprob', type=float, default=0., metavar='PCT')
    group.add_argument('--remode', type=str, default='pixel')
    group.add_argument('--recount', type=int, default=1)
    group.add_argument('--resplit', action='store_true', default=False)
    group.add_argument('--mixup', type=float, default=0.0)
    group.add_argument('--cutmix', type=float, default=0.0)
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', type=str, default='batch')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N')
    group.add_argument('--smoothing', type=float, default=0.1)
    group.add_argument('--train-interpolation', type=str, default='random')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT')
    group.add_argument('--drop-connect', type=float, default=None, metavar='PCT', help='deprecated: --drop-path')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT')
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT')
    group.add_argument('--bn-momentum', type=float, default=None)
    group.add_argument('--bn-eps', type=float, default=None)
    group.add_argument('--sync-bn', action='store_true', default=False)
    group.add_argument('--dist-bn', type=str, default='reduce', help='no BatchNorm in ViTs: accepted, unused')
    group.add_argument('--split-bn', action='store_true', default=False)


def _add_ema_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False)
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='keep the EMA on CPU (rank 0); it is then not validated during training')
    group.add_argument('--model-ema-decay', type=float, default=0.9998)
    group.add_argument('--model-ema-warmup', action='store_true', default=False)


def _add_misc_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S')
    group.add_argument('--worker-seeding', type=str, default='all')
    group.add_argument('--log-interval', type=int, default=50, metavar='N', help='optimizer steps between logs')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='optimizer steps between recovery checkpoints (0: off)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N')
    group.add_argument('--save-images', action='store_true', default=False)
    group.add_argument('--pin-mem', action='store_true', default=False)
    group.add_argument('--no-prefetcher', action='store_true', default=False)
    group.add_argument('--output', default='', type=str, metavar='PATH', help='default: ./output/train')
    group.add_argument('--experiment', default='', type=str, metavar='NAME')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC',
                       help='best-checkpoint metric: top1/top5/loss = mean over --heads, or e.g. top1_k12')
    group.add_argument('--tta', type=int, default=0, metavar='N')
    group.add_argument('--use-multi-epochs-loader', action='store_true', default=False)
    group.add_argument('--log-wandb', action='store_true', default=False)


def read_config_file(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f'--config: file not found: {path}')
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f'--config: {path} is not valid YAML: {e}') from e
    if not isinstance(cfg, dict):
        raise ConfigError(f'--config: {path} must hold a mapping of argument names to values')
    return cfg


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """(args, args_text): YAML defaults overridden by the command line; args_text is the YAML of the result."""
    config_args, remaining = _config_parser().parse_known_args(argv)
    parser = build_parser()
    if config_args.config:
        cfg = read_config_file(config_args.config)
        known = {a.dest for a in parser._actions}
        unknown = sorted(k for k in cfg if k not in known)
        if unknown:
            _logger.warning(f'--config {config_args.config}: keys unknown to this trainer are kept but unused: '
                            f'{", ".join(unknown)}')
        parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args.config = config_args.config
    args.check_only = config_args.check_only
    check_static_args(args)
    return args, yaml.safe_dump(plain_args(args), default_flow_style=False)


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The parsed arguments as a dict of YAML / weights-only safe values (tuples become lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return str(v)
    return {k: plain(v) for k, v in vars(args).items()}


def check_static_args(args: argparse.Namespace) -> None:
    """Checks that need no model or data. Raises ConfigError naming the flag."""
    for key, neutral in UNSUPPORTED.items():
        if getattr(args, key, neutral) != neutral:
            flag = '--' + key.replace('_', '-')
            raise ConfigError(f'{flag}: not supported by hydravit.train (got {getattr(args, key)!r}, '
                              f'only {neutral!r} is accepted)')
    if args.heads is not None:
        heads = list(args.heads)
        dupes = sorted({k for k in heads if heads.count(k) > 1})
        if dupes:
            raise ConfigError(f'--heads: duplicate head counts {dupes}')
    if args.weights is not None:
        if args.heads is None:
            raise ConfigError('--weights: needs --heads (one weight per head count, same order)')
        try:
            normalize_weights(args.weights, len(args.heads))
        except ValueError as e:
            raise ConfigError(str(e)) from e
    positive = {'batch_size': args.batch_size, 'grad_accum_steps': args.grad_accum_steps, 'epochs': args.epochs,
                'eval_interval': args.eval_interval, 'log_interval': args.log_interval,
                'checkpoint_hist': args.checkpoint_hist}
    for key, value in positive.items():
        if value is None or value < 1:
            raise ConfigError(f'--{key.replace("_", "-")}: must be >= 1, got {value}')
    if args.workers < 0:
        raise ConfigError(f'--workers: must be >= 0, got {args.workers}')
    if args.amp_dtype not in ('float16', 'bfloat16'):
        raise ConfigError(f'--amp-dtype: float16 or bfloat16, got {args.amp_dtype!r}')
    if args.clip_mode not in ('norm', 'value', 'agc'):
        raise ConfigError(f'--clip-mode: norm, value or agc, got {args.clip_mode!r}')
    if args.init_slices and not args.initial_checkpoint:
        raise ConfigError('--init-slices: needs --initial-checkpoint')
    check_eval_metric(args.eval_metric, args.heads)
    check_step_args(args)
    check_compile_args(args)
    check_optimizer_and_schedule(args)
    if not (args.data or args.data_dir):
        raise ConfigError('--data-dir: give the dataset folder (positional DIR or --data-dir)')
    for key in ('lr', 'lr_base', 'weight_decay', 'smoothing', 'mixup', 'cutmix', 'reprob', 'drop'):
        value = getattr(args, key)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ConfigError(f'--{key.replace("_", "-")}: must be a finite number >= 0, got {value}')


def check_eval_metric(metric: str, heads: Optional[List[int]]) -> None:
    if metric in EVAL_METRICS:
        return
    name, _, k = metric.partition('_k')
    if name in EVAL_METRICS and k.isdigit() and (heads is None or int(k) in heads):
        return
    raise ConfigError(f'--eval-metric: one of {", ".join(EVAL_METRICS)} (mean over --heads) or NAME_kK '
                      f'with K in --heads (e.g. top1_k12), got {metric!r}')


def check_step_args(args: argparse.Namespace) -> None:
    """Subnetworks-per-step and distillation flags that contradict each other or are out of range."""
    # --subnets-per-step against --subnet-policy, --heads and --weights: HeadSampler.check_step, in prepare_run
    if not (math.isfinite(args.kd_alpha) and 0.0 <= args.kd_alpha <= 1.0):
        raise ConfigError(f'--kd-alpha: must be in [0, 1], got {args.kd_alpha}')
    if not (math.isfinite(args.kd_temperature) and args.kd_temperature > 0):
        raise ConfigError(f'--kd-temperature: must be > 0, got {args.kd_temperature}')
    if args.full_warmup_epochs < 0:
        raise ConfigError(f'--full-warmup-epochs: must be >= 0, got {args.full_warmup_epochs}')
    if args.inplace_kd and args.subnets_per_step < 2 and not args.teacher:
        raise ConfigError('--inplace-kd: needs --subnets-per-step >= 2 (a larger subnetwork in the step to learn '
                          'from) or a --teacher')
    if args.teacher and not args.teacher_checkpoint:
        raise ConfigError('--teacher-checkpoint: required with --teacher (a local weights file)')
    for key in ('teacher_checkpoint', 'teacher_kwargs', 'teacher_heads'):
        if getattr(args, key) and not args.teacher:
            raise ConfigError(f'--{key.replace("_", "-")}: given without --teacher')


def check_compile_args(args: argparse.Namespace) -> None:
    """``--torchcompile BACKEND`` must be a registered dynamo backend and ``--torchcompile-mode`` a known mode."""
    if args.torchcompile is None:
        if args.torchcompile_mode is not None:
            raise ConfigError('--torchcompile-mode: given without --torchcompile')
        return
    if args.torchcompile not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f'--torchcompile: unknown backend {args.torchcompile!r} '
                          f'(available: {", ".join(torch._dynamo.list_backends())})')
    if args.torchcompile_mode is not None:
        from torch._inductor import list_mode_options  # the modes torch.compile accepts
        if args.torchcompile_mode not in list_mode_options():
            raise ConfigError(f'--torchcompile-mode: unknown mode {args.torchcompile_mode!r} '
                              f'(one of {", ".join(list_mode_options())})')


def check_optimizer_and_schedule(args: argparse.Namespace) -> None:
    """``--opt`` and ``--sched`` by timm's own rules (an optional ``lookahead_`` prefix; the scheduler factory's
    names), so a typo stops the run here and not after the data and the model are set up."""
    try:
        get_optimizer_info(args.opt.lower().split('_')[-1])
    except ValueError:
        raise ConfigError(f'--opt: unknown optimizer {args.opt!r} (timm.optim.list_optimizers() has '
                          f'{len(list_optimizers())}, e.g. sgd, adamw, lamb)') from None
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        scheduler, _ = create_scheduler_v2(probe, **scheduler_kwargs(args), updates_per_epoch=1)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f'--sched: {e}') from None
    if scheduler is None:  # timm < 1.0.31 returns no scheduler for a name it does not know
        raise ConfigError(f'--sched: Unknown scheduler {args.sched!r}.')
