"""CheckpointFiles: timm's checkpoint layout and ranking, written atomically, continued across a resume."""
import os

import pytest
import torch

from hydravit.checkpoint import load_checkpoint_file
from hydravit.training.checkpointing import CheckpointFiles


def save(files: CheckpointFiles, epoch: int, metric):
    state = {'epoch': epoch, 'saver': files.state_dict(epoch, metric), 'w': torch.tensor([float(epoch)])}
    return files.save_epoch(state, epoch, metric)


def names(directory) -> list:
    return sorted(p for p in os.listdir(directory) if not p.startswith('.'))


@pytest.mark.parametrize('decreasing', [False, True])
def test_keeps_the_best_epochs_and_model_best(tmp_path, decreasing):
    files = CheckpointFiles(str(tmp_path), decreasing=decreasing, max_history=2)
    metrics = [1., 3., 2., 0.5] if not decreasing else [3., 1., 2., 4.]
    for epoch, metric in enumerate(metrics):
        best = save(files, epoch, metric)
    assert best == ((3., 1) if not decreasing else (1., 1))
    assert names(tmp_path) == ['checkpoint-1.pth.tar', 'checkpoint-2.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    assert load_checkpoint_file(tmp_path / 'model_best.pth.tar')['epoch'] == 1
    assert load_checkpoint_file(tmp_path / 'last.pth.tar')['epoch'] == 3


def test_unranked_epochs_keep_the_newest_and_never_displace_ranked_ones(tmp_path):
    files = CheckpointFiles(str(tmp_path), decreasing=False, max_history=2)
    save(files, 0, 5.)
    for epoch in (1, 2, 3):
        assert save(files, epoch, None) == (5., 0)
    assert [name for name, _ in files.kept] == ['checkpoint-0.pth.tar', 'checkpoint-3.pth.tar']


def test_resume_into_the_same_folder_continues_the_ranking(tmp_path):
    files = CheckpointFiles(str(tmp_path), decreasing=False, max_history=2)
    for epoch, metric in enumerate([1., 3.]):
        save(files, epoch, metric)
    resumed = CheckpointFiles(str(tmp_path), decreasing=False, max_history=2)
    resumed.load_state_dict(load_checkpoint_file(tmp_path / 'last.pth.tar')['saver'])
    assert resumed.kept == files.kept and (resumed.best_metric, resumed.best_epoch) == (3., 1)
    save(resumed, 2, 2.)  # evicts epoch 0 (metric 1), as an uninterrupted run would
    assert names(tmp_path)[:2] == ['checkpoint-1.pth.tar', 'checkpoint-2.pth.tar']


def test_recovery_files_keep_the_two_newest(tmp_path):
    files = CheckpointFiles(str(tmp_path), decreasing=False)
    for step in (1, 2, 3):
        files.save_recovery({'epoch': 0}, 0, step)
    assert names(tmp_path) == ['recovery-0-1.pth.tar', 'recovery-0-2.pth.tar']


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    files = CheckpointFiles(str(tmp_path), decreasing=False)
    save(files, 0, 1.)
    before = (tmp_path / 'last.pth.tar').read_bytes()

    def broken(obj, path):
        open(path, 'wb').write(b'half')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken)
    with pytest.raises(OSError, match='disk full'):
        save(files, 1, 2.)
    assert (tmp_path / 'last.pth.tar').read_bytes() == before
    assert names(tmp_path) == ['checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
