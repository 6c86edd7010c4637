"""Evaluation suite: the four tools, the sweep, result files and user errors.

Runs on the small ``hydravit_dyn_patch4_32`` and a generated 2-class ImageFolder; the DeiT GMACs
check runs DeepSpeed on CPU on the 224 model.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from timm.models import VisionTransformer

import hydravit  # noqa: F401  registers the models
from hydravit.evaluation import accuracy, environment, macs, memory, read_results, sweep, throughput
from hydravit.evaluation.environment import SETTINGS_KEYS
from hydravit.export import export_subnetwork, subnetwork_vit_args

os.environ.setdefault('DS_ACCELERATOR', 'cpu')
REPO = Path(__file__).resolve().parents[1]
SMALL = 'hydravit_dyn_patch4_32'
NUM_CLASSES = 2
TOOLS = {'validate': accuracy, 'throughput': throughput, 'macs': macs, 'memory': memory}
QUICK_BENCH = ['--num-warm-iter', '1', '--num-bench-iter', '3']


# --- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    plain = timm.create_model(SMALL, num_classes=NUM_CLASSES).eval()
    ema = timm.create_model(SMALL, num_classes=NUM_CLASSES).eval()  # other weights: tells the two apart
    return plain, ema


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory, models):
    """A timm-style training checkpoint (with EMA and heads) and a safetensors file of the EMA weights."""
    plain, ema = models
    root = tmp_path_factory.mktemp('ckpt')
    timm_ckpt = root / 'model_best.pth.tar'
    torch.save({'arch': SMALL, 'epoch': 1, 'state_dict': plain.state_dict(), 'state_dict_ema': ema.state_dict(),
                'heads': [3, 6, 12]}, timm_ckpt)
    safetensors = root / 'ema.safetensors'
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(safetensors))
    return timm_ckpt, safetensors


def load_images(folder: Path, model) -> tuple:
    """The images as a normalized batch and their labels, without timm's data pipeline."""
    mean = torch.tensor(model.pretrained_cfg['mean']).view(3, 1, 1)
    std = torch.tensor(model.pretrained_cfg['std']).view(3, 1, 1)
    images, labels = [], []
    for label, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for file in sorted(class_dir.glob('*.png')):
            pixels = torch.from_numpy(np.array(Image.open(file).convert('RGB'))).permute(2, 0, 1).float() / 255
            images.append((pixels - mean) / std)
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def expected_accuracy(model, folder: Path, k: int) -> dict:
    images, labels = load_images(folder, model)
    model.set_heads(k)
    with torch.no_grad():
        logits = model(images)
    return {'top1': 100. * (logits.argmax(1) == labels).float().mean().item(),
            'loss': F.cross_entropy(logits, labels).item(), 'num_images': len(labels)}


def run_main(tool, argv, capsys):
    """Run a tool's main in-process; returns (rows, stdout)."""
    rows = tool.main([*argv, '--device', 'cpu'])
    return rows, capsys.readouterr().out


def stdout_result(out: str) -> list:
    return json.loads(out.split('--result\n', 1)[1])


# --- validate.py -------------------------------------------------------------------------------------
def test_validate_matches_direct_computation(image_folder, checkpoints, models, tmp_path, capsys):
    results = tmp_path / 'acc.json'
    rows, out = run_main(accuracy, [str(image_folder), '--model', SMALL, '--checkpoint', str(checkpoints[0]),
                                    '-b', '3', '-j', '0', '--heads', '3', '12', '--results-file', str(results)],
                         capsys)
    written = json.loads(results.read_text())
    assert written == stdout_result(out) == rows
    assert [list(row) for row in written] == [list(accuracy.KEYS + SETTINGS_KEYS)] * 2
    for row, k in zip(written, (3, 12), strict=True):
        expected = expected_accuracy(models[0], image_folder, k)
        assert row['heads'] == k and row['embed_dim'] == 16 * k
        assert row['num_images'] == expected['num_images'] == 8
        assert row['top1'] == pytest.approx(expected['top1'], abs=1e-3)
        assert row['loss'] == pytest.approx(expected['loss'], rel=1e-4)
        assert row['top5'] == 100.  # 2 classes: top-5 is top-2
    assert 'Test: [3/3]' in out  # progress lines


def test_validate_ema_safetensors_csv_and_default_heads(image_folder, checkpoints, models, tmp_path, capsys):
    timm_ckpt, safetensors = checkpoints
    common = [str(image_folder), '--model', SMALL, '-b', '8', '-j', '0']
    ema_csv = tmp_path / 'ema.csv'
    ema_rows, _ = run_main(accuracy, [*common, '--checkpoint', str(timm_ckpt), '--use-ema',
                                      '--results-file', str(ema_csv)], capsys)
    with open(ema_csv, newline='') as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == accuracy.KEYS + SETTINGS_KEYS
        assert len(list(reader)) == 3
    assert read_results(ema_csv) == ema_rows
    assert [row['heads'] for row in ema_rows] == [3, 6, 12]  # the checkpoint's head set
    for row in ema_rows:
        assert row['loss'] == pytest.approx(expected_accuracy(models[1], image_folder, row['heads'])['loss'], rel=1e-4)
    st_rows, _ = run_main(accuracy, [*common, '--checkpoint', str(safetensors)], capsys)
    assert st_rows == ema_rows
    plain_rows, _ = run_main(accuracy, [*common, '--checkpoint', str(timm_ckpt)], capsys)
    assert [r['loss'] for r in plain_rows] != [r['loss'] for r in ema_rows]


def test_separate_classifiers_checkpoint(image_folder, tmp_path, capsys):
    """The paper's separate-classifiers variant: the head counts with a classifier come from the checkpoint."""
    torch.manual_seed(1)
    model = timm.create_model(SMALL, num_classes=NUM_CLASSES, separate_classifiers=(3, 12)).eval()
    path = tmp_path / 'separate.pth'
    torch.save({'state_dict': model.state_dict()}, path)  # no 'heads': every k with a classifier
    base = [str(image_folder), '--model', SMALL, '--checkpoint', str(path), '-j', '0']
    rows, _ = run_main(accuracy, base, capsys)
    assert [row['heads'] for row in rows] == [3, 12]
    for row in rows:
        assert row['loss'] == pytest.approx(expected_accuracy(model, image_folder, row['heads'])['loss'], rel=1e-4)
    expect_usage_error(accuracy, [*base, '--heads', '6'], capsys, '--heads', 'no classifier', '[3, 12]')


# --- validate_throughput.py --------------------------------------------------------------------------
def test_throughput_rows(image_folder, tmp_path, capsys):
    results = tmp_path / 'tp.csv'
    rows, out = run_main(throughput, ['--model', SMALL, '-b', '4', '--heads', '2', '12', *QUICK_BENCH, '--amp',
                                      '--results-file', str(results)], capsys)
    assert read_results(results) == stdout_result(out) == rows
    assert [list(row) for row in rows] == [list(throughput.KEYS + SETTINGS_KEYS)] * 2
    for row, k in zip(rows, (2, 12), strict=True):
        assert row['heads'] == k and row['batch_size'] == 4
        assert 0 < row['latency_ms_median'] <= row['latency_ms_p90']
        assert row['throughput'] > 0
    # From DATA (8 images repeated to fill 12), with a time budget and the exported ViT.
    rows, _ = run_main(throughput, [str(image_folder), '--model', SMALL, '-b', '12', '-j', '0', '--heads', '3',
                                    '--num-warm-iter', '1', '--bench-time', '0.05', '--exported'], capsys)
    assert rows[0]['batch_size'] == 12 and rows[0]['throughput'] > 0


def test_time_calls_counts_and_budget():
    calls = []
    times = throughput.time_calls(lambda: calls.append(1), torch.device('cpu'), warmup=3, iters=7)
    assert len(times) == 7 and len(calls) == 10 and all(t >= 0 for t in times)
    times = throughput.time_calls(lambda: None, torch.device('cpu'), warmup=0, iters=1, budget_s=0.02)
    assert len(times) > 1  # the budget, not the count, decides


def test_time_call_with_injected_clock_and_latency_stats():
    ticks = iter([10.0, 10.25])
    out, ms = throughput.time_call(lambda: 'out', torch.device('cpu'), clock=lambda: next(ticks))
    assert (out, ms) == ('out', 250.0)
    assert throughput.latency_stats([1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11.]) == {
        'latency_ms_median': 6., 'latency_ms_p90': 10.}


# --- settings recorded with every row; CUDA defaults ---------------------------------------------------
def test_rows_record_device_dtype_tf32_and_compile_on_cpu(capsys):
    base = ['--model', SMALL, '-b', '2', '--heads', '3', *QUICK_BENCH]
    plain, _ = run_main(throughput, base, capsys)
    amp, _ = run_main(throughput, [*base, '--amp', '--no-tf32'], capsys)
    macs_rows, _ = run_main(macs, ['--model', SMALL, '--heads', '3'], capsys)
    cpu = environment.cpu_name()
    assert cpu and cpu == environment.device_name(torch.device('cpu'))
    expected = [
        (plain[0], {'device_name': cpu, 'dtype': 'float32', 'tf32': False, 'compile': False}),
        (amp[0], {'device_name': cpu, 'dtype': 'float16', 'tf32': False, 'compile': False}),  # timm's default
        (macs_rows[0], {'device_name': cpu, 'dtype': 'float32', 'tf32': False, 'compile': False}),
    ]
    for row, settings in expected:
        assert {key: row[key] for key in SETTINGS_KEYS} == settings
    compiled = argparse.Namespace(amp=True, amp_dtype='float16', compile=True)  # no CPU compile
    assert environment.settings_row(compiled, torch.device('cpu'))['compile'] is True
    assert environment.settings_row(compiled, torch.device('cpu'))['dtype'] == 'float16'


def test_cuda_defaults_tf32_and_cudnn_benchmark():
    """The switches are process-wide flags: settable and readable without a GPU."""
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        parser = sweep.create_sweep_parser()
        cuda = torch.device('cuda')
        environment.apply_cuda_args(parser.parse_args(['DATA']), cuda)
        assert torch.get_float32_matmul_precision() == 'high' and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark and environment.tf32_enabled(cuda)
        environment.apply_cuda_args(parser.parse_args(['DATA', '--no-tf32', '--no-cudnn-benchmark']), cuda)
        assert torch.get_float32_matmul_precision() == 'highest' and not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.benchmark and not environment.tf32_enabled(cuda)
        environment.apply_cuda_args(parser.parse_args(['DATA']), torch.device('cpu'))  # CPU work: untouched
        assert torch.get_float32_matmul_precision() == 'highest' and not torch.backends.cudnn.benchmark
        assert not environment.tf32_enabled(torch.device('cpu'))
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before[1:]


# --- validate_macs.py --------------------------------------------------------------------------------
def test_macs_equal_dedicated_vit_and_export(tmp_path, capsys):
    results = tmp_path / 'macs.json'
    rows, _ = run_main(macs, ['--model', SMALL, '--heads', '1', '5', '12', '--results-file', str(results)], capsys)
    assert json.loads(results.read_text()) == rows
    assert [list(row) for row in rows] == [list(macs.KEYS + SETTINGS_KEYS)] * 3
    model = timm.create_model(SMALL).eval()
    for row in rows:
        k = row['heads']
        dedicated = VisionTransformer(**subnetwork_vit_args(model, k)).eval()
        dedicated_macs, dedicated_flops = macs.profile_module(dedicated, (1, 3, 32, 32))
        export_macs, _ = macs.profile_module(export_subnetwork(model, k).eval(), (1, 3, 32, 32))
        assert row['gmacs'] == pytest.approx(dedicated_macs / 1e9, rel=1e-5)
        assert row['gmacs'] == pytest.approx(export_macs / 1e9, rel=1e-5)
        # DeepSpeed counts the bias of the sliced qkv projection's baddbmm (3 k head_dim a block), not F.linear's
        bias_flops = 3 * k * model.head_dim * len(model.blocks) if k < model.num_heads else 0
        assert row['gflops'] == pytest.approx((dedicated_flops + bias_flops) / 1e9, rel=1e-5)
        assert row['params_m'] == pytest.approx(sum(p.numel() for p in dedicated.parameters()) / 1e6, rel=1e-5)
    assert rows[0]['gmacs'] < rows[1]['gmacs'] < rows[2]['gmacs']
    # MACs are per image whatever the batch size.
    batched = macs.profile_heads(model, 5, (3, 32, 32), batch_size=3)
    assert batched['gmacs'] == pytest.approx(rows[1]['gmacs'], rel=1e-5)


def test_macs_of_224_model_equal_deit(capsys):
    rows, _ = run_main(macs, ['--model', 'hydravit_dyn_patch16_224', '-b', '1', '--heads', '3', '6', '12'], capsys)
    deit = {3: (1.25, 5.72), 6: (4.60, 22.05), 12: (17.56, 86.57)}  # DeiT-Ti/S/B: GMACs, M params
    for row in rows:
        gmacs, params = deit[row['heads']]
        assert row['gmacs'] == pytest.approx(gmacs, rel=0.01)
        assert row['params_m'] == pytest.approx(params, rel=0.01)
        assert row['gflops'] == pytest.approx(2 * row['gmacs'], rel=0.02)


# --- validate_memory.py ------------------------------------------------------------------------------
def test_memory_rows(checkpoints, models, tmp_path, capsys):
    results = tmp_path / 'mem.csv'
    rows, _ = run_main(memory, ['--model', SMALL, '--checkpoint', str(checkpoints[0]), '-b', '2', '--heads', '3', '12',
                                '--results-file', str(results)], capsys)
    assert read_results(results) == rows
    assert [list(row) for row in rows] == [list(memory.KEYS + SETTINGS_KEYS)] * 2
    input_mb = 2 * 3 * 32 * 32 * 4 / 1e6
    for row in rows:
        params = models[0].subnetwork_params(row['heads'])
        assert row['params_m'] == pytest.approx(params / 1e6, rel=1e-5)
        assert row['params_mb'] == pytest.approx(4 * params / 1e6, rel=1e-5)  # float32
        assert row['total_mb'] == pytest.approx(input_mb + row['activations_mb'] + row['params_mb'], rel=1e-4)
        assert row['peak_mb'] >= 0.9 * row['params_mb']  # the weights are resident during the forward
    assert rows[0]['activations_mb'] < rows[1]['activations_mb']
    assert rows[0]['peak_mb'] < rows[1]['peak_mb']


# --- the sweep ---------------------------------------------------------------------------------------
def test_sweep_csv_and_plots(image_folder, checkpoints, tmp_path, capsys):
    reference = tmp_path / 'ref.csv'
    reference.write_text('name,top1,gmacs,throughput,peak_mb\nbaseline,60,0.05,,4\n')
    out_dir = tmp_path / 'sweep'
    # No --model: the training checkpoint's 'arch' names it.
    rows = sweep.main([str(image_folder), '--checkpoint', str(checkpoints[0]), '--heads', '2', '12',
                       '-b', '4', '-j', '0', *QUICK_BENCH, '-o', str(out_dir), '--reference', str(reference),
                       '--device', 'cpu'])
    capsys.readouterr()
    with open(out_dir / 'sweep.csv', newline='') as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == sweep.SWEEP_KEYS
        assert [int(r['heads']) for r in reader] == [2, 12]
    assert set(sweep.SWEEP_KEYS) == set(accuracy.KEYS + throughput.KEYS + macs.KEYS + memory.KEYS + SETTINGS_KEYS)
    assert [(r['dtype'], r['tf32'], r['compile']) for r in rows] == [('float32', False, False)] * 2
    assert read_results(out_dir / 'sweep.csv') == rows
    single, _ = run_main(accuracy, [str(image_folder), '--model', SMALL, '--checkpoint', str(checkpoints[0]),
                                    '-j', '0', '--heads', '2', '12'], capsys)
    assert [r['top1'] for r in rows] == [r['top1'] for r in single]
    png = out_dir / 'tradeoff.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size < 200_000
    redrawn = sweep.plot_main([str(out_dir / 'sweep.csv'), '-o', str(tmp_path / 'again.png'), '--ram-key', 'peak_mb'])
    assert redrawn.read_bytes()[:4] == b'\x89PNG'


# --- user errors: clear messages before any work, no traceback ---------------------------------------
def expect_usage_error(tool, argv, capsys, *needles):
    with pytest.raises(SystemExit) as exc:
        tool.main([*argv, '--device', 'cpu'])
    captured = capsys.readouterr()
    assert exc.value.code == 2
    assert '--result' not in captured.out
    for needle in needles:
        assert needle in captured.err, captured.err


@pytest.mark.parametrize('name', sorted(TOOLS))
def test_heads_out_of_range(name, image_folder, capsys):
    expect_usage_error(TOOLS[name], [str(image_folder), '--model', SMALL, '--heads', '3', '13'], capsys,
                       '--heads', '1..12', '13')


@pytest.mark.parametrize('name', sorted(TOOLS))
def test_missing_checkpoint(name, image_folder, tmp_path, capsys):
    expect_usage_error(TOOLS[name], [str(image_folder), '--model', SMALL, '--checkpoint', str(tmp_path / 'nope.pth')],
                       capsys, '--checkpoint', 'not found')


def test_wrong_architecture_checkpoint(image_folder, tmp_path, capsys):
    path = tmp_path / 'vit_tiny.pth'
    torch.save(timm.create_model('vit_tiny_patch16_224', num_classes=NUM_CLASSES).state_dict(), path)
    for tool in (accuracy, macs):
        expect_usage_error(tool, [str(image_folder), '--model', SMALL, '--checkpoint', str(path)], capsys,
                           'shape mismatches', 'pos_embed', 'patch_embed.proj.weight')


def test_empty_dataset(tmp_path, checkpoints, capsys):
    empty = tmp_path / 'empty'
    (empty / 'cat').mkdir(parents=True)
    for tool in (accuracy, throughput):
        expect_usage_error(tool, [str(empty), '--model', SMALL, '--checkpoint', str(checkpoints[0]), '-j', '0'],
                           capsys, 'DATA', '0 images')


def test_more_bad_arguments(image_folder, checkpoints, tmp_path, capsys):
    base = [str(image_folder), '--model', SMALL, '-j', '0']
    expect_usage_error(accuracy, [str(tmp_path / 'missing'), '--model', SMALL], capsys, 'DATA', 'no such folder')
    expect_usage_error(accuracy, [*base, '--model', 'vit_tiny_patch16_224'], capsys, '--model', 'not a HydraViT')
    expect_usage_error(throughput, [*base, '--num-bench-iter', '0'], capsys, '--num-bench-iter')
    safetensors = checkpoints[1]
    expect_usage_error(accuracy, [*base, '--checkpoint', str(safetensors), '--use-ema'], capsys, 'EMA')
    expect_usage_error(macs, ['--model', SMALL, '--heads', '3', '3'], capsys, '--heads', 'duplicate')


def test_more_classes_than_the_model(tmp_path, image_folder, checkpoints, capsys):
    wide = tmp_path / 'wide'
    for i in range(3):
        (wide / f'c{i}').mkdir(parents=True)
        Image.new('RGB', (32, 32)).save(wide / f'c{i}' / '0.png')
    expect_usage_error(accuracy, [str(wide), '--model', SMALL, '--checkpoint', str(checkpoints[0]), '-j', '0'],
                       capsys, 'DATA has 3 classes', '--num-classes')


# --- the root scripts run as written -----------------------------------------------------------------
def test_root_scripts_run_as_written(image_folder, checkpoints, tmp_path):
    """One real process per script, in the original README's form (DATA positional, -b, --heads)."""
    ckpt = str(checkpoints[0])
    commands = {
        'validate.py': [str(image_folder), '--model', SMALL, '--checkpoint', ckpt, '-b', '4', '--use-ema',
                        '--heads', '3', '-j', '0'],
        'validate_throughput.py': [str(image_folder), '--model', SMALL, '-b', '4', '--heads', '3', '-j', '0',
                                   *QUICK_BENCH],
        'validate_macs.py': [str(image_folder), '--model', SMALL, '-b', '1', '--heads', '3'],
        'validate_memory.py': [str(image_folder), '--model', SMALL, '--heads', '3'],
    }
    bad_heads = [str(image_folder), '--model', SMALL, '--checkpoint', ckpt, '--heads', '13']
    env = dict(os.environ, DS_ACCELERATOR='cpu', CUDA_VISIBLE_DEVICES='')

    def start(script, argv):
        return subprocess.Popen([sys.executable, script, *argv], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    procs = {script: start(script, argv) for script, argv in commands.items()}
    bad = start('validate.py', bad_heads)
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f'{script}:\n{err[-3000:]}'
        rows = stdout_result(out)
        assert [row['heads'] for row in rows] == [3], script
    _, err = bad.communicate(timeout=300)
    assert bad.returncode == 2 and '--heads' in err and 'Traceback' not in err, err
