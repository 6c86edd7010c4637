"""Class names: every reader records them, every consumer labels data by them (issue 21, items 2 and 10).

The accuracy tests use data whose truth is the model's own prediction: each image lies in the folder of the class
the model predicts for it (through timm's eval transform), so a consumer that labels by class name measures exactly
100 % top-1, and one that numbers the folders in another order measures less.
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_dataset, create_transform, resolve_data_config
from torchvision.datasets import ImageFolder

from hydravit.classes import class_folder_message, dataset_class_to_idx, relabel
from hydravit.convert import labelled_dataset
from hydravit.deploy import profile
from hydravit.evaluation import accuracy, throughput
from hydravit.training.config import ConfigError, parse_args
from hydravit.training.data import create_datasets, train_class_names

SMALL = 'hydravit_dyn_patch4_32'
TORCH_ORDER = ['1', '10', '2']  # torchvision's ImageFolder sorts class folders as strings
TIMM_ORDER = ['1', '2', '10']  # timm's folder reader sorts them naturally


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def with_class_order(model, names, order):
    """A copy of ``model`` (whose output i is class ``names[i]``) whose output j is class ``order[j]``."""
    copy = timm.create_model(SMALL, num_classes=len(names)).eval()
    state = model.state_dict()
    rows = [names.index(name) for name in order]
    state['head.weight'], state['head.bias'] = state['head.weight'][rows], state['head.bias'][rows]
    copy.load_state_dict(state)
    return copy


@pytest.fixture(scope='module')
def predicted(tmp_path_factory):
    """ROOT/validation/{1,2,10}/*.png, each image in its predicted class at k = 12, and two training-style
    checkpoints of that model: class names in torchvision's order, and (head rows permuted) in timm's."""
    root = tmp_path_factory.mktemp('predicted')
    torch.manual_seed(0)
    model = timm.create_model(SMALL, num_classes=3).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        save_png(root / 'staging' / f'{i}.png', image)
    x = torch.stack([transform(Image.open(root / 'staging' / f'{i}.png').convert('RGB')) for i in range(12)])
    with torch.no_grad():
        logits = model(x)
        model.head.bias -= logits.mean(0)  # centred logits: the three classes are all predicted
        predictions = model(x).argmax(1).tolist()
    assert sorted(set(predictions)) == [0, 1, 2], predictions
    for i, label in enumerate(predictions):
        save_png(root / 'validation' / TORCH_ORDER[label] / f'{i}.png', pixels[i])
    shutil.rmtree(root / 'staging')
    checkpoints = {}
    for name, order in (('torch', TORCH_ORDER), ('timm', TIMM_ORDER)):
        net = with_class_order(model, TORCH_ORDER, order)
        checkpoints[name] = root / f'{name}.pth.tar'
        torch.save({'arch': SMALL, 'state_dict': net.state_dict(), 'heads': [3, 12], 'class_names': order},
                   checkpoints[name])
    return root, checkpoints


def validate(data, checkpoint, *extra):
    return accuracy.main([str(data), '--checkpoint', str(checkpoint), '--heads', '12', '-j', '0', '--device', 'cpu',
                          *extra])


# --- item 2: readers record class names, consumers map by name ------------------------------------------------
def test_class_to_idx_of_timm_and_torchvision_folders(predicted):
    data = predicted[0] / 'validation'
    assert dataset_class_to_idx(create_dataset('', root=str(data))) == {'1': 0, '2': 1, '10': 2}
    assert dataset_class_to_idx(create_dataset('torch/image_folder', root=str(data))) == {'1': 0, '10': 1, '2': 2}
    assert dataset_class_to_idx(argparse.Namespace(classes=['cat', 'dog'])) == {'cat': 0, 'dog': 1}
    # ImageNet: class_to_idx maps several descriptive names to one label; wnid_to_idx is one to one
    imagenet = argparse.Namespace(class_to_idx={'tench': 0, 'Tinca tinca': 0, 'goldfish': 1},
                                  wnid_to_idx={'n01440764': 0, 'n01443537': 1})
    assert dataset_class_to_idx(imagenet) == {'n01440764': 0, 'n01443537': 1}


def test_relabel_maps_a_torchvision_dataset_by_name(predicted):
    data = predicted[0] / 'validation'
    dataset = relabel(ImageFolder(str(data)), {name: i for i, name in enumerate(TIMM_ORDER)}, None)
    assert dataset_class_to_idx(dataset) == {'1': 0, '10': 2, '2': 1}
    for i, (path, _) in enumerate(dataset.samples):
        assert dataset[i][1] == TIMM_ORDER.index(Path(path).parent.name)


@pytest.mark.parametrize('checkpoint', ['torch', 'timm'])
@pytest.mark.parametrize('reader', ['', 'torch/image_folder'])
def test_validate_labels_by_name_with_either_reader(predicted, checkpoint, reader, capsys):
    root, checkpoints = predicted
    rows = validate(root, checkpoints[checkpoint], *(['--dataset', reader] if reader else []))
    assert rows[0]['top1'] == 100.0 and rows[0]['num_images'] == 12


def test_training_records_torchvision_class_names_and_maps_validation_by_name(predicted, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(predicted[0] / 'validation', data / 'train')
    shutil.copytree(predicted[0] / 'validation', data / 'validation')
    shutil.rmtree(data / 'validation' / '2')  # the validation split has no images of class '2'
    args, _ = parse_args([str(data), '--model', SMALL, '--workers', '0', '--dataset', 'torch/image_folder'])
    args.data_dir = str(data)
    train, val = create_datasets(args, 'RGB')
    assert train_class_names(train) == TORCH_ORDER
    # its own (string-sorted) labels would be '1': 0, '10': 1: matched by name they are the training labels
    assert dataset_class_to_idx(val) == {'1': 0, '10': 1}
    for i, (path, _) in enumerate(val.samples):
        assert val[i][1] == TORCH_ORDER.index(Path(path).parent.name)


def test_training_with_a_class_map_file_relabels_a_torchvision_dataset(predicted, tmp_path):
    class_map = tmp_path / 'class_map.txt'
    class_map.write_text('10\n2\n1\n')
    args, _ = parse_args([str(predicted[0]), '--model', SMALL, '--workers', '0', '--dataset', 'torch/image_folder',
                          '--train-split', 'validation', '--val-split', '', '--class-map', str(class_map)])
    args.data_dir = str(predicted[0])
    train, _ = create_datasets(args, 'RGB')
    assert train_class_names(train) == ['10', '2', '1']
    assert all(train[i][1] == ['10', '2', '1'].index(Path(p).parent.name) for i, (p, _) in enumerate(train.samples))


def test_profile_labels_by_name_with_torchvision_reader(predicted, tmp_path, capsys):
    root, checkpoints = predicted
    result = profile.main([str(root), '--checkpoint', str(checkpoints['timm']), '--dataset', 'torch/image_folder',
                           '--heads', '12', '-b', '2', '-j', '0', '--device', 'cpu', '--num-warm-iter', '1',
                           '--num-bench-iter', '2', '-o', str(tmp_path / 'p.json')])
    assert result['rows'][0]['top1'] == 100.0


def test_convert_labels_its_report_by_the_source_class_names(predicted):
    args = argparse.Namespace(data=str(predicted[0]))
    dataset = labelled_dataset(args, 'validation', TORCH_ORDER)
    assert dataset_class_to_idx(dataset) == {'1': 0, '10': 1, '2': 2}
    assert all(dataset[i][1] == TORCH_ORDER.index(Path(p).parent.name)
               for i, (p, _) in enumerate(dataset.reader.samples))


# --- item 10: images not in class folders ------------------------------------------------------------------------
@pytest.fixture
def flat(tmp_path):
    """A folder holding 3 images directly, no class folders."""
    rng = np.random.default_rng(0)
    for i in range(3):
        save_png(tmp_path / 'flat' / f'{i}.png', rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return tmp_path / 'flat'


def one_error_line(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, '--device', 'cpu', '-j', '0'])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count('error:') == 1, err
    return err.strip().splitlines()[-1].split('error: ', 1)[1]


def test_class_folder_message():
    assert class_folder_message('/d/val', 3) == ('/d/val has 3 image(s) directly in it, not in a class folder: '
                                                 'expected CLASS/IMAGE sub-folders (one folder per class)')
    assert class_folder_message('/d/val') == ('/d/val has no class sub-folders: expected CLASS/IMAGE sub-folders '
                                              '(one folder per class)')


@pytest.mark.parametrize('reader', ['', 'torch/image_folder'])
def test_evaluation_tools_refuse_a_flat_folder(flat, predicted, reader, capsys):
    argv = [str(flat), '--checkpoint', str(predicted[1]['torch']), *(['--dataset', reader] if reader else [])]
    expected = f'DATA: {class_folder_message(str(flat), None if reader else 3)}'
    assert one_error_line(accuracy.main, argv, capsys) == expected
    assert one_error_line(throughput.main, argv, capsys) == expected
    assert one_error_line(profile.main, [*argv, '--heads', '12'], capsys) == expected


@pytest.mark.parametrize('reader', ['', 'torch/image_folder'])
def test_training_refuses_a_flat_split(flat, reader):
    (flat / 'train').mkdir()
    shutil.copy(flat / '0.png', flat / 'train' / '0.png')  # train/ holds images, not class folders
    args, _ = parse_args([str(flat), '--model', SMALL, '--workers', '0', '--val-split', '',
                          *(['--dataset', reader] if reader else [])])
    args.data_dir = str(flat)
    folder = str(flat / 'train')
    message = class_folder_message(folder, None if reader else 1)
    with pytest.raises(ConfigError) as e:
        create_datasets(args, 'RGB')
    assert str(e.value) == f"--train-split 'train': {message}"


def test_torchvision_reader_refuses_images_beside_class_folders(flat, predicted, capsys):
    shutil.copytree(predicted[0] / 'validation' / '1', flat / '1')  # a class folder, and 3 images beside it
    argv = [str(flat), '--checkpoint', str(predicted[1]['torch']), '--dataset', 'torch/image_folder']
    assert one_error_line(accuracy.main, argv, capsys) == f'DATA: {class_folder_message(str(flat), 3)}'


def test_convert_refuses_a_flat_folder(flat):
    with pytest.raises(ValueError) as e:
        labelled_dataset(argparse.Namespace(data=str(flat)), 'train')
    assert str(e.value) == f'DATA: {class_folder_message(str(flat), 3)}'


def test_convert_carries_class_names_and_reports_by_them(predicted, tmp_path, capsys):
    from hydravit.checkpoint import load_checkpoint_file
    from hydravit.convert import main as convert_main
    root, checkpoints = predicted
    out = tmp_path / 'converted.pth'
    assert convert_main([str(root), '--model', SMALL, '--checkpoint', str(checkpoints['torch']), '-o', str(out),
                         '--calib-images', '4', '--report', '--heads', '12', '--report-file',
                         str(tmp_path / 'report.json')]) == 0
    assert load_checkpoint_file(out)['class_names'] == TORCH_ORDER
    report = json.loads((tmp_path / 'report.json').read_text())['top1']
    assert report == {'original order': {'12': 100.0}, 'converted': {'12': 100.0}}
    # full width computes the source's function: labelled by the source's names, every image is right
    rows = validate(root, out, '--num-classes', '3')
    assert rows[0]['top1'] == 100.0


def test_validate_class_map_file_with_torchvision_reader(predicted, tmp_path, capsys):
    root, checkpoints = predicted
    class_map = tmp_path / 'class_map.txt'
    class_map.write_text(''.join(f'{name}\n' for name in TIMM_ORDER))
    reader = ['--dataset', 'torch/image_folder', '--class-map', str(class_map)]
    assert validate(root, checkpoints['timm'], *reader)[0]['top1'] == 100.0
    class_map.write_text('1\n2\n')
    assert one_error_line(accuracy.main, [str(root), '--checkpoint', str(checkpoints['timm']), *reader], capsys) \
        == '--class-map: the class map lacks classes of the data: 10'


# --- --initial-checkpoint: its classifier rows keep their classes ----------------------------------------------
def test_align_classifier_maps_rows_by_name(caplog):
    import logging

    from hydravit.training.builders import align_classifier
    model = timm.create_model(SMALL, num_classes=3)
    weight, bias = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    with caplog.at_level(logging.INFO, logger='train'):
        align_classifier(model, TORCH_ORDER, TIMM_ORDER, 'ckpt')  # 1 10 2 -> 1 2 10
    assert torch.equal(model.head.weight, weight[[0, 2, 1]]) and torch.equal(model.head.bias, bias[[0, 2, 1]])
    assert 'classifier rows mapped to this data\'s classes by name (2 moved)' in caplog.text
    align_classifier(model, ['1', '2', '7'], ['1', '2', '10'], 'ckpt')  # class 10 is new: a fresh row
    assert torch.equal(model.head.weight[:2], weight[[0, 2]]) and not torch.equal(model.head.weight[2], weight[1])
    assert float(model.head.bias[2].detach()) == 0.
    assert 'ckpt has no classifier rows for 1 class(es) of this data (10)' in caplog.text


def test_initial_checkpoint_classifier_follows_the_class_names(predicted, tmp_path):
    """A checkpoint trained with torchvision's order (1, 10, 2), fine-tuned on the same folders read by timm's reader
    (1, 2, 10): before any update the model must still predict every image's folder (lr 0: one epoch changes
    nothing), so its validation top-1 is 100 %."""
    from test_train import run_train
    root, checkpoints = predicted
    data = tmp_path / 'data'
    shutil.copytree(root / 'validation', data / 'train')
    shutil.copytree(root / 'validation', data / 'validation')
    assert run_train(str(data), '--model', SMALL, '--num-classes', '3', '--heads', '12', '-b', '4', '--epochs', '1',
                     '--lr', '0', '--warmup-epochs', '0', '--workers', '0', '--no-aug',
                     '--initial-checkpoint', str(checkpoints['torch']), '--output', str(tmp_path / 'out'),
                     '--experiment', 'ft') == 0
    summary = (tmp_path / 'out' / 'ft' / 'summary.csv').read_text().splitlines()
    header, row = summary[0].split(','), summary[-1].split(',')
    assert float(row[header.index('eval_top1_k12')]) == 100.0
