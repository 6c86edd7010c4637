"""The load-driven cascade: ``CascadeController`` / ``ElasticCascadeRunner`` on stub stages whose latency per k and
per sub-batch is set here (an injected clock, as tests/test_deploy.py does for the ElasticRunner), and serve-bench's
two cascade policies on a tiny generated ImageFolder.
"""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import hydravit  # noqa: F401  registers the models
from hydravit.deploy import serve_bench
from hydravit.deploy.cascade import CascadeRunner
from hydravit.deploy.runtime import CascadeController, ElasticCascadeRunner, OperatingPoint, operating_frontier
from hydravit.evaluation.cascade import CascadeRecords, CascadeSpec, batch_draws, cascade_latency, exit_stages

B = 10
COST = {3: 2., 6: 4., 12: 10.}  # ms per call of a full batch at k without load; a sub-batch of n pays n / B of it
# Image i's difficulty; every stage answers it with top-1 probability 1 - d / 2: under the max_prob rule it exits
# stage 1 at threshold T = 1 - m / 20 exactly when i < m.
DIFFICULTY = (torch.arange(B, dtype=torch.float32) + 0.5) / B


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.

    def __call__(self) -> float:
        return self.now


def stub_stages(clock: FakeClock, load, seed: int = 0) -> dict:
    """Per k: a stage that advances the clock by ``COST[k] * n / B * load(t)`` (+-2 %) and returns 2-class logits
    whose top-1 probability is ``1 - d / 2`` for an image of difficulty ``d`` (its only pixel)."""
    rng = random.Random(seed)

    def stage(k: int):
        def run(images: torch.Tensor) -> torch.Tensor:
            n = images.shape[0]
            clock.now += COST[k] * n / B * load(clock.now) * rng.uniform(0.98, 1.02) / 1e3
            p = 1 - images.flatten() / 2
            return torch.stack([torch.log(p) - torch.log1p(-p), torch.zeros(n)], dim=1)
        return run
    return {k: stage(k) for k in COST}


def cascade_point(m: int) -> OperatingPoint:
    """3 -> 12 where m of the B images exit at k=3: latency 2 + 10 (1 - m / B) ms; top-1 90 - 12 (m / B)^2."""
    share = m / B
    latency = COST[3] + COST[12] * (1 - share)
    return OperatingPoint(CascadeSpec((3, 12), 'max_prob', (1 - m / 20,)), 90 - 12 * share ** 2, latency,
                          latency * 1.02)


FIXED = {3: 70., 6: 80., 12: 90.}
POINTS = [OperatingPoint(CascadeSpec((k,)), top1, COST[k], COST[k] * 1.02) for k, top1 in FIXED.items()] + [
    cascade_point(m) for m in range(1, 10)]


def serve(load, seconds: float, budget_ms: float, **kwargs) -> ElasticCascadeRunner:
    clock = FakeClock()
    stages = stub_stages(clock, load)
    runner = ElasticCascadeRunner(CascadeRunner(stages, CascadeSpec((12,))), budget_ms, POINTS, clock=clock,
                                  **kwargs)
    images = DIFFICULTY.view(B, 1, 1, 1)
    while clock.now < seconds:
        point = runner.point
        out = runner(images)
        # The call ran the point's cascade: the first m images answered at stage 0, the rest at the last stage.
        m = round(20 * (1 - point.spec.thresholds[0])) if len(point.spec.ladder) > 1 else 0
        assert out.stage.tolist() == [0] * m + [len(point.spec.ladder) - 1] * (B - m)
        assert out.batch_sizes == ([B] if m == 0 else [B, B - m] if m < B else [B])
    return runner


def test_frontier_orders_points_and_drops_dominated_and_below_floor():
    frontier = operating_frontier(POINTS)
    # 3->12 with 9 of 10 exiting (3 ms, 80.28 %) beats k=6 (4 ms, 80 %); with 2 exiting it costs what k=12 does
    # (10 ms) for less, with 1 more (11 ms): those three are dominated and dropped.
    assert [p.spec.name for p in frontier] == ['k=3'] + [f'3->12 max_prob>={1 - m / 20:.4g}' for m in
                                                        range(9, 2, -1)] + ['k=12']
    assert [p.latency_ms for p in frontier] == sorted(p.latency_ms for p in frontier)
    floored = operating_frontier(POINTS, min_top1=85.)
    assert min(p.top1 for p in floored) >= 85. and [p.spec.thresholds for p in floored[:1]] == [(0.7,)]
    with pytest.raises(ValueError, match=r'^min_top1 95: no operating point reaches it \(best: 90 % at k=12\)$'):
        operating_frontier(POINTS, min_top1=95.)
    with pytest.raises(ValueError, match='^no operating points given$'):
        operating_frontier([])
    with pytest.raises(ValueError, match=r'operating point k=3: top1 and latencies must be finite, latencies > 0'):
        OperatingPoint(CascadeSpec((3,)), 70., 0., 1.)


def test_controller_starts_at_the_most_accurate_point_that_fits():
    assert CascadeController(POINTS, 12.).point.spec.name == 'k=12'  # p90 10.2 ms <= 11.4 ms (5 % margin)
    # 8 ms: the most accurate point with p90 <= 7.6 ms: 3->12 with 5 of 10 exiting (7.14 ms).
    assert CascadeController(POINTS, 8.).point.spec.thresholds == (0.75,)
    assert CascadeController(POINTS, 1.).point.spec.name == 'k=3'  # nothing fits: the cheapest


def test_controller_prices_points_by_their_p90_not_their_median():
    # A cascade whose calls spread (median 6 ms, p90 11 ms: some batches re-run many images) is not entered from
    # k=6 (7 ms) under a 10 ms budget: scaled by medians it would look like 6 ms, by p90s it is 11 ms.
    spread = OperatingPoint(CascadeSpec((3, 12), 'max_prob', (0.8,)), 85., 6., 11.)
    points = [OperatingPoint(CascadeSpec((3,)), 70., 2., 2.04), OperatingPoint(CascadeSpec((6,)), 80., 7., 7.2),
              spread]
    controller = CascadeController(points, 10.)
    assert [p.spec.name for p in controller.points] == ['k=3', 'k=6', spread.spec.name]  # by p90
    assert controller.point.spec.name == 'k=6' and controller.costs == {0: 2.04, 1: 7.2, 2: 11.}
    for i in range(60):
        controller.update(7., i * 0.01)
    assert controller.point.spec.name == 'k=6'


def test_runner_moves_to_cheaper_points_under_a_3x_slowdown_and_returns_after():
    runner = serve(lambda t: 3. if 3 <= t < 8 else 1., 12, budget_ms=12.)
    history = list(runner.history)
    names = [p.spec.name for p in runner.points]
    assert {names[level] for t, level, _ in history if t < 3} == {'k=12'}
    # 3 x (2 + 10 x 0.1) = 9 ms fits the 10.2 ms target, 3 x 4 ms does not: the threshold knob settles on 3->12
    # with 9 of 10 images exiting at k=3 (80.3 %), not on k=3 (70 %), the best fixed width that fits.
    settled = [names[level] for t, level, _ in history if 3.5 <= t < 8]
    assert set(settled) <= {'3->12 max_prob>=0.55', '3->12 max_prob>=0.6'}
    assert settled.count('3->12 max_prob>=0.55') > 0.95 * len(settled)
    under_load = [ms for t, _, ms in history if 3.5 <= t < 8]
    assert np.mean([ms <= 12. for ms in under_load]) >= 0.97
    back = next(t for t, level, _ in history if t >= 8 and names[level] == 'k=12')
    assert back - 8 < 0.5 and {names[level] for t, level, _ in history if t >= back} == {'k=12'}
    assert np.mean([ms <= 12. for t, _, ms in history if not 3 <= t < 8.1]) > 0.99


def test_runner_never_serves_below_the_floor():
    # From t = 1 s every call takes 3x; with an 85 % floor the cheapest allowed point (3->12, 6 of 10 exiting:
    # 6 ms, 18 ms under load) cannot hold 12 ms: it serves there, over budget, never a cheaper point.
    runner = serve(lambda t: 3. if t >= 1 else 1., 5, budget_ms=12., min_top1=85.)
    top1 = [runner.points[level].top1 for _, level, _ in runner.history]
    assert min(top1) >= 85. and runner.points[0].spec.thresholds == (0.7,)
    late = [(level, ms) for t, level, ms in runner.history if t >= 2]
    assert {level for level, _ in late} == {0} and all(ms > 12. for _, ms in late)


def test_runner_refuses_points_its_stages_cannot_run():
    clock = FakeClock()
    stages = stub_stages(clock, lambda t: 1.)
    del stages[6]
    with pytest.raises(ValueError, match=r'^the cascade runner has no stage for head count\(s\) \[6\] of the '
                                         r'operating points$'):
        ElasticCascadeRunner(CascadeRunner(stages, CascadeSpec((3,))), 12., POINTS[:2], clock=clock)
    with pytest.raises(ValueError, match='latency budget must be > 0 ms'):
        ElasticCascadeRunner(CascadeRunner(stub_stages(clock, lambda t: 1.), CascadeSpec((3,))), 0., POINTS)


# --- serve-bench's operating points: capped re-runs, priced on batch draws ------------------------------------------
def synthetic_records(n: int = 50) -> CascadeRecords:
    """k=3 right on the confident half of the images, k=12 right on all; entropies spread over (0, 1)."""
    g = torch.Generator().manual_seed(0)
    entropy = torch.rand(n, generator=g)
    target = torch.zeros(n, dtype=torch.long)
    pred3 = (entropy > 0.5).long()  # wrong where unsure
    return CascadeRecords([3, 12], target, {3: pred3, 12: target.clone()}, {3: pred3 == 0, 12: target == 0},
                          {'entropy': {3: entropy, 12: torch.zeros(n)}, 'max_prob': {3: 1 - entropy / 2,
                                                                                      12: torch.ones(n)}})


def test_batch_draws_cover_every_image_about_equally():
    draws = batch_draws(50, 16, 200, seed=0)
    counts = torch.bincount(draws.flatten(), minlength=50)
    assert draws.shape == (200, 16) and counts.max() - counts.min() <= 1
    assert torch.equal(draws, batch_draws(50, 16, 200, seed=0))


def test_capped_point_caps_reruns_at_their_p90_and_prices_the_capped_batches():
    records, b = synthetic_records(), 16
    draws = batch_draws(records.num_images, b, 200, seed=0)
    table = {3: {1: (1., 1.1), 8: (2., 2.2), 16: (3., 3.3)}, 12: {1: (2., 2.2), 8: (10., 11.), 16: (20., 22.)}}
    spec = CascadeSpec((3, 12), 'entropy', (0.5,))
    point = serve_bench.capped_point(records, spec, draws, table)
    reruns = (exit_stages(records, spec, draws) >= 1).sum(1)
    cap = round(point.spec.rerun_cap[0] * b)
    assert (reruns <= cap).double().mean() >= 0.9 and (reruns < cap).double().mean() < 0.9 and reruns.max() > cap
    capped = exit_stages(records, point.spec, draws)
    assert ((capped >= 1).sum(1) == reruns.clamp(max=cap)).all()
    # top-1: the draws' answers (k=12 right on all, k=3 wrong on the unsure it keeps)
    assert point.top1 == pytest.approx(100. * float((capped == 1).double().mean()
                                                    + ((capped == 0) & (records.pred[3][draws] == 0)).double().mean()))
    _, median, p90 = cascade_latency(capped, spec.ladder, table)
    assert (point.latency_ms, point.latency_ms_p90) == (median, p90)
    # the cap leaves the 9 batches in 10 under it as they were (the same p90) and cuts the tenth down to it
    assert p90 == cascade_latency(exit_stages(records, spec, draws), spec.ladder, table)[2]
    assert p90 == pytest.approx(3.3 + np.interp(cap, [1, 8, 16], [2.2, 11., 22.]))
    # three stages: each stage's cap at the p90 of what goes on past it, given the caps before it
    wide = CascadeRecords([3, 6, 12], records.target, {**records.pred, 6: records.pred[3]},
                          {**records.top5, 6: records.top5[3]},
                          {r: {**v, 6: v[3].flip(0)} for r, v in records.scores.items()})
    three = serve_bench.capped_point(wide, CascadeSpec((3, 6, 12), 'entropy', (0.5, 0.5)), draws, table | {6: table[3]})
    assert len(three.spec.rerun_cap) == 2
    stages = exit_stages(wide, three.spec, draws)
    for s, share in enumerate(three.spec.rerun_cap):
        went_on = (stages > s).sum(1)
        assert went_on.max() <= share * b and (went_on < share * b).double().mean() < 0.9 <= (
            went_on <= share * b).double().mean()
    # a threshold that lets every image exit needs no cap
    assert serve_bench.capped_point(records, CascadeSpec((3, 12), 'entropy', (2.,)), draws, table).spec.rerun_cap == ()


# --- serve-bench's cascade policies on real images ----------------------------------------------------------
@pytest.fixture(scope='module')
def trained_checkpoint(tmp_path_factory) -> Path:
    """The small model, weights perturbed, with the head set [3, 12] a training run records."""
    torch.manual_seed(0)
    model = timm.create_model('hydravit_dyn_patch4_32', num_classes=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp('ckpt') / 'last.pth.tar'
    torch.save({'arch': 'hydravit_dyn_patch4_32', 'state_dict': model.state_dict(), 'heads': [12, 3],
                'class_names': ['cat', 'dog']}, path)
    return path


def test_serve_bench_cascade_policies_count_what_they_served(image_folder, trained_checkpoint, tmp_path, capsys):
    torch.set_num_threads(1)
    out, budget = tmp_path / 'sb', 1e4
    result = serve_bench.main([str(image_folder), '--checkpoint', str(trained_checkpoint), '-b', '2',
                               '--budget-ms', str(budget), '--load-schedule', 'off:0.2', 'on:0.3', 'off:0.2',
                               '--load-procs', '1', '--calibration-time', '0.02', '--log-every', '0.3',
                               '-o', str(out), '--device', 'cpu', '-j', '0'])
    stdout = capsys.readouterr().out
    assert json.loads((out / 'serve_bench.json').read_text())['summary'] == result['summary']
    # 8 images, 2 served k: 4 images calibrate (a disjoint half), the other 4 are served.
    assert result['settings']['fit_images'] == 4 and result['settings']['fit_disjoint']
    assert 'calibrating on 4 other images (a disjoint half)' in stdout
    points = result['operating_points']
    assert [p['cascade'] for p in points[:2]] == ['k=3', 'k=12'] and all(p['ladder'] == [3, 12] for p in points[2:])
    # pick-cascade: the most accurate point whose calibrated p90 fits (all do at 10 s), on ties the lower p90.
    best = min(points, key=lambda p: (-p['top1'], p['latency_ms_p90']))
    assert result['policies']['pick-cascade'] == [best['cascade']]
    frontier = result['policies']['elastic-cascade']
    by_name = {p['cascade']: p for p in points}
    assert [by_name[n]['latency_ms_p90'] for n in frontier] == sorted(by_name[n]['latency_ms_p90']
                                                                      for n in frontier)
    assert all(by_name[a]['top1'] < by_name[b]['top1'] for a, b in zip(frontier, frontier[1:], strict=False))
    assert min(p['latency_ms_p90'] for p in points) == by_name[frontier[0]]['latency_ms_p90']
    assert list(result['repeats'][0]['runs']) == list(serve_bench.POLICIES)
    summary = {row['policy']: row for row in result['repeats'][0]['summary']}
    for name, served in (('pick-cascade', [best['cascade']]), ('elastic-cascade', frontier)):
        calls = result['repeats'][0]['runs'][name]['calls']
        assert calls and all(0 <= c[1] < len(served) and 3 <= c[5] <= 12 and c[4] == 2 for c in calls)
        images = sum(c[4] for c in calls)
        assert summary[name]['top1'] == pytest.approx(100 * sum(c[3] for c in calls) / images, abs=1e-3)
        assert summary[name]['goodput'] == pytest.approx(
            100 * sum(c[3] for c in calls if c[2] <= budget) / images, abs=1e-3)
        on = [c for c in calls if 0.2 <= c[0] < 0.5]  # none on a busy CPU, where one call outlasts the 0.3 s load
        assert summary[name]['goodput_load'] == (pytest.approx(100 * sum(c[3] for c in on) / sum(c[4] for c in on),
                                                               abs=1e-3) if on else None)
        assert summary[name]['mean_k'] == pytest.approx(np.mean([c[5] for c in calls]), abs=1e-3)
        assert summary[name]['k'] is None and summary[name]['runner_us_per_call'] > 0
    assert 'goodput under load: elastic-cascade' in stdout and f'pick-cascade serves {best["cascade"]}' in stdout


def test_frontier_keeps_a_costlier_point_only_for_at_least_min_gain():
    # 225 calibration images: one image is 0.444 p.p. A cascade 0.3 p.p. (a fraction of an image, a mean over batch
    # draws) above k=3 is no level of its own; k=6, one whole image above (its float difference a hair under
    # 100 / 225), is.
    one_image = 100 / 225
    top1 = [100 * n / 225 for n in (200, 201, 202)]
    assert top1[1] - top1[0] < one_image
    points = [OperatingPoint(CascadeSpec((3,)), top1[0], 2., 2.),
              OperatingPoint(CascadeSpec((3, 6), 'entropy', (0.2,)), top1[0] + 0.3, 2.5, 3.),
              OperatingPoint(CascadeSpec((6,)), top1[1], 4., 4.), OperatingPoint(CascadeSpec((12,)), top1[2], 9., 9.)]
    assert [p.spec.name for p in operating_frontier(points)] == [p.spec.name for p in points]
    assert [p.spec.name for p in operating_frontier(points, min_gain=one_image)] == ['k=3', 'k=6', 'k=12']
    assert [p.spec.name for p in CascadeController(points, 10., min_gain=one_image).points] == ['k=3', 'k=6', 'k=12']
    with pytest.raises(ValueError, match=r'^min_gain must be >= 0 p.p., got -0.5$'):
        operating_frontier(points, min_gain=-0.5)


# --- the goodput objective ---------------------------------------------------------------------------------------
def _fed(controller, latencies, start: float = 0.) -> list:
    """Feed one call latency per 10 ms of clock; the level after each call."""
    return [controller.update(ms, start + 0.01 * i) for i, ms in enumerate(latencies)]


def test_goodput_objective_leaves_a_level_that_runs_over_on_one_call_in_ten():
    from hydravit.deploy.runtime import HeadController
    # Level 1 is 1 p.p. more accurate than level 0 at twice its cost; a 10 ms budget. A full window at level 1 with 2
    # calls of 20 over: the p90 rule (3 of 20) holds it. The goodput objective leaves at the first call over:
    # 91 x 18/19 = 86.2 against level 0's 90 x 19/19 (every latency halved fits), and blocks level 1.
    latencies = [9.] * 18 + [11., 11.]
    kwargs = dict(costs={0: 5., 1: 10.}, start=1, accuracy={0: 90., 1: 91.})
    assert _fed(HeadController([0, 1], 10., **kwargs), latencies) == [1] * 20
    goodput = HeadController([0, 1], 10., objective='goodput', **kwargs)
    assert _fed(goodput, latencies[:19]) == [1] * 18 + [0] and goodput._blocked_until[1] > 0.18
    # 8 p.p. more accurate, one call over in 19 is worth it (99 x 18/19 = 93.8 > 90); it stays.
    worth = HeadController([0, 1], 10., objective='goodput', **{**kwargs, 'accuracy': {0: 90., 1: 99.}})
    assert _fed(worth, latencies[:19]) == [1] * 19


def test_goodput_objective_steps_up_only_when_the_scaled_window_fits():
    from hydravit.deploy.runtime import HeadController
    kwargs = dict(costs={0: 5., 1: 10.}, start=0, accuracy={0: 90., 1: 91.}, objective='goodput')
    # At level 0, 20 calls of 4 ms scale to 8 ms at level 1: within the entry margin (9.5 ms): up after a full window.
    up = HeadController([0, 1], 10., **kwargs)
    assert _fed(up, [4.] * 20) == [0] * 19 + [1]
    # 19 calls of 4 ms and one of 4.9 (9.8 ms scaled, over the margin): 91 x 19/20 = 86.45 < 90: it stays.
    stay = HeadController([0, 1], 10., **kwargs)
    assert _fed(stay, [4.] * 19 + [4.9]) == [0] * 20


def _served(controller, latency_of_k: dict, calls: int, start: float) -> list:
    """Serve ``calls`` calls, each at the controller's k with that k's latency, one per 10 ms; the k after each."""
    return [controller.update(latency_of_k[controller.k], start + 0.01 * i) for i in range(calls)]


@pytest.mark.parametrize('objective', ['goodput', 'p90'])
def test_costs_learned_under_a_time_slicing_load_are_dropped_once_the_device_runs_as_calibrated(objective):
    from hydravit.deploy.runtime import HeadController
    # Calibrated: k=4 37 ms, k=8 95 ms (2.6x), budget 150 ms. A load that time-slices the CPU: k=8 300 ms, k=4 75
    # ms (4x). Stepping down learns k=4's cost as 95 x 75/300 = 23.75 ms, so once the load is gone k=4's 37 ms
    # scale to 148 ms at k=8, over the 142.5 ms entry margin: the goodput objective stayed at k=4 (serve-bench,
    # digits seed 1). A full window at k=4 whose median is within 10 % of its calibrated 37 ms drops what was
    # learned.
    kwargs = dict(costs={4: 37., 8: 95.}, start=8, accuracy={4: 98.2, 8: 99.1}, objective=objective)
    calibrated, loaded = {4: 37., 8: 95.}, {4: 75., 8: 300.}
    for recalibrate in (0.1, None):
        controller = HeadController([4, 8], 150., recalibrate_within=recalibrate, **kwargs)
        assert _served(controller, calibrated, 20, start=0.) == [8] * 20
        assert _served(controller, loaded, 60, start=1.)[-40:] == [4] * 40 and controller.costs[4] == 23.75
        after = _served(controller, calibrated, 40, start=3.)
        if recalibrate:  # back at k=8 once the window holds (almost) only calibrated calls; the seeds' ratio again
            assert after[:10] == [4] * 10 and 8 in after[10:20] and after[-1] == 8
            assert controller.costs[4] / controller.costs[8] == pytest.approx(37. / 95.)
        elif objective == 'goodput':  # the ratio learned under the load is kept: stuck at k=4
            assert after == [4] * 40
    # k² seeds are no latencies: nothing is dropped.
    assert HeadController([4, 8], 150., objective=objective, accuracy=kwargs['accuracy']).recalibrate_within is None


def test_goodput_objective_needs_accuracies_and_a_known_name():
    from hydravit.deploy.runtime import HeadController
    with pytest.raises(ValueError, match=r"^objective 'goodput' needs the accuracy of every level \(a profile with "
                                         r"top1\)$"):
        HeadController([3, 6], 10., objective='goodput')
    with pytest.raises(ValueError, match=r"^objective must be one of \('p90', 'goodput'\), got 'p99'$"):
        HeadController([3, 6], 10., objective='p99')


def test_latency_table_is_made_non_decreasing_in_k():
    # A noisy calibration timed k=4 under k=3 at the batch (16) and k=12's p90 under k=6's at sub-batch 2: each
    # figure is raised to the largest of the smaller k, the others are kept.
    table = {3: {2: (10., 12.), 16: (40., 50.)}, 4: {2: (11., 13.), 16: (38., 45.)},
             6: {2: (15., 30.), 16: (60., 70.)}, 12: {2: (25., 28.), 16: (150., 160.)}}
    assert serve_bench.monotone_in_k(table) == {
        3: {2: (10., 12.), 16: (40., 50.)}, 4: {2: (11., 13.), 16: (40., 50.)},
        6: {2: (15., 30.), 16: (60., 70.)}, 12: {2: (25., 30.), 16: (150., 160.)}}
