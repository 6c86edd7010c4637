"""Calibration of cascades for a budget: the search in ``pick``, 2-fold cross-fitting, the per-batch latency model.

Records are built by hand (no model runs) except in the profile test, which uses the small random model on a tiny
ImageFolder. Expected numbers are computed here independently of ``hydravit.evaluation.cascade``.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from hydravit.deploy import pick, profile
from hydravit.evaluation import cascade
from hydravit.evaluation.cascade import CascadeRecords, CascadeSpec, PolicyCosts, Recipe

HEADS = (3, 6, 9, 12)
GMACS = {3: 0.01, 6: 0.04, 9: 0.09, 12: 0.16}
PEAK = {3: 4., 6: 6., 9: 8., 12: 10.}
SIZES = (1, 2, 4, 8)


def latency_ms(k: int, b: int) -> tuple:
    """(mean, p90) of one call: a fixed overhead plus a cost per image growing with k."""
    mean = 0.5 + 0.02 * k * k * b
    return mean, 1.5 * mean


LATENCY = {k: {b: latency_ms(k, b) for b in SIZES} for k in HEADS}


def make_records(n: int = 200, classes: int = 4, seed: int = 0) -> CascadeRecords:
    """k = 3 right on 60 % of the images, k = 6 on 65 %, k = 9 and 12 on 90 %; the narrow widths are confident
    (low entropy) mostly where they are right, so a cascade 3 -> 9 beats k = 6."""
    g = torch.Generator().manual_seed(seed)
    target = torch.arange(n) % classes
    difficulty = torch.rand(n, generator=g)
    pred, top5, entropy, max_prob = {}, {}, {}, {}
    for k, solved in zip(HEADS, (0.6, 0.65, 0.9, 0.9), strict=True):
        right = difficulty < solved
        pred[k] = torch.where(right, target, (target + 1) % classes)
        top5[k] = torch.ones(n, dtype=torch.bool)
        noise = torch.rand(n, generator=g)
        entropy[k] = torch.where(right, 0.2 + 0.5 * noise, 0.6 + 0.7 * noise)
        max_prob[k] = 1 - entropy[k] / 2
    return CascadeRecords(list(HEADS), target, pred, top5, {'entropy': entropy, 'max_prob': max_prob})


def costs(batch_size: int = 1) -> PolicyCosts:
    return PolicyCosts(dict(GMACS), LATENCY, dict(PEAK), batch_size)


def profile_object(records=None, with_latency: bool = True) -> dict:
    rows = [{'heads': k, 'embed_dim': 16 * k, 'top1': 100. * float(make_records().correct(k).float().mean()),
             'gmacs': GMACS[k], 'params_m': 0.1 * k, 'latency_ms_median': latency_ms(k, 1)[0],
             'latency_ms_p90': latency_ms(k, 1)[1], 'throughput': 1000. * 8 / latency_ms(k, 8)[0],
             'peak_mb': PEAK[k]} for k in HEADS]
    out = {'device': {'name': 'test', 'type': 'cpu'}, 'rows': rows}
    if with_latency:
        out['batch_latency'] = [{'heads': k, 'batch_size': b, 'latency_ms_mean': m, 'latency_ms_p90': p}
                                for k in HEADS for b, (m, p) in LATENCY[k].items()]
    if records is not None:
        out['cascade_records'] = profile.records_state(records)
    return out


def write(tmp_path: Path, obj: dict, name: str = 'p.json') -> Path:
    path = tmp_path / name
    profile.write_profile(obj, path)
    return path


def expect_exit(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        pick.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith('usage: ') and [line for line in lines if 'error' in line] == lines[-1:]  # one line
    return lines[-1]


# --- the latency model ---------------------------------------------------------------------------------------
def test_cascade_latency_sums_each_batchs_stage_times():
    # Hand-made exits of 3 batches of 4: stage 2 runs on 0, 2 and 3 images; 3 images are interpolated between the
    # measured sizes 2 and 4, 0 images cost nothing.
    stages = torch.tensor([[0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]])
    at3 = {n: (latency_ms(9, 2)[i] + latency_ms(9, 4)[i]) / 2 for n, i in (('mean', 0), ('p90', 1))}
    central = [latency_ms(3, 4)[0], latency_ms(3, 4)[0] + latency_ms(9, 2)[0], latency_ms(3, 4)[0] + at3['mean']]
    tail = [latency_ms(3, 4)[1], latency_ms(3, 4)[1] + latency_ms(9, 2)[1], latency_ms(3, 4)[1] + at3['p90']]
    mean, median, p90 = cascade.cascade_latency(stages, (3, 9), LATENCY)
    assert mean == pytest.approx(sum(central) / 3, abs=1e-12) and median == pytest.approx(central[1], abs=1e-12)
    # the nearest-rank p90 of 3 values (the runtime's rule): the ceil(2.7) = 3rd smallest
    assert p90 == pytest.approx(max(tail), abs=1e-12)
    mean, median, p90 = cascade.cascade_latency(stages.repeat(4, 1)[:10], (3, 9), LATENCY)  # 4, 3, 3 of each batch
    assert p90 == pytest.approx(sorted(tail * 4)[8], abs=1e-12)  # the 9th smallest of 10
    # padded to buckets: 3 images cost what 4 do
    assert cascade.cascade_latency(stages[2:], (3, 9), LATENCY, buckets=[1, 2, 4])[0] == pytest.approx(
        latency_ms(3, 4)[0] + latency_ms(9, 4)[0], abs=1e-12)
    # a fixed k is its table
    assert cascade.cascade_latency(torch.zeros(5, 8, dtype=torch.long), (6,), LATENCY) == (
        latency_ms(6, 8)[0], latency_ms(6, 8)[0], pytest.approx(latency_ms(6, 8)[1], abs=1e-12))
    with pytest.raises(ValueError, match=r'no latency measured at or above batch size 9 \(largest: 8\)'):
        cascade.cascade_latency(torch.zeros(1, 9, dtype=torch.long), (3,), LATENCY)


def test_policy_rows_price_cascades_on_batches_of_the_images():
    # 150 images (fewer than the 200 draws): stage 2 of 3 -> 9 runs on the images whose k=3 entropy is over T.
    records = make_records(n=150)
    spec = cascade.fit_spec(records, Recipe((3, 9), 0.6), 'entropy')
    goes_on = (records.scores['entropy'][3] > spec.thresholds[0]).tolist()
    p = sum(goes_on) / 150
    # Batch 1: every image priced equally often, so the mean is exactly L3(1) + p L9(1); p > 10 %: the p90 call
    # runs both stages.
    row = cascade.policy_row(records, spec, costs(1))
    assert row['latency_ms_mean'] == pytest.approx(latency_ms(3, 1)[0] + p * latency_ms(9, 1)[0], abs=1e-12)
    assert row['latency_ms_p90'] == pytest.approx(latency_ms(3, 1)[1] + latency_ms(9, 1)[1], abs=1e-12)
    # Batch 8: whole rounds of the images (lcm(150, 8) / 8 = 75 batches a round, 3 rounds >= 200): every image 24
    # times; by linearity of the per-image cost the mean is L3(8) plus the mean cost of the sub-batches.
    draws = cascade.latency_draws(150, 8)
    assert draws.shape == (225, 8) and torch.bincount(draws.flatten()).tolist() == [12] * 150
    sub = [sum(goes_on[i] for i in batch) for batch in draws.tolist()]
    per_size = {n: (0. if n == 0 else latency_ms(9, n)[0] if n in SIZES else
                    (latency_ms(9, 4)[0] * (8 - n) + latency_ms(9, 8)[0] * (n - 4)) / 4 if n > 4 else
                    (latency_ms(9, 2)[0] + latency_ms(9, 4)[0]) / 2) for n in set(sub)}
    row = cascade.policy_row(records, spec, costs(8))
    expected = latency_ms(3, 8)[0] + sum(per_size[n] for n in sub) / len(sub)
    assert row['latency_ms_mean'] == pytest.approx(expected, abs=1e-12)
    assert row['throughput'] == pytest.approx(8e3 / expected)


# --- the search space and the split discipline ------------------------------------------------------------------
def test_candidates_are_few_ladders_and_one_shared_threshold():
    assert cascade.ladder_grid(range(3, 13)) == [3, 6, 9, 12]
    recipes = cascade.cascade_candidates(HEADS, exit_shares=(0.5,))
    assert [r.ladder for r in recipes] == [(3,), (6,), (9,), (12,), (3, 6), (3, 9), (3, 12), (6, 9), (6, 12), (9, 12),
                                           (3, 6, 12), (3, 9, 12), (6, 9, 12)]
    records = make_records()
    spec = cascade.fit_spec(records, Recipe((3, 6, 12), 0.3), 'entropy')
    t = sorted(records.scores['entropy'][3].tolist())[60 - 1]  # the 60th most confident of 200 images
    assert spec == CascadeSpec((3, 6, 12), 'entropy', (t, t))
    assert int((records.scores['entropy'][3] <= t).sum()) == 60
    with pytest.raises(ValueError, match=r'exit shares must be in \(0, 1\), got \[1.0\]'):
        cascade.cascade_candidates(HEADS, exit_shares=(1.0,))


def test_fit_never_sees_the_reported_half():
    records = make_records()
    recipes = cascade.cascade_candidates(HEADS)
    budget = {'gmacs': (True, 0.06)}
    honest = cascade.cross_fit(records, recipes, 'entropy', costs(), budget, seed=3)
    first, second = cascade.halves(records, seed=3)
    assert not set(first.tolist()) & set(second.tolist()) and len(first) + len(second) == records.num_images
    # Corrupt the reported half of fold 0 (half B): its labels and its confidences.
    corrupted = records.subset(torch.arange(records.num_images))
    corrupted.target[second] = (corrupted.target[second] + 1) % 4
    for k in HEADS:
        corrupted.scores['entropy'][k][second] = 0.01
    # The halves are stratified by label, so the corrupted records keep the clean split.
    changed = cascade.cross_fit(corrupted, recipes, 'entropy', costs(), budget, split=(first, second))
    fold, fold_corrupted = honest.folds[0], changed.folds[0]
    assert torch.equal(fold.fit, fold_corrupted.fit) and torch.equal(fold.report, second)
    assert fold_corrupted.recipe == fold.recipe and fold_corrupted.spec == fold.spec
    assert fold_corrupted.fit_row == fold.fit_row
    assert fold_corrupted.reported['top1'] != fold.reported['top1']


def test_cross_fitting_averages_the_two_folds_computed_by_hand():
    records = make_records()
    recipe = Recipe((3, 9), 0.5)
    first, second = cascade.halves(records, seed=0)
    by_hand = []
    for fit, report in ((first, second), (second, first)):
        fit_scores = sorted(records.scores['entropy'][3][fit].tolist())
        threshold = fit_scores[math.ceil(0.5 * len(fit_scores)) - 1]
        top1 = gmacs = 0.
        for i in report.tolist():
            leave = records.scores['entropy'][3][i].item() <= threshold
            answer = records.pred[3][i] if leave else records.pred[9][i]
            top1 += 100. * float(answer == records.target[i]) / len(report)
            gmacs += (GMACS[3] + (0 if leave else GMACS[9])) / len(report)
        by_hand.append((threshold, top1, gmacs))
    result = cascade.cross_fit(records, [recipe], 'entropy', costs())
    assert [fold.spec.thresholds for fold in result.folds] == [(t,) for t, _, _ in by_hand]
    assert result.reported['top1'] == pytest.approx((by_hand[0][1] + by_hand[1][1]) / 2, abs=1e-5)  # float32 means
    assert result.reported['gmacs'] == pytest.approx((by_hand[0][2] + by_hand[1][2]) / 2, rel=1e-6)
    # The frontier's row of a recipe is the same average (each fold's threshold fitted on the other half).
    row, = cascade.cross_fit_recipes(records, [recipe], 'entropy', costs())
    assert row['top1'] == pytest.approx(result.reported['top1'], abs=1e-9)
    assert row['thresholds'] == [[by_hand[0][0]], [by_hand[1][0]]]


# --- pick: one frontier of fixed k and cascades -------------------------------------------------------------------
def dominated(row, rows) -> bool:
    keys = (('top1', 1), ('gmacs', -1), ('latency_ms_mean', -1), ('latency_ms_p90', -1), ('throughput', 1))
    return any(all(o[key] * s >= row[key] * s for key, s in keys) and any(o[key] * s > row[key] * s for key, s in keys)
               for o in rows)


def test_pick_frontier_holds_fixed_k_and_cascades(tmp_path, capsys):
    records = make_records()
    path = write(tmp_path, profile_object(records))
    result = pick.main([str(path), '--max-gmacs', '0.06', '-b', '4', '--json'])
    capsys.readouterr()
    recipes = cascade.cascade_candidates(HEADS)
    stored = CascadeRecords.from_state_dict(json.loads(path.read_text())['cascade_records'])
    rows = cascade.cross_fit_recipes(stored, recipes, 'entropy', costs(4))
    expected = sorted(r['policy'] for r in rows if not dominated(r, rows))
    frontier = result['frontier']
    assert sorted(r['policy'] for r in frontier if r['on_frontier']) == expected
    assert {len(r['ladder']) for r in frontier} >= {1, 2}  # both kinds on one frontier
    assert 'k=12' not in expected  # k = 9 is as accurate (same images right) and cheaper
    assert any(len(r['ladder']) > 1 and r['policy'] not in expected for r in rows)  # dominance prunes cascades too
    chosen = result['chosen']
    # The deployed policy is the budget's choice fitted on all images; its figures held out are reported.
    recipe, spec, _ = cascade.fit_cascade(stored, recipes, 'entropy', costs(4), {'gmacs': (True, 0.06)})
    assert chosen['policy'] == recipe.name and chosen['deploy']['thresholds'] == list(spec.thresholds)
    assert len(chosen['ladder']) > 1 and chosen['gmacs'] <= 0.06
    assert result['split'] == {'method': '2-fold cross-fitting', 'images': 200, 'halves': [100, 100], 'seed': 0}
    # The text names the search space and the split, marks the choice, prints its ladder, rule, threshold.
    pick.main([str(path), '--max-gmacs', '0.06', '-b', '4'])
    out = capsys.readouterr().out
    assert out.startswith('search: fixed k [3, 6, 9, 12]; cascades over k [3, 6, 9, 12]: 6 ladders k1->k2, 3 ladders '
                          'k1->k2->12, exit rule entropy, one threshold per cascade')
    assert 'split: 2-fold cross-fitting on the 200 images (stratified halves of 100 and 100, --seed 0)' in out
    assert f'* {chosen["policy"]} ' in out
    assert f'chosen: {chosen["policy"]}: ladder {chosen["ladder"]}, exit rule entropy <= ' in out


def test_old_profiles_search_fixed_k_only(tmp_path, capsys):
    old = write(tmp_path, profile_object(None, with_latency=False))
    assert list(json.loads(old.read_text())) == ['device', 'rows']
    result = pick.main([str(old), '--max-gmacs', '0.05'])
    out, err = capsys.readouterr()
    assert err.splitlines() == ['fixed k only: the profile has no per-image records and per-batch latencies '
                                   '(written before cascades, or without DATA; re-profile with DATA to search '
                                   'cascades)']
    assert result['chosen']['heads'] == 6 and 'Pareto frontier (' in out
    pick.main([str(old), '--json'])
    out, err = capsys.readouterr()
    assert json.loads(out)['chosen']['heads'] == 9 and err.startswith('fixed k only:')  # 9 as accurate as 12
    assert expect_exit([str(old), '-b', '4'], capsys).endswith(
        'error: -b/--batch-size: searches cascades, but the profile has no per-image records and per-batch '
        'latencies (written before cascades, or without DATA; re-profile with DATA to search cascades)')
    full = write(tmp_path, profile_object(make_records()), 'full.json')
    assert pick.main([str(full), '--fixed-only', '--json'])['chosen']['heads'] == 9  # as accurate as 12, cheaper


def test_bad_bounds_and_flags_name_the_flag(tmp_path, capsys):
    path = str(write(tmp_path, profile_object(make_records())))
    assert expect_exit([path, '--max-gmacs', '-1'], capsys).endswith('error: --max-gmacs must be >= 0, got -1')
    assert expect_exit([path, '--max-mean-latency-ms', 'nan'], capsys).endswith(
        'error: --max-mean-latency-ms must be >= 0, got nan')
    assert expect_exit([path, '-b', '9'], capsys).endswith(
        'error: -b/--batch-size must be between 1 and 8 (the largest batch size the profile timed), got 9')
    assert expect_exit([path, '--exit-shares', '0.5', '1'], capsys).endswith(
        'error: --exit-shares: each share must be in (0, 1), got [0.5, 1.0]')
    assert expect_exit([path, '--ladder-heads', '3', '5'], capsys).endswith(
        'error: --ladder-heads: give at least two of the profiled head counts [3, 6, 9, 12], got [3, 5]')
    assert expect_exit([path, '--max-gmacs', '0.001', '--min-top1', '99'], capsys).endswith(
        'error: no head count or cascade meets every bound: --max-gmacs 0.001 (best: 0.01 GMACs at k=3); '
        '--min-top1 99 (best: 92 % at k=9)')
    broken = profile_object(make_records())
    broken['batch_latency'] = broken['batch_latency'][:-1]  # k = 12 lacks batch 8
    err = expect_exit([str(_raw(tmp_path, broken))], capsys)
    assert err.endswith("batch_latency must time every k at the same batch sizes, 1 among them, got {3: [1, 2, 4, 8], "
                        "6: [1, 2, 4, 8], 9: [1, 2, 4, 8], 12: [1, 2, 4]}")
    short = profile_object(make_records())
    short['cascade_records']['pred']['12'] = short['cascade_records']['pred']['12'][:-1]
    assert expect_exit([str(_raw(tmp_path, short))], capsys).endswith(
        '"cascade_records" must hold every image at every profiled k [3, 6, 9, 12] (records: [3, 6, 9, 12], '
        '200 images)')


def _raw(tmp_path: Path, obj: dict) -> Path:
    path = tmp_path / 'raw.json'
    path.write_text(json.dumps(obj))
    return path


# --- the profile records what pick needs ------------------------------------------------------------------------
def test_profile_stores_records_and_batch_latency(image_folder, tmp_path, capsys):
    out = tmp_path / 'p.json'
    torch.manual_seed(0)
    written = profile.main([str(image_folder), '--model', 'hydravit_dyn_patch4_32', '--heads', '3', '12', '-b', '3',
                            '-j', '0', '--num-warm-iter', '1', '--num-bench-iter', '2', '--device', 'cpu',
                            '-o', str(out)])
    capsys.readouterr()
    loaded = profile.read_profile(out)
    assert list(loaded) == ['device', 'model', 'rows', 'batch_latency', 'cascade_records']
    assert [(r['heads'], r['batch_size']) for r in loaded['batch_latency']] == [(3, 1), (3, 2), (3, 3), (12, 1),
                                                                                (12, 2), (12, 3)]
    records = profile.cascade_records(loaded)
    for row in loaded['rows']:  # the rows' top-1 comes from the same records
        assert row['top1'] == pytest.approx(100. * float(records.correct(row['heads']).double().mean()), abs=1e-4)
    assert records.num_images == 8 and records.heads == [3, 12]
    assert written['cascade_records']['target'] == records.target.tolist()
    # The file keeps the records on one line each: small.
    assert len(out.read_text().splitlines()) < 100
    result = pick.main([str(out), '--json'])
    assert result['split']['images'] == records.num_images
