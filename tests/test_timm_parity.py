"""Where timm users go, hydravit behaves like timm (issue 16's six replayed reports, each with its kind around it):
wrapped checkpoints, timm's model mutators followed by an export, resolution changes, and validation splits that
lack a class."""
import argparse
import json
import logging

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from timm.layers import resample_abs_pos_embed
from timm.models import VisionTransformer
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

import hydravit
from hydravit.checkpoint import extract_state_dict, load_checkpoint_file
from hydravit.cli import create_model_from_args
from hydravit.deploy import export_cli
from hydravit.evaluation import accuracy
from hydravit.evaluation.common import create_eval_dataset, create_session
from hydravit.export import model_vit_args
from hydravit.training.builders import load_initial_checkpoint
from hydravit.training.checkpointing import TrainingState
from hydravit.training.config import ConfigError, parse_args
from hydravit.training.data import create_datasets
from hydravit.training.loop import main as train_main

SMALL = 'hydravit_dyn_patch4_32'


def small(**kwargs) -> hydravit.HydraViT:
    return timm.create_model(SMALL, **{'num_classes': 3, **kwargs}).eval()


def images(n=2, size=32) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- 1. wrapped checkpoints ----------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def process_group(tmp_path_factory):
    """A one-process gloo group, so DDP can wrap a CPU model as torch and timm's train.py do."""
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp('pg') / 'store'
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


WRAPPERS = {
    'compile(ddp)': lambda m: torch.compile(DistributedDataParallel(m)),  # timm's train.py: DDP, then compile
    'ddp(compile)': lambda m: DistributedDataParallel(torch.compile(m)),
    'ema(compile(ddp))': lambda m: ModelEmaV3(torch.compile(DistributedDataParallel(m))),
    'dataparallel': nn.DataParallel,
}


@pytest.fixture(scope='module')
def wrapped_checkpoints(process_group, tmp_path_factory):
    """One timm-layout checkpoint per wrapper nesting, and the model whose weights they hold."""
    model = small()
    root = tmp_path_factory.mktemp('wrapped')
    paths = {}
    for name, wrap in WRAPPERS.items():
        state_dict = wrap(model).state_dict()
        assert not any(k in model.state_dict() for k in state_dict), name  # really prefixed
        paths[name] = root / f'{name}.pth.tar'
        torch.save({'arch': SMALL, 'epoch': 0, 'state_dict': state_dict, 'state_dict_ema': state_dict}, paths[name])
    return model, paths


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize('wrapper', sorted(WRAPPERS))
def test_checkpoint_of_any_wrapper_nesting_loads_everywhere(wrapper, wrapped_checkpoints, tmp_path):
    model, paths = wrapped_checkpoints
    path = str(paths[wrapper])
    # validate*.py / scripts/export.py (--checkpoint, --use-ema)
    for use_ema in (False, True):
        args = argparse.Namespace(model=None, checkpoint=path, use_ema=use_ema, num_classes=None)
        loaded, _ = create_model_from_args(args)
        assert_same_weights(loaded, model)
    # training: --initial-checkpoint and --resume
    fresh = small()
    load_initial_checkpoint(fresh, path, init_slices=False)
    assert_same_weights(fresh, model)
    fresh = small()
    TrainingState.load_model_weights(fresh, load_checkpoint_file(path), path)
    assert_same_weights(fresh, model)
    # the export script end to end
    export_cli.main(['--checkpoint', path, '--use-ema', '--heads', '3', '-o', str(tmp_path / 'k3')])
    vit = timm.create_model(f'local-dir:{tmp_path / "k3"}', pretrained=True).eval()
    model.set_heads(3)
    x = images()
    with torch.no_grad():
        assert max_diff(vit(x), model(x)) <= 1e-5
    model.set_heads(12)


def test_wrapper_prefixes_that_collide_are_an_error():
    weight = torch.zeros(1)
    with pytest.raises(ValueError, match="'module.pos_embed' is 'pos_embed'"):
        extract_state_dict({'state_dict': {'pos_embed': weight, 'module.pos_embed': weight}})


# --- 2. and 4.: every timm mutator, then an export ---------------------------------------------------------
def assert_export_equals_sliced(model: hydravit.HydraViT, k: int, size: int = 32) -> VisionTransformer:
    vit = hydravit.export_subnetwork(model, k).eval()
    model.set_heads(k)
    x = images(2, size)
    with torch.no_grad():
        assert max_diff(vit(x), model(x)) <= 1e-5
    return vit


@pytest.mark.parametrize('img_size, patch_size', [((48, 48), None), (48, 8), ((40, 32), None)])
def test_set_input_size_then_export(img_size, patch_size):
    model = small()
    stock = VisionTransformer(**model_vit_args(model)).eval()
    stock.load_state_dict(model.state_dict())
    model.set_input_size(img_size=img_size, patch_size=patch_size)
    stock.set_input_size(img_size=img_size, patch_size=patch_size)
    assert torch.equal(model.pos_embed, stock.pos_embed)  # timm's own resampling
    size = img_size if isinstance(img_size, tuple) else (img_size, img_size)
    vit = hydravit.export_subnetwork(model, 3).eval()
    assert vit.patch_embed.img_size == size == stock.patch_embed.img_size
    assert vit.pos_embed.shape[1] == stock.pos_embed.shape[1]
    assert vit.pretrained_cfg['input_size'] == (3, *size)
    x = torch.randn(2, 3, *size)
    model.set_heads(3)
    with torch.no_grad():
        assert max_diff(vit(x), model(x)) <= 1e-5
        model.set_heads(12)
        assert max_diff(model(x), stock(x)) <= 1e-5


def test_save_subnetwork_after_set_input_size_records_the_new_size(tmp_path):
    model = small()
    model.set_input_size(img_size=48)
    hydravit.save_subnetwork(model, 3, tmp_path / 'k3')
    config = json.loads((tmp_path / 'k3' / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [3, 48, 48]
    vit = timm.create_model(f'local-dir:{tmp_path / "k3"}', pretrained=True).eval()
    model.set_heads(3)
    x = images(2, 48)
    with torch.no_grad():
        assert max_diff(vit(x), model(x)) <= 1e-5


@pytest.mark.parametrize('pool', ['avg', 'max', 'avgmax', 'token', ''])
def test_reset_classifier_pool_then_export_equals_stock_timm(pool):
    model = small()
    stock = VisionTransformer(**model_vit_args(model)).eval()
    stock.load_state_dict(model.state_dict())
    model.reset_classifier(5, pool)
    stock.reset_classifier(5, pool)
    stock.head.load_state_dict(model.head.state_dict())
    x = images()
    with torch.no_grad():
        assert max_diff(model(x), stock(x)) <= 1e-5
    vit = assert_export_equals_sliced(model, 3)
    assert vit.global_pool == pool == stock.global_pool
    assert type(vit.norm) is type(stock.norm) and type(vit.fc_norm) is type(stock.fc_norm)


@pytest.mark.parametrize('prune_norm, prune_head', [(False, True), (True, True), (True, False)])
def test_prune_intermediate_layers_then_export(prune_norm, prune_head):
    model = small()
    model.prune_intermediate_layers(indices=[1], prune_norm=prune_norm, prune_head=prune_head)
    vit = assert_export_equals_sliced(model, 4)
    assert len(vit.blocks) == 2


def test_export_refuses_what_a_vit_cannot_describe():
    model = small()
    model.blocks[0].mlp.fc1 = nn.Linear(192, 10)  # no VisionTransformer argument makes this
    with pytest.raises(ValueError, match='blocks.0.mlp.fc1.weight'):
        hydravit.export_subnetwork(model, 3)


# --- 3. widths reported after set_heads ------------------------------------------------------------------------
def test_num_features_follow_the_active_heads_like_the_exported_vit():
    model = small()
    model.set_heads(3)
    model.reset_classifier(0)
    features = model(images())
    vit = hydravit.export_subnetwork(model, 3)
    assert model.num_features == model.head_hidden_size == vit.num_features == vit.head_hidden_size == 48
    assert nn.Linear(model.num_features, 5)(features).shape == (2, 5)
    model.set_heads(12)
    assert model.num_features == model.head_hidden_size == 192
    assert model.embed_dim == 192  # the full width layers are built with does not move
    with pytest.raises(AttributeError, match='set_heads'):
        model.num_features = 48


def test_pre_logits_width_is_head_hidden_size():
    model = small()
    for k in (2, 7):
        model.set_heads(k)
        pooled = model.forward_head(model.forward_features(images()), pre_logits=True)
        assert pooled.shape[-1] == model.head_hidden_size == k * 16


# --- 5. a checkpoint trained at another resolution -----------------------------------------------------------
@pytest.fixture
def ckpt_32px(tmp_path):
    source = small()
    path = tmp_path / 'k32.pth.tar'
    torch.save({'state_dict': source.state_dict()}, path)
    return source, path


def test_initial_checkpoint_at_another_resolution_resamples_like_timm(ckpt_32px, caplog):
    source, path = ckpt_32px
    model = small(img_size=48)
    caplog.set_level(logging.INFO)
    load_initial_checkpoint(model, str(path), init_slices=False)
    stock = VisionTransformer(**model_vit_args(source))
    stock.load_state_dict(source.state_dict())
    stock.set_input_size(img_size=48)  # what timm does to a pretrained ViT's table
    assert torch.equal(model.pos_embed, stock.pos_embed)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    lines = [r.getMessage() for r in caplog.records if 'position embedding resampled' in r.getMessage()]
    assert len(lines) == 1 and '8x8 to a 12x12 patch grid' in lines[0]


def test_init_slices_at_another_resolution_resamples_the_narrow_table(tmp_path, caplog):
    tiny = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=3)
    path = tmp_path / 'tiny.pth'
    torch.save(tiny.state_dict(), path)
    model = small(img_size=48)
    caplog.set_level(logging.INFO)
    load_initial_checkpoint(model, str(path), init_slices=True)
    expected = resample_abs_pos_embed(tiny.pos_embed, new_size=[12, 12], old_size=[8, 8], num_prefix_tokens=1)
    assert torch.equal(model.pos_embed[..., :48], expected)
    assert sum('position embedding resampled' in r.getMessage() for r in caplog.records) == 1


def test_init_slices_never_copies_rows_of_another_shape(tmp_path):
    shallow = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=3,
                                mlp_ratio=2.)
    path = tmp_path / 'mlp2.pth'
    torch.save(shallow.state_dict(), path)
    with pytest.raises(ConfigError, match=r'--init-slices: .*3-head subnetwork: blocks\.0\.mlp\.fc1\.weight'):
        load_initial_checkpoint(small(), str(path), init_slices=True)


def test_train_cli_img_size_with_initial_checkpoint(ckpt_32px, tmp_path, caplog):
    _, path = ckpt_32px
    data = make_split_folder(tmp_path / 'data', {'train': ('a', 'b', 'c'), 'validation': ('a', 'b', 'c')})
    caplog.set_level(logging.INFO)
    rc = train_main([str(data), '--model', SMALL, '--num-classes', '3', '--img-size', '48',
                     '--initial-checkpoint', str(path), '--check-only'])
    assert rc == 0
    assert sum('position embedding resampled' in r.getMessage() for r in caplog.records) == 1


def test_validate_img_size_resamples_a_checkpoint(ckpt_32px, image_folder, capsys):
    source, path = ckpt_32px
    rows = accuracy.main([str(image_folder), '--checkpoint', str(path), '--model', SMALL, '--img-size', '48',
                          '--heads', '3', '-j', '0', '--device', 'cpu'])
    captured = capsys.readouterr()
    assert len(rows) == 1 and captured.err.count('position embedding resampled') == 1


# --- 6. a validation split that lacks a class ------------------------------------------------------------------
def make_split_folder(root, splits: dict, per_class: int = 2):
    """ROOT/SPLIT/CLASS/*.png with the given classes per split; class i has its own colour."""
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            shade = 60 * (ord(name[-1]) % 4)
            for i in range(per_class):
                pixels = rng.integers(0, 40, (32, 32, 3)) + shade
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i}.png')
    return root


def targets(dataset) -> set:
    return {int(dataset[i][1]) for i in range(len(dataset))}


def test_training_maps_a_partial_validation_split_by_class_name(tmp_path, caplog):
    data = make_split_folder(tmp_path, {'train': ('class_0', 'class_1', 'class_2'),
                                        'validation': ('class_1', 'class_2')})
    args, _ = parse_args([str(data), '--model', SMALL, '--workers', '0'])
    args.data_dir = str(data)
    train, val = create_datasets(args, 'RGB')
    assert targets(train) == {0, 1, 2} and targets(val) == {1, 2}
    assert 'class_0' in caplog.text and 'matched to the training classes by name' in caplog.text


def test_training_refuses_validation_classes_it_does_not_train(tmp_path):
    data = make_split_folder(tmp_path, {'train': ('class_0', 'class_1'), 'validation': ('class_1', 'zebra')})
    args, _ = parse_args([str(data), '--model', SMALL, '--workers', '0'])
    args.data_dir = str(data)
    with pytest.raises(ConfigError, match="--val-split 'validation' has classes the model was not trained on: zebra"):
        create_datasets(args, 'RGB')


@pytest.fixture(scope='module')
def partial_run(tmp_path_factory):
    """One epoch on train class_0..2, validated on a split holding only class_1 and class_2."""
    root = tmp_path_factory.mktemp('partial')
    data = make_split_folder(root / 'data', {'train': ('class_0', 'class_1', 'class_2'),
                                             'validation': ('class_1', 'class_2')})
    rc = train_main([str(data), '--model', SMALL, '--num-classes', '3', '--heads', '3', '12', '-b', '3',
                     '--epochs', '1', '--opt', 'adamw', '--lr', '1e-3', '--warmup-epochs', '0', '--workers', '0',
                     '--output', str(root / 'out'), '--experiment', 'run'])
    assert rc == 0
    return data, root / 'out' / 'run'


def test_training_records_class_names(partial_run):
    _, run = partial_run
    assert load_checkpoint_file(run / 'last.pth.tar')['class_names'] == ['class_0', 'class_1', 'class_2']
    assert (run / 'class_map.txt').read_text() == 'class_0\nclass_1\nclass_2\n'


def test_validate_maps_by_the_checkpoint_class_names(partial_run, capsys):
    data, run = partial_run
    args = argparse.Namespace(model=None, checkpoint=str(run / 'last.pth.tar'), use_ema=False, num_classes=None)
    model, checkpoint = create_model_from_args(args)
    rows = accuracy.main([str(data / 'validation'), '--checkpoint', str(run / 'last.pth.tar'), '--heads', '3',
                          '-j', '0', '--device', 'cpu'])
    assert 'no images of 1 of the 3 classes' in capsys.readouterr().err
    # the expected top-1 from the checkpoint's own labels, without timm's data pipeline
    expected = direct_top1(model, data / 'validation', {'class_1': 1, 'class_2': 2}, k=3)
    assert rows[0]['top1'] == pytest.approx(expected)


def test_validate_class_map_file_is_timms_meaning(partial_run, capsys):
    data, run = partial_run
    model = small()
    path = run.parent / 'plain.pth'
    torch.save(model.state_dict(), path)  # no class names recorded
    argv = [str(data / 'validation'), '--checkpoint', str(path), '--model', SMALL, '--heads', '3', '-j', '0',
            '--device', 'cpu']
    rows = accuracy.main([*argv, '--class-map', str(run / 'class_map.txt')])
    assert rows[0]['top1'] == pytest.approx(direct_top1(model, data / 'validation', {'class_1': 1, 'class_2': 2}, 3))
    capsys.readouterr()
    accuracy.main(argv)  # numbered by its own folders: said, not silent
    assert 'records no class names' in capsys.readouterr().err


def test_validate_refuses_classes_the_checkpoint_does_not_know(partial_run, tmp_path, capsys):
    _, run = partial_run
    data = make_split_folder(tmp_path, {'val': ('class_1', 'zebra')})
    with pytest.raises(SystemExit):
        accuracy.main([str(data), '--checkpoint', str(run / 'last.pth.tar'), '-j', '0', '--device', 'cpu'])
    err = capsys.readouterr().err
    assert 'classes the model was not trained on: zebra' in err and err.count('error:') == 1


def test_eval_dataset_labels_are_the_checkpoint_classes(partial_run):
    data, run = partial_run
    args = accuracy_args([str(data / 'validation'), '--checkpoint', str(run / 'last.pth.tar')])
    session = create_session(args)
    assert targets(create_eval_dataset(session)) == {1, 2}


def accuracy_args(argv):
    from hydravit.evaluation.common import create_parser
    parser = create_parser('', True, 4)
    accuracy.add_args(parser)
    return parser.parse_args([*argv, '--device', 'cpu', '-j', '0'])


def direct_top1(model, folder, class_to_idx: dict, k: int) -> float:
    mean = torch.tensor(model.pretrained_cfg['mean']).view(3, 1, 1)
    std = torch.tensor(model.pretrained_cfg['std']).view(3, 1, 1)
    xs, ys = [], []
    for name, label in class_to_idx.items():
        for file in sorted((folder / name).glob('*.png')):
            pixels = torch.from_numpy(np.array(Image.open(file).convert('RGB'))).permute(2, 0, 1).float() / 255
            xs.append((pixels - mean) / std)
            ys.append(label)
    model.eval().set_heads(k)
    with torch.no_grad():
        logits = model(torch.stack(xs))
    return 100. * (logits.argmax(1) == torch.tensor(ys)).float().mean().item()


def test_resume_onto_data_of_other_classes_is_refused(partial_run, tmp_path, capsys):
    _, run = partial_run
    data = make_split_folder(tmp_path / 'data', {'train': ('class_0', 'class_1', 'zebra'),
                                                 'validation': ('class_0', 'class_1', 'zebra')})
    rc = train_main([str(data), '--model', SMALL, '--num-classes', '3', '--heads', '3', '12', '-b', '3',
                     '--epochs', '2', '--workers', '0', '--resume', str(run / 'last.pth.tar'), '--opt', 'adamw',
                     '--output', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert rc == 2 and 'error: --resume' in err and 'class_2, zebra' in err
    assert not (tmp_path / 'out').exists()
