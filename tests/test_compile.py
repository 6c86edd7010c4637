"""--torchcompile: one graph per head count, the same training as eager, plain checkpoints, DDP.

The backend here is aot_eager: dynamo's capture and guards (where a sliced model can go wrong: a graph traced at one
width reused for another) and AOTAutograd's forward/backward graphs, run by eager kernels, so its results equal eager
bit for bit and can be compared exactly. inductor only changes the kernels; on CPU it compiles for minutes, and
scripts/gpu_check.sh runs it on CUDA.
"""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import ROOT, base_args, load, make_image_folder
from torch._dynamo.utils import counters

from hydravit.training.loop import main

MULTI_SUBNET = ('--subnets-per-step', '3', '--subnet-policy', 'sandwich', '--inplace-kd', '--model-ema',
                '--model-ema-decay', '0.9')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('data'))


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
    """The same 1-epoch sandwich + in-place KD run (k = 12, 6, 3 every step), eager and compiled."""
    out = tmp_path_factory.mktemp('out')
    logger, handler = logging.getLogger(), _Lines()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert main(base_args(data_dir, out, 'eager', *MULTI_SUBNET)) == 0
        torch._dynamo.reset()
        counters.clear()
        handler.lines.clear()
        assert main(base_args(data_dir, out, 'compiled', *MULTI_SUBNET, '--torchcompile', 'aot_eager')) == 0
        stats = {'graphs': counters['stats']['unique_graphs'], 'breaks': sum(counters['graph_break'].values())}
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        torch._dynamo.reset()
    return load(out / 'eager' / 'last.pth.tar'), load(out / 'compiled' / 'last.pth.tar'), stats, handler.lines


def test_compiled_training_equals_eager_at_every_k(runs):
    eager, compiled, _, _ = runs
    assert compiled['sampler']['counts'] == eager['sampler']['counts'] == [2, 2, 2]  # k = 3, 6, 12 in both steps
    for key in ('state_dict', 'state_dict_ema'):
        assert compiled[key].keys() == eager[key].keys()
        for name, tensor in eager[key].items():
            assert torch.equal(compiled[key][name], tensor), f'{key}.{name}'
    for a, b in zip(eager['optimizer']['state'].values(), compiled['optimizer']['state'].values(), strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_one_graph_per_head_count_and_no_eager_fallback(runs):
    _, _, stats, lines = runs
    assert stats == {'graphs': 3, 'breaks': 0}
    assert 'torch.compile: compiling the graph for k=12,6,3 (first step at this width)' in lines
    assert sum(line.startswith('torch.compile: first step at k=12,6,3 took') for line in lines) == 1


def test_compiled_checkpoint_has_plain_keys(runs):
    _, compiled, _, _ = runs
    for key in ('state_dict', 'state_dict_ema'):
        assert not [n for n in compiled[key] if n.startswith(('_orig_mod.', 'module.'))]
    assert compiled['args']['torchcompile'] == 'aot_eager'


@pytest.mark.parametrize('flags, message', [
    (('--torchcompile', 'no_such_backend'), "--torchcompile: unknown backend 'no_such_backend' (available: "),
    (('--torchcompile', '--torchcompile-mode', 'fastest'), "--torchcompile-mode: unknown mode 'fastest' (one of "),
    (('--torchcompile-mode', 'max-autotune'), '--torchcompile-mode: given without --torchcompile'),
])
def test_bad_compile_flags_fail_early(data_dir, tmp_path, capsys, flags, message):
    assert main(base_args(data_dir, tmp_path / 'out', 'bad', *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'python -m hydravit.train: error: {message}'), err
    assert not (tmp_path / 'out').exists()


def test_compiled_ddp_two_processes(data_dir, tmp_path):
    """DDP (gloo) + compile: each rank trains its own k through its own graph; rank 0 saves plain keys."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1', DS_ACCELERATOR='cpu')
    env.pop('TORCHRUN_ARGS', None)
    argv = base_args(data_dir, tmp_path, 'ddp', '--heads', '3', '12', '--torchcompile', 'aot_eager')
    proc = subprocess.run([str(ROOT / 'distributed_train.sh'), '2', *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert 'Process 1/2' in log and 'gloo' in log and 'torch.compile: first step at k=' in log
    ckpt = load(tmp_path / 'ddp' / 'last.pth.tar')
    assert ckpt['world_size'] == 2 and sum(ckpt['sampler']['counts']) == 2  # one step, one k per rank
    assert not [n for n in ckpt['state_dict'] if n.startswith(('_orig_mod.', 'module.'))]
