import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault('DS_ACCELERATOR', 'cpu')  # DeepSpeed: no accelerator probing on CPU machines
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests run from a checkout without installing

import hydravit  # noqa: E402, F401  registers the models with timm


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory) -> Path:
    """2 classes x 4 random 32x32 RGB PNGs (one image folder, no splits)."""
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for name in ('cat', 'dog'):
        (root / name).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f'{i}.png')
    return root
