"""Coming from the official HydraViT code (issue 21, item 11): its checkpoints' head counts, timm's results-file
and --amp-dtype defaults."""
import argparse
import csv
import importlib.util

import pytest
import timm
import torch
from test_train import ROOT

from hydravit.cli import default_heads, recorded_heads
from hydravit.deploy import profile, serve_bench
from hydravit.evaluation import accuracy, throughput
from hydravit.evaluation.common import SETTINGS_KEYS, create_parser, create_session
from hydravit.training.config import parse_args as train_parse_args

SMALL = 'hydravit_dyn_patch4_32'


@pytest.fixture(scope='module')
def official_checkpoint(tmp_path_factory):
    """The official code's checkpoint layout: timm train.py's keys, the head counts only in ``args.heads``."""
    path = tmp_path_factory.mktemp('official') / 'model_best.pth.tar'
    model = timm.create_model(SMALL, num_classes=2)
    args = argparse.Namespace(model=SMALL, heads=[3, 6, 12], amp_dtype='float16', eval_metric='top1')
    torch.save({'epoch': 9, 'arch': SMALL, 'state_dict': model.state_dict(), 'args': args}, path)
    return path


def test_recorded_heads_reads_heads_then_args_heads():
    assert recorded_heads({'heads': [3, 12], 'args': argparse.Namespace(heads=[6])}) == [3, 12]
    assert recorded_heads({'args': argparse.Namespace(heads=[3, 6, 12])}) == [3, 6, 12]
    assert recorded_heads({'args': {'heads': [6, 12]}}) == [6, 12]  # hydravit.train stores args as a dict
    assert recorded_heads({'args': argparse.Namespace(heads=12)}) == [12]
    assert recorded_heads({'args': argparse.Namespace(model=SMALL)}) is None
    assert recorded_heads({'state_dict': {}}) is None and recorded_heads(None) is None
    assert default_heads(12, {'args': argparse.Namespace(heads=[12, 3])}) == [12, 3]
    with pytest.raises(ValueError) as error:
        default_heads(12, {'args': argparse.Namespace(heads=[3, 13])}, 'c.pth')
    assert str(error.value) == ('--heads: c.pth records args.heads [3, 13]: head counts must be ints in 1..12, got '
                                '[13]; pass --heads with the head counts it was trained on')


def test_validate_and_deploy_use_args_heads_of_an_official_checkpoint(official_checkpoint, image_folder, capsys):
    rows = accuracy.main([str(image_folder), '--checkpoint', str(official_checkpoint), '-j', '0', '--device', 'cpu'])
    assert [row['heads'] for row in rows] == [3, 6, 12]
    # the deploy tools (profile, serve-bench) serve the trained head counts: create_session(trained_only=True)
    args = profile.create_profile_parser().parse_args(['--checkpoint', str(official_checkpoint), '--device', 'cpu'])
    session = create_session(args, trained_only=True)
    assert session.heads == [3, 6, 12] and session.model.trained_heads == [3, 6, 12]


def test_results_file_of_any_name_is_csv_as_timm(image_folder, tmp_path, capsys):
    out = tmp_path / 'r.txt'
    rows = accuracy.main([str(image_folder), '--model', SMALL, '--num-classes', '2', '--heads', '3', '-j', '0',
                          '--device', 'cpu', '--results-file', str(out)])
    with open(out, newline='') as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == [*accuracy.KEYS, *SETTINGS_KEYS]
    assert [float(r['top1']) for r in written] == [row['top1'] for row in rows]


def bench_slicing():
    spec = importlib.util.spec_from_file_location('bench_slicing', ROOT / 'scripts' / 'bench_slicing.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_amp_dtype_defaults_to_float16_as_timm():
    def tool_parser(add_args):
        parser = create_parser('', False, 1)
        add_args(parser)
        return parser

    parsers = {  # name: (parser, required arguments)
        'validate.py': (tool_parser(accuracy.add_args), []),
        'validate_throughput.py': (tool_parser(throughput.add_args), []),
        'deploy profile': (profile.create_profile_parser(), []),
        'deploy serve-bench': (serve_bench.create_serve_bench_parser(), ['--budget-ms', '5']),
    }
    for name, (parser, argv) in parsers.items():
        assert parser.parse_args(argv).amp_dtype == 'float16', name
    assert bench_slicing().parse_args(['--device', 'cpu']).amp_dtype == 'float16'
    assert train_parse_args(['data', '--model', SMALL])[0].amp_dtype == 'float16'
