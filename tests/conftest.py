import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault('DS_ACCELERATOR', 'cpu')  # DeepSpeed: no accelerator probing on CPU machines
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests run from a checkout without installing

import hydravit  # noqa: E402, F401  registers the models with timm


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
