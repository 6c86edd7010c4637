"""Fault matrix (issue 21): every entry point against every fault, in one table (``MATRIX``).

How to read a row ``(entry, fault, expected)``:

* ``Works(check)``: exit status 0 and ``CHECKS[check]`` holds on what the entry point returned or wrote, e.g. top-1
  equal to the count made here image by image from the checkpoint's own predictions (``counted_top1``), a note line
  printed, files written.
* ``Refused(message)``: exit status 2 (argparse's ``parser.error`` for the evaluation, deploy and export tools;
  ``main`` returns 2 for training and convert), stderr holds exactly one ``error:`` line, its text after
  ``error: `` is ``message`` ({ckpt}, {data}, {run}, {profile} filled in), and the cell's output was not created.
  ``Refused(..., more=True)``: the line heads an indented list (the key lists of a checkpoint of another
  architecture), which is asserted to follow it.
* ``Skip(why)``: the entry point cannot meet the fault.

Entry points, each run in-process through its ``main(argv)``: ``train`` (checkpoint faults through
``--initial-checkpoint``, checked with ``--check-only``), ``resume`` (``--resume``), ``validate`` / ``macs`` /
``memory`` / ``throughput`` (validate*.py), ``export`` (``--format timm``), ``onnx`` (``--format onnx``),
``convert``, ``profile`` / ``pick`` / ``serve_bench`` (``python -m hydravit.deploy ...``).

Everything is built once (``world``): one 1-epoch run of the small model on 3 classes named ``1``, ``2``, ``10``
(timm's folder reader sorts them 1, 2, 10; torchvision's ``--dataset torch/image_folder`` 1, 10, 2) with EMA and
recovery checkpoints; the faulty checkpoints are edited copies of its ``last.pth.tar``.

Documented skips:

* pick reads a profile JSON, not a checkpoint or images: weight, class, resolution and data faults do not reach it
  (its analogues, a truncated, foreign or non-finite profile, are rows of their own).
* export ``--format timm`` takes no DATA (refused: "only --format onnx uses DATA"), so data faults do not reach it.
* validate_memory, like validate_macs, accepts DATA but never reads it (costs do not depend on pixel values); the
  macs rows prove the ignored DATA changes nothing, memory's would repeat them at seconds a cell.
* Only a resume has a position, accumulation, world size, head set, run folder and optimizer state to keep (the
  ``resume_*`` faults).
* convert has no ``--img-size`` (it converts at its source's resolution) and no ``--dataset`` (timm's reader only).
* The ONNX export reads DATA's first batch for its parity check only: class faults other than an unknown class
  (refused) do not reach it.
* ``train-other_order`` fine-tunes from the checkpoint whose classes are in another order (``--initial-checkpoint``,
  learning rate 0): its classifier rows are mapped to the data's classes by name.
* In ``profile`` cells the fresh-process peak-memory stage is stubbed (it reads neither DATA nor labels); the
  ``memory`` cells run it.
"""
import csv
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_deploy import ROWS, write_profile
from test_nonfinite import QKV, QKV_SIZE, with_nan
from test_train import MODEL, base_args, load, run_train
from timm.data import create_transform, resolve_data_config
from timm.layers import resample_abs_pos_embed

from hydravit import convert
from hydravit.classes import class_folder_message
from hydravit.deploy import __main__ as deploy
from hydravit.deploy import export_cli
from hydravit.evaluation import accuracy, macs, memory, throughput
from hydravit.training.checkpointing import resume_position
from hydravit.training.config import PROG, ConfigError

CLASSES = ['1', '2', '10']  # the training run's class names (timm's natural order)
QUICK = ['-j', '0', '--device', 'cpu']
BENCH = ['--num-warm-iter', '1', '--num-bench-iter', '2', '-b', '2']


# --- the three kinds of expected result -------------------------------------------------------------------
@dataclass(frozen=True)
class Works:
    check: str


@dataclass(frozen=True)
class Refused:
    message: str
    more: bool = False


@dataclass(frozen=True)
class Skip:
    why: str


# --- the table ----------------------------------------------------------------------------------------------
ARCH = '{ckpt} does not match HydraViT (another architecture?)'  # then the key lists, indented
NAN = '{ckpt}: non-finite values in ' + QKV + ' (state_dict; 1 of ' + QKV_SIZE + ' NaN/inf)'
NAN_EMA = NAN.replace('(state_dict;', '(state_dict_ema;')
TRUNCATED = 'checkpoint {ckpt} is truncated or corrupt ({size:,} bytes; {reason}); copy or save it again'
EMPTY = 'DATA: Found 0 images in subfolders of {data}. Supported image extensions are .png, .jpg, .jpeg'
TRAIN_EMPTY = "--data-dir: no images found for --train-split 'train' in {data} (expected CLASS/IMAGE files; timm: " \
              "Found 0 images in subfolders of {data})"
FLAT = 'DATA: {flat}'  # class_folder_message(DATA, 3)
UNKNOWN_CLASS = 'DATA ({data}) has classes the model was not trained on: 3 (trained on 3: 1, 2, 10)'
UNKNOWN_VAL_CLASS = "--val-split 'validation' has classes the model was not trained on: 3 (trained on 3: 1, 2, 10)"
OTHER_CLASSES = '--resume: the checkpoint was trained on other classes than {data} holds (differ: {differ})'
OTHER_HEADS = '--resume: --heads gives 3 4 12, but {ckpt} was trained with 3 6 12; in its run folder that would ' \
              'change summary.csv columns or the model_best ranking: resume with the same --heads, or into a new ' \
              'run folder (--experiment NAME)'
RESAMPLED = '{ckpt}: position embedding resampled from a 8x8 to a 12x12 patch grid (the checkpoint was trained at ' \
            'another resolution; bicubic, as timm does)'

NOT_A_CHECKPOINT = Skip('pick reads a profile JSON, not a checkpoint (its own faults: the pick_* rows)')
NO_IMAGES = Skip('pick reads a profile JSON, no images')
TIMM_NO_DATA = Skip('export --format timm takes no DATA (refused: only --format onnx uses DATA)')
MEMORY_NO_DATA = Skip('validate_memory never reads DATA, as validate_macs, whose rows show it changes nothing')
RESUME_ONLY = Skip('only a resume has a position, accumulation, world size, head set, run folder and optimizer '
                   'state to keep')
ONNX_NO_LABELS = Skip('the ONNX export reads DATA\'s first batch for its parity check; labels do not reach it')
PICK_ONLY = Skip('only pick reads a profile JSON')

EVAL = ('validate', 'macs', 'memory', 'throughput')
ENTRIES = ('train', 'resume', *EVAL, 'export', 'onnx', 'convert', 'profile', 'pick', 'serve_bench')
TOOLS = ENTRIES[2:]  # the tools with --checkpoint: the refusal names the flag
CHECKPOINT_TOOLS = tuple(e for e in TOOLS if e != 'pick')
WEIGHT_FAULTS = ('nan_model', 'nan_ema', 'nan_ema_unused', 'truncated', 'foreign', 'img_size')
DATA_FAULTS = ('extra_class', 'missing_class', 'other_order', 'other_reader', 'image_size', 'empty', 'flat')
RESUME_FAULTS = ('resume_batch', 'resume_batch_partial', 'resume_accum', 'resume_world_1to2', 'resume_world_2to4',
                 'resume_heads', 'resume_symlink', 'resume_moved', 'resume_opt')
PICK_FAULTS = ('pick_truncated', 'pick_foreign', 'pick_nan')
FLAG_FAULTS = ('class_map_contradicts', 'results_dir')  # a --class-map against the recorded names; an unwritable file
CLASS_MAP_CONTRADICTS = ("--class-map: {root}/class_map.txt labels '10' as 0, but the checkpoint's label 0 is '1' (2 "
                         'of its 3 classes contradict the class names the checkpoint records: 1, 2, 10); leave '
                         '--class-map out to label DATA by the recorded names')

MATRIX: List[Tuple[str, str, object]] = [
    # non-finite weights: refused where they are used, and only there
    ('train', 'nan_model', Refused('--initial-checkpoint: ' + NAN)),
    ('train', 'nan_ema', Refused('--initial-checkpoint: ' + NAN_EMA)),  # --initial-checkpoint-weights auto: the EMA
    ('train', 'nan_ema_unused', Works('checked')),
    ('resume', 'nan_model', Refused('--resume: ' + NAN)),
    ('resume', 'nan_ema', Refused('--resume: ' + NAN_EMA)),
    ('resume', 'nan_ema_unused', Works('checked')),  # no --model-ema: the EMA weights are not read
    *[(e, 'nan_model', Refused('--checkpoint: ' + NAN)) for e in CHECKPOINT_TOOLS],
    *[(e, 'nan_ema', Refused('--checkpoint: ' + NAN_EMA)) for e in CHECKPOINT_TOOLS],
    ('validate', 'nan_ema_unused', Works('top1')),
    ('macs', 'nan_ema_unused', Works('rows')),
    ('memory', 'nan_ema_unused', Works('rows')),
    ('throughput', 'nan_ema_unused', Works('rows')),
    ('export', 'nan_ema_unused', Works('exported')),
    ('onnx', 'nan_ema_unused', Works('exported')),
    ('convert', 'nan_ema_unused', Works('converted')),
    ('profile', 'nan_ema_unused', Works('profile_top1')),
    ('serve_bench', 'nan_ema_unused', Works('serve_top1')),
    *[('pick', f, NOT_A_CHECKPOINT) for f in WEIGHT_FAULTS],

    # a truncated or foreign checkpoint
    ('train', 'truncated', Refused('--initial-checkpoint: ' + TRUNCATED)),
    ('resume', 'truncated', Refused('--resume: ' + TRUNCATED)),
    *[(e, 'truncated', Refused(TRUNCATED)) for e in CHECKPOINT_TOOLS],
    ('train', 'foreign', Refused('--initial-checkpoint: ' + ARCH, more=True)),  # + '(for a narrower ViT ...)'
    ('resume', 'foreign', Refused('--resume: {ckpt} is not a training checkpoint (no state_dict/epoch); use '
                                  '--initial-checkpoint for weights only')),
    *[(e, 'foreign', Refused(ARCH, more=True)) for e in CHECKPOINT_TOOLS if e != 'convert'],
    ('convert', 'foreign', Refused('--checkpoint {ckpt} (--model ' + MODEL + ') does not match HydraViT (another '
                                   'architecture?)', more=True)),

    # a 32 px checkpoint at --img-size 48: the position table is resampled, with one note line
    ('train', 'img_size', Works('resampled')),
    ('resume', 'img_size', Refused('--resume: {ckpt} was trained with 65 positions, this run builds 145 (another '
                                   '--img-size / --input-size): resume at the checkpoint\'s resolution, or start a '
                                   'new run from it with --initial-checkpoint, which resamples the position table')),
    ('validate', 'img_size', Works('resampled_top1')),
    *[(e, 'img_size', Works('resampled')) for e in ('macs', 'memory', 'throughput', 'export', 'onnx', 'profile',
                                                     'serve_bench')],
    ('convert', 'img_size', Skip('convert has no --img-size: it converts at the source\'s resolution')),

    # class sets and orders: labelled by name, counted here image by image; an unknown class is refused
    ('train', 'extra_class', Refused(UNKNOWN_VAL_CLASS)),
    ('train', 'missing_class', Works('trained')),
    ('train', 'other_order', Works('aligned')),  # --initial-checkpoint's classifier rows follow the class names
    ('train', 'other_reader', Works('trained')),
    ('resume', 'extra_class', Refused(UNKNOWN_VAL_CLASS)),
    ('resume', 'missing_class', Works('trained')),
    ('resume', 'other_order', Refused(OTHER_CLASSES.replace('{differ}', 'same names, other order'))),
    ('resume', 'other_reader', Refused(OTHER_CLASSES.replace('{differ}', 'same names, other order'))),
    *[(e, 'extra_class', Refused(UNKNOWN_CLASS)) for e in ('validate', 'throughput', 'onnx', 'profile', 'serve_bench')],
    ('convert', 'extra_class', Refused(UNKNOWN_CLASS.replace('{data}', '{data}/validation'))),
    *[(e, f, Works(check)) for e, check in (('validate', 'top1'), ('throughput', 'rows'), ('profile', 'profile_top1'),
                                            ('serve_bench', 'serve_top1'), ('convert', 'report_top1'))
      for f in ('missing_class', 'other_order', 'other_reader', 'image_size') if (e, f) != ('convert', 'other_reader')],
    ('onnx', 'image_size', Works('exported')),
    *[('onnx', f, ONNX_NO_LABELS) for f in ('missing_class', 'other_order', 'other_reader')],
    ('convert', 'other_reader', Skip('convert reads DATA with timm\'s folder reader only (no --dataset)')),
    ('train', 'image_size', Works('trained')),
    ('resume', 'image_size', Works('trained')),
    *[('macs', f, Works('ignores_data')) for f in DATA_FAULTS],
    *[('memory', f, MEMORY_NO_DATA) for f in DATA_FAULTS],
    *[('export', f, TIMM_NO_DATA) for f in DATA_FAULTS],
    *[('pick', f, NO_IMAGES) for f in DATA_FAULTS],

    # an empty folder, images not in class folders
    *[(e, 'empty', Refused(TRAIN_EMPTY)) for e in ('train', 'resume')],
    *[(e, 'flat', Refused("--train-split 'train': {flat}")) for e in ('train', 'resume')],
    *[(e, 'empty', Refused(EMPTY)) for e in ('validate', 'throughput', 'onnx', 'convert', 'profile', 'serve_bench')],
    *[(e, 'flat', Refused(FLAT)) for e in ('validate', 'throughput', 'onnx', 'convert', 'profile', 'serve_bench')],

    # resume only: the position is images seen, converted to this run's steps; the run folder's layout is kept
    ('resume', 'resume_batch', Works('steps')),
    ('resume', 'resume_batch_partial', Refused('--resume: {ckpt} stopped in epoch 0 after 20 images, not a whole '
                                               'number of optimizer steps of 8 images (-b 8 x --grad-accum-steps 1 x 1 '
                                               'process(es)); resume with a -b / --grad-accum-steps whose global '
                                               'batch divides 20, or from the end-of-epoch last.pth.tar')),
    ('resume', 'resume_accum', Works('steps')),
    ('resume', 'resume_world_1to2', Refused('--resume: {ckpt} stopped in epoch 0 after 16 images on 1 process(es), '
                                            'whose image order 2 process(es) cannot replay; resume it on one '
                                            'process, or from the end-of-epoch last.pth.tar')),
    ('resume', 'resume_world_2to4', Works('position')),
    ('resume', 'resume_heads', Refused(OTHER_HEADS)),
    ('resume', 'resume_symlink', Refused(OTHER_HEADS)),  # into its run folder through a symlinked --output
    ('resume', 'resume_moved', Refused(OTHER_HEADS)),  # a copy of last.pth.tar resumed into its run folder
    ('resume', 'resume_opt', Refused('--opt: {ckpt} was trained with --opt adamw, and its optimizer state is adamw\'s, '
                                     'not sgd\'s; resume with --opt adamw, or with --no-resume-opt to start the '
                                     'optimizer afresh')),
    *[(e, f, RESUME_ONLY) for e in ENTRIES if e != 'resume' for f in RESUME_FAULTS],

    # pick's own input: a profile JSON
    ('pick', 'pick_truncated', Refused('PROFILE: {ckpt} is not JSON: Expecting \',\' delimiter: line 1 column 527 '
                                       '(char 526)')),
    ('pick', 'pick_foreign', Refused('PROFILE: {ckpt}: expected an object with "device" and "rows"')),
    ('pick', 'pick_nan', Refused('PROFILE: {ckpt}: row 0 (heads 1): top1 must be a finite number >= 0, got nan')),
    *[(e, f, PICK_ONLY) for e in ENTRIES if e != 'pick' for f in PICK_FAULTS],

    # --class-map reversing the recorded class names: refused before any work wherever it is taken
    ('train', 'class_map_contradicts', Skip('a new run records the names --class-map gives (an --initial-checkpoint\'s '
                                            'classifier rows follow them by name: train-other_order)')),
    ('resume', 'class_map_contradicts', Refused(OTHER_CLASSES.replace('{differ}', 'same names, other order'))),
    *[(e, 'class_map_contradicts', Refused(CLASS_MAP_CONTRADICTS))
      for e in (*EVAL, 'export', 'onnx', 'profile', 'serve_bench')],
    ('convert', 'class_map_contradicts', Skip('convert has no --class-map: it labels DATA by the source\'s names')),
    ('pick', 'class_map_contradicts', NO_IMAGES),
    # --results-file an existing folder: refused before any work (convert's -o / --report-file: test_review_fixes)
    *[(e, 'results_dir', Refused('--results-file: {root} is a folder; give a file name'))
      for e in (*EVAL, 'profile', 'serve_bench')],
    *[(e, 'results_dir', Skip('a run writes into its run folder (--output), no --results-file'))
      for e in ('train', 'resume')],
    *[(e, 'results_dir', Skip('export writes no results file; an unwritable -o is refused alike (test_review_fixes)'))
      for e in ('export', 'onnx')],
    ('convert', 'results_dir', Skip('convert has --report-file, refused alike (test_review_fixes)')),
    ('pick', 'results_dir', Skip('pick writes no results file')),
]
FAULTS = (*WEIGHT_FAULTS, *DATA_FAULTS, *RESUME_FAULTS, *PICK_FAULTS, *FLAG_FAULTS)


def test_matrix_is_a_whole_table():
    """Every entry point meets every fault once (a skip is a row too)."""
    cells = [(e, f) for e, f, _ in MATRIX]
    assert len(cells) == len(set(cells))
    assert sorted(cells) == sorted((e, f) for e in ENTRIES for f in FAULTS)


# --- what is built once ---------------------------------------------------------------------------------------
def class_images(root: Path, split: str, per_class: int, size: int = 32, seed: int = 0) -> Path:
    """ROOT/SPLIT/{1,2,10}/*.png; class i is bright in colour channel i, so one epoch learns it."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 64, (size, size, 3))
            pixels[..., c] += 160
            Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f'{i}.png')
    return root


def train_argv(data: Path, out: Path, experiment: str, *extra: str) -> List[str]:
    return base_args(data, out, experiment, '--num-classes', '3', *extra)


@dataclass
class World:
    root: Path
    data: Path  # ROOT/{train,validation}/{1,2,10}
    run: Path  # the training run's folder
    files: Dict[str, Path] = field(default_factory=dict)  # checkpoints, data folders and profiles by name


@pytest.fixture(scope='module')
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp('matrix')
    data = class_images(class_images(root / 'data', 'train', 8), 'validation', 2, seed=1)
    # 24 images at -b 4: 6 steps; recovery checkpoints after 16 and 20 images (the two newest are kept)
    assert run_train(*train_argv(data, root / 'out', 'run', '--model-ema', '--model-ema-decay', '0.5',
                                 '--recovery-interval', '1')) == 0
    w = World(root, data, root / 'out' / 'run')
    last = load(w.run / 'last.pth.tar')
    assert last['class_names'] == CLASSES and last['state_dict_ema'] is not None
    files = w.files
    files['good'] = w.run / 'last.pth.tar'
    files['outlink'] = root / 'outlink'  # the run's --output, reached through a symlink
    files['outlink'].symlink_to(root / 'out')
    files['moved'] = root / 'moved.pth.tar'  # its last.pth.tar, copied out of the run folder
    shutil.copy(files['good'], files['moved'])
    files['class_map'] = root / 'class_map.txt'  # the recorded names reversed: 10, 2, 1
    files['class_map'].write_text('10\n2\n1\n')
    files['nan_model'] = root / 'nan_model.pth.tar'
    torch.save({**last, 'state_dict': with_nan(last['state_dict'])}, files['nan_model'])
    files['nan_ema'] = root / 'nan_ema.pth.tar'
    torch.save({**last, 'state_dict_ema': with_nan(last['state_dict_ema'])}, files['nan_ema'])
    files['truncated'] = root / 'truncated.pth.tar'
    whole = files['good'].read_bytes()
    files['truncated'].write_bytes(whole[:len(whole) // 2])
    files['foreign'] = root / 'resnet.pth.tar'
    torch.save({'state_dict': timm.create_model('resnet10t', num_classes=3).state_dict()}, files['foreign'])
    # the same model with its classes in torchvision's order (1, 10, 2): head rows and names permuted together
    rows = [CLASSES.index(name) for name in ('1', '10', '2')]
    permuted = {key: {**last[key], 'head.weight': last[key]['head.weight'][rows],
                      'head.bias': last[key]['head.bias'][rows]} for key in ('state_dict', 'state_dict_ema')}
    files['other_order'] = root / 'other_order.pth.tar'
    torch.save({**last, **permuted, 'class_names': ['1', '10', '2']}, files['other_order'])
    # data folders
    for name in ('extra_class', 'missing_class'):
        shutil.copytree(data, root / name)
    (root / 'extra_class' / 'validation' / '10').rename(root / 'extra_class' / 'validation' / '3')
    shutil.rmtree(root / 'missing_class' / 'validation' / '2')
    files.update({name: root / name for name in ('extra_class', 'missing_class')})
    files['image_size'] = class_images(class_images(root / 'big', 'train', 8, size=48), 'validation', 2, 48, 1)
    files['empty'] = root / 'empty'
    files['empty'].mkdir()
    files['flat'] = root / 'flat'
    files['flat'].mkdir()
    for i, image in enumerate(sorted((data / 'validation' / '1').iterdir())[:2] + [data / 'train' / '2' / '0.png']):
        shutil.copy(image, files['flat'] / f'{i}.png')
    # profiles for pick
    files['profile'] = write_profile(root / 'profile.json', ROWS)
    files['pick_truncated'] = root / 'profile_truncated.json'
    text = files['profile'].read_text()
    files['pick_truncated'].write_text(text[:len(text) // 2])
    files['pick_foreign'] = root / 'results.json'
    files['pick_foreign'].write_text(json.dumps([{'heads': 3, 'top1': 50.0}]))  # a validate.py results file
    files['pick_nan'] = write_profile(root / 'profile_nan.json', [dict(ROWS[0], top1=float('nan')), *ROWS[1:]])
    return w


# --- faults: what a cell feeds its entry point ---------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One fault, as the entry points take it: the checkpoint, DATA, whether the EMA weights are the ones used,
    flags any entry point adds, and the training checkpoint a resume starts from."""

    ckpt: Path
    data: Path
    use_ema: bool = False
    flags: Tuple[str, ...] = ()
    resume_from: str = 'last.pth.tar'
    resume_flags: Tuple[str, ...] = ()


def make_case(w: World, fault: str) -> Case:
    good = Case(w.files['good'], w.data)
    files = w.files
    cases = {
        'nan_model': replace(good, ckpt=files['nan_model']),
        'nan_ema': replace(good, ckpt=files['nan_ema'], use_ema=True),
        'nan_ema_unused': replace(good, ckpt=files['nan_ema']),
        'truncated': replace(good, ckpt=files['truncated']),
        'foreign': replace(good, ckpt=files['foreign']),
        'img_size': replace(good, flags=('--img-size', '48')),
        'extra_class': replace(good, data=files['extra_class']),
        'missing_class': replace(good, data=files['missing_class']),
        'other_order': replace(good, ckpt=files['other_order']),
        'other_reader': replace(good, flags=('--dataset', 'torch/image_folder')),
        'image_size': replace(good, data=files['image_size']),
        'empty': replace(good, data=files['empty']),
        'flat': replace(good, data=files['flat']),
        'resume_batch': replace(good, resume_from='recovery-0-3.pth.tar', resume_flags=('-b', '8')),
        'resume_batch_partial': replace(good, resume_from='recovery-0-4.pth.tar', resume_flags=('-b', '8')),
        'resume_accum': replace(good, resume_from='recovery-0-3.pth.tar', resume_flags=('--grad-accum-steps', '2')),
        'resume_world_1to2': replace(good, resume_from='recovery-0-3.pth.tar'),
        'resume_world_2to4': replace(good, resume_from='recovery-0-3.pth.tar'),
        'resume_heads': replace(good, resume_flags=('--heads', '3', '4', '12')),
        'resume_symlink': replace(good, resume_flags=('--heads', '3', '4', '12')),
        'resume_moved': replace(good, ckpt=files['moved'], resume_flags=('--heads', '3', '4', '12')),
        'resume_opt': replace(good, resume_flags=('--opt', 'sgd')),
        'class_map_contradicts': replace(good, flags=('--class-map', str(files['class_map']))),
        'results_dir': replace(good, flags=('--results-file', str(w.root))),
        'pick_truncated': replace(good, ckpt=files['pick_truncated']),
        'pick_foreign': replace(good, ckpt=files['pick_foreign']),
        'pick_nan': replace(good, ckpt=files['pick_nan']),
    }
    return cases[fault]


# --- entry points: (main, argv) for a case, writing under OUT ------------------------------------------------
CHECKPOINT_FAULTS = ('nan_model', 'nan_ema', 'nan_ema_unused', 'truncated', 'foreign', 'img_size')


def train_call(c: Case, out: Path, fault: str):
    argv = train_argv(c.data, out, 'cell', *c.flags)
    if fault in CHECKPOINT_FAULTS:  # the weights are read before any data: --check-only runs every check
        weights = () if c.use_ema else ('--initial-checkpoint-weights', 'model')  # auto: the EMA weights
        argv += ['--initial-checkpoint', str(c.ckpt), *weights, '--check-only']
    elif fault == 'other_order':  # learning rate 0: the run validates the initial weights themselves
        argv += ['--initial-checkpoint', str(c.ckpt), '--lr', '0']
    return train_main, argv


def resume_call(c: Case, out: Path, fault: str, w: World):
    path = resume_path(c, w)
    if fault.startswith('resume_world'):
        return world_size_resume, [str(path), fault]
    into_run = fault in ('resume_heads', 'resume_symlink', 'resume_moved')  # into its own run folder
    experiment = 'run' if into_run else 'cell'
    output = w.files['outlink'] if fault == 'resume_symlink' else w.root / 'out' if into_run else out
    argv = train_argv(c.data, output, experiment, '--resume', str(path), *c.flags, *c.resume_flags,
                      *(('--model-ema',) if c.use_ema else ()))
    argv += ['--check-only'] if fault in CHECKPOINT_FAULTS else ['--epochs', '2']  # last.pth.tar ended epoch 0
    return train_main, argv


def resume_path(c: Case, w: World) -> Path:
    """A faulty checkpoint is resumed itself; the other faults resume the run's own checkpoint."""
    return c.ckpt if c.ckpt != w.files['good'] else w.run / c.resume_from


def train_main(argv: List[str]) -> int:
    return run_train(*argv)


def world_size_resume(argv: List[str]) -> int:
    """What a torchrun worker does with --resume: ``resume_position`` at its world size, no processes needed
    (training's own error line on a ConfigError). 1to2: the recovery checkpoint as written by one process; 2to4:
    the same checkpoint as if written by 2 processes of -b 4 (16 images = 2 steps of 8), resumed by 4."""
    path, fault = argv
    checkpoint = load(Path(path))
    try:
        if fault == 'resume_world_1to2':
            resume_position(checkpoint, path, 4, 1, 2)
        else:
            point = resume_position({**checkpoint, 'world_size': 2}, path, 4, 1, 4)
            print(f'{point.start_epoch} {point.skip_updates}')
    except ConfigError as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        return 2
    return 0


def tool_call(entry: str, c: Case, out: Path):
    base = [str(c.data), '--checkpoint', str(c.ckpt), *c.flags, *(('--use-ema',) if c.use_ema else ())]
    if entry in EVAL:
        main = {'validate': accuracy.main, 'macs': macs.main, 'memory': memory.main,
                'throughput': throughput.main}[entry]
        extra = BENCH if entry == 'throughput' else ()
        results = () if '--results-file' in c.flags else ('--results-file', str(out / 'rows.json'))
        return main, [*base, '--heads', '3', *QUICK, *extra, *results]
    if entry == 'export':
        return export_cli.main, [*base[1:], '--heads', '3', '-o', str(out)]
    if entry == 'onnx':
        return export_cli.main, [*base, '--heads', '3', '--format', 'onnx', '-b', '2', '-o', str(out / 'k3.onnx')]
    if entry == 'convert':
        return convert.main, [*base, '--model', MODEL, '-o', str(out / 'c.pth'), '--calib-images', '4', '-b', '4',
                              '--report', '--heads', '3', '--report-file', str(out / 'report.json')]
    if entry == 'profile':
        return deploy.main, ['profile', *base, '--heads', '3', *QUICK, *BENCH, '-o', str(out / 'p.json')]
    if entry == 'pick':
        return deploy.main, ['pick', str(c.ckpt), '--json']
    return deploy.main, ['serve-bench', *base, '--heads', '3', *QUICK, '-b', '2', '--budget-ms', '1000',
                         '--load-schedule', 'off:0.2', '--load-procs', '0', '--calibration-time', '0.02',
                         '-o', str(out)]


def call(entry: str, fault: str, w: World, out: Path):
    c = make_case(w, fault)
    if entry == 'train':
        return train_call(c, out, fault)
    if entry == 'resume':
        return resume_call(c, out, fault, w)
    return tool_call(entry, c, out)


def invoke(main: Callable, argv: List[str]) -> Tuple[int, object]:
    """(exit status, what main returned): argparse errors exit with 2, training and convert return it."""
    try:
        result = main(argv)
    except SystemExit as e:
        return e.code, None
    return (result if isinstance(result, int) else 0), result


# --- counting top-1 here ----------------------------------------------------------------------------------------
def counted_top1(ckpt: Path, data: Path, k: int, use_ema: bool = False, img_size: Optional[int] = None):
    """(top-1 %, images) of ``ckpt`` at k heads on DATA/validation, each image's prediction compared with its
    folder's name: the truth any reader and any class order must reproduce."""
    checkpoint = load(ckpt)
    names = checkpoint['class_names']
    state = dict(checkpoint['state_dict_ema' if use_ema else 'state_dict'])
    kwargs = {}
    if img_size:  # timm's own resampling of the position table, with timm's defaults
        kwargs['img_size'] = img_size
        grid = img_size // 4
        state['pos_embed'] = resample_abs_pos_embed(state['pos_embed'], [grid, grid], num_prefix_tokens=1)
    model = timm.create_model(MODEL, num_classes=len(names), **kwargs).eval()
    model.load_state_dict(state)
    model.set_heads(k)
    transform = create_transform(**resolve_data_config({'img_size': img_size}, model=model))
    images = [(p, folder.name) for folder in (data / 'validation').iterdir() for p in folder.glob('*.png')]
    x = torch.stack([transform(Image.open(p).convert('RGB')) for p, _ in images])
    with torch.no_grad():
        predicted = model(x).argmax(1).tolist()
    hits = sum(names[i] == name for i, (_, name) in zip(predicted, images, strict=True))
    return 100 * hits / len(images), len(images)


# --- the checks named by Works ----------------------------------------------------------------------------------
@dataclass
class Cell:
    w: World
    fault: str
    case: Case
    out: Path
    result: object
    stdout: str
    stderr: str
    log: str


def _rows_file(cell: Cell) -> list:
    rows = json.loads((cell.out / 'rows.json').read_text())
    assert [row['heads'] for row in rows] == [3] and rows == [{**r, **{}} for r in cell.result]
    return rows


def check_top1(cell: Cell, img_size: Optional[int] = None) -> None:
    row = _rows_file(cell)[0]
    top1, images = counted_top1(cell.case.ckpt, cell.case.data, 3, cell.case.use_ema, img_size)
    assert (row['top1'], row['num_images']) == (pytest.approx(top1, abs=1e-4), images)


def check_resampled(cell: Cell) -> None:
    note = RESAMPLED.format(ckpt=cell.case.ckpt)
    assert note in (cell.stderr.splitlines() + cell.log.splitlines()), cell.stderr + cell.log


def check_resampled_top1(cell: Cell) -> None:
    check_resampled(cell)
    check_top1(cell, img_size=48)


def check_rows(cell: Cell) -> None:
    assert all(all(v is not None for v in row.values()) for row in _rows_file(cell))


def check_ignores_data(cell: Cell) -> None:
    """The DATA given (whatever its fault) changes nothing: the rows equal those of a run without DATA."""
    argv = ['--checkpoint', str(cell.case.ckpt), '--heads', '3', '--device', 'cpu']
    without = macs.main(argv)
    assert [dict(r, data=None) for r in cell.result] == [dict(r, data=None) for r in without]


def check_exported(cell: Cell) -> None:
    written = sorted(p.name for p in cell.out.iterdir())
    assert written in (['config.json', 'model.safetensors'], ['k3.onnx']), written


def check_converted(cell: Cell) -> None:
    assert load(cell.out / 'c.pth')['class_names'] == load(cell.case.ckpt)['class_names']  # the source's


def check_report_top1(cell: Cell) -> None:
    check_converted(cell)
    report = json.loads((cell.out / 'report.json').read_text())['top1']['converted']
    top1, _ = counted_top1(cell.out / 'c.pth', cell.case.data, 3)
    assert report == {'3': pytest.approx(top1, abs=0.01)}


def check_profile_top1(cell: Cell) -> None:
    rows = json.loads((cell.out / 'p.json').read_text())['rows']
    top1, _ = counted_top1(cell.case.ckpt, cell.case.data, 3, cell.case.use_ema)
    assert [(r['heads'], r['top1']) for r in rows] == [(3, pytest.approx(top1, abs=0.01))]


def check_serve_top1(cell: Cell) -> None:
    calibration = json.loads((cell.out / 'serve_bench.json').read_text())['calibration']
    top1, _ = counted_top1(cell.case.ckpt, cell.case.data, 3, cell.case.use_ema)
    assert [(r['heads'], r['top1']) for r in calibration] == [(3, pytest.approx(top1, abs=0.01))]


def check_checked(cell: Cell) -> None:
    assert not cell.out.exists()  # --check-only writes nothing


def check_trained(cell: Cell) -> None:
    """Each k's top-1 in the run's summary.csv equals the count made here from the checkpoint it wrote."""
    run = cell.out / 'cell'
    with open(run / 'summary.csv', newline='') as f:
        row = list(csv.DictReader(f))[-1]
    for k in (3, 6, 12):
        top1, _ = counted_top1(run / 'last.pth.tar', cell.case.data, k)
        assert float(row[f'eval_top1_k{k}']) == pytest.approx(top1, abs=1e-4), k


def check_aligned(cell: Cell) -> None:
    """Fine-tuned at learning rate 0 from a checkpoint whose classes are in another order: each k's top-1 equals the
    count made from that checkpoint by its own class names, so every classifier row kept its class."""
    run = cell.out / 'cell'
    with open(run / 'summary.csv', newline='') as f:
        row = list(csv.DictReader(f))[-1]
    for k in (3, 6, 12):
        top1, _ = counted_top1(cell.case.ckpt, cell.case.data, k)
        assert float(row[f'eval_top1_k{k}']) == pytest.approx(top1, abs=1e-4), k


# 4 steps of 4 done (16 of 24 images), 1 step of 8 left in epoch 0, then 3 in epoch 1
STEPS = {'resume_batch': 4 + 1 + 3, 'resume_accum': 4 + 1 + 3}


def check_steps(cell: Cell) -> None:
    assert sum(load(cell.out / 'cell' / 'last.pth.tar')['sampler']['counts']) == STEPS[cell.fault]


def check_position(cell: Cell) -> None:
    assert cell.stdout == '0 1\n'  # 16 images of 2 x 4 = 2 steps, at 4 x 4 = 16 images: epoch 0, 1 step done


CHECKS: Dict[str, Callable[[Cell], None]] = {
    'top1': check_top1, 'resampled': check_resampled, 'resampled_top1': check_resampled_top1, 'rows': check_rows,
    'ignores_data': check_ignores_data, 'exported': check_exported, 'converted': check_converted,
    'report_top1': check_report_top1, 'profile_top1': check_profile_top1, 'serve_top1': check_serve_top1,
    'checked': check_checked, 'trained': check_trained, 'aligned': check_aligned, 'steps': check_steps,
    'position': check_position,
}


# --- the one test -------------------------------------------------------------------------------------------------
def error_text(stderr: str, more: bool) -> str:
    """The text after ``error: `` of the one error line (followed by nothing, or, with ``more``, by an indented
    line: the key lists of a checkpoint that does not match)."""
    lines = stderr.rstrip('\n').splitlines()
    at = [i for i, line in enumerate(lines) if 'error: ' in line]
    assert len(at) == 1, stderr
    rest = lines[at[0] + 1:]
    assert (bool(rest) and rest[0].startswith('  ')) if more else not rest, stderr
    return lines[at[0]].split('error: ', 1)[1]


def fill(message: str, w: World, entry: str, fault: str) -> str:
    case = make_case(w, fault)
    ckpt = resume_path(case, w) if entry == 'resume' else case.ckpt
    size = case.ckpt.stat().st_size if case.ckpt.is_file() else 0
    return message.format(ckpt=ckpt, data=case.data, run=w.run, root=w.root, size=size,
                          flat=class_folder_message(str(case.data), 3),
                          reason='RuntimeError: PytorchStreamReader failed reading zip archive: failed finding '
                                 'central directory')


XFAIL: Dict[Tuple[str, str], str] = {}  # (entry, fault): why a cell still fails; empty when every cell holds


def _param(entry: str, fault: str, expected) -> pytest.param:
    marks = [pytest.mark.xfail(strict=True, reason=XFAIL[entry, fault])] if (entry, fault) in XFAIL else []
    return pytest.param(entry, fault, expected, id=f'{entry}-{fault}', marks=marks)


@pytest.mark.parametrize('entry, fault, expected', [_param(*row) for row in MATRIX])
def test_cell(entry, fault, expected, world, tmp_path, capsys, caplog, monkeypatch):
    if isinstance(expected, Skip):
        pytest.skip(expected.why)
    caplog.set_level(logging.INFO)
    if entry == 'profile':  # its fresh-process peak-memory stage (seconds a cell) reads neither DATA nor labels
        monkeypatch.setattr(memory, '_cpu_peak_mb_subprocess', lambda *args, **kwargs: 1.0)
    out = tmp_path / 'out'
    main, argv = call(entry, fault, world, out)
    code, result = invoke(main, argv)
    captured = capsys.readouterr()
    if isinstance(expected, Refused):
        assert code == 2, captured.err[-3000:]
        assert error_text(captured.err, expected.more) == fill(expected.message, world, entry, fault)
        assert not out.exists()
        return
    assert code == 0, captured.err[-3000:]
    CHECKS[expected.check](Cell(world, fault, make_case(world, fault), out, result, captured.out, captured.err,
                                '\n'.join(caplog.messages)))
