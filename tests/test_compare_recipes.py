"""scripts/compare_recipes.py without training: the plan, resuming from recorded rows, the report."""
import importlib.util
import json

import pytest
from test_train import ROOT

spec = importlib.util.spec_from_file_location('compare_recipes', ROOT / 'scripts' / 'compare_recipes.py')
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


@pytest.fixture(autouse=True)
def _gmacs(monkeypatch):
    """Forward GMACs per image of k = k / 100: round numbers instead of DeepSpeed's count of the small model."""
    monkeypatch.setattr(compare, '_GMACS', {k: k / 100 for k in compare.HEADS})


def _row(recipe: str, seed: int, top1: float) -> dict:
    heads = [compare.RECIPES[recipe].dedicated] if compare.RECIPES[recipe].dedicated else compare.HEADS
    row = {'recipe': recipe, 'seed': seed, 'epochs': 40, 'subnet_passes': 3360, 'teacher_forwards': 0,
           'wall_s': 60.0, 'cpu_s': 30.0, 'threads': 1, 'commit': 'abc'}
    for k in heads:
        row[f'top1_k{k}'] = top1 + k
        row[f'ema_top1_k{k}'] = top1 + k + 0.5
    return row


def test_report_gives_mean_and_std_over_seeds_and_resumes_from_its_csv(tmp_path):
    runs, report = tmp_path / 'runs', tmp_path / 'report'
    rows = [_row('paper_uniform', 0, 80.0), _row('paper_uniform', 1, 82.0), _row('dedicated_k3', 0, 90.0)]
    for row in rows[:2]:
        folder = compare.run_dir(runs, row['recipe'], row['seed'])
        folder.mkdir(parents=True)
        (folder / 'result.json').write_text(json.dumps(row))
    compare.write_report(rows, report)
    text = (report / 'comparison.md').read_text()
    assert '| paper_uniform | 2 | 40 | 3360 | 12,096 |  | 1.0 | 0.5 | 84.00 ± 1.41 |' in text  # k=3: 83, 85
    assert (report / 'comparison.png').stat().st_size > 10_000
    # a later session on another machine: no run folders, the committed CSV says what is done
    reloaded = compare.load_results(tmp_path / 'elsewhere', report)
    assert [(r['recipe'], r['seed']) for r in reloaded] == [('paper_uniform', 0), ('paper_uniform', 1),
                                                            ('dedicated_k3', 0)]
    assert reloaded[0]['top1_k12'] == pytest.approx(92.0)


def test_a_teacher_recipe_retrains_its_missing_teacher_first(tmp_path):
    teacher, dedicated = compare.RECIPES['sandwich_ikd_teacher'], compare.RECIPES['dedicated_k12']
    cells = compare.with_teachers([(teacher, 1)], tmp_path)
    assert cells == [(dedicated, 1), (teacher, 1)]
    compare.teacher_file(tmp_path, 1).parent.mkdir(parents=True)
    compare.teacher_file(tmp_path, 1).write_bytes(b'x')
    assert compare.with_teachers([(teacher, 1)], tmp_path) == [(teacher, 1)]


def test_recipe_flags_build_dedicated_models_of_exactly_k_heads():
    flags = compare.RECIPES['dedicated_k6'].train_flags()
    assert flags[-6:] == ['--heads', '6', '--weights', '1', '--model-kwargs', 'embed_dim=96', 'num_heads=6'][-6:]
    sandwich = compare.RECIPES['sandwich_ikd'].train_flags()
    assert '--inplace-kd' in sandwich and sandwich[sandwich.index('--epochs') + 1] == '10'  # equal compute


def test_targets_table_names_which_targets_a_recipe_meets():
    rows = [_row('paper_uniform', 0, 80.0), _row('paper_weighted', 0, 81.0), _row('sandwich', 0, 81.5),
            {**_row('sandwich_e40', 0, 82.0), 'subnet_passes': 4 * 3360}]
    rows += [_row(f'dedicated_k{k}', 0, 81.8) for k in (3, 6, 9, 12)]  # dedicated k: 81.8 + k
    text = compare.targets_table(rows)
    assert '| sandwich | 1x | 0.25x | +0.50 | -0.30 | -0.30 | -0.30 | -0.30 | yes |' in text
    assert '| paper_uniform | 1x | 0.25x | -1.00 | -1.80 | -1.80 | -1.80 | -1.80 | no |' in text
    assert '| sandwich_e40 | 4x | 1.00x | +1.00 | +0.20 | +0.20 | +0.20 | +0.20 | yes |' in text


def test_targets_table_counts_a_tie_with_the_paper_as_met():
    # equal means over three seeds from other per-seed counts out of 450 images: the float means differ by 1e-14
    def seeds(recipe: str, counts: tuple) -> list:
        return [{**_row(recipe, seed, 0.0), **{f'top1_k{k}': 100 * count / 450 for k in compare.HEADS}}
                for seed, count in enumerate(counts)]
    rows = seeds('sandwich', (420, 421, 431)) + seeds('paper_uniform', (424,) * 3) + seeds('paper_weighted', (400,))
    rows += [{**_row(f'dedicated_k{k}', 0, 0.0), f'top1_k{k}': 100 * 424 / 450} for k in (3, 6, 9, 12)]
    assert '| sandwich | 1x |  | +0.00 | +0.00 | +0.00 | +0.00 | +0.00 | yes |' in compare.targets_table(rows)


def test_update_docs_replaces_only_the_marked_blocks(tmp_path, monkeypatch):
    (tmp_path / 'docs').mkdir()
    readme, training = tmp_path / 'README.md', tmp_path / 'docs' / 'training.md'
    readme.write_text('intro\n<!-- comparison_summary:start -->\nold\n<!-- comparison_summary:end -->\nrest\n')
    training.write_text('a\n<!-- comparison_report:start -->\nold\n<!-- comparison_report:end -->\nb\n')
    monkeypatch.setattr(compare, 'ROOT', tmp_path)
    rows = [_row('paper_uniform', 0, 80.0), _row('paper_uniform', 1, 82.0), _row('dedicated_k3', 0, 90.0)]
    compare.write_report(rows, tmp_path / 'report')
    compare.update_docs(rows, tmp_path / 'report')
    text = readme.read_text()
    assert text.startswith('intro\n<!-- comparison_summary:start -->\nModel top-1') and text.endswith(
        '<!-- comparison_summary:end -->\nrest\n')
    assert '| paper_uniform | 2 | 40 | 3360 | 12,096 |  | 84.00 ± 1.41 | 87.00 ± 1.41 | 90.00 ± 1.41 | 93.00 ± 1.41 |' \
        in text
    assert '| dedicated_k3 | 1 | 40 | 3360 | 4,838 |  | 93.00 |  |  |  |' in text  # one seed: no spread shown
    assert 'old' not in text and 'old' not in training.read_text()
    assert '**EMA**' in training.read_text() and training.read_text().endswith('<!-- comparison_report:end -->\nb\n')
    readme.write_text('no markers\n')
    with pytest.raises(SystemExit, match='needs exactly one <!-- comparison_summary:start -->'):
        compare.update_docs(rows, tmp_path / 'report')


def test_digits_plus_config_is_exactly_the_compared_recipe():
    from hydravit.training.config import parse_args
    compared, _ = parse_args(['data', '--config', str(ROOT / compare.CONFIG)]
                             + compare.RECIPES['sandwich_e40'].train_flags())
    plus, _ = parse_args(['data', '--config', str(ROOT / 'configs' / 'digits_plus.yaml')])
    assert {**vars(plus), 'config': None} == {**vars(compared), 'config': None}
    assert (plus.subnets_per_step, plus.subnet_policy, plus.inplace_kd, plus.epochs) == (4, 'sandwich', False, 40)


def test_training_time_counts_each_epoch_once_across_a_resume(tmp_path):
    (tmp_path / 'seed0').mkdir()
    log = tmp_path / 'seed0' / 'train.log'
    log.write_text('Epoch 0 done in 0:00:41; k trained so far: {12: 84}\n'
                   'Train: 1/2 [  10/84]  (stopped here, then resumed from epoch 0)\n'
                   'Epoch 0 done in 0:00:40 (84 steps, 0.4 s/step); k ...\n'
                   'Epoch 1 done in 1:02:03 (84 steps, 44.3 s/step); k ...\n')
    assert compare.training_seconds(log) == 40 + 3600 + 2 * 60 + 3
    # rows recorded before the column existed get it from their log
    runs, report = tmp_path / 'runs', tmp_path / 'report'
    compare.write_report([_row('dedicated_k3', 0, 90.0)], report)
    compare.run_dir(runs, 'dedicated_k3', 0).mkdir(parents=True)
    (compare.run_dir(runs, 'dedicated_k3', 0) / 'train.log').write_text(log.read_text())
    assert compare.load_results(runs, report)[0]['train_s'] == 3763.0


def test_training_gmacs_count_each_pass_at_its_k_and_a_converted_entry_its_source():
    recipes = compare.RECIPES
    exact = {**_row('paper_uniform', 0, 80.0), 'passes_per_k': '3:100 12:10'}
    assert compare.training_gmacs(exact, [exact]) == pytest.approx((100 * 0.03 + 10 * 0.12) * 16 * 3)
    # a row without per-k counts: its sampler's expectation (sandwich: 12 and 3 every step, two of the 8 others)
    sandwich = _row('sandwich', 0, 80.0)
    per_pass = (0.12 + 0.03 + 2 * 0.075) / 4
    assert compare.training_gmacs(sandwich, [sandwich]) == pytest.approx(3360 * per_pass * 48)
    weighted = _row('paper_weighted', 0, 80.0)  # weights ~ k
    expected = sum(k * k / 100 for k in compare.HEADS) / sum(compare.HEADS)
    assert compare.training_gmacs(weighted, [weighted]) == pytest.approx(3360 * expected * 48)
    teacher = {**_row('sandwich_ikd_teacher', 0, 80.0), 'teacher_forwards': 840}
    assert compare.training_gmacs(teacher, [teacher]) == pytest.approx(3360 * per_pass * 48 + 840 * 16 * 0.12)
    # converted: the fine-tune, the source run of the same seed and the 256 calibration images (forward only for
    # the magnitude score: the full-width check)
    source = _row('dedicated_k12', 1, 90.0)
    tuned = {**_row('convert_ft10', 1, 90.0), 'subnet_passes': 840, 'passes_per_k': '12:210 3:210 7:420'}
    fine_tune = (210 * 0.12 + 210 * 0.03 + 420 * 0.07) * 48
    calib = 256 * (3 if 'taylor' in compare.CONVERT else 1) * 0.12
    assert compare.training_gmacs(tuned, [source, tuned]) == pytest.approx(fine_tune + 3360 * 0.12 * 48 + calib)
    assert compare.training_gmacs(tuned, [tuned]) != compare.training_gmacs(tuned, [tuned])  # NaN: source unknown
    assert recipes['source_ft10'].convert is None and recipes['source_ft10'].source


def test_converted_entries_convert_their_source_then_fine_tune_or_validate(tmp_path):
    ft = compare.RECIPES['convert_ft5']
    convert = compare.convert_command(ft, 2, tmp_path / 'data', tmp_path)
    assert convert[1:4] == ['-m', 'hydravit.convert', str(tmp_path / 'data')]
    assert str(compare.teacher_file(tmp_path, 2)) in convert and '--score' in convert and '--seed' in convert
    train = compare.command(ft, 2, tmp_path / 'data', tmp_path)
    assert train[train.index('--initial-checkpoint') + 1] == str(compare.run_dir(tmp_path, 'convert_ft5', 2)
                                                                 / 'converted.pth')
    assert train[train.index('--epochs') + 1] == '5' and '--subnets-per-step' in train
    ablation = compare.command(compare.RECIPES['source_ft10'], 2, tmp_path / 'data', tmp_path)
    assert ablation[ablation.index('--initial-checkpoint') + 1] == str(compare.teacher_file(tmp_path, 2))
    zero = compare.validate_command(compare.run_dir(tmp_path, 'convert_ft0', 2), tmp_path / 'data')
    assert zero[1] == 'validate.py' and zero[zero.index('--heads') + 1:zero.index('-b')] == list(
        map(str, compare.HEADS))
    # every converted entry waits for (or retrains) the dedicated 12-head run of its seed
    assert compare.with_teachers([(ft, 2)], tmp_path) == [(compare.RECIPES['dedicated_k12'], 2), (ft, 2)]
