"""Issue 21 review findings F3, F4, F6, F7, F8, F9: each fault refused in one exact line naming the flag (or warned
in one exact line), at every entry point that has the flag; fixed kinds, not cases.

Checkpoints are random weights of the small model (numbers do not matter here, only labels, names and messages);
data are a few generated 32 px images.
"""
import argparse
import ast
import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from hydravit import convert
from hydravit.classes import TIMM_FOLDERS, TORCHVISION_FOLDERS, check_class_map_agrees, folder_orders
from hydravit.deploy import __main__ as deploy
from hydravit.deploy import export_cli, onnx
from hydravit.evaluation import accuracy, macs, memory, throughput

ROOT = Path(__file__).resolve().parents[1]
MODEL = 'hydravit_dyn_patch4_32'
QUICK = ['-j', '0', '--device', 'cpu']
BENCH = ['--num-warm-iter', '1', '--num-bench-iter', '1', '-b', '1']
EVAL_MAINS = {'validate': accuracy.main, 'macs': macs.main, 'memory': memory.main, 'throughput': throughput.main}


def images(root: Path, classes: List[str], per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f'{i}.png')
    return root


def checkpoint(path: Path, class_names: Optional[List[str]] = None, **extra) -> Path:
    """A hydravit-style checkpoint (``class_names`` when given) or, with ``args``, an official-style one."""
    model = timm.create_model(MODEL, num_classes=3)
    saved = {'state_dict': model.state_dict(), 'arch': MODEL, **extra}
    if class_names is not None:
        saved['class_names'] = class_names
    torch.save(saved, path)
    return path


def error_line(main, argv, capsys) -> str:
    """The text after ``error: `` of the one line a refused command prints (exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if 'error: ' in line]
    assert len(lines) == 1, lines
    return lines[0].split('error: ', 1)[1]


def warnings_of(err: str) -> List[str]:
    return [line[len('warning: '):] for line in err.splitlines() if line.startswith('warning: ')]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('review')
    return {
        'named': checkpoint(root / 'named.pth.tar', ['1', '2', '10'], heads=[3, 6, 12]),
        'unnamed': checkpoint(root / 'unnamed.pth.tar', args=argparse.Namespace(heads=[3, 6, 12])),
        'bad_heads': checkpoint(root / 'bad_heads.pth.tar', args=argparse.Namespace(heads=[3, 6, 20])),
        'str_heads': checkpoint(root / 'str_heads.pth.tar', heads=['3', '6']),
        'numbers': images(root / 'numbers', ['1', '2', '10']),
        'letters': images(root / 'letters', ['a', 'b', 'c']),
        'extra': images(root / 'extra', ['1', '2', '10', '7']),
    }


# --- F6: flags are matched by exact name at every entry point ------------------------------------------------------
def _parser_calls_without_exact_names(path: Path) -> List[int]:
    tree = ast.parse(path.read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, 'attr', getattr(node.func, 'id', None)) == 'ArgumentParser']
    return [c.lineno for c in calls
            if not any(k.arg == 'allow_abbrev' and getattr(k.value, 'value', True) is False for k in c.keywords)]


def test_every_argument_parser_matches_exact_names():
    """argparse's default prefix matching read validate_macs.py's ``--amp`` as ``--amp-impl``: every parser of
    every entry point is built with allow_abbrev=False (training's ``_Parser`` sets it itself)."""
    sources = [*ROOT.glob('hydravit/**/*.py'), *ROOT.glob('scripts/*.py'), *ROOT.glob('*.py')]
    offending = {str(p.relative_to(ROOT)): lines for p in sources if (lines := _parser_calls_without_exact_names(p))}
    assert offending == {}
    from hydravit.training.config import build_parser
    assert build_parser().allow_abbrev is False


@pytest.mark.parametrize('main', [macs.main, memory.main])
def test_amp_is_refused_by_the_tools_that_run_float32(main, capsys):
    for flag in (['--amp'], ['--amp-dtype', 'bfloat16']):
        assert error_line(main, [*flag, *QUICK], capsys) == \
            f'{flag[0]}: not supported by this tool: it runs the model in float32, without autocast'


def test_an_abbreviated_flag_is_unknown(capsys):
    assert error_line(accuracy.main, ['--amp-d', 'bfloat16'], capsys) == 'unrecognized arguments: --amp-d'


# --- F8: an output that cannot be written is refused before any work -------------------------------------------------
@pytest.mark.parametrize('tool', sorted(EVAL_MAINS))
def test_results_file_that_is_a_folder_is_refused_first(tool, files, tmp_path, capsys):
    argv = [str(files['numbers']), '--checkpoint', str(files['named']), *QUICK, '--results-file', str(tmp_path)]
    assert error_line(EVAL_MAINS[tool], argv, capsys) == f'--results-file: {tmp_path} is a folder; give a file name'
    inside_a_file = tmp_path / 'rows.csv'
    inside_a_file.write_text('')
    argv[-1] = str(inside_a_file / 'r.csv')
    assert error_line(EVAL_MAINS[tool], argv, capsys) == \
        f'--results-file: {inside_a_file} is a file, so {inside_a_file / "r.csv"} cannot be created in it'


def test_deploy_and_export_outputs_that_cannot_be_written_are_refused(files, tmp_path, capsys):
    folder = tmp_path / 'p.json'
    folder.mkdir()
    a_file = tmp_path / 'f'
    a_file.write_text('')
    base = ['--checkpoint', str(files['named']), *QUICK]
    assert error_line(deploy.main, ['profile', *base, '-o', str(folder)], capsys) == \
        f'-o/--output: {folder} is a folder; give a file name'
    assert error_line(deploy.main, ['profile', *base, '--results-file', str(tmp_path)], capsys) == \
        f'--results-file: {tmp_path} is a folder; give a file name'
    assert error_line(deploy.main, ['serve-bench', str(files['numbers']), *base, '--budget-ms', '10', '-o',
                                    str(a_file)], capsys) == f'-o/--output: {a_file} is a file; give a folder'
    assert error_line(export_cli.main, ['--checkpoint', str(files['named']), '--heads', '3', '-o', str(a_file)],
                      capsys) == f'--output: {a_file} is a file; give a folder'


# --- F9: a malformed recorded head set ---------------------------------------------------------------------------
@pytest.mark.parametrize('name, key, shown, bad', [('bad_heads', 'args.heads', '[3, 6, 20]', '[20]'),
                                                   ('str_heads', 'heads', "['3', '6']", "['3', '6']")])
def test_malformed_recorded_heads(name, key, shown, bad, files, capsys):
    ckpt = files[name]
    problem = f'{ckpt} records {key} {shown}: head counts must be ints in 1..12, got {bad}'
    assert error_line(macs.main, ['--checkpoint', str(ckpt), *QUICK], capsys) == \
        f'--heads: {problem}; pass --heads with the head counts it was trained on'
    # --heads given: the recorded set is not needed, only warned about (the deploy tools too)
    rows = macs.main(['--checkpoint', str(ckpt), '--heads', '3', *QUICK])
    assert [row['heads'] for row in rows] == [3]
    assert warnings_of(capsys.readouterr().err) == [f'{problem}; ignored: --heads 3 given']
    assert error_line(deploy.main, ['profile', '--checkpoint', str(ckpt), *QUICK], capsys) == \
        f'--heads: {problem}; pass --heads with the head counts it was trained on'


# --- F7: with recorded class names, an unknown class is named before any count ---------------------------------------
@pytest.mark.parametrize('tool', ['validate', 'throughput'])
def test_unknown_class_is_named_before_the_class_count(tool, files, capsys):
    argv = [str(files['extra']), '--checkpoint', str(files['named']), '--heads', '3', *QUICK, *BENCH]
    if tool == 'validate':
        argv = argv[:-len(BENCH)]
    assert error_line(EVAL_MAINS[tool], argv, capsys) == \
        f'DATA ({files["extra"]}) has classes the model was not trained on: 7 (trained on 3: 1, 2, 10)'


# --- F4 (a): no recorded class names and folder readers that disagree: one warning line -------------------------------
def test_folder_orders(files):
    from timm.data import create_dataset
    timm_reader = create_dataset('', root=str(files['numbers']))
    torchvision_reader = create_dataset('torch/image_folder', root=str(files['numbers']))
    assert folder_orders(timm_reader) == ((TIMM_FOLDERS, ['1', '2', '10']), (TORCHVISION_FOLDERS, ['1', '10', '2']))
    assert folder_orders(torchvision_reader) == ((TORCHVISION_FOLDERS, ['1', '10', '2']),
                                                 (TIMM_FOLDERS, ['1', '2', '10']))
    assert folder_orders(torch.utils.data.TensorDataset(torch.zeros(1))) is None  # not a folder of classes


@pytest.mark.parametrize('reader, order, other, other_order', [
    ('', '1, 2, 10', TORCHVISION_FOLDERS, '1, 10, 2'),
    ('torch/image_folder', '1, 10, 2', TIMM_FOLDERS, '1, 2, 10')])
def test_unnamed_labels_warn_when_the_readers_disagree(reader, order, other, other_order, files, capsys):
    this = TIMM_FOLDERS if not reader else TORCHVISION_FOLDERS
    argv = [str(files['numbers']), '--checkpoint', str(files['unnamed']), '--heads', '3', *QUICK,
            *(['--dataset', reader] if reader else [])]
    accuracy.main(argv)
    assert warnings_of(capsys.readouterr().err) == [
        f'the checkpoint records no class names: labels follow the class-folder order of {this}: {order}; {other} '
        f'gives {other_order}, and the model\'s labels follow the reader it was trained with: pass --class-map FILE '
        f'(the training classes in label order, one per line) to make the order explicit']
    accuracy.main([str(files['letters']), *argv[1:]])  # a, b, c: both readers agree, nothing to say
    assert warnings_of(capsys.readouterr().err) == []
    accuracy.main([*argv, '--class-map', str(write_map(files['numbers'].parent / 'm.txt', ['1', '2', '10']))])
    assert warnings_of(capsys.readouterr().err) == []  # the order made explicit


def write_map(path: Path, names: List[str]) -> Path:
    path.write_text(''.join(f'{n}\n' for n in names))
    return path


# --- F4 (b): a --class-map that contradicts the recorded class names --------------------------------------------------
def test_check_class_map_agrees():
    check_class_map_agrees(['1', '2', '10'], {'1': 0, '2': 1, '10': 2})
    check_class_map_agrees(['1', '2', '10'], {'10': 2})  # a subset that agrees
    with pytest.raises(ValueError) as error:
        check_class_map_agrees(['1', '2', '10'], {'1': 0, '2': 1, '10': 2, '7': 3})
    assert str(error.value) == ("labels '7' as 3, but the checkpoint has 3 classes (1 of its 4 classes contradict "
                                'the class names the checkpoint records: 1, 2, 10)')


@pytest.mark.parametrize('entry', ['validate', 'macs', 'export', 'profile', 'serve_bench'])
def test_contradicting_class_map_is_refused(entry, files, tmp_path, capsys):
    cmap = write_map(tmp_path / 'cmap.txt', ['10', '2', '1'])
    base = ['--checkpoint', str(files['named']), '--class-map', str(cmap), '--heads', '3']
    data = [str(files['numbers'])]
    main, argv = {
        'validate': (accuracy.main, [*data, *base, *QUICK]),
        'macs': (macs.main, [*base, *QUICK]),
        'export': (export_cli.main, [*base, '-o', str(tmp_path / 'out')]),
        'profile': (deploy.main, ['profile', *data, *base, *QUICK, '-o', str(tmp_path / 'p.json')]),
        'serve_bench': (deploy.main, ['serve-bench', *data, *base, *QUICK, '--budget-ms', '10',
                                      '-o', str(tmp_path / 'out')]),
    }[entry]
    assert error_line(main, argv, capsys) == (
        f"--class-map: {cmap} labels '10' as 0, but the checkpoint's label 0 is '1' (2 of its 3 classes contradict "
        'the class names the checkpoint records: 1, 2, 10); leave --class-map out to label DATA by the recorded names')
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'p.json').exists()


def test_agreeing_class_map_is_accepted(files, tmp_path):
    cmap = write_map(tmp_path / 'cmap.txt', ['1', '2', '10'])  # the run's own class_map.txt
    rows = accuracy.main([str(files['numbers']), '--checkpoint', str(files['named']), '--class-map', str(cmap),
                          '--heads', '3', *QUICK])
    assert [(r['heads'], r['num_images']) for r in rows] == [(3, 6)]


# --- F3: exports carry the class names ------------------------------------------------------------------------------
def test_timm_export_writes_label_names(files, tmp_path):
    export_cli.main(['--checkpoint', str(files['named']), '--heads', '3', '-o', str(tmp_path / 'k3')])
    assert json.loads((tmp_path / 'k3' / 'config.json').read_text())['label_names'] == ['1', '2', '10']
    vit = timm.create_model(f'local-dir:{tmp_path / "k3"}', pretrained=True)
    assert list(vit.pretrained_cfg['label_names']) == ['1', '2', '10']
    # no recorded names: --class-map's, which must name every class in label order; else none are written
    cmap = write_map(tmp_path / 'cmap.txt', ['b', 'a', 'c'])
    export_cli.main(['--checkpoint', str(files['unnamed']), '--heads', '3', '--class-map', str(cmap),
                     '-o', str(tmp_path / 'm')])
    assert json.loads((tmp_path / 'm' / 'config.json').read_text())['label_names'] == ['b', 'a', 'c']
    export_cli.main(['--checkpoint', str(files['unnamed']), '--heads', '3', '-o', str(tmp_path / 'none')])
    assert 'label_names' not in json.loads((tmp_path / 'none' / 'config.json').read_text())


def test_export_refuses_a_class_map_of_another_class_count(files, tmp_path, capsys):
    cmap = write_map(tmp_path / 'cmap.txt', ['a', 'b'])
    assert error_line(export_cli.main, ['--checkpoint', str(files['unnamed']), '--heads', '3', '--class-map',
                                        str(cmap), '-o', str(tmp_path / 'm')], capsys) == \
        (f"--class-map: {cmap} must name the model's 3 classes in label order (0..2): label names must name each "
         'of the 3 classes once, got 2 (2 distinct)')


@pytest.mark.skipif(bool(onnx.missing_requirements()), reason='needs the deploy extra (onnx, onnxruntime)')
def test_onnx_export_carries_label_names(files, tmp_path):
    out = tmp_path / 'k3.onnx'
    export_cli.main(['--checkpoint', str(files['named']), '--heads', '3', '--format', 'onnx', '-b', '2',
                     '-o', str(out)])
    meta = onnx.onnx_session(out).get_modelmeta().custom_metadata_map
    assert json.loads(meta['label_names']) == ['1', '2', '10']


def test_convert_outputs_that_are_folders_are_refused(files, tmp_path, capsys):
    argv = [str(files['numbers']), '--model', MODEL, '--checkpoint', str(files['named']), '--report']
    assert error_line(convert.main, [*argv, '-o', str(tmp_path)], capsys) == \
        f'-o/--output: {tmp_path} is a folder; give a file name'
    assert error_line(convert.main, [*argv, '-o', str(tmp_path / 'c.pth'), '--report-file', str(tmp_path)],
                      capsys) == f'--report-file: {tmp_path} is a folder; give a file name'
