"""scripts/cascade_report.py rebuilds its tables from committed records alone (no checkpoint, no training run)."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hydravit.evaluation.cascade import RULES, CascadeRecords, CascadeSpec, confidence, evaluate_cascade, halves

ROOT = Path(__file__).resolve().parents[1]
HEADS = list(range(3, 13))


def load_script():
    spec = importlib.util.spec_from_file_location('cascade_report', ROOT / 'scripts' / 'cascade_report.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_records(seed: int, n: int = 80) -> CascadeRecords:
    """Logits that sharpen with k around the target (wider is more often right and more confident)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.arange(n) % 4
    noise = torch.randn(n, 4, generator=g)
    logits = {k: noise * 2 + torch.nn.functional.one_hot(target, 4) * k / 4 for k in HEADS}
    return CascadeRecords(HEADS, target, {k: v.argmax(1) for k, v in logits.items()},
                          {k: torch.ones(n, dtype=torch.bool) for k in HEADS},
                          {r: {k: confidence(v, r) for k, v in logits.items()} for r in RULES})


def test_report_is_rebuilt_from_committed_records_alone(tmp_path):
    script = load_script()
    gmacs = {k: 0.0013 * k * k for k in HEADS}
    for seed in (0, 1):
        state = synthetic_records(seed).state_dict()
        (tmp_path / 'out' / 'records').mkdir(parents=True, exist_ok=True)
        (tmp_path / 'out' / 'records' / f'digits_seed{seed}.json').write_text(json.dumps(
            {'source': {}, 'gmacs': {str(k): v for k, v in gmacs.items()}, 'records': state}))
    assert script.main(['--runs', str(tmp_path / 'no-runs'), '--datasets', 'digits', 'mnist',
                        '--out', str(tmp_path / 'out')]) == 0
    rows = list(csv.DictReader(open(tmp_path / 'out' / 'cascade.csv')))
    assert {(r['dataset'], r['seed']) for r in rows} == {('digits', '0'), ('digits', '1')}
    # a fixed k's figure is the mean of its top-1 over the two halves, from the records as committed
    records = synthetic_records(1)
    split = halves(records, seed=0)
    expected = sum(evaluate_cascade(records.subset(h), CascadeSpec((9,)), gmacs).top1 for h in split) / 2
    row = next(r for r in rows if r['seed'] == '1' and r['budget'] == 'fixed k=9')
    assert float(row['fixed_top1']) == expected
    md = (tmp_path / 'out' / 'cascade.md').read_text()
    assert md.startswith('### digits (2 seeds: 0, 1)') and (tmp_path / 'out' / 'cascade.png').is_file()


def test_fixed_k_baseline_chosen_on_one_half_is_measured_on_the_other():
    """Each half favours another k: in-sample both score 75 %, held out the chosen k scores 50 % both ways."""
    script = load_script()
    n, heads = 16, [3, 4]
    target = torch.arange(n) % 2
    first, second = halves(CascadeRecords(heads, target, {k: target for k in heads},
                                          {k: torch.ones(n, dtype=torch.bool) for k in heads},
                                          {r: {k: torch.zeros(n) for k in heads} for r in RULES}), seed=0)
    right = {3: torch.zeros(n, dtype=torch.bool), 4: torch.zeros(n, dtype=torch.bool)}
    right[3][first], right[4][second] = True, True
    right[3][second[::2]], right[4][first[::2]] = True, True
    records = CascadeRecords(heads, target, {k: torch.where(right[k], target, 1 - target) for k in heads},
                             {k: torch.ones(n, dtype=torch.bool) for k in heads},
                             {r: {k: torch.zeros(n) for k in heads} for r in RULES})
    gmacs = {3: 1., 4: 2.}
    assert [evaluate_cascade(records, CascadeSpec((k,)), gmacs).top1 for k in heads] == [75., 75.]
    assert script.heldout_fixed(script.fixed_top1_per_half(records, heads, gmacs, (first, second)), heads) == 50.


def test_records_keep_float32_scores_exactly_at_9_digits():
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(torch.tensor([float(f'{v:.9g}') for v in values.tolist()], dtype=torch.float32), values)


def _write_records(path: Path, sha256=None) -> None:
    gmacs = {k: 0.0013 * k * k for k in HEADS}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'source': {} if sha256 is None else {'sha256': sha256},
                                'gmacs': {str(k): v for k, v in gmacs.items()},
                                'records': synthetic_records(0).state_dict()}))


def test_records_of_another_checkpoint_of_the_run_are_refused(tmp_path):
    script = load_script()
    run, path = tmp_path / 'runs' / 'digits' / 'seed0', tmp_path / 'records' / 'digits_seed0.json'
    run.mkdir(parents=True)
    (run / 'model_best.pth.tar').write_bytes(b'the checkpoint trained again')
    (run / 'done').write_text('done\n')
    _write_records(path, sha256='0123456789ab' + '0' * 52)
    with pytest.raises(SystemExit) as e:
        script.run_records(run, 'data/digits', path)
    assert str(e.value) == (f'{path}: recorded from another checkpoint than {run / "model_best.pth.tar"} (sha256 '
                            '0123456789ab...): delete the records file to record this one, or move the run away')
    _write_records(path, sha256=script.checkpoint_sha256(run))  # the same checkpoint: read as written
    records, gmacs = script.run_records(run, 'data/digits', path)
    assert torch.equal(records.target, synthetic_records(0).target) and sorted(gmacs) == HEADS


def test_records_without_their_run_are_read_and_nothing_is_none(tmp_path):
    script = load_script()
    path = tmp_path / 'records' / 'mnist_seed1.json'
    assert script.run_records(tmp_path / 'no-run', 'data/mnist', path) is None
    _write_records(path, sha256='f' * 64)  # its checkpoint is gone (another session): the committed file counts
    assert script.run_records(tmp_path / 'no-run', 'data/mnist', path) is not None


@pytest.mark.parametrize('script', sorted(p.name for p in (ROOT / 'scripts').glob('*.py')))
def test_every_script_imports(script):
    """A script whose import broke (cascade_throughput imported a function cascade_report no longer had) fails here,
    not at the one run it was written for."""
    spec = importlib.util.spec_from_file_location(f'script_{script[:-3]}', ROOT / 'scripts' / script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
