"""hydravit.train end to end on tiny generated ImageFolders: outputs, resume equality, DDP, bad flags."""
import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from timm.models import VisionTransformer

import hydravit  # noqa: F401  registers the models
from hydravit.checkpoint import load_checkpoint_file
from hydravit.export import subnetwork_state_dict
from hydravit.training.builders import load_initial_checkpoint
from hydravit.training.config import ConfigError, parse_args
from hydravit.training.loop import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = 'hydravit_dyn_patch4_32'


def make_image_folder(root: Path, classes=('a', 'b'), per_class=(4, 2), size=32, seed=0) -> Path:
    """ROOT/{train,validation}/CLASS/*.png; each class has its own mean colour so it is learnable."""
    rng = np.random.default_rng(seed)
    for split, count in zip(('train', 'validation'), per_class, strict=True):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 96, (size, size, 3)) + 128 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('data'))


def base_args(data: Path, out: Path, experiment: str, *extra: str) -> list:
    return [str(data), '--model', MODEL, '--num-classes', '2', '--heads', '3', '6', '12', '-b', '4',
            '--epochs', '1', '--opt', 'adamw', '--lr', '1e-3', '--sched', 'cosine', '--warmup-epochs', '0',
            '--workers', '0', '--hflip', '0', '--scale', '0.5', '1', '--seed', '3', '--log-interval', '1',
            '--output', str(out), '--experiment', experiment, *extra]


def run_train(*argv: str) -> int:
    return main(list(argv))


def load(path: Path) -> dict:
    return load_checkpoint_file(path)  # weights_only: fails if the checkpoint holds anything else


# --- end to end ------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def one_epoch_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('out')
    logger = logging.getLogger()
    handler = _ListHandler()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        rc = run_train(*base_args(data_dir, out, 'e2e', '--model-ema', '--model-ema-decay', '0.9',
                                  '--mixup', '0.2', '--smoothing', '0.1'))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return rc, out / 'e2e', handler.lines


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_one_epoch_writes_timm_layout(one_epoch_run):
    rc, run_dir, _ = one_epoch_run
    assert rc == 0
    for name in ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar', 'args.yaml', 'summary.csv'):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob('*.tmp*'))


def test_checkpoint_holds_full_training_state(one_epoch_run):
    _, run_dir, _ = one_epoch_run
    ckpt = load(run_dir / 'last.pth.tar')
    for key in ('state_dict', 'state_dict_ema', 'optimizer', 'sampler', 'rng_state', 'scheduler', 'saver'):
        assert key in ckpt, key
    assert ckpt['epoch'] == 0 and ckpt['arch'] == MODEL and ckpt['heads'] == [3, 6, 12]
    assert isinstance(ckpt['args'], dict) and ckpt['args']['heads'] == [3, 6, 12]
    assert set(ckpt['rng_state'][0]) >= {'torch', 'numpy', 'python'}
    assert sum(ckpt['sampler']['counts']) == 2  # 8 images / batch 4 = 2 optimizer steps, one k each
    model = timm.create_model(MODEL, num_classes=2)
    model.load_state_dict(ckpt['state_dict'], strict=True)
    model.load_state_dict(ckpt['state_dict_ema'], strict=True)


def test_summary_has_one_column_per_k(one_epoch_run):
    _, run_dir, _ = one_epoch_run
    with open(run_dir / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    for k in (3, 6, 12):
        for name in (f'eval_top1_k{k}', f'eval_top5_k{k}', f'eval_loss_k{k}', f'eval_ema_top1_k{k}'):
            assert name in rows[0], name
    mean = sum(float(rows[0][f'eval_top1_k{k}']) for k in (3, 6, 12)) / 3
    assert float(rows[0]['eval_top1']) == pytest.approx(mean)


def test_args_yaml_is_the_effective_config(one_epoch_run):
    _, run_dir, _ = one_epoch_run
    saved = yaml.safe_load((run_dir / 'args.yaml').read_text())
    assert saved['heads'] == [3, 6, 12] and saved['model'] == MODEL and saved['mixup'] == 0.2
    assert saved['model_ema'] is True and saved['batch_size'] == 4


def test_logs_show_progress_and_per_k_table(one_epoch_run):
    _, _, lines = one_epoch_run
    progress = [line for line in lines if line.startswith('Train:')]
    assert progress and all(s in progress[-1] for s in ('Loss:', 'img/s', 'LR:', 'ETA:', 'k-hist:'))
    tables = [line for line in lines if line.startswith('Per-k validation')]
    assert any('model' in t for t in tables) and any('EMA' in t for t in tables)
    assert all(f'\n{k:>4} ' in tables[0] for k in (3, 6, 12))


# --- exact resume -------------------------------------------------------------------------------------------
def _assert_same_training_state(a: dict, b: dict) -> None:
    for key in ('state_dict', 'state_dict_ema'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f'{key}.{name}'
    for pa, pb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values(), strict=True):
        assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert a['sampler']['counts'] == b['sampler']['counts']
    assert torch.equal(a['sampler']['generator'], b['sampler']['generator'])


def test_resume_matches_uninterrupted_run(data_dir, tmp_path):
    common = ('--model-ema', '--model-ema-decay', '0.5', '--drop-path', '0.1', '--reprob', '0.5',
              '--heads', '3', '4', '12', '--eval-interval', '2')
    assert run_train(*base_args(data_dir, tmp_path, 'straight', *common, '--epochs', '2',
                                '--recovery-interval', '1')) == 0
    assert run_train(*base_args(data_dir, tmp_path, 'split', *common, '--epochs', '1')) == 0
    assert run_train(*base_args(data_dir, tmp_path, 'split', *common, '--epochs', '2',
                                '--resume', str(tmp_path / 'split' / 'last.pth.tar'))) == 0
    straight = load(tmp_path / 'straight' / 'last.pth.tar')
    resumed = load(tmp_path / 'split' / 'last.pth.tar')
    assert straight['epoch'] == resumed['epoch'] == 1
    _assert_same_training_state(straight, resumed)

    # mid-epoch: the recovery checkpoint written after the first step of epoch 1 resumes to the same end
    recovery = tmp_path / 'straight' / 'recovery-1-0.pth.tar'
    assert recovery.is_file()
    assert run_train(*base_args(data_dir, tmp_path, 'recovered', *common, '--epochs', '2',
                                '--resume', str(recovery))) == 0
    _assert_same_training_state(straight, load(tmp_path / 'recovered' / 'last.pth.tar'))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, caplog):
    assert run_train(*base_args(data_dir, tmp_path, 'nan')) == 0
    last = tmp_path / 'nan' / 'last.pth.tar'
    before = last.read_bytes()
    # a zero std makes the normalized inputs inf: the first loss is not finite
    rc = run_train(*base_args(data_dir, tmp_path, 'nan', '--epochs', '3', '--std', '0', '0', '0',
                              '--resume', str(last)))
    assert rc == 1
    assert 'loss is' in caplog.text
    assert f'The last checkpoint with finite weights is {last} (end of epoch 0)' in caplog.text
    assert last.read_bytes() == before
    assert load(last)['epoch'] == 0


# --- initialization ------------------------------------------------------------------------------------------
def test_initial_checkpoint_full_size_and_fresh_classifier(tmp_path, caplog):
    source = timm.create_model(MODEL, num_classes=5)
    path = tmp_path / 'full.pth'
    torch.save({'state_dict': source.state_dict()}, path)
    model = timm.create_model(MODEL, num_classes=2)
    head_before = model.head.weight.clone()
    load_initial_checkpoint(model, str(path), init_slices=False)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert torch.equal(model.head.weight, head_before)  # 5 -> 2 classes: a fresh classifier
    assert 'classifier shape differs' in caplog.text


def test_init_slices_loads_a_narrow_vit_into_the_leading_heads(tmp_path):
    tiny = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=2)
    path = tmp_path / 'tiny.pth'
    torch.save(tiny.state_dict(), path)
    model = timm.create_model(MODEL, num_classes=2)
    untouched = model.blocks[0].mlp.fc1.weight[200:].clone()
    load_initial_checkpoint(model, str(path), init_slices=True)
    for name, tensor in subnetwork_state_dict(model, 3).items():
        assert torch.equal(tensor, tiny.state_dict()[name]), name
    assert torch.equal(model.blocks[0].mlp.fc1.weight[200:], untouched)
    model.set_heads(3)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval()(x), tiny.eval()(x), atol=1e-5)


def test_wrong_initial_checkpoint_is_a_clear_error(tmp_path):
    tiny = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=2)
    path = tmp_path / 'tiny.pth'
    torch.save(tiny.state_dict(), path)
    with pytest.raises(ConfigError, match='--init-slices'):
        load_initial_checkpoint(timm.create_model(MODEL, num_classes=2), str(path), init_slices=False)


# --- configuration ------------------------------------------------------------------------------------------
def test_original_recipe_yaml_loads_unchanged(tmp_path):
    recipe = ROOT / 'configs' / 'hydravit_imagenet.yaml'
    args, text = parse_args([str(tmp_path), '--config', str(recipe), '--heads', '3', '4', '12', '-b', '8'])
    assert args.aa == 'rand-m9-mstd0.5-inc1' and args.mixup == 0.8 and args.cutmix == 1.0
    assert args.model_ema and args.model_ema_decay == 0.99996 and args.lr_base == 5e-4
    assert args.batch_size == 8 and args.heads == [3, 4, 12]  # the command line overrides the file
    assert yaml.safe_load(text)['batch_size'] == 8


def test_unknown_yaml_keys_are_kept_with_a_warning(tmp_path, caplog):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('lr: 0.01\nsome_future_timm_key: 3\n')
    args, text = parse_args([str(tmp_path), '--config', str(cfg)])
    assert args.lr == 0.01 and args.some_future_timm_key == 3
    assert 'some_future_timm_key' in caplog.text and 'some_future_timm_key' in yaml.safe_load(text)


BAD_FLAGS = [
    (('--heads', '0', '3'), '--heads'),
    (('--heads', '3', '13'), '--heads'),
    (('--heads', '3', '3', '6'), '--heads'),
    (('--heads', '3', '6', '--weights', '1'), '--weights'),
    (('--heads', '3', '6', '--weights', '-1', '2'), '--weights'),
    (('--heads', '3', '6', '--weights', '0', '0'), '--weights'),
    (('--model', 'no_such_model'), '--model'),
    (('--model', 'resnet18'), '--model'),
    (('--eval-metric', 'top1_k7'), '--eval-metric'),
    (('--torchscript',), '--torchscript'),
    (('--grad-accum-steps', '0'), '--grad-accum-steps'),
    (('--amp-dtype', 'int8'), '--amp-dtype'),
]


@pytest.mark.parametrize('flags, flag', BAD_FLAGS, ids=[' '.join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_fail_early_naming_the_flag(data_dir, tmp_path, capsys, flags, flag):
    out = tmp_path / 'out'
    argv = base_args(data_dir, out, 'bad')
    argv += list(flags)
    assert run_train(*argv) == 2
    err = capsys.readouterr().err
    assert 'error:' in err and flag in err, err
    assert not out.exists()


@pytest.mark.parametrize('layout', ['missing', 'empty', 'empty_classes'])
def test_missing_or_empty_data_dir_is_a_clear_error(tmp_path, capsys, layout):
    data = tmp_path / 'data'
    if layout != 'missing':
        data.mkdir()
    if layout == 'empty_classes':
        (data / 'train' / 'a').mkdir(parents=True)
        (data / 'validation' / 'a').mkdir(parents=True)
    out = tmp_path / 'out'
    assert run_train(*base_args(data, out, 'bad')) == 2
    err = capsys.readouterr().err
    assert '--data-dir' in err and ('not found' in err or 'no images' in err), err
    assert not out.exists()


# --- torchrun -------------------------------------------------------------------------------------------
def test_two_process_torchrun_gloo(data_dir, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1', DS_ACCELERATOR='cpu')
    env.pop('TORCHRUN_ARGS', None)
    argv = base_args(data_dir, tmp_path, 'ddp', '--heads', '3', '12', '--model-ema', '--eval-interval', '1')
    proc = subprocess.run([str(ROOT / 'distributed_train.sh'), '2', *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert 'Process 1/2' in log and 'gloo' in log
    ckpt = load(tmp_path / 'ddp' / 'last.pth.tar')
    assert ckpt['world_size'] == 2 and len(ckpt['rng_state']) == 2
    # batch 4 x 2 ranks: one step per epoch, one k drawn per rank
    assert sum(ckpt['sampler']['counts']) == 2


# --- DDP head policy (no processes needed: every rank runs the same sampler) --------------------------------
def _ranks_draws(shared: bool, world_size: int = 4, steps: int = 200, num_subnets: int = 1,
                 policy: str = 'random') -> list:
    """The head set each rank trains at each step, simulating the ranks with identically seeded samplers."""
    from hydravit.training.objective import StepObjective
    from hydravit.training.sampler import HeadSampler
    per_rank = []
    for rank in range(world_size):
        objective = StepObjective(HeadSampler(range(3, 13), seed=11), torch.nn.CrossEntropyLoss(),
                                  num_subnets=num_subnets, policy=policy, shared_heads=shared,
                                  world_size=world_size, rank=rank)
        per_rank.append([tuple(objective.draw(epoch=0)) for _ in range(steps)])
    return list(zip(*per_rank, strict=True))


def test_shared_heads_gives_every_rank_the_same_k():
    assert all(len(set(step)) == 1 for step in _ranks_draws(shared=True))


def test_per_rank_heads_differ_between_ranks():
    steps = _ranks_draws(shared=False)
    assert sum(len(set(step)) > 1 for step in steps) > len(steps) // 2


def test_multi_subnet_steps_are_the_same_on_every_rank():
    steps = _ranks_draws(shared=False, num_subnets=3, policy='sandwich')
    assert all(len(set(step)) == 1 and len(step[0]) == 3 for step in steps)


def test_summary_columns_stay_aligned_when_some_epochs_are_not_validated(data_dir, tmp_path):
    # timm's update_summary writes each row in its own key order under the first row's header
    assert run_train(*base_args(data_dir, tmp_path, 'sparse', '--epochs', '2', '--eval-interval', '2',
                                '--model-ema')) == 0
    with open(tmp_path / 'sparse' / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert rows[0]['eval_top1_k3'] == '' and rows[1]['eval_top1_k3'] != ''
    for prefix in ('eval_', 'eval_ema_'):
        per_k = [float(rows[1][f'{prefix}top1_k{k}']) for k in (3, 6, 12)]
        assert float(rows[1][f'{prefix}top1']) == pytest.approx(sum(per_k) / 3)
        assert all(float(rows[1][f'{prefix}top5_k{k}']) >= float(rows[1][f'{prefix}top1_k{k}']) for k in (3, 6, 12))
