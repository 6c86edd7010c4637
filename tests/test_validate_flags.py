"""timm's validate.py flags on the evaluation entry points: each that applies works with timm's name and meaning,
each that cannot apply stops the tool with one line naming the flag and why."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from test_evaluation import load_images

import hydravit  # noqa: F401  registers the models
from hydravit.evaluation import accuracy, macs, memory
from hydravit.evaluation.common import create_parser, create_session

SMALL = 'hydravit_dyn_patch4_32'

# Every flag of timm's validate.py that a HydraViT evaluation cannot honour, with a value where it takes one.
REFUSED = [
    ['--pretrained'], ['--test-pool'], ['--tf-preprocessing'], ['--torchscript'], ['--aot-autograd'],
    ['--fuser', 'te'], ['--fast-norm'], ['--real-labels', 'real.json'], ['--valid-labels', 'valid.txt'],
    ['--retry'], ['--metrics-avg', 'macro'], ['--naflex-loader'], ['--naflex-max-seq-len', '64'],
    ['--num-gpu', '2'], ['--amp-impl', 'apex'], ['--num-samples', '3'],
]


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    model = timm.create_model(SMALL, num_classes=2).eval()
    path = tmp_path_factory.mktemp('flags') / 'model.pth.tar'
    torch.save({'arch': SMALL, 'state_dict': model.state_dict(), 'heads': [3, 12]}, path)
    return model, path


def run(image_folder, checkpoint, *extra):
    _, path = checkpoint
    return accuracy.main([str(image_folder), '--checkpoint', str(path), '-j', '0', '--device', 'cpu', *extra])


def assert_refused(tool, argv, capsys, flag):
    with pytest.raises(SystemExit) as exc:
        tool.main([*argv, '--device', 'cpu'])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    error_lines = [line for line in err.splitlines() if 'error:' in line]
    assert len(error_lines) == 1 and flag in error_lines[0], err
    assert 'Traceback' not in err


@pytest.mark.parametrize('argv', REFUSED, ids=lambda a: a[0])
def test_flags_that_cannot_apply_are_refused_with_one_line(argv, image_folder, checkpoint, capsys):
    assert_refused(accuracy, [str(image_folder), '--checkpoint', str(checkpoint[1]), '-j', '0', *argv], capsys,
                   argv[0])


@pytest.mark.parametrize('tool, argv', [
    (macs, ['--model-dtype', 'bfloat16']), (macs, ['--channels-last']), (macs, ['--torchcompile']),
    (memory, ['--channels-last']),
    (memory, ['--torchcompile', 'eager']), (accuracy, ['--model-dtype', 'bfloat16', '--amp']),
    (accuracy, ['--model-dtype', 'float64']),
], ids=lambda v: getattr(v, '__name__', None) or ' '.join(v))
def test_flags_a_tool_does_not_honour_are_refused(tool, argv, image_folder, capsys):
    assert_refused(tool, [str(image_folder), '--model', SMALL, '--heads', '3', '-j', '0', *argv], capsys,
                   '--model-dtype' if '--model-dtype' in argv else argv[0])


def direct_rows(model, folder, k: int, dtype=torch.float32):
    """top-1 and loss computed without timm's data pipeline, with the model and inputs in ``dtype``."""
    images, labels = load_images(folder, model)
    cast = timm.create_model(SMALL, num_classes=2).eval()
    cast.load_state_dict(model.state_dict())
    cast.to(dtype).set_heads(k)
    with torch.no_grad():
        logits = cast(images.to(dtype)).float()
    return 100. * (logits.argmax(1) == labels).float().mean().item(), F.cross_entropy(logits, labels).item()


def test_model_dtype_casts_model_and_inputs_once(image_folder, checkpoint):
    model, _ = checkpoint
    rows = run(image_folder, checkpoint, '--model-dtype', 'bfloat16', '--heads', '3', '12')
    for row in rows:
        top1, loss = direct_rows(model, image_folder, row['heads'], torch.bfloat16)
        assert row['dtype'] == 'bfloat16'
        assert row['top1'] == pytest.approx(top1) and row['loss'] == pytest.approx(loss, rel=1e-3)


@pytest.mark.parametrize('extra', [['--channels-last'], ['--torchcompile', 'eager'], ['--reparam'],
                                   ['--no-prefetcher', '--pin-mem', '--use-train-size', '--seed', '1']])
def test_flags_that_apply_leave_the_numbers_as_they_are(extra, image_folder, checkpoint):
    model, _ = checkpoint
    rows = run(image_folder, checkpoint, '--heads', '3', *extra)
    top1, loss = direct_rows(model, image_folder, 3)
    assert rows[0]['top1'] == pytest.approx(top1) and rows[0]['loss'] == pytest.approx(loss, abs=1e-5)
    assert rows[0]['compile'] is ('--torchcompile' in extra)


def test_results_format_and_data_dir(image_folder, checkpoint, tmp_path):
    _, path = checkpoint
    out = tmp_path / 'results.out'
    accuracy.main(['--data-dir', str(image_folder), '--checkpoint', str(path), '-j', '0', '--device', 'cpu',
                   '--heads', '3', '--results-file', str(out), '--results-format', 'json'])
    assert [row['heads'] for row in json.loads(out.read_text())] == [3]


def test_results_format_contradicting_the_suffix_is_refused(image_folder, checkpoint, tmp_path, capsys):
    assert_refused(accuracy, [str(image_folder), '--checkpoint', str(checkpoint[1]), '-j', '0',
                              '--results-file', str(tmp_path / 'r.json'), '--results-format', 'csv'], capsys,
                   '--results-format')


def session_of(*argv):
    parser = create_parser('', True, 4)
    accuracy.add_args(parser)
    return create_session(parser.parse_args([*argv, '--device', 'cpu']))


@pytest.mark.parametrize('argv, input_size, pool', [
    (['--img-size', '48'], (3, 48, 48), 'token'),
    (['--input-size', '3', '40', '40'], (3, 40, 40), 'token'),
    (['--model-kwargs', 'img_size=48', 'global_pool=avg'], (3, 48, 48), 'avg'),
    (['--gp', 'avg'], (3, 32, 32), 'avg'),
])
def test_model_input_flags_build_the_model_and_the_data_config(argv, input_size, pool, image_folder):
    session = session_of(str(image_folder), '--model', SMALL, *argv)
    assert session.input_size == input_size
    assert tuple(session.model.patch_embed.img_size) == input_size[1:]
    assert session.model.global_pool == pool


def test_missing_data_names_both_ways_to_give_it(checkpoint, capsys):
    with pytest.raises(SystemExit):
        accuracy.main(['--checkpoint', str(checkpoint[1]), '--device', 'cpu'])
    assert 'DATA (or --data-dir) is required' in capsys.readouterr().err
