#!/usr/bin/env python3
"""Write scikit-learn's bundled handwritten digits as an ImageFolder: OUT_DIR/{train,validation}/<digit>/*.png.

The 1,797 8x8 grayscale images ship inside scikit-learn (no download). They are split with a fixed seed,
stratified by class, and upscaled to 32x32 RGB PNGs so ``hydravit_dyn_patch4_32`` sees one original pixel
per 4x4 patch. Usage: ``python scripts/prepare_digits.py data/digits``.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLITS = ('train', 'validation')


def write_digits(out_dir: Path, size: int = 32, val_fraction: float = 0.25, seed: int = 0) -> dict:
    """Write the ImageFolder; returns {split: image count}. Existing class folders are overwritten file by file."""
    digits = load_digits()
    # 0..16 intensities -> 0..255, white digit on black like the originals
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return write_image_folder(images, digits.target, out_dir, size, val_fraction, seed)


def write_image_folder(images: np.ndarray, labels: np.ndarray, out_dir: Path, size: int, val_fraction: float,
                       seed: int) -> dict:
    """Grayscale ``images`` (N, H, W) uint8 with class ``labels`` (N,) as OUT_DIR/{train,validation}/<label>/NNNN.png,
    split with ``seed``, stratified by class, resized to ``size`` x ``size`` RGB (bicubic). Returns {split: count}."""
    indices = np.arange(len(labels))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, random_state=seed, stratify=labels)
    counts = {}
    for split, split_idx in zip(SPLITS, (train_idx, val_idx), strict=True):
        for i in sorted(split_idx):
            class_dir = out_dir / split / str(labels[i])
            class_dir.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[i], mode='L').resize((size, size), Image.Resampling.BICUBIC)
            image.convert('RGB').save(class_dir / f'{i:04d}.png')
        counts[split] = len(split_idx)
    return counts


def run_cli(argv, description: str, write, val_fraction: float) -> int:
    """The command line of a data-preparation script: OUT_DIR, --size, --val-fraction, --seed; ``write(out_dir,
    size, val_fraction, seed)`` writes the ImageFolder and returns {split: count}."""
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out_dir', type=Path, help='output folder (gets train/ and validation/)')
    parser.add_argument('--size', type=int, default=32, help='output image side in pixels (default: 32)')
    parser.add_argument('--val-fraction', type=float, default=val_fraction,
                        help=f'share of images held out (default: {val_fraction})')
    parser.add_argument('--seed', type=int, default=0, help='split seed (default: 0)')
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error(f'--val-fraction must be in (0, 1), got {args.val_fraction}')
    if args.size < 8:
        parser.error(f'--size must be >= 8, got {args.size}')
    counts = write(args.out_dir, args.size, args.val_fraction, args.seed)
    print(f'wrote {counts["train"]} train and {counts["validation"]} validation images '
          f'({args.size}x{args.size} RGB, 10 classes) to {args.out_dir}')
    return 0


def main(argv=None) -> int:
    return run_cli(argv, __doc__, write_digits, 0.25)


if __name__ == '__main__':
    sys.exit(main())
