"""scripts/serve_bench_seeds.py: serve-bench results of several checkpoints averaged per data set, or refused."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from hydravit.deploy.serve_bench import POLICIES, SUMMARY_KEYS

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location('serve_bench_seeds', ROOT / 'scripts' / 'serve_bench_seeds.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(seed: int, budget_ms: float = 150., data: str = 'data/digits') -> dict:
    """A serve-bench result whose every figure is distinct per seed and policy."""
    summary = []
    for i, name in enumerate(POLICIES):
        row = {key: float(10 * seed + i + j) for j, key in enumerate(SUMMARY_KEYS[1:])}
        summary.append(dict(row, policy=name, repeats=3))
    settings = {'data': data, 'checkpoint': f'output/seeds/digits/seed{seed}/model_best.pth.tar',
                'budget_ms': budget_ms, 'batch_size': 16, 'min_top1': 90., 'objective': 'goodput',
                'load_schedule': ['off:10', 'on:15'], 'load_procs': 2, 'repeats': 3, 'duration_s': 25.}
    policies = {'pick': [6], 'largest': [12], 'elastic': [3, 6, 12], 'pick-cascade': ['3->6 entropy<=0.2'],
                'elastic-cascade': ['k=3']}
    return {'settings': settings, 'summary': summary, 'policies': policies}


def write(tmp_path: Path, results) -> list:
    names = []
    for i, res in enumerate(results):
        path = tmp_path / f'r{i}.json'
        path.write_text(json.dumps(res))
        names.append(str(path))
    return names


def test_mean_and_std_over_checkpoints_and_per_seed_target(tmp_path):
    script = load_script()
    results = [result(0), result(1), result(2)]
    text = script.main(write(tmp_path, results))
    goodput = [r['summary'][POLICIES.index('elastic-cascade')]['goodput'] for r in results]
    row = next(line for line in text.splitlines() if line.startswith('| elastic-cascade |'))
    assert f'{np.mean(goodput):.1f} ± {np.std(goodput, ddof=1):.1f}' == row.split(' | ')[2]
    by = {name: i for i, name in enumerate(POLICIES)}
    diff = (results[0]['summary'][by['elastic-cascade']]['goodput_load']
            - results[0]['summary'][by['elastic']]['goodput_load'])
    assert (f'- output/seeds/digits/seed0/model_best.pth.tar: elastic-cascade against elastic {diff:+.1f} p.p. '
            'under load (target above: met)') in text
    assert text.startswith('### digits: 3 checkpoints\n')


def test_data_sets_are_grouped_apart(tmp_path):
    text = load_script().main(write(tmp_path, [result(0), result(1, data='data/mnist')]))
    assert '### digits: 1 checkpoint\n' in text and '### mnist: 1 checkpoint\n' in text


def test_runs_with_different_settings_are_refused(tmp_path):
    names = write(tmp_path, [result(0), result(1, budget_ms=100.)])
    with pytest.raises(SystemExit) as exc:
        load_script().main(names)
    assert str(exc.value) == (f"error: {names[1]} was run with budget_ms=100.0, {names[0]} with 150.0: "
                              'digits figures do not average')


def test_one_checkpoint_twice_is_refused(tmp_path):
    with pytest.raises(SystemExit) as exc:
        load_script().main(write(tmp_path, [result(0), result(0)]))
    assert str(exc.value).startswith('error: digits: one checkpoint counted twice')
