"""What the four evaluation tools share: arguments, model/data setup, and result files.

Every tool measures one row of numbers per head count k; ``run_tool`` parses the command line,
builds the model once, validates everything before any work starts, and writes the rows, each with
the settings it was measured under (``environment.SETTINGS_KEYS``: device name, dtype, TF32, compile).
"""
import argparse
import contextlib
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from timm.data import IterableImageDataset, create_dataset, create_loader, resolve_data_config
from timm.utils import random_seed, reparameterize_model

from ..checkpoint import atomic_write, to_json
from ..classes import (
    check_class_folders,
    check_class_map_agrees,
    dataset_class_to_idx,
    folder_orders,
    ignores_class_map,
    match_classes,
    read_class_map,
    recorded_class_names,
    relabel,
    shown,
    torchvision_folder_error,
)
from ..cli import add_model_args, create_model_from_args, recorded_heads, resolve_heads
from ..model import HydraViT
from .environment import SETTINGS_KEYS, add_cuda_args, apply_cuda_args, settings_row

Row = Dict[str, float]
RESULT_SUFFIXES = ('.json', '.csv')
RESULT_FORMATS = ('csv', 'json')
MODEL_DTYPES = ('float32', 'float16', 'bfloat16')


class UsageError(ValueError):
    """Bad user input; reported as ``prog: error: ...`` without a traceback."""


@dataclass
class EvalSession:
    """Everything a tool needs: the parsed arguments, the model (eval mode, on ``device``), the head counts."""

    args: argparse.Namespace
    model: HydraViT
    heads: List[int]
    device: torch.device
    data_config: Dict
    checkpoint: Optional[dict] = None

    @property
    def input_size(self) -> tuple:
        return tuple(self.data_config['input_size'])

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype the model was cast to (``--model-dtype``), float32 by default."""
        return getattr(torch, getattr(self.args, 'model_dtype', None) or 'float32')

    def prepare_input(self, images: torch.Tensor) -> torch.Tensor:
        """An input batch on the session's device, in the model's dtype and memory layout (as timm's validate.py)."""
        images = images.to(self.device, dtype=self.model_dtype, non_blocking=True)
        if getattr(self.args, 'channels_last', False):
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    @property
    def class_names(self) -> Optional[List[str]]:
        """The classes the checkpoint was trained on, in label order (recorded by hydravit.train), else None."""
        return recorded_class_names(self.checkpoint)


# --- arguments ---------------------------------------------------------------------------------------
def create_parser(description: str, data_required: bool, default_batch_size: int) -> argparse.ArgumentParser:
    """Parser with the arguments every tool shares (names and meanings follow timm's validate.py).

    timm flags a tool cannot honour are refused with one line saying why (``add_refused_args``); a tool that
    does honour one (``--model-dtype``, ``--channels-last``, ``--torchcompile``) registers it again in its own
    ``add_args``, which replaces the refusal (``conflict_handler='resolve'``).
    """
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     conflict_handler='resolve')
    parser.add_argument(
        'data', metavar='DATA', nargs='?', default=None,
        help='image folder in ImageFolder layout, or a root holding a val/validation split folder'
             + ('' if data_required else ' (optional: without it the input is random of the model\'s input size)'))
    parser.add_argument('--data-dir', metavar='DIR', default=None, help='the same as DATA (timm\'s newer name)')
    parser.set_defaults(data_required=data_required)
    add_model_args(parser)
    parser.add_argument('-b', '--batch-size', type=int, default=default_batch_size, metavar='N',
                        help=f'batch size (default: {default_batch_size})')
    parser.add_argument('--device', default=None, help='torch device (default: cuda if available, else cpu)')
    parser.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42, as timm)')
    parser.add_argument('--results-file', default='', metavar='FILE',
                        help='write the per-k rows to FILE: CSV (header + one row per k) as timm, JSON (a list of '
                             'objects) when FILE ends in .json or with --results-format json')
    parser.add_argument('--reparam', action='store_true',
                        help="timm's reparameterize_model (a ViT has nothing to fuse)")
    parser.add_argument('--num-gpu', type=int, default=1, metavar='N', help='1 only: run one process per GPU')
    parser.add_argument('--amp-impl', default='native', help='native (torch.autocast) only')
    add_data_args(parser)
    add_cuda_args(parser)
    add_refused_args(parser)
    return parser


class _Refused(argparse.Action):
    """A timm flag that does not apply here: using it stops the tool with one line saying why."""

    def __init__(self, option_strings, dest, reason: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f'{option_string}: {self.reason}')


# timm validate.py flags that cannot apply to a HydraViT evaluation, and why: (nargs, reason).
REFUSED_FLAGS = {
    '--pretrained': (0, 'no pretrained HydraViT weights are published; pass --checkpoint FILE'),
    '--test-pool': (0, "test-time pooling widens a CNN's pooling window; a ViT's token grid is fixed by its "
                       'position table (use --img-size to resample it)'),
    '--tf-preprocessing': (0, "TensorFlow's preprocessing pipeline is not supported; use --interpolation and "
                              '--crop-pct'),
    '--torchscript': (0, 'TorchScript cannot script a HydraViT (its width is chosen at run time); use --torchcompile '
                         'where the tool has it'),
    '--aot-autograd': (0, "functorch's memory_efficient_fusion is not supported; use --torchcompile where the tool "
                          'has it'),
    '--fuser': (1, 'jit fusers apply to TorchScript models, and a HydraViT cannot be scripted'),
    '--fast-norm': (0, "HydraViT's sliceable LayerNorm does not take timm's fast-norm path, so it would change "
                       'nothing'),
    '--real-labels': (1, 'ImageNet ReaL labels are not supported (top-1 / top-5 are against the folder labels)'),
    '--valid-labels': (1, 'a partial label space is not supported; pass --class-map FILE to label a subset of '
                          'classes by name'),
    '--retry': (0, 'batch size decay and retry is not supported; choose -b'),
    '--metrics-avg': (1, 'precision / recall / F1 are not computed (top-1, top-5 and loss are)'),
    '--naflex-loader': (0, 'the NaFlex loader needs a NaFlexVit model; a HydraViT has a fixed patch grid'),
    '--naflex-max-seq-len': (1, 'the NaFlex loader needs a NaFlexVit model; a HydraViT has a fixed patch grid'),
    '--model-dtype': (1, 'not supported by this tool: it runs the model in float32'),
    '--channels-last': (0, 'not supported by this tool'),
    '--torchcompile': ('?', 'not supported by this tool'),
    '--torchcompile-mode': (1, 'not supported by this tool'),
    '--amp': (0, 'not supported by this tool: it runs the model in float32, without autocast'),
    '--amp-dtype': (1, 'not supported by this tool: it runs the model in float32, without autocast'),
    '--results-format': (1, 'not supported by this tool: --results-file FILE is JSON when FILE ends in .json, '
                            'else CSV'),
}


def add_refused_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('timm validate.py flags that do not apply')
    for flag, (nargs, reason) in REFUSED_FLAGS.items():
        group.add_argument(flag, action=_Refused, reason=reason, nargs=nargs, default=None, help=argparse.SUPPRESS)
    never = [flag for flag, (_, reason) in REFUSED_FLAGS.items() if not reason.startswith('not supported by this')]
    parser.epilog = (parser.epilog or '') + "timm validate.py flags that cannot apply (each stops with the reason): " \
        + ', '.join(never)


def add_results_format_arg(parser: argparse.ArgumentParser) -> None:
    """timm's ``--results-format`` for tools that write their results through ``report`` / ``write_results``."""
    parser.add_argument('--results-format', default=None, choices=RESULT_FORMATS,
                        help='format of --results-file (default: json for a .json file, else csv, as timm)')


def add_precision_args(parser: argparse.ArgumentParser) -> None:
    """``--model-dtype`` and ``--channels-last`` as in timm's validate.py: the model is cast once, every input
    batch follows it (``EvalSession.prepare_input``)."""
    group = parser.add_argument_group('Model precision and layout')
    group.add_argument('--model-dtype', default=None, choices=MODEL_DTYPES,
                       help='cast the model (and its inputs) to this dtype, without autocast (default: float32)')
    group.add_argument('--channels-last', action='store_true', help='channels_last memory layout')


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """timm's dataset and preprocessing arguments (used when DATA is given)."""
    group = parser.add_argument_group('Data')
    group.add_argument('--dataset', default='', help='timm dataset name (default: image folder)')
    group.add_argument('--split', default='validation', help='dataset split (default: validation)')
    group.add_argument('--num-samples', type=int, default=None, metavar='N',
                       help='samples in the split, for iterable datasets (tfds/, wds/, hfids/)')
    group.add_argument('--dataset-download', action='store_true', help='allow torch/ and tfds/ datasets to download')
    group.add_argument('--class-map', default='', metavar='FILENAME',
                       help="class name -> label file (.txt: one name per line, e.g. a training run's "
                            "class_map.txt); default: the checkpoint's class names, else the folders' sorted order")
    group.add_argument('--input-key', default=None, help='dataset key for input images')
    group.add_argument('--input-img-mode', default=None, help='image conversion mode (default: RGB, or L for 1 chan)')
    group.add_argument('--target-key', default=None, help='dataset key for target labels')
    group.add_argument('--dataset-trust-remote-code', action='store_true',
                       help="allow a Hugging Face dataset to run code from its repository")
    group.add_argument('--use-train-size', action='store_true',
                       help='use the train input size even if the model has a test size (HydraViT models have none)')
    group.add_argument('--crop-border-pixels', type=int, default=None, metavar='N', help='crop pixels from the border')
    group.add_argument('--pin-mem', action='store_true', help='pin loader memory (always on with CUDA)')
    group.add_argument('--no-prefetcher', action='store_true',
                       help="accepted for timm's command lines: the loader never uses the prefetcher here")
    group.add_argument('-j', '--workers', type=int, default=min(4, os.cpu_count() or 1), metavar='N',
                       help='data loading processes (default: min(4, CPU count))')
    group.add_argument('--crop-pct', type=float, default=None, help='center crop fraction (default: model cfg)')
    group.add_argument('--crop-mode', default=None, help='crop mode: center, squash or border (default: model cfg)')
    group.add_argument('--interpolation', default='', help='resize interpolation (default: model cfg)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='normalization mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='normalization std')
    group.add_argument('--log-freq', type=int, default=10, metavar='N', help='batches between progress lines')


def add_amp_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Mixed precision')
    group.add_argument('--amp', action='store_true', help='run the forward under torch.autocast')
    group.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'),
                       help="autocast dtype (default: float16, as timm's validate.py and train.py)")


def autocast(args: argparse.Namespace, device: torch.device):
    """``torch.autocast`` context when ``--amp`` is set, else a no-op."""
    if not getattr(args, 'amp', False):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, args.amp_dtype))


# --- setup -------------------------------------------------------------------------------------------
def create_session(args: argparse.Namespace, all_heads: bool = False, trained_only: bool = False) -> EvalSession:
    """Check the arguments, build the model and load its weights. Raises ``UsageError`` on bad input.

    ``all_heads``: without ``--heads``, use every head count the model can run (the sweep) instead of
    the checkpoint's head set. ``trained_only`` (the deploy tools): without ``--heads``, the head counts the
    checkpoint was trained on (``trained_heads``), and a warning for any ``--heads`` outside them.
    """
    check_common_args(args)
    device = resolve_device(args.device)
    apply_cuda_args(args, device)
    if getattr(args, 'seed', None) is not None:
        random_seed(args.seed)
    try:
        model, checkpoint = create_model_from_args(args)
    except FileNotFoundError as e:
        raise UsageError(f'--checkpoint: {e}') from e
    except KeyError as e:  # e.g. --use-ema on a checkpoint without EMA weights
        raise UsageError(str(e.args[0])) from e
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from e
    if not isinstance(model, HydraViT):
        raise UsageError(f'--model: {args.model} is not a HydraViT model')
    heads = trained_heads(args, model, checkpoint) if trained_only else _select_heads(args, model, checkpoint,
                                                                                          all_heads)
    data_config = resolve_data_config(vars(args), model=model)
    if not (getattr(args, 'input_size', None) or getattr(args, 'img_size', None)):
        # the resolution the model was built at (--model-kwargs img_size=...), not the one its cfg was written for
        data_config['input_size'] = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    if getattr(args, 'reparam', False):
        model = reparameterize_model(model)
    session = EvalSession(args, model.eval(), heads, device, data_config, checkpoint)
    check_class_map(session)
    model.to(device=device, dtype=session.model_dtype)  # cast once, as timm's validate.py
    if getattr(args, 'channels_last', False):
        model.to(memory_format=torch.channels_last)
    return session


def check_common_args(args: argparse.Namespace) -> None:
    """Checks of the shared flags that need no model: one ``UsageError`` naming the flag."""
    args.data = args.data or getattr(args, 'data_dir', None)
    if getattr(args, 'data_required', False) and args.data is None:
        raise UsageError('DATA (or --data-dir) is required')
    if args.batch_size < 1:
        raise UsageError(f'-b/--batch-size must be >= 1, got {args.batch_size}')
    fmt = getattr(args, 'results_format', None)
    suffix = Path(args.results_file).suffix.lower() if args.results_file else ''
    if fmt is not None and suffix in RESULT_SUFFIXES and suffix != f'.{fmt}':
        raise UsageError(f'--results-format {fmt} contradicts --results-file {args.results_file}')
    if args.results_file:
        check_output_file(args.results_file, '--results-file')
    if args.data is not None and not args.dataset and not Path(args.data).is_dir():
        raise UsageError(f'DATA: no such folder: {args.data}')
    if getattr(args, 'num_gpu', 1) != 1:
        raise UsageError(f'--num-gpu: one device per process only (DataParallel is not supported), got '
                         f'{args.num_gpu}; run one process per GPU')
    if getattr(args, 'amp_impl', 'native') != 'native':
        raise UsageError(f'--amp-impl: only native (torch.autocast) is supported, got {args.amp_impl!r}')
    if getattr(args, 'amp', False) and getattr(args, 'model_dtype', None) not in (None, 'float32'):
        raise UsageError(f'--model-dtype: {args.model_dtype} cannot be combined with --amp (autocast needs a '
                         f'float32 model)')


def check_output_file(path: str, flag: str) -> None:
    """``UsageError`` naming ``flag`` when the file ``path`` could not be written at the end of a run: it is an
    existing folder, or a folder it would be created in is a file. Checked before any work starts."""
    if Path(path).is_dir():
        raise UsageError(f'{flag}: {path} is a folder; give a file name')
    _check_parents(path, flag)


def check_output_folder(path: str, flag: str) -> None:
    """``UsageError`` naming ``flag`` when the folder ``path`` could not be created or written into at the end
    of a run: it, or a folder above it, is an existing file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f'{flag}: {path} is a file; give a folder')
    _check_parents(path, flag)


def _check_parents(path: str, flag: str) -> None:
    existing = next((p for p in Path(path).parents if p.exists()), None)  # the nearest one: mkdir starts there
    if existing is not None and not existing.is_dir():
        raise UsageError(f'{flag}: {existing} is a file, so {path} cannot be created in it')


def resolve_device(name: Optional[str]) -> torch.device:
    if not name:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f'--device: {e}') from e
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device: {name} requested but CUDA is not available')
    return device


def runnable_heads(model: HydraViT) -> List[int]:
    """Every head count the model can run (all of 1..H, or those with a separate classifier)."""
    return list(model.separate_classifiers or range(1, model.num_heads + 1))


def _select_heads(args, model: HydraViT, checkpoint: Optional[dict], all_heads: bool) -> List[int]:
    if args.heads is None and (all_heads or (model.separate_classifiers and not recorded_heads(checkpoint))):
        return runnable_heads(model)  # every k, or every k that has a classifier
    try:
        heads = resolve_heads(args, model, checkpoint)
    except ValueError as e:
        raise UsageError(str(e) if str(e).startswith(('--heads', 'checkpoint')) else f'--heads: {e}') from e
    return heads


def trained_heads(args: argparse.Namespace, model: HydraViT, checkpoint: Optional[dict]) -> List[int]:
    """The head counts to serve: ``--heads``, else those the checkpoint was trained on (``hydravit.train`` records
    them as ``heads``, the official HydraViT code as ``args.heads``: ``cli.recorded_heads``), else, for random
    weights (no ``--checkpoint``), every k: none is trained, only costs are measured.

    Raises ``UsageError`` for a checkpoint that records no head set (a plain state dict, a converted ViT): which
    widths work is then unknown, so ``--heads`` must say. A ``--heads`` beyond the trained set gets a warning.
    """
    if args.heads is None and checkpoint is None:
        return runnable_heads(model)
    if args.heads is None and model.trained_heads is None:
        raise UsageError(f'--heads: {args.checkpoint} records no trained head counts (neither heads nor '
                         'args.heads); pass --heads with the k it was trained on')
    heads = sorted(_select_heads(args, model, checkpoint, all_heads=False))
    untrained = [k for k in heads if model.trained_heads is not None and k not in model.trained_heads]
    if untrained:
        warn(f'--heads {" ".join(map(str, untrained))}: not among the head counts {args.checkpoint} was trained on '
             f'({" ".join(map(str, model.trained_heads))}); their accuracy is whatever the untrained width gives')
    return heads


def create_eval_dataset(session: EvalSession, labels: bool = True):
    """timm dataset for DATA, labelled by the model's classes.

    Labels follow ``--class-map`` when given (timm's meaning; it must agree with the class names the checkpoint
    records: ``check_class_map``), else the class names the checkpoint records, matched by class name, with any
    reader (``--dataset``: timm's, or torchvision's ``torch/...``, which timm creates without a class map, so
    their labels are mapped by a target transform); a class the model was not trained on is an error. Without
    either, labels are the reader's order of DATA's folders, with a warning where the two folder readers' orders
    differ. Raises ``UsageError`` when the dataset is empty, its images are not in class folders, or it has more
    classes than the model. ``labels=False``: only images are used (no warnings about labels).
    """
    args = session.args
    class_map = getattr(args, 'class_map', '')
    dataset = _create_dataset(args, class_map)
    if class_map and ignores_class_map(dataset):
        dataset = _relabel(args, dataset, _read_class_map(args), '--class-map')
    found = dataset_class_to_idx(dataset)
    names = session.class_names
    if names is not None and found and not class_map:  # an unknown class is named before any count
        return _label_by_names(session, dataset, names, found, labels)
    num_classes = session.model.num_classes
    if found and len(found) > num_classes:
        raise UsageError(f'DATA has {len(found)} classes but the model predicts {num_classes}: '
                         'pass --num-classes or a checkpoint trained on this data')
    if labels and not class_map and found:
        _warn_unnamed_labels(found, num_classes, dataset)
    return dataset


def _label_by_names(session: EvalSession, dataset, names: List[str], found: Dict[str, int], labels: bool):
    """``dataset`` relabelled by the checkpoint's class names (``UsageError`` naming a class it was not trained
    on)."""
    args = session.args
    try:
        mapping, missing = match_classes(names, found, f'DATA ({args.data})')
    except ValueError as e:
        raise UsageError(str(e)) from e
    if missing and labels:
        warn(f'DATA has no images of {len(missing)} of the {len(names)} classes the model was trained on '
             f'({shown(missing)}); labels matched by class name')
    return dataset if mapping is None else _relabel(args, dataset, mapping, 'DATA')


def _warn_unnamed_labels(found: Dict[str, int], num_classes: int, dataset) -> None:
    """The checkpoint records no class names: say where the labels DATA gets may not be the model's."""
    if len(found) != num_classes:
        warn(f'DATA has {len(found)} classes, the model predicts {num_classes} and the checkpoint records no '
             f'class names: labels are DATA\'s sorted folders 0..{len(found) - 1}; pass --class-map FILE '
             f'(the training classes, one per line) to match them by name')
    orders = folder_orders(dataset)
    if orders is not None and orders[0][1] != orders[1][1]:
        (reader, order), (other, other_order) = orders
        warn(f'the checkpoint records no class names: labels follow the class-folder order of {reader}: '
             f'{shown(order)}; {other} gives {shown(other_order)}, and the model\'s labels follow the reader it '
             f'was trained with: pass --class-map FILE (the training classes in label order, one per line) to make '
             f'the order explicit')


def check_class_map(session: EvalSession) -> None:
    """``--class-map``, when given, must be readable and agree with the class names the checkpoint records (else
    every image of a contradicted class is scored against another class): ``UsageError`` naming the flag."""
    args = session.args
    if not getattr(args, 'class_map', ''):
        return
    class_map = _read_class_map(args)
    if session.class_names is None:
        return
    try:
        check_class_map_agrees(session.class_names, class_map)
    except ValueError as e:
        raise UsageError(f'--class-map: {args.class_map} {e}; leave --class-map out to label DATA by the '
                         f'recorded names') from e


def _read_class_map(args: argparse.Namespace) -> Dict[str, int]:
    try:
        return read_class_map(args.class_map, args.data or '')
    except (ValueError, OSError) as e:
        raise UsageError(f'--class-map: {e}') from e


def _relabel(args: argparse.Namespace, dataset, class_map: Dict[str, int], flag: str):
    try:
        return relabel(dataset, class_map, lambda mapping: _create_dataset(args, mapping))
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f'{flag}: {e}') from e


def _create_dataset(args: argparse.Namespace, class_map):
    num_samples = getattr(args, 'num_samples', None)
    try:
        dataset = create_dataset(args.dataset, root=args.data, split=args.split, is_training=False,
                                 class_map=class_map or '', num_samples=num_samples, **_dataset_kwargs(args))
        check_class_folders(dataset)
    except (RuntimeError, FileNotFoundError, ValueError, AssertionError) as e:
        raise UsageError(f'DATA: {torchvision_folder_error(e) or e}') from e
    if num_samples is not None and not isinstance(dataset, IterableImageDataset):
        raise UsageError('--num-samples: applies to iterable datasets (--dataset tfds/..., wds/..., hfids/...); '
                         'an image folder is always read whole')
    if len(dataset) == 0:
        raise UsageError(f'DATA: no images found in {args.data}')
    return dataset


def _dataset_kwargs(args: argparse.Namespace) -> Dict:
    """timm's optional dataset flags, where the tool has them."""
    renamed = {'dataset_download': 'download', 'dataset_trust_remote_code': 'trust_remote_code'}
    names = ('input_img_mode', 'input_key', 'target_key', *renamed)
    return {renamed.get(name, name): getattr(args, name) for name in names if getattr(args, name, None)}


def warn(message: str) -> None:
    """One ``warning:`` line on stderr: something the user should know about the numbers that follow."""
    print(f'warning: {message}', file=sys.stderr, flush=True)


def create_eval_loader(session: EvalSession, dataset, batch_size: Optional[int] = None):
    """Deterministic evaluation loader with the model's (or the flags') preprocessing."""
    cfg = session.data_config
    return create_loader(
        dataset,
        input_size=cfg['input_size'],
        batch_size=batch_size or session.args.batch_size,
        use_prefetcher=False,  # normalization in the transform: one code path on CPU and GPU
        interpolation=cfg['interpolation'],
        mean=cfg['mean'],
        std=cfg['std'],
        num_workers=session.args.workers,
        crop_pct=cfg['crop_pct'],
        crop_mode=cfg['crop_mode'],
        crop_border_pixels=getattr(session.args, 'crop_border_pixels', None),
        pin_memory=session.device.type == 'cuda' or getattr(session.args, 'pin_mem', False),
        device=session.device,
    )


# --- results -----------------------------------------------------------------------------------------
def round_row(row: Row) -> Row:
    """Floats to 6 significant digits: enough for 1e-3 GMACs of a tiny model and for 99.875% top-1."""
    return {key: float(f'{v:.6g}') if isinstance(v, float) else v for key, v in row.items()}


def write_results(rows: Sequence[Row], path, keys: Optional[Sequence[str]] = None,
                  fmt: Optional[str] = None) -> Path:
    """Write ``rows`` as JSON (list of objects) or CSV (header + one row each), atomically. The format is
    ``fmt`` ('csv' or 'json', timm's ``--results-format``), else JSON for a ``.json`` file and CSV for any other
    name (timm writes CSV whatever the name)."""
    path = Path(path)
    keys = list(keys or rows[0].keys())
    path.parent.mkdir(parents=True, exist_ok=True)
    as_csv = fmt == 'csv' if fmt else path.suffix.lower() != '.json'

    def write(tmp: Path) -> None:
        with open(tmp, 'w', newline='') as f:
            if as_csv:
                writer = csv.DictWriter(f, fieldnames=keys, extrasaction='ignore')
                writer.writeheader()
                writer.writerows(rows)
            else:
                # valid JSON: a non-finite metric (a NaN loss) is written as null, never a bare NaN
                f.write(to_json([{key: row.get(key) for key in keys} for row in rows], indent=4))
                f.write('\n')
    atomic_write(path, write)
    return path


def read_results(path) -> List[Row]:
    """Rows of a results file written by ``write_results`` (CSV values parsed back to numbers and booleans)."""
    path = Path(path)
    if path.suffix.lower() == '.json':
        return json.loads(path.read_text())
    with open(path, newline='') as f:
        return [{key: _parse_value(v) for key, v in row.items()} for row in csv.DictReader(f)]


def _parse_value(text: str):
    if text == '':
        return None
    if text in ('True', 'False'):  # how csv writes the settings' booleans (tf32, compile)
        return text == 'True'
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def report(rows: Sequence[Row], keys: Sequence[str], results_file: str = '',
           results_format: Optional[str] = None) -> None:
    """Write the results file (if asked) and print the ``--result`` JSON block as timm's validate.py does."""
    rows = [{key: row[key] for key in keys} for row in rows]
    if results_file:
        write_results(rows, results_file, keys, results_format)
    print(f'--result\n{to_json(rows, indent=4)}')


def format_row(row: Row) -> str:
    return '  '.join(f'{key} {value:.4g}' if isinstance(value, float) else f'{key} {value}'
                     for key, value in row.items())


# --- running a tool ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tool:
    """One evaluation tool: its arguments, its result keys, and how it measures all head counts."""

    description: str
    keys: Sequence[str]
    data_required: bool
    default_batch_size: int
    measure: Callable[[EvalSession], Iterable[Row]]
    add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None
    check_args: Optional[Callable[[argparse.Namespace], None]] = None
    result_keys: Optional[Callable[[argparse.Namespace], Sequence[str]]] = None  # keys by flags (validate --cascade)


def run_tool(tool: Tool, argv: Optional[Sequence[str]] = None) -> List[Row]:
    """Command-line entry: parse, set up (all errors before work starts), measure, report."""
    parser = create_parser(tool.description, tool.data_required, tool.default_batch_size)
    add_results_format_arg(parser)
    if tool.add_args is not None:
        tool.add_args(parser)
    args = parser.parse_args(argv)
    try:
        if tool.check_args is not None:
            tool.check_args(args)
        session = create_session(args)
        settings = settings_row(args, session.device)
        rows = [round_row({**row, **settings}) for row in tool.measure(session)]
    except UsageError as e:
        parser.error(str(e))
    keys = tool.result_keys(args) if tool.result_keys is not None else tool.keys
    report(rows, (*keys, *SETTINGS_KEYS), args.results_file, args.results_format)
    sys.stdout.flush()
    return rows
