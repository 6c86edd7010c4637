"""What a user sees: distributed_train.sh on bad input (one error line, no traceback, exit 2), damaged checkpoints
named as such, and a run's log (no checkpoint list, the checkpoints' paths at the end)."""
import csv
import logging
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from test_train import ROOT, base_args, make_image_folder

from hydravit.checkpoint import load_checkpoint_file
from hydravit.evaluation.accuracy import main as validate_main
from hydravit.training.config import parse_args
from hydravit.training.loop import main as train_main

MODEL = 'hydravit_dyn_patch4_32'
PROG = 'python -m hydravit.train'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def truncated(tmp_path_factory) -> Path:
    """A training checkpoint cut in half, as an interrupted copy leaves it."""
    folder = tmp_path_factory.mktemp('ckpt')
    model = timm.create_model(MODEL, num_classes=2)
    full = folder / 'full.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'epoch': 0, 'arch': MODEL}, full)
    cut = folder / 'cut.pth.tar'
    data = full.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    return cut


def corrupt_message(path: Path) -> str:
    size = path.stat().st_size
    return (f'checkpoint {path} is truncated or corrupt ({size:,} bytes; RuntimeError: PytorchStreamReader failed '
            f'reading zip archive: failed finding central directory); copy or save it again')


def launch(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1', DS_ACCELERATOR='cpu')
    env.pop('TORCHRUN_ARGS', None)
    return subprocess.run([str(ROOT / 'distributed_train.sh'), *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


# --- through the shell script: torchrun never starts --------------------------------------------------------
@pytest.mark.parametrize('flags, error', [
    (('--heads', '3', '13'), '--heads: head counts must be ints in 1..12, got [13]'),
    (('--initial-checkpoint', '/no/such/file.pth'), '--initial-checkpoint: file not found: /no/such/file.pth'),
], ids=['bad-value', 'missing-file'])
def test_launcher_bad_input_is_one_error_line(data_dir, tmp_path, flags, error):
    proc = launch('2', *base_args(data_dir, tmp_path / 'out', 'bad', *flags))
    assert proc.returncode == 2
    assert proc.stderr == f'{PROG}: error: {error}\n'
    assert proc.stdout == ''
    assert not (tmp_path / 'out').exists()


def test_launcher_truncated_resume_checkpoint(data_dir, tmp_path, truncated):
    proc = launch('2', *base_args(data_dir, tmp_path / 'out', 'bad', '--resume', str(truncated)))
    assert proc.returncode == 2
    assert proc.stderr == f'{PROG}: error: --resume: {corrupt_message(truncated)}\n'
    assert proc.stdout == ''


def test_argparse_errors_are_one_line_too(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train_main(base_args(data_dir, tmp_path / 'out', 'bad', '--no-such-flag', '--epochs', 'two'))
    assert info.value.code == 2
    assert capsys.readouterr().err == f"{PROG}: error: argument --epochs: invalid int value: 'two' (see --help)\n"
    with pytest.raises(SystemExit):
        train_main(base_args(data_dir, tmp_path / 'out', 'bad', '--no-such-flag'))
    assert capsys.readouterr().err == f'{PROG}: error: unrecognized arguments: --no-such-flag (see --help)\n'


@pytest.mark.parametrize('flags, error', [
    (('--opt', 'adamx'), "--opt: unknown optimizer 'adamx' (timm.optim.list_optimizers() has "),
    (('--sched', 'cosinus'), "--sched: Unknown scheduler 'cosinus'."),
    (('--device', 'gpu0'), '--device: '),
], ids=['opt', 'sched', 'device'])
def test_names_timm_would_reject_late_fail_early(data_dir, tmp_path, capsys, flags, error):
    assert train_main(base_args(data_dir, tmp_path / 'out', 'bad', *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'{PROG}: error: {error}') and err.count('\n') == 1, err
    assert not (tmp_path / 'out').exists()


def test_check_only_is_silent_and_writes_nothing_when_all_is_well(data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', DS_ACCELERATOR='cpu')
    argv = base_args(data_dir, tmp_path / 'out', 'ok', '--torchcompile', '--model-ema', '--drop-p', '1')
    proc = subprocess.run([sys.executable, '-m', 'hydravit.train', '--check-only', *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, '', '')
    assert not (tmp_path / 'out').exists()


def test_launcher_checks_nproc_before_python(tmp_path):
    proc = launch('two', str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr == (f"{ROOT / 'distributed_train.sh'}: error: NPROC must be a positive number of processes "
                           f"(or gpu, cpu, auto), got 'two'\n")


# --- the same message from every reader of checkpoints --------------------------------------------------------
def test_load_checkpoint_file_names_a_truncated_file(truncated):
    with pytest.raises(ValueError) as info:
        load_checkpoint_file(truncated)
    assert str(info.value) == corrupt_message(truncated)


@pytest.mark.parametrize('cut', [0, 7, 0.5])
def test_every_kind_of_cut_is_truncated_or_corrupt(truncated, tmp_path, cut):
    data = truncated.with_name('full.pth.tar').read_bytes()
    path = tmp_path / 'c.pth.tar'
    path.write_bytes(data[:int(len(data) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(ValueError, match=rf'^checkpoint {path} is truncated or corrupt \({path.stat().st_size:,} '
                                         r'bytes; '):
        load_checkpoint_file(path)


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file
    full = tmp_path / 'w.safetensors'
    save_file({'a': torch.ones(1000)}, full)
    data = full.read_bytes()
    full.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=rf'^checkpoint {full} is truncated or corrupt \(.*SafetensorError'):
        load_checkpoint_file(full)


def test_initial_checkpoint_truncated(data_dir, tmp_path, truncated, capsys):
    assert train_main(base_args(data_dir, tmp_path / 'out', 'bad', '--initial-checkpoint', str(truncated))) == 2
    assert capsys.readouterr().err == f'{PROG}: error: --initial-checkpoint: {corrupt_message(truncated)}\n'


def test_validate_truncated(data_dir, truncated, capsys):
    with pytest.raises(SystemExit) as info:
        validate_main([str(data_dir / 'validation'), '--model', MODEL, '--checkpoint', str(truncated)])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f'error: {corrupt_message(truncated)}')


def test_export_truncated(tmp_path, truncated, capsys):
    export = runpy.run_path(str(ROOT / 'scripts' / 'export.py'))  # the script's main(), without a new process
    with pytest.raises(SystemExit) as info:
        export['main'](['--model', MODEL, '--checkpoint', str(truncated), '--heads', '3', '-o', str(tmp_path / 'k3')])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f'error: {corrupt_message(truncated)}')
    assert not (tmp_path / 'k3').exists()


# --- logs -----------------------------------------------------------------------------------------------------------
def test_log_has_no_checkpoint_list_and_ends_with_the_checkpoints(data_dir, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    assert train_main(base_args(data_dir, tmp_path, 'logs', '--epochs', '2', '--checkpoint-hist', '1')) == 0
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [m for m in info if 'Current checkpoints' in m or 'checkpoint-' in m]
    kept = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Checkpoints kept')]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.getMessage().startswith('Checkpoints kept'))
    # at debug level, one line when an epoch's checkpoint is kept (epoch 0 always; epoch 1 only if it ranks higher)
    assert len(kept) in (1, 2) and all(len(m.splitlines()) == 1 for m in kept)
    assert kept[0] == f'Checkpoints kept (best first): checkpoint-0.pth.tar ({_top1(tmp_path / "logs", 0):.4g})'
    run = tmp_path / 'logs'
    assert re.fullmatch(rf'\*\*\* Done in 0:00:\d\d\. Checkpoints: best {run}/model_best\.pth\.tar \(top1 [0-9.]+, '
                        rf'epoch [01]\); last {run}/last\.pth\.tar \(epoch 1\)', info[-1]), info[-1]
    numbered = [p.name for p in run.glob('checkpoint-*.pth.tar')]
    assert len(numbered) == 1 and (run / 'last.pth.tar').is_file() and (run / 'model_best.pth.tar').is_file()


def _top1(run: Path, epoch: int) -> float:
    with open(run / 'summary.csv') as f:
        return float(list(csv.DictReader(f))[epoch]['eval_top1'])


def test_digits_recipe_keeps_one_numbered_checkpoint(tmp_path):
    args, _ = parse_args([str(tmp_path), '--config', str(ROOT / 'configs' / 'digits.yaml')])
    assert args.checkpoint_hist == 1 and args.epochs == 40  # the recipe itself is unchanged
