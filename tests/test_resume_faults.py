"""Resume faults (issue 21): a mid-epoch position at another batch / accumulation / world size, a resume that would
change the run folder's summary columns or ranking, and DDP validation counting each image once."""
import argparse
import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_train import MODEL, ROOT, base_args, load, make_image_folder, run_train
from timm.data.distributed_sampler import OrderedDistributedSampler
from torch.utils.data import DistributedSampler

from hydravit.checkpoint import extract_state_dict
from hydravit.evaluation import accuracy
from hydravit.evaluation.accuracy import genuine_samples
from hydravit.training.checkpointing import ResumePoint, TrainingState, continues_run, resume_position, rng_state
from hydravit.training.config import ConfigError

ERR = 'python -m hydravit.train: error: '


@pytest.fixture(scope='module')
def recovery_run(tmp_path_factory):
    """16 training images at -b 4: 4 steps in epoch 0, recovery checkpoints after steps 2 and 3 (8 and 12 images)."""
    root = tmp_path_factory.mktemp('resume')
    data = make_image_folder(root / 'data', per_class=(8, 2))
    out = root / 'out'
    assert run_train(*base_args(data, out, 'b4', '--recovery-interval', '1')) == 0
    run = out / 'b4'
    assert sorted(p.name for p in run.glob('recovery-*')) == ['recovery-0-1.pth.tar', 'recovery-0-2.pth.tar']
    return data, out, run


def _resume(recovery_run, experiment: str, checkpoint: str, *extra: str) -> int:
    data, out, run = recovery_run
    return run_train(*base_args(data, out, experiment, '--resume', str(run / checkpoint), *extra))


# --- item 3: the position of a mid-epoch checkpoint is images seen --------------------------------------------
def test_mid_epoch_resume_converts_images_seen_to_this_batch(recovery_run):
    _, out, run = recovery_run
    saved = load(run / 'recovery-0-1.pth.tar')
    assert saved['updates_done'] == 2 and saved['images_done'] == 8 and sum(saved['sampler']['counts']) == 2
    # 8 images seen: 1 step of 8 (or of 4 x 2 accumulated) remains of the epoch's 16, 4 steps of 2
    for name, extra, steps_left in [('b8', ('-b', '8'), 1), ('accum', ('--grad-accum-steps', '2'), 1),
                                    ('b2', ('-b', '2'), 4)]:
        assert _resume(recovery_run, name, 'recovery-0-1.pth.tar', *extra) == 0
        assert sum(load(out / name / 'last.pth.tar')['sampler']['counts']) == 2 + steps_left, name
    # the same 8 images, once as one batch and once as two accumulated halves: the same step
    b8, accum = load(out / 'b8' / 'last.pth.tar'), load(out / 'accum' / 'last.pth.tar')
    for key, value in b8['state_dict'].items():
        torch.testing.assert_close(value, accum['state_dict'][key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(b8['state_dict']['cls_token'], saved['state_dict']['cls_token'])


def test_mid_epoch_resume_that_is_not_whole_steps_is_refused(recovery_run, capsys):
    data, out, run = recovery_run
    path = run / 'recovery-0-2.pth.tar'
    assert _resume(recovery_run, 'refused', 'recovery-0-2.pth.tar', '-b', '8') == 2
    assert capsys.readouterr().err == (
        f'{ERR}--resume: {path} stopped in epoch 0 after 12 images, not a whole number of optimizer steps of 8 '
        f'images (-b 8 x --grad-accum-steps 1 x 1 process(es)); resume with a -b / --grad-accum-steps whose global '
        f'batch divides 12, or from the end-of-epoch last.pth.tar\n')
    # 12 images = 1 step of 12, but at -b 12 (drop_last) an epoch of 16 images has only 1 step
    assert _resume(recovery_run, 'refused', 'recovery-0-2.pth.tar', '-b', '12') == 2
    assert capsys.readouterr().err == (
        f'{ERR}--resume: {path} stopped in epoch 0 after 12 images, 1 optimizer steps of 12 images (-b 12 x '
        f'--grad-accum-steps 1 x 1 process(es)), but an epoch has only 1 of them; resume with a smaller -b, or from '
        f'the end-of-epoch last.pth.tar\n')
    assert not (out / 'refused').exists()  # refused before the run folder was made


def test_resume_position_for_world_sizes_and_old_checkpoints():
    recovery = {'epoch': 3, 'updates_done': 2, 'world_size': 2, 'args': {'batch_size': 4, 'grad_accum_steps': 1}}
    # no images_done (older checkpoints): 2 steps x 4 x 2 processes = 16 images
    assert resume_position(recovery, 'R', 4, 1, 4) == ResumePoint(3, 1)  # 2 -> 4 processes: same global order
    assert resume_position(recovery, 'R', 2, 2, 2) == ResumePoint(3, 2)
    with pytest.raises(ConfigError, match=r'^--resume: R stopped in epoch 3 after 16 images on 2 process\(es\), '
                                          r'whose image order 1 process\(es\) cannot replay; resume it on several, '
                                          r'or from the end-of-epoch last.pth.tar$'):
        resume_position(recovery, 'R', 16, 1, 1)
    with pytest.raises(ConfigError, match=r'not a whole number of optimizer steps of 6 images \(-b 3 x '
                                          r'--grad-accum-steps 2\);'):
        resume_position(recovery, 'R', 3, 2, None)  # --check-only before torchrun: world size not known yet
    end_of_epoch = {'epoch': 3, 'world_size': 8, 'args': {'batch_size': 64}}
    assert resume_position(end_of_epoch, 'R', 5, 3, 1) == ResumePoint(4, 0)  # any batch, any world size


def test_no_resume_opt_still_replays_the_epochs_data_order():
    state = TrainingState(argparse.Namespace(world_size=1, rank=0), torch.nn.Linear(1, 1), optimizer=None)
    torch.manual_seed(5)
    epoch_start = rng_state()
    expected = torch.rand(3)
    torch.manual_seed(6)
    checkpoint = {'epoch_rng_state': [epoch_start], 'rng_state': [rng_state()]}
    torch.manual_seed(7)
    assert state._restore_rng(checkpoint, skip_updates=1, streams=False) is None
    assert torch.equal(torch.rand(3), expected)


# --- item 4: a resume into its run folder keeps summary.csv's columns and the ranking --------------------------
@pytest.mark.parametrize('extra, flag, value, saved', [
    (('--heads', '3', '4', '5', '6'), '--heads', '3 4 5 6', '3 6 12'),
    (('--heads', '12', '6', '3'), '--heads', '12 6 3', '3 6 12'),
    (('--eval-metric', 'top1_k12'), '--eval-metric', 'top1_k12', 'top1'),
    (('--val-split', ''), '--val-split', '(none)', 'validation'),
    (('--model-ema',), '--model-ema', 'EMA validated', 'no EMA validated'),
])
def test_resume_that_changes_summary_or_ranking_is_refused(recovery_run, capsys, extra, flag, value, saved):
    _, out, run = recovery_run
    before = (run / 'summary.csv').read_text()
    assert _resume(recovery_run, 'b4', 'last.pth.tar', '--epochs', '2', *extra) == 2
    assert capsys.readouterr().err == (
        f'{ERR}--resume: {flag} gives {value}, but {run / "last.pth.tar"} was trained with {saved}; in its run folder '
        f'that would change summary.csv columns or the model_best ranking: resume with the same {flag}, or into a '
        f'new run folder (--experiment NAME)\n')
    assert (run / 'summary.csv').read_text() == before


def test_resume_with_other_heads_into_a_new_folder_writes_new_files(recovery_run):
    _, out, _ = recovery_run
    assert _resume(recovery_run, 'more-heads', 'last.pth.tar', '--epochs', '2', '--heads', '3', '4', '5', '6') == 0
    with open(out / 'more-heads' / 'summary.csv', newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ['epoch', 'train_loss', 'train_loss_ce', 'train_loss_kd'] and rows[0][-1] == 'lr'
    assert rows[0][4:-1] == [f'eval_{m}_k{k}' for k in (3, 4, 5, 6) for m in ('loss', 'top1', 'top5')] + [
        'eval_top1', 'eval_top5', 'eval_loss']
    assert [len(row) for row in rows] == [len(rows[0])] * 2 and rows[1][0] == '1'
    best = load(out / 'more-heads' / 'model_best.pth.tar')
    top1 = [float(rows[1][rows[0].index(f'eval_top1_k{k}')]) for k in (3, 4, 5, 6)]
    assert best['epoch'] == 1 and best['metric'] == pytest.approx(sum(top1) / 4)


# --- item 6: DDP validation counts every image once ----------------------------------------------------------
@pytest.mark.parametrize('size, replicas', [(13, 2), (13, 4), (12, 5), (3, 4), (16, 2)])
def test_genuine_samples_cover_the_dataset_once(size, replicas):
    dataset = list(range(size))
    for make in (lambda r: OrderedDistributedSampler(dataset, replicas, r),
                 lambda r: DistributedSampler(dataset, replicas, r, shuffle=True, seed=1)):
        kept = []
        for rank in range(replicas):
            sampler = make(rank)
            kept += list(sampler)[:genuine_samples(sampler)]
        assert sorted(kept) == dataset
    assert genuine_samples(torch.utils.data.SequentialSampler(dataset)) is None


def test_ddp_validation_counts_each_image_once(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=(4, 6))
    rng = np.random.default_rng(1)
    for i in range(6):  # validation images carry no class signal: the top-1 is no trivial 0 or 100 %
        for name in ('a', 'b'):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(
                tmp_path / 'data' / 'validation' / name / f'{i}.png')
    Image.fromarray(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(
        tmp_path / 'data' / 'validation' / 'a' / '6.png')  # 13 images: 2 ranks are padded with a copy
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1', DS_ACCELERATOR='cpu')
    env.pop('TORCHRUN_ARGS', None)
    argv = base_args(data, tmp_path / 'out', 'ddp', '--heads', '3', '12')
    proc = subprocess.run([str(ROOT / 'distributed_train.sh'), '2', *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / 'out' / 'ddp' / 'summary.csv', newline='') as f:
        trained = next(csv.DictReader(f))
    rows = accuracy.main([str(data / 'validation'), '--checkpoint', str(tmp_path / 'out' / 'ddp' / 'last.pth.tar'),
                          '--heads', '3', '12', '-b', '4', '-j', '0', '--device', 'cpu'])
    for row in rows:
        assert row['num_images'] == 13
        top1 = float(trained[f'eval_top1_k{row["heads"]}'])
        assert top1 == pytest.approx(row['top1'], abs=1e-4)  # validate.py rounds to 4 decimals
        hits = top1 * 13 / 100
        assert hits == pytest.approx(round(hits), abs=1e-9) and 0 < round(hits) < 13


# --- review F1: the run folder is judged by what it holds, however it is reached -------------------------------
def _folder_state(run) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in run.iterdir()}


LAYOUT = ('{ERR}--resume: --heads gives 3 4 5 6, but {ckpt} was trained with 3 6 12; in its run folder that would '
          'change summary.csv columns or the model_best ranking: resume with the same --heads, or into a new run '
          'folder (--experiment NAME)\n')


def test_resume_into_its_folder_through_a_symlink_or_from_a_copy_is_refused(recovery_run, tmp_path, capsys):
    data, out, run = recovery_run
    before = _folder_state(run)
    heads = ('--epochs', '2', '--heads', '3', '4', '5', '6')
    (tmp_path / 'link').symlink_to(out)
    assert run_train(*base_args(data, tmp_path / 'link', 'b4', '--resume', str(run / 'last.pth.tar'), *heads)) == 2
    assert capsys.readouterr().err == LAYOUT.format(ERR=ERR, ckpt=run / 'last.pth.tar')
    copy = tmp_path / 'copy.pth.tar'
    shutil.copy(run / 'last.pth.tar', copy)  # its ranking records the folder it was saved in
    assert run_train(*base_args(data, out, 'b4', '--resume', str(copy), *heads)) == 2
    assert capsys.readouterr().err == LAYOUT.format(ERR=ERR, ckpt=copy)
    older = tmp_path / 'older.pth.tar'  # a checkpoint that does not record its folder: summary.csv's header tells
    checkpoint = load(copy)
    del checkpoint['saver']['directory']
    torch.save(checkpoint, older)
    assert run_train(*base_args(data, out, 'b4', '--resume', str(older), *heads)) == 2
    assert capsys.readouterr().err == (
        f'{ERR}--heads gives 3 4 5 6, but {run / "summary.csv"} was written with 3 6 12; its rows of the epochs '
        f'before 1 would stay under that header: use the same --heads, or a new run folder (--experiment NAME)\n')
    assert _folder_state(run) == before


def test_start_epoch_into_a_folder_with_other_columns_is_refused(recovery_run, capsys):
    data, out, run = recovery_run
    before = _folder_state(run)
    assert run_train(*base_args(data, out, 'b4', '--start-epoch', '1', '--epochs', '2', '--model-ema')) == 2
    assert capsys.readouterr().err == (
        f'{ERR}--model-ema gives EMA validated, but {run / "summary.csv"} was written with no EMA validated; its rows '
        f'of the epochs before 1 would stay under that header: use the same --model-ema, or a new run folder '
        f'(--experiment NAME)\n')
    assert _folder_state(run) == before


def test_a_run_folder_is_known_by_its_real_path_or_its_recorded_one(recovery_run, tmp_path):
    _, out, run = recovery_run
    checkpoint = load(run / 'last.pth.tar')
    (tmp_path / 'link').symlink_to(out)
    assert continues_run(checkpoint, str(run / 'last.pth.tar'), str(tmp_path / 'link' / 'b4'))
    assert continues_run(checkpoint, str(tmp_path / 'link' / 'b4' / 'last.pth.tar'), str(run))
    copy = tmp_path / 'copy.pth.tar'  # resumed into its folder: the ranking it records is continued
    shutil.copy(run / 'last.pth.tar', copy)
    assert continues_run(checkpoint, str(copy), str(run))
    assert not continues_run(checkpoint, str(copy), str(out)) and not continues_run(checkpoint, str(copy), None)
    del checkpoint['saver']['directory']
    assert not continues_run(checkpoint, str(copy), str(run))


# --- review F5: an optimizer state this run's optimizer cannot take -----------------------------------------------
def _group_sizes() -> list:
    """timm's weight-decay split of the small model: 1-d tensors, biases and no_weight_decay() first, then the rest."""
    model = timm.create_model(MODEL, num_classes=2)
    skip = model.no_weight_decay()
    flat = [n for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith('.bias') or n in skip]
    return [len(flat), len(list(model.parameters())) - len(flat)]


def test_resume_with_another_optimizer_is_refused_before_anything_is_written(recovery_run, tmp_path, capsys):
    data, out, run = recovery_run
    path = run / 'last.pth.tar'
    afresh = 'or with --no-resume-opt to start the optimizer afresh\n'
    flat, decayed = _group_sizes()
    for extra, message in [
        (('--opt', 'sgd'), f'--opt: {path} was trained with --opt adamw, and its optimizer state is adamw\'s, not '
                           f'sgd\'s; resume with --opt adamw, {afresh}'),
        (('--weight-decay', '0'), f'--weight-decay: {path} holds optimizer state for 2 parameter group(s) of '
                                  f'{flat}/{decayed} tensors, --weight-decay 0.0 builds 1 of {flat + decayed}; resume '
                                  f'with --weight-decay 2e-05, {afresh}')]:
        assert run_train(*base_args(data, out, 'opt', '--resume', str(path), '--epochs', '2', *extra)) == 2
        assert capsys.readouterr().err == ERR + message, extra
    assert run_train(*base_args(data, out, 'opt', '--resume', str(path), '--epochs', '2', '--layer-decay', '0.7')) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'{ERR}--layer-decay: {path} holds optimizer state for 2 parameter group(s) of '
                          f'{flat}/{decayed} tensors, --layer-decay 0.7 builds ') and err.endswith(
        f'; resume without --layer-decay, {afresh}') and err.count('\n') == 1
    none = tmp_path / 'no_opt.pth.tar'
    torch.save({**load(path), 'optimizer': None}, none)
    assert run_train(*base_args(data, out, 'opt', '--resume', str(none), '--epochs', '2')) == 2
    assert capsys.readouterr().err == (f'{ERR}--resume: {none} holds no optimizer state; resume with --no-resume-opt '
                                       f'to start the optimizer afresh\n')
    assert not (out / 'opt').exists()
    assert run_train(*base_args(data, out, 'sgd', '--resume', str(path), '--epochs', '2', '--opt', 'sgd',
                                '--no-resume-opt')) == 0


def test_resumed_optimizer_trains_with_this_runs_hyperparameters():
    model = torch.nn.Linear(3, 2)
    saved_opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.05, betas=(0.9, 0.99))
    model(torch.ones(1, 3)).sum().backward()
    saved_opt.step()
    saved = saved_opt.state_dict()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.2, betas=(0.8, 0.9))
    state = TrainingState(argparse.Namespace(opt_kwargs={}), model, optimizer)
    state._restore_optimization({'optimizer': saved})
    group = optimizer.param_groups[0]
    assert (group['weight_decay'], tuple(group['betas'])) == (0.2, (0.8, 0.9))
    for param in model.parameters():
        assert torch.equal(optimizer.state[param]['exp_avg'], saved_opt.state[param]['exp_avg'])


# --- review F10: model weights asked of a file holding only EMA weights ------------------------------------------
def test_initial_checkpoint_weights_model_of_an_ema_only_file(recovery_run, tmp_path, capsys):
    data, out, run = recovery_run
    path = tmp_path / 'ema_only.pth'
    torch.save({'state_dict_ema': load(run / 'last.pth.tar')['state_dict']}, path)
    assert run_train(*base_args(data, out, 'ema', '--initial-checkpoint', str(path),
                                '--initial-checkpoint-weights', 'model', '--check-only')) == 2
    assert capsys.readouterr().err == (f'{ERR}--initial-checkpoint-weights model: {path} holds only EMA weights '
                                       f'(state_dict_ema); use --initial-checkpoint-weights ema or auto\n')
    with pytest.raises(ValueError, match=r'^x holds only EMA weights \(state_dict_ema\), no model weights '
                                         r'\(state_dict\)$'):
        extract_state_dict(load(path), source='x')
    assert not (out / 'ema').exists()
