"""Non-finite weights are refused by every loader with one line naming the tensor; result files are valid JSON.

One NaN is written into a state dict of the small model, then each entry point is run in-process through its
``main(argv)``: validate*.py, export (timm and ONNX), convert, deploy profile / serve-bench, training's
--initial-checkpoint / --resume / --teacher. The refusal always reads
``FLAG: PATH: non-finite values in TENSOR (KEY; N of M NaN/inf)``.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import hydravit  # noqa: F401  registers the models
from hydravit import convert
from hydravit.checkpoint import (
    NonFiniteWeightsError,
    check_finite,
    check_optimizer_finite,
    extract_state_dict,
    load_model_weights,
    newest_finite_checkpoint,
    to_json,
    write_json,
)
from hydravit.deploy import export_cli, profile, serve_bench
from hydravit.deploy.profile import ProfileError, check_profile
from hydravit.evaluation import accuracy, macs, memory, throughput
from hydravit.evaluation.common import read_results, write_results
from hydravit.export import export_subnetwork, save_subnetwork
from hydravit.training.checkpointing import CheckpointFiles
from hydravit.training.loop import divergence_advice
from hydravit.training.loop import main as train_main

MODEL = 'hydravit_dyn_patch4_32'
QKV = 'blocks.0.attn.qkv.weight'  # 576 x 192 in the 12-head, 192-wide model
QKV_SIZE = '110,592'
EVAL_TOOLS = {'validate.py': accuracy.main, 'validate_macs.py': macs.main, 'validate_memory.py': memory.main,
              'validate_throughput.py': throughput.main}


def nan_message(path, key: str = 'state_dict', flag: str = '--checkpoint', count: int = 1) -> str:
    """The one line every loader gives for the NaN(s) these tests write into ``QKV``."""
    return f'{flag}: {path}: non-finite values in {QKV} ({key}; {count} of {QKV_SIZE} NaN/inf)'


def strict_json(text: str):
    """json.loads that fails on the bare NaN / Infinity tokens Python's json writes by default."""
    def refuse(token):
        raise ValueError(f'invalid JSON token {token}')
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    """ROOT/{train,validation}/{a,b}/*.png, 2 images per class and split."""
    root = tmp_path_factory.mktemp('nonfinite_data')
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        for name in ('a', 'b'):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def weights() -> dict:
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=2)
    return {n: t.clone() for n, t in model.state_dict().items()}


def with_nan(state_dict: dict, name: str = QKV, count: int = 1) -> dict:
    poisoned = {n: t.clone() for n, t in state_dict.items()}
    poisoned[name].view(-1)[:count] = float('nan')
    return poisoned


@pytest.fixture(scope='module')
def ckpts(weights, tmp_path_factory) -> dict:
    """Training-style checkpoints: NaN in the model weights, NaN in the EMA only, NaN in the optimizer only."""
    root = tmp_path_factory.mktemp('nonfinite_ckpt')
    optimizer = {'state': {0: {'step': torch.tensor(1.), 'exp_avg': torch.zeros(3), 'exp_avg_sq': torch.zeros(3)}},
                 'param_groups': [{'params': [0], 'lr': 1e-3}]}
    bad_optimizer = {**optimizer, 'state': {0: {**optimizer['state'][0], 'exp_avg_sq': torch.tensor([0., math.inf,
                                                                                                     0.])}}}

    def save(name: str, **parts) -> Path:
        path = root / name
        torch.save({'epoch': 0, 'arch': MODEL, 'heads': [3, 6, 12], 'optimizer': optimizer, **parts}, path)
        return path
    return {
        'model': save('model_nan.pth.tar', state_dict=with_nan(weights), state_dict_ema=weights),
        'ema': save('ema_nan.pth.tar', state_dict=weights, state_dict_ema=with_nan(weights, count=3)),
        'optimizer': save('opt_nan.pth.tar', state_dict=weights, state_dict_ema=weights, optimizer=bad_optimizer),
        'good': save('good.pth.tar', state_dict=weights, state_dict_ema=weights),
    }


# --- the shared check --------------------------------------------------------------------------------------------
def test_check_finite_names_first_bad_tensor_and_counts_the_rest():
    tensors = {'a': torch.ones(4), 'b': torch.tensor([1., math.inf, -math.inf, math.nan]),
               'c': torch.full((2, 3), math.nan), 'steps': torch.tensor([1, 2]), 'note': 'text'}
    with pytest.raises(NonFiniteWeightsError) as e:
        check_finite(tensors, 'f.pth', where='state_dict_ema')
    assert str(e.value) == 'f.pth: non-finite values in b (state_dict_ema; 3 of 4 NaN/inf), and in 1 more tensor'
    check_finite({'b': tensors['b'], 'c': tensors['c']}, 'f.pth', skip={'b', 'c'})  # buffers: not checked


def test_extract_state_dict_checks_only_the_weights_it_returns(ckpts):
    checkpoint = torch.load(ckpts['ema'], weights_only=True)
    assert set(extract_state_dict(checkpoint, source='x')) == set(checkpoint['state_dict'])  # model weights: fine
    with pytest.raises(NonFiniteWeightsError, match=r'^x: non-finite values in blocks.0.attn.qkv.weight '
                                                     r'\(state_dict_ema; 3 of 110,592 NaN/inf\)$'):
        extract_state_dict(checkpoint, use_ema=True, source='x')


def test_plain_state_dict_and_safetensors_name_no_key(weights, tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / 'w.safetensors'
    save_file(with_nan(weights), str(path))
    model = timm.create_model(MODEL, num_classes=2)
    with pytest.raises(NonFiniteWeightsError) as e:
        load_model_weights(model, path)
    assert str(e.value) == f'{path}: non-finite values in {QKV} (1 of {QKV_SIZE} NaN/inf)'


def test_load_model_weights_skips_buffers(tmp_path):
    """A teacher may be any timm model: its buffers (here BatchNorm running stats) are not checked."""
    model = timm.create_model('resnet10t', num_classes=2)
    state = model.state_dict()
    state['bn1.running_var'][0] = math.inf
    torch.save(state, tmp_path / 'r.pth')
    load_model_weights(model, tmp_path / 'r.pth')
    state['conv1.0.weight'].view(-1)[0] = math.nan  # 24 x 3 x 3 x 3 values
    torch.save(state, tmp_path / 'r.pth')
    with pytest.raises(NonFiniteWeightsError, match=r'non-finite values in conv1\.0\.weight \(1 of 648 NaN/inf\)$'):
        load_model_weights(model, tmp_path / 'r.pth')


def test_optimizer_state_check():
    state = {'state': {7: {'step': torch.tensor(3.), 'exp_avg_sq': torch.tensor([math.nan, 1.])}}}
    with pytest.raises(NonFiniteWeightsError) as e:
        check_optimizer_finite(state, 'o.pth')
    assert str(e.value) == 'o.pth: non-finite values in exp_avg_sq of parameter 7 (optimizer; 1 of 2 NaN/inf)'
    check_optimizer_finite(None, 'o.pth')  # a checkpoint without optimizer state: nothing to check


# --- evaluation and deployment entry points ----------------------------------------------------------------------
def expect_usage_error(main, argv, capsys) -> str:
    """The last stderr line of a tool that refuses ``argv`` with argparse's exit code 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize('tool', sorted(EVAL_TOOLS))
def test_validate_tools_refuse(tool, ckpts, data, capsys):
    line = expect_usage_error(EVAL_TOOLS[tool], [str(data / 'validation'), '--checkpoint', str(ckpts['model'])],
                              capsys)
    assert line.endswith(f'error: {nan_message(ckpts["model"])}')


def test_validate_uses_the_weights_it_checks(ckpts, data, capsys):
    """NaN only in the EMA: the model weights validate; --use-ema refuses, naming state_dict_ema."""
    rows = accuracy.main([str(data / 'validation'), '--checkpoint', str(ckpts['ema']), '--heads', '3'])
    assert rows[0]['top1'] in (0.0, 25.0, 50.0, 75.0, 100.0)
    capsys.readouterr()
    line = expect_usage_error(accuracy.main, [str(data / 'validation'), '--checkpoint', str(ckpts['ema']),
                                              '--use-ema'], capsys)
    assert line.endswith(f'error: {nan_message(ckpts["ema"], "state_dict_ema", count=3)}')


def test_export_refuses_and_writes_nothing(ckpts, tmp_path, capsys):
    out = tmp_path / 'k3'
    line = expect_usage_error(export_cli.main, ['--checkpoint', str(ckpts['model']), '--heads', '3', '-o', str(out)],
                              capsys)
    assert line.endswith(f'error: {nan_message(ckpts["model"])}')
    assert not out.exists()


def test_onnx_export_refuses(ckpts, data, tmp_path, capsys):
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    out = tmp_path / 'k3.onnx'
    line = expect_usage_error(export_cli.main, [str(data / 'validation'), '--checkpoint', str(ckpts['model']),
                                                '--heads', '3', '--format', 'onnx', '-o', str(out)], capsys)
    assert line.endswith(f'error: {nan_message(ckpts["model"])}')
    assert not out.exists()


def test_export_library_refuses_a_nan_model(weights, tmp_path):
    """Weights that went bad in memory (not read through a loader) are refused by the export itself."""
    model = timm.create_model(MODEL, num_classes=2)
    model.load_state_dict(with_nan(weights))
    expected = f'HydraViT: non-finite values in {QKV} (k=3 subnetwork; 1 of 6,912 NaN/inf)'  # 144 x 48
    with pytest.raises(NonFiniteWeightsError) as e:
        save_subnetwork(model, 3, tmp_path / 'k3')
    assert str(e.value) == expected and not (tmp_path / 'k3').exists()
    with pytest.raises(NonFiniteWeightsError):
        export_subnetwork(model, 3)
    # outside the 3-head slice (the last of 192 channels) a NaN does not reach the export
    outside = {n: t.clone() for n, t in weights.items()}
    outside['blocks.0.attn.proj.bias'][-1] = math.nan
    model.load_state_dict(outside)
    assert torch.isfinite(export_subnetwork(model, 3).blocks[0].attn.proj.bias).all()


def test_deploy_tools_refuse(ckpts, data, tmp_path, capsys):
    line = expect_usage_error(profile.main, [str(data / 'validation'), '--checkpoint', str(ckpts['model']),
                                             '-o', str(tmp_path / 'p.json')], capsys)
    assert line.endswith(f'error: {nan_message(ckpts["model"])}')
    line = expect_usage_error(serve_bench.main, [str(data / 'validation'), '--checkpoint', str(ckpts['model']),
                                                 '--budget-ms', '20', '-o', str(tmp_path / 'sb')], capsys)
    assert line.endswith(f'error: {nan_message(ckpts["model"])}')
    assert not (tmp_path / 'p.json').exists() and not (tmp_path / 'sb').exists()


def test_convert_refuses(ckpts, data, tmp_path, capsys):
    out = tmp_path / 'c.pth'
    rc = convert.main([str(data), '--model', MODEL, '--checkpoint', str(ckpts['model']), '-o', str(out)])
    assert rc == 2
    assert capsys.readouterr().err.strip() == f'error: {nan_message(ckpts["model"])}'
    assert not out.exists()


def test_convert_refuses_a_local_dir(weights, data, tmp_path, capsys):
    """timm reads ``local-dir:`` folders itself; the same check runs on what it built."""
    from safetensors.torch import load_file, save_file
    model = timm.create_model(MODEL, num_classes=2)
    model.load_state_dict(weights)
    folder = save_subnetwork(model, 12, tmp_path / 'vit')
    state = load_file(str(folder / 'model.safetensors'))
    save_file(with_nan(state), str(folder / 'model.safetensors'))
    rc = convert.main([str(data), '--model', MODEL, '--checkpoint', f'local-dir:{folder}', '-o', str(tmp_path / 'c')])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (f'error: --checkpoint: local-dir:{folder}: non-finite values in {QKV} '
                                               f'(1 of {QKV_SIZE} NaN/inf)')
    assert not (tmp_path / 'c').exists()


# --- training entry points (--check-only: every check, nothing trained) -------------------------------------------
def train_args(data: Path, tmp_path: Path, *extra: str) -> list:
    return [str(data), '--model', MODEL, '--num-classes', '2', '--heads', '3', '6', '12', '-b', '2',
            '--epochs', '1', '--workers', '0', '--output', str(tmp_path), '--check-only', *extra]


def train_error(argv, capsys) -> str:
    assert train_main(argv) == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize('case, extra, expected', [
    ('model', ('--initial-checkpoint-weights', 'model'), nan_message('{path}', flag='--initial-checkpoint')),
    ('ema', (), nan_message('{path}', 'state_dict_ema', '--initial-checkpoint', count=3)),  # auto: the EMA
    ('model', (), None),  # auto takes the (finite) EMA weights: the NaN model weights are not used
])
def test_initial_checkpoint_refuses_what_it_would_load(case, extra, expected, ckpts, data, tmp_path, capsys):
    argv = train_args(data, tmp_path, '--initial-checkpoint', str(ckpts[case]), *extra)
    if expected is None:
        assert train_main(argv) == 0
    else:
        assert train_error(argv, capsys).endswith(f'error: {expected.format(path=ckpts[case])}')


@pytest.mark.parametrize('case, extra, expected', [
    ('model', (), nan_message('{path}', flag='--resume')),
    ('ema', ('--model-ema',), nan_message('{path}', 'state_dict_ema', '--resume', count=3)),
    ('ema', ('--no-resume-opt',), None),  # no --model-ema: the EMA weights are not used (the fixture's optimizer
    # state, one group of one tensor, fits no optimizer of the model: --check-only refuses it)
    ('optimizer', (), '--resume: {path}: non-finite values in exp_avg_sq of parameter 0 (optimizer; 1 of 3 NaN/inf)'),
    ('optimizer', ('--no-resume-opt',), None),  # the optimizer state is not used
])
def test_resume_refuses_what_it_would_use(case, extra, expected, ckpts, data, tmp_path, capsys):
    argv = train_args(data, tmp_path, '--resume', str(ckpts[case]), *extra)
    if expected is None:
        assert train_main(argv) == 0
    else:
        assert train_error(argv, capsys).endswith(f'error: {expected.format(path=ckpts[case])}')


def test_teacher_refuses(weights, data, tmp_path, capsys):
    path = tmp_path / 'teacher.pth'
    torch.save(with_nan(weights), path)
    err = train_error(train_args(data, tmp_path, '--teacher', MODEL, '--teacher-checkpoint', str(path),
                                 '--teacher-kwargs', 'num_classes=2'), capsys)
    assert err.endswith(f'error: --teacher-checkpoint: {path}: non-finite values in {QKV} (1 of {QKV_SIZE} NaN/inf)')


# --- the NaN-loss stop names only a checkpoint that exists and is finite ------------------------------------------
def test_divergence_advice(ckpts, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    files = CheckpointFiles(str(run), decreasing=False)
    remedy = 'lower --lr, set --clip-grad, or check the data'
    assert divergence_advice(files, None) == f'No checkpoint was written in {run}; {remedy}'
    assert divergence_advice(files, 'a/last.pth.tar') == (f'No checkpoint was written in {run} (the run started '
                                                          f'from --resume a/last.pth.tar); {remedy}')
    (run / 'last.pth.tar').write_bytes(ckpts['model'].read_bytes())  # written after the weights went bad
    assert divergence_advice(files, None) == f'No checkpoint in {run} holds finite weights (1 checked); {remedy}'
    (run / 'checkpoint-0.pth.tar').write_bytes(ckpts['good'].read_bytes())
    bad = torch.load(ckpts['optimizer'], weights_only=True)
    torch.save({**bad, 'epoch': 1, 'updates_done': 5}, run / 'recovery-1-4.pth.tar')  # newest, bad optimizer
    good = run / 'checkpoint-0.pth.tar'
    assert divergence_advice(files, None) == (f'The last checkpoint with finite weights is {good} (end of epoch 0); '
                                              f'resume from it with --resume and {remedy}')
    assert newest_finite_checkpoint([run / 'missing.pth.tar']) is None
    # other ranks: the primary one names the checkpoints
    assert divergence_advice(None, None) == 'Lower --lr, set --clip-grad, or check the data'


# --- result files are valid JSON -----------------------------------------------------------------------------
def test_to_json_writes_null_for_non_finite(tmp_path):
    obj = {'loss': math.nan, 'rows': [{'top1': math.inf, 'k': 3}, (1.5, -math.inf)], 'name': 'x'}
    assert strict_json(to_json(obj)) == {'loss': None, 'rows': [{'top1': None, 'k': 3}, [1.5, None]], 'name': 'x'}
    write_json(tmp_path / 'sub' / 'r.json', obj, indent=1)
    assert strict_json((tmp_path / 'sub' / 'r.json').read_text())['loss'] is None
    write_results([{'heads': 3, 'top1': 50.0, 'loss': math.nan}], tmp_path / 'r.json')
    assert read_results(tmp_path / 'r.json') == [{'heads': 3, 'top1': 50.0, 'loss': None}]
    assert strict_json((tmp_path / 'r.json').read_text())[0]['loss'] is None


def test_validate_results_file_with_an_infinite_loss(weights, data, tmp_path, capsys):
    """Finite weights whose logits overflow the loss: --results-file and the --result block stay valid JSON."""
    state = {n: t.clone() for n, t in weights.items()}
    state['head.bias'] = torch.tensor([3e38, -3e38])  # class b's loss: 3e38 - (-3e38) = inf in float32
    torch.save(state, tmp_path / 'w.pth')
    results = tmp_path / 'res.json'
    rows = accuracy.main([str(data / 'validation'), '--model', MODEL, '--checkpoint', str(tmp_path / 'w.pth'),
                          '--heads', '3',
                          '--results-file', str(results)])
    assert not math.isfinite(rows[0]['loss']) and rows[0]['top1'] == 50.0  # every image predicted as class a
    assert strict_json(results.read_text())[0]['loss'] is None
    block = capsys.readouterr().out.split('--result\n', 1)[1]
    assert strict_json(block)[0]['loss'] is None


def test_profile_refuses_non_finite_rows():
    row = {'heads': 3, 'embed_dim': 48, 'top1': math.nan, 'gmacs': 0.01, 'params_m': 0.1, 'latency_ms_median': 1.,
           'latency_ms_p90': 1., 'throughput': 10., 'peak_mb': 2.}
    with pytest.raises(ProfileError, match=r'top1 must be a finite number >= 0, got nan$'):
        check_profile({'device': {}, 'rows': [row]})
