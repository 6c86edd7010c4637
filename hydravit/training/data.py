"""Datasets, loaders and Mixup/CutMix for training, all from timm.data, plus early data-dir checks."""
import argparse
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader

from ..classes import (
    check_class_folders,
    class_names,
    dataset_class_to_idx,
    ignores_class_map,
    match_classes,
    read_class_map,
    relabel,
    shown,
    torchvision_folder_error,
)
from .config import ConfigError

_logger = logging.getLogger('train')


def check_data_dir(args: argparse.Namespace) -> None:
    """Fail early, naming the flag, when the dataset folder is missing or holds no images.

    Only folder datasets (``--dataset`` empty) are checked here; other readers report their own errors. Each split
    is opened with timm's ``create_dataset``, so the folder checked is the one timm reads (ROOT/SPLIT, a synonym
    such as val / valid, else ROOT itself).
    """
    root = args.data_dir
    if not os.path.isdir(root):
        raise ConfigError(f'--data-dir: dataset folder not found: {root}')
    if args.dataset:
        return
    splits = [('--train-split', args.train_split)] + ([('--val-split', args.val_split)] if args.val_split else [])
    for flag, split in splits:
        try:
            folder = create_dataset('', root=root, split=split).reader.root
        except RuntimeError as e:  # timm: "Found 0 images in subfolders of FOLDER"
            found = str(e).split('. ')[0]
            raise ConfigError(f'--data-dir: no images found for {flag} {split!r} in {root} '
                              f'(expected CLASS/IMAGE files; timm: {found})') from e
        if os.path.samefile(folder, root) and any(os.path.isdir(os.path.join(root, s)) for _, s in splits
                                                  if s != split):
            raise ConfigError(f'{flag}: no folder {split!r} in {root} (found: {sorted(os.listdir(root))})')


def create_datasets(args: argparse.Namespace, input_img_mode: str) -> Tuple[Any, Optional[Any]]:
    """(train, validation or None). Validation labels mean the training classes, matched by class name.

    Any reader: timm's (folders, tar, hfds/, tfds/, wds/, ...) and torchvision's (``torch/...``, whose labels
    ``--class-map`` and the name matching set through a target transform, since timm gives it no class map).
    """
    common = dict(download=args.dataset_download, batch_size=args.batch_size,
                  input_img_mode=input_img_mode, input_key=args.input_key, target_key=args.target_key)

    def split(flag: str, name: str, class_map, **kwargs):
        try:
            dataset = create_dataset(args.dataset, root=args.data_dir, split=name, class_map=class_map,
                                     **common, **kwargs)
            check_class_folders(dataset)
            if args.class_map and ignores_class_map(dataset):
                dataset = relabel(dataset, read_class_map(args.class_map, args.data_dir), None)
        except (FileNotFoundError, ValueError) as e:  # torchvision's folder errors, a flat folder, a bad map
            raise ConfigError(f'{flag} {name!r}: {torchvision_folder_error(e) or e}') from e
        return dataset

    train = split('--train-split', args.train_split, args.class_map, is_training=True, seed=args.seed,
                  repeats=args.epoch_repeats, num_samples=args.train_num_samples)
    if not args.val_split:
        return train, None

    def validation(class_map):
        return split('--val-split', args.val_split, class_map, is_training=False, num_samples=args.val_num_samples)

    val = validation(args.class_map)
    train_classes, val_classes = dataset_class_to_idx(train), dataset_class_to_idx(val)
    if args.class_map or train_classes is None or val_classes is None:
        return train, val  # --class-map numbers both splits; readers without names label by their own rules
    names = class_names(train_classes)
    try:
        class_map, missing = match_classes(names, val_classes, f'--val-split {args.val_split!r}')
        val = val if class_map is None else relabel(val, class_map, validation)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if missing:
        _logger.warning(f'--val-split {args.val_split!r} has no images of {len(missing)} of the {len(names)} '
                        f'training classes ({shown(missing)}); '
                        f'its labels are matched to the training classes by name')
    return train, val


def train_class_names(dataset) -> Optional[List[str]]:
    """The training classes in label order (recorded with every checkpoint), or None for readers without names."""
    class_to_idx = dataset_class_to_idx(dataset)
    return class_names(class_to_idx) if class_to_idx else None


def mixup_args(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Mixup/CutMix kwargs, or None when both are off."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                label_smoothing=args.smoothing, num_classes=args.num_classes)


def create_loaders(args: argparse.Namespace, dataset_train, dataset_val, data_config: Dict[str, Any],
                   device: torch.device):
    """(train_loader, val_loader or None, mixup_fn or None). Mixup runs in the collate with the prefetcher."""
    mix = mixup_args(args)
    collate_fn, mixup_fn = None, None
    if mix is not None:
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mix)
        else:
            mixup_fn = Mixup(**mix)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    common = dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                  num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem, device=device,
                  use_prefetcher=args.prefetcher)
    loader_train = create_loader(
        dataset_train, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, re_split=args.resplit, train_crop_mode=args.train_crop_mode,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob or 0.,
        gaussian_blur_prob=args.gaussian_blur_prob or 0., auto_augment=args.aa,
        num_aug_repeats=int(args.aug_repeats), interpolation=train_interpolation, collate_fn=collate_fn,
        use_multi_epochs_loader=args.use_multi_epochs_loader, worker_seeding=args.worker_seeding, **common)
    loader_val = None
    if dataset_val is not None:
        loader_val = create_loader(
            dataset_val, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
            interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], **common)
    return loader_train, loader_val, mixup_fn


def disable_mixup_after(args: argparse.Namespace, epoch: int, loader, mixup_fn) -> None:
    """timm's ``--mixup-off-epoch``: from that epoch on, train on unmixed batches."""
    if not args.mixup_off_epoch or epoch < args.mixup_off_epoch:
        return
    if args.prefetcher and getattr(loader, 'mixup_enabled', False):
        loader.mixup_enabled = False
    elif mixup_fn is not None:
        mixup_fn.mixup_enabled = False
