"""Deployment: Pareto and pick, the device profile, ONNX export, the ElasticRunner, serve-bench.

Pick and the runner's controller run on hand-made profiles and an injected clock; the profile, the
ONNX export and serve-bench run for real on the small ``hydravit_dyn_patch4_32``.
"""
import contextlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import hydravit  # noqa: F401  registers the models
from hydravit.deploy import ElasticRunner, export_cli, load, onnx, pick, profile, serve_bench
from hydravit.deploy import __main__ as deploy_main
from hydravit.evaluation import accuracy, macs
from hydravit.evaluation.common import create_session
from hydravit.export import export_subnetwork

SMALL = 'hydravit_dyn_patch4_32'
QUICK_BENCH = ['--num-warm-iter', '1', '--num-bench-iter', '3']


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread: timings on a shared 2-core machine stay fast and sane (no spinning OpenMP barriers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    """Weights like a trained model's: every tensor distinct (fresh init has identical LayerNorm tensors, which
    the ONNX exporter stores once)."""
    torch.manual_seed(0)
    model = timm.create_model(SMALL, num_classes=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp('ckpt') / 'model_best.pth.tar'
    torch.save({'arch': SMALL, 'state_dict': model.state_dict(), 'state_dict_ema': model.state_dict()}, path)
    return path


def expect_exit(main, argv, capsys, code: int = 2) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    return capsys.readouterr().err


# --- Pareto and pick on hand-made profiles --------------------------------------------------------------
def row(k, top1, gmacs, p90, peak, throughput):
    return {'heads': k, 'embed_dim': 16 * k, 'top1': top1, 'gmacs': gmacs, 'params_m': gmacs * 10,
            'latency_ms_median': p90 * 0.9, 'latency_ms_p90': p90, 'throughput': throughput, 'peak_mb': peak}


ROWS = [
    row(1, 50., 0.01, 1.0, 2., 1000.),
    row(2, 70., 0.02, 1.5, 3., 800.),
    row(3, 80., 0.04, 2.0, 4., 600.),
    row(4, 80., 0.06, 2.5, 5., 500.),  # as accurate as k=3, costs more: dominated
    row(5, 78., 0.09, 3.0, 6., 400.),  # less accurate than k=3/4, costs more: dominated
    row(6, 85., 0.12, 4.0, 7., 300.),
]


def write_profile(path: Path, rows) -> Path:
    path.write_text(json.dumps({'device': {'name': 'test CPU', 'type': 'cpu'}, 'rows': rows}))
    return path


def test_pareto_frontier_drops_dominated_rows():
    assert [r['heads'] for r in pick.pareto_frontier(ROWS)] == [1, 2, 3, 6]
    no_acc = [dict(r, top1=None) for r in ROWS]  # larger k counts as more accurate: nothing is dominated
    assert [r['heads'] for r in pick.pareto_frontier(no_acc)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize('bounds, expected', [
    ({}, 6),
    ({'max_latency_ms': 3.5}, 3),  # k=3 and 4 tie at 80 %: the cheaper
    ({'max_latency_ms': 2.0}, 3),  # the bound is inclusive
    ({'max_gmacs': 0.05}, 3),
    ({'max_memory_mb': 3.5}, 2),
    ({'min_throughput': 700}, 2),
    ({'min_top1': 85}, 6),
    ({'max_latency_ms': 4, 'min_throughput': 450, 'max_memory_mb': 10}, 3),
])
def test_choose_most_accurate_within_every_bound(bounds, expected):
    assert pick.choose(ROWS, bounds)['heads'] == expected


def test_choose_ties_go_to_the_cheaper_in_any_order():
    rows = [row(4, 80., 0.06, 2.5, 5., 500.), row(3, 80., 0.04, 2.0, 4., 600.), row(5, 80., 0.04, 2.1, 4., 600.)]
    assert pick.choose(rows, {})['heads'] == 3  # k=5 ties k=3 on GMACs, is slower
    assert pick.choose(rows, {'max_latency_ms': 2.05})['heads'] == 3


def test_choose_without_accuracies_takes_the_largest_k_that_fits():
    rows = [dict(r, top1=None) for r in ROWS]
    assert pick.choose(rows, {'max_latency_ms': 3.0})['heads'] == 5
    assert pick.choose(rows, {})['heads'] == 6


def test_choose_nothing_fits_names_the_best_value_of_each_bound():
    with pytest.raises(pick.NoFit) as exc:
        pick.choose(ROWS, {'max_latency_ms': 0.5, 'min_top1': 90, 'max_gmacs': 1})
    assert str(exc.value) == ('no head count meets every bound: --max-latency-ms 0.5 (best: 1 ms at k=1); '
                              '--max-gmacs 1 (best: 0.01 GMACs at k=1); --min-top1 90 (best: 85 % at k=6)')


def test_pick_command(tmp_path, capsys):
    path = write_profile(tmp_path / 'p.json', ROWS)
    result = pick.main([str(path), '--max-latency-ms', '3.5', '--json'])
    printed = json.loads(capsys.readouterr().out)
    assert printed == result and printed['chosen']['heads'] == 3
    assert [r['heads'] for r in printed['frontier']] == [1, 2, 3, 6]
    pick.main([str(path), '--max-latency-ms', '3.5'])
    lines = capsys.readouterr().out.splitlines()
    marks = {int(line[2:].split()[0]): line[0] for line in lines[2:6]}
    assert marks == {1: ' ', 2: ' ', 3: '*', 6: 'x'} and lines[-1] == 'chosen: k=3'
    err = expect_exit(pick.main, [str(path), '--max-latency-ms', '0.5', '--min-top1', '90'], capsys)
    assert err.splitlines()[-1] == ('python -m hydravit.deploy pick: error: no head count meets every bound: '
                                    '--max-latency-ms 0.5 (best: 1 ms at k=1); --min-top1 90 (best: 85 % at k=6)')
    # Through the package entry point, as `python -m hydravit.deploy pick`.
    assert deploy_main.main(['pick', str(path), '--min-top1', '85', '--json'])['chosen']['heads'] == 6
    capsys.readouterr()


def test_pick_rejects_bad_input(tmp_path, capsys):
    no_acc = write_profile(tmp_path / 'no_acc.json', [dict(r, top1=None) for r in ROWS])
    err = expect_exit(pick.main, [str(no_acc), '--min-top1', '80'], capsys)
    assert err.endswith('error: --min-top1: the profile has no top1 (profile with DATA or --accuracy)\n')
    broken = write_profile(tmp_path / 'broken.json', [{k: v for k, v in ROWS[0].items() if k != 'gmacs'}])
    err = expect_exit(pick.main, [str(broken)], capsys)
    assert err.endswith(f"error: PROFILE: {broken}: row 0 lacks ['gmacs']\n")
    mixed = write_profile(tmp_path / 'mixed.json', [ROWS[0], dict(ROWS[1], top1=None)])
    assert 'top1 is given for heads [1] only' in expect_exit(pick.main, [str(mixed)], capsys)
    assert 'no such file' in expect_exit(pick.main, [str(tmp_path / 'missing.json')], capsys)
    err = expect_exit(pick.main, [str(no_acc), '--max-gmacs', '-1'], capsys)
    assert err.endswith('error: --max-gmacs must be >= 0, got -1\n')
    err = expect_exit(pick.main, [str(no_acc), '--verify'], capsys)
    assert 'error: --verify: the profile has no usable "model" object' in err


# --- the device profile ----------------------------------------------------------------------------------
def test_profile_round_trip_and_pick(image_folder, checkpoint, tmp_path, capsys):
    out = tmp_path / 'profile.json'
    written = profile.main([str(image_folder), '--model', SMALL, '--checkpoint', str(checkpoint), '--use-ema',
                            '--heads', '2', '12', '-b', '4', '-j', '0', *QUICK_BENCH, '-o', str(out),
                            '--device', 'cpu'])
    stdout = capsys.readouterr().out
    assert '[records] accuracy' in stdout and '[3/4] peak memory k=12' in stdout  # progress
    loaded = profile.read_profile(out)
    assert loaded == written and list(loaded) == ['device', 'model', 'rows', 'batch_latency', 'cascade_records']
    device = loaded['device']
    assert device['type'] == 'cpu' and device['threads'] == 1 and device['torch'] == torch.__version__
    assert device['dtype'] == 'float32' and device['name'] and device['date'].startswith('20')
    assert loaded['model']['name'] == SMALL and loaded['model']['input_size'] == [3, 32, 32]
    rows = loaded['rows']
    assert [list(r) for r in rows] == [list(profile.PROFILE_KEYS)] * 2
    model = timm.create_model(SMALL, num_classes=2)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)['state_dict_ema'])
    validated = accuracy.main([str(image_folder), '--model', SMALL, '--checkpoint', str(checkpoint), '--use-ema',
                               '--heads', '2', '12', '-j', '0', '--device', 'cpu'])
    capsys.readouterr()
    for r, v in zip(rows, validated, strict=True):
        k = r['heads']
        assert r['embed_dim'] == 16 * k and r['top1'] == v['top1']
        assert r['gmacs'] == pytest.approx(macs.profile_heads(model, k, (3, 32, 32))['gmacs'], rel=1e-5)
        assert r['params_m'] == pytest.approx(model.subnetwork_params(k) / 1e6, rel=1e-5)
        assert 0 < r['latency_ms_median'] <= r['latency_ms_p90'] and r['throughput'] > 0 and r['peak_mb'] > 0
    assert pick.main([str(out), '--json', '--fixed-only'])['chosen']['heads'] in (2, 12)
    capsys.readouterr()
    # --verify rebuilds the profiled model and re-times the chosen k at batch 1 (a warning only goes to stderr).
    verified = pick.main([str(out), '--max-gmacs', '0.01', '--verify', '--fixed-only'])['verify']
    assert verified['heads'] == 2 and verified['latency_ms_median'] > 0
    assert verified['warning'] == (abs(verified['latency_ms_median'] / rows[0]['latency_ms_median'] - 1) > 0.15)
    assert 'verify k=2 on ' in capsys.readouterr().out


def test_profile_accuracy_file_and_bad_input(image_folder, tmp_path, capsys):
    acc = tmp_path / 'acc.csv'
    acc.write_text('heads,embed_dim,top1\n2,32,55.5\n12,192,91.25\n')
    assert profile.load_accuracy(str(acc)) == {2: 55.5, 12: 91.25}
    base = ['--model', SMALL, '--device', 'cpu', '-o', str(tmp_path / 'p.json')]
    err = expect_exit(profile.main, [*base, '--accuracy', str(acc), '--heads', '2', '5'], capsys)
    assert err.endswith(f'error: --accuracy: {acc} has no top1 for heads [5]; profile only the heads it has with '
                        '--heads 2 12\n')
    err = expect_exit(profile.main, [str(image_folder), *base, '--accuracy', str(acc)], capsys)
    assert err.endswith('error: --accuracy: give DATA or --accuracy, not both (top-1 comes from one of them)\n')
    bad = tmp_path / 'bad.csv'
    bad.write_text('heads,loss\n2,0.5\n')
    assert 'needs numeric heads and a finite top1' in expect_exit(profile.main, [*base, '--accuracy', str(bad)], capsys)
    err = expect_exit(profile.main, ['--model', SMALL, '-o', str(tmp_path / 'p.txt')], capsys)
    assert err.endswith("error: -o/--output must end in .json, got '" + str(tmp_path / 'p.txt') + "'\n")
    assert not (tmp_path / 'p.json').exists()


# --- ONNX ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def onnx_exports(image_folder, checkpoint, tmp_path_factory):
    """``scripts/export.py DATA ... --heads 1 3 12 --format onnx``: (paths, stdout)."""
    out, stdout = tmp_path_factory.mktemp('onnx'), io.StringIO()
    with contextlib.redirect_stdout(stdout):
        paths = export_cli.main([str(image_folder), '--checkpoint', str(checkpoint), '--use-ema', '--heads', '1', '3',
                                 '12', '--format', 'onnx', '-o', str(out), '-b', '4', '-j', '0'])
    assert paths == [out / 'k1.onnx', out / 'k3.onnx', out / 'k12.onnx']
    return paths, stdout.getvalue()


def test_onnx_export_parity_and_size(onnx_exports, checkpoint):
    import onnx as onnx_lib

    paths, stdout = onnx_exports
    assert stdout.count('max |onnxruntime - PyTorch|: random batch') == 3 and stdout.count('DATA batch') == 3
    assert stdout.count('batch-1 latency, median / p90: onnxruntime') == 3 and 'pytorch' in stdout
    model = timm.create_model(SMALL, num_classes=2).eval()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)['state_dict_ema'])
    x = torch.randn(3, 3, 32, 32)  # another batch size than the export's example: the batch axis is dynamic
    for k, path in zip((1, 3, 12), paths, strict=True):
        params = model.subnetwork_params(k)
        assert onnx.initializer_count(path) == pytest.approx(params, rel=0.01)  # the subnetwork, not the model
        graph = onnx_lib.load(str(path))
        assert graph.opset_import[0].version >= 17
        assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
        assert {p.key: p.value for p in graph.metadata_props}['hydravit.heads'] == str(k)
        session = onnx.onnx_session(path)
        assert onnx.max_abs_diff(session, export_subnetwork(model, k).eval(), x) <= 1e-4
        model.set_heads(k)
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(session.run(None, {'input': x.numpy()})[0] - expected).max() <= 1e-4


def test_onnx_export_failures_and_bad_flags(onnx_exports, checkpoint, tmp_path, capsys, monkeypatch):
    base = ['--checkpoint', str(checkpoint), '--format', 'onnx']
    err = expect_exit(export_cli.main, [*base, '--heads', '3', '6', '-o', str(tmp_path / 'm.onnx')], capsys)
    assert err.endswith('error: --output: a .onnx file holds one head count; give a folder for --heads 3 6\n')
    err = expect_exit(export_cli.main, [*base, '--heads', '3', '--opset', '16', '-o', str(tmp_path / 'o')], capsys)
    assert err.endswith('error: --opset must be >= 17, got 16\n')
    err = expect_exit(export_cli.main, [str(tmp_path), '--checkpoint', str(checkpoint), '-o', str(tmp_path / 't')],
                      capsys)
    assert err.endswith('error: DATA: only --format onnx uses DATA (its parity check on real images)\n')
    monkeypatch.setattr(onnx, 'TOLERANCE', -1.)  # no difference passes: the check must fail the command
    # The export itself is tested above; reuse its k=1 file instead of exporting again.
    monkeypatch.setattr(onnx, 'export_onnx', lambda model, k, path, *args: shutil.copy(onnx_exports[0][0], path))
    target = tmp_path / 'k1.onnx'
    with pytest.raises(SystemExit) as exc:
        export_cli.main([*base, '--heads', '1', '-o', str(target), '-b', '2'])
    assert str(exc.value).startswith('export: k=1: max |diff| ') and str(exc.value).endswith(f'({target} removed)')
    assert not target.exists()
    capsys.readouterr()


# --- the ElasticRunner on an injected clock ---------------------------------------------------------------
COST = {k: 1 + 0.3 * k + 0.05 * k * k for k in range(1, 13)}  # ms per call at k without load
PROFILE = [{'heads': k, 'latency_ms_median': c, 'latency_ms_p90': c * 1.02} for k, c in COST.items()]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.

    def __call__(self) -> float:
        return self.now


class FakeModel:
    """Has set_heads and num_heads; a call advances the clock by ``latency(k, now)`` ms."""

    num_heads = 12
    trained_heads = list(range(1, 13))

    def __init__(self, clock: FakeClock, latency) -> None:
        self.clock, self.latency, self.k = clock, latency, None

    def set_heads(self, k: int) -> None:
        self.k = k

    def __call__(self, x):
        self.clock.now += self.latency(self.k, self.clock.now) / 1e3
        return self.k


def serve(latency, seconds: float, budget_ms: float, **kwargs) -> ElasticRunner:
    clock = FakeClock()
    model = FakeModel(clock, latency)
    runner = ElasticRunner(model, budget_ms, clock=clock, **kwargs)
    while clock.now < seconds:
        assert runner(None) == model.k  # the call ran at the k the model was set to
    return runner


def noisy(load, spread: float = 0.02, seed: int = 0):
    rng = random.Random(seed)
    return lambda k, t: COST[k] * load(t) * rng.uniform(1 - spread, 1 + spread)


def test_runner_steps_down_under_load_and_back_up_after():
    runner = serve(noisy(lambda t: 1.8 if 3 <= t < 8 else 1.), 11, budget_ms=10., profile=PROFILE)
    history = list(runner.history)
    assert history[0][1] == 10  # the profile's largest k whose p90 leaves the 5 % entry margin (9.18 ms)
    assert all(isinstance(t, float) and k in range(1, 13) and ms > 0 for t, k, ms in history)
    assert {k for t, k, _ in history if t < 3} == {10}
    under_load = [(k, ms) for t, k, ms in history if 3 <= t < 8]
    assert np.mean([ms <= 10. for _, ms in under_load]) >= 0.98
    # 1.8 x 4.6 ms fits, 1.8 x 5.55 does not: k=6, with at most a few one-call tries of k=7 spaced by a doubling
    # back-off.
    settled = [k for t, k, _ in history if 3.2 <= t < 8]
    tries = [t for (t, a, _), (_, b, _) in zip(history, history[1:], strict=False) if (a, b) == (6, 7)]
    assert 6 in settled and set(settled) <= {6, 7} and settled.count(7) < 0.03 * len(settled) and len(tries) <= 4
    assert all(later - earlier > 0.4 for earlier, later in zip(tries, tries[1:], strict=False))
    back = next(t for t, k, _ in history if t >= 8 and k == 10)
    assert back - 8 < 0.5 and {k for t, k, _ in history if t >= back} == {10}
    assert runner.active_heads == 10


def test_runner_does_not_oscillate_at_a_steady_load_near_the_budget():
    # k=10 runs at 9.0 ms +- 3 % against a 9.3 ms budget: it fits, but not with the margin a step up needs.
    runner = serve(noisy(lambda t: 1., spread=0.03), 30, budget_ms=9.3, profile=PROFILE)
    assert {k for _, k, _ in runner.history} == {9}
    # Without a profile (costs ~ k^2) it starts at 12, steps down once to a k that fits and stays there.
    runner = serve(noisy(lambda t: 1., spread=0.03), 30, budget_ms=8.9)
    ks = [k for _, k, _ in runner.history]
    switches = [(a, b) for a, b in zip(ks, ks[1:], strict=False) if a != b]
    assert ks[0] == 12 and switches == [(12, 9)]
    assert np.mean([ms <= 8.9 for _, _, ms in runner.history]) > 0.99


def test_runner_never_leaves_its_heads():
    runner = serve(noisy(lambda t: 10. if t >= 1 else 1.), 4, budget_ms=10., heads=[3, 6, 9], profile=PROFILE)
    ks = [k for _, k, _ in runner.history]
    assert set(ks) == {3, 9} and ks[-1] == 3  # under a load no k holds, the smallest; 6 was skipped on the way
    assert runner.heads == [3, 6, 9]


def test_runner_learns_costs_and_climbs_back_after_a_load():
    # No profile: k^2 seeds the costs, but this model's latency grows linearly in k (k^2 puts k=9 at 2.25x k=6,
    # the model at 1.4x). The runner holds k=9 (8.2 ms; k=10 at 9.0 ms lacks the 5 % entry margin), drops under a
    # 2x load and, having measured k=9 before the load, is back there soon after the load ends.
    cost = {k: 1 + 0.8 * k for k in range(1, 13)}
    rng = random.Random(0)
    runner = serve(lambda k, t: cost[k] * (2. if 5 <= t < 10 else 1.) * rng.uniform(0.98, 1.02), 16,
                   budget_ms=9., heads=list(range(3, 13)))
    history = list(runner.history)
    assert {k for t, k, _ in history if 1 <= t < 5} == {9}
    assert {k for t, k, _ in history if 5.5 <= t < 10} <= {3, 4}  # 2 x 4.2 ms fits, 2 x 5.0 does not
    back = next(t for t, k, _ in history if t >= 10 and k == 9)
    assert back - 10 < 0.5 and {k for t, k, _ in history if t >= back} == {9}
    learned = runner.controller.costs
    assert learned[9] == pytest.approx(cost[9], rel=0.03) and learned[4] == pytest.approx(cost[4], rel=0.03)


def test_runner_accuracy_floor():
    top1 = {3: 80., 4: 88., 5: 91., 6: 90.5, 7: 93., 8: 94.}
    rows = [{**p, 'top1': top1[p['heads']]} for p in PROFILE if p['heads'] in top1]
    model = FakeModel(FakeClock(), lambda k, t: COST[k])
    model.trained_heads = None  # then the profile's head counts are the served set
    runner = ElasticRunner(model, 6., profile=rows, min_top1=90.)
    assert runner.heads == [5, 6, 7, 8] and runner.dropped == [3, 4]
    assert runner.active_heads == 7  # the most accurate k whose p90 (5.02 ms) is within the 5 % margin
    # Among the k that fit, the more accurate: with k=6 at 90.5 % and k=5 at 91 %, the start at 5.5 ms is k=5.
    assert ElasticRunner(model, 5.5, profile=rows, heads=[5, 6]).active_heads == 5
    with pytest.raises(ValueError, match=r'min_top1 needs a profile with top1 for every k'):
        ElasticRunner(model, 6., profile=PROFILE, min_top1=90.)
    with pytest.raises(ValueError, match=r'min_top1 95: no head count reaches it \(best: 94 % at k=8\)'):
        ElasticRunner(model, 6., profile=rows, min_top1=95.)
    with pytest.raises(ValueError, match=r'heads: the model records no trained head counts and no profile'):
        ElasticRunner(timm.create_model(SMALL, num_classes=5), 10.)


def test_runner_under_a_forced_slowdown_stays_at_the_floor():
    top1 = {k: 50. + 4 * k for k in range(1, 13)}
    rows = [{**p, 'top1': top1[p['heads']]} for p in PROFILE]
    # From t = 1 s every call takes 20x: nothing fits a 10 ms budget; the floor (80 %) leaves k >= 8.
    runner = serve(noisy(lambda t: 20. if t >= 1 else 1.), 6, budget_ms=10., profile=rows, min_top1=80.)
    ks = [k for _, k, _ in runner.history]
    assert set(ks) <= set(range(8, 13)) and runner.heads == [8, 9, 10, 11, 12]
    assert {k for t, k, _ in runner.history if t >= 2} == {8}  # the smallest allowed k, over budget, not below
    assert all(ms > 10. for t, _, ms in runner.history if t >= 2)


def test_runner_on_a_real_model_and_bad_arguments():
    model = timm.create_model(SMALL, num_classes=5).eval()
    runner = ElasticRunner(model, 1e4, heads=[3, 12])
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(runner(x), model(x)) and model.active_heads == 12
        runner.controller.k = 3  # what a step down does: the next call switches with set_heads
        out = runner(x)
        assert model.active_heads == 3 and torch.allclose(out, export_subnetwork(model, 3).eval()(x), atol=1e-5)
    assert [k for _, k, _ in runner.history] == [12, 3]
    with pytest.raises(TypeError, match='set_heads'):
        ElasticRunner(torch.nn.Linear(2, 2), 10.)
    with pytest.raises(ValueError, match=r'heads: head counts must be ints in 1..12, got \[13\]'):
        ElasticRunner(model, 10., heads=[3, 13])
    with pytest.raises(ValueError, match='latency budget must be > 0 ms'):
        ElasticRunner(model, 0., heads=[3])
    with pytest.raises(ValueError, match=r'profile has no latency for heads \[5\]'):
        ElasticRunner(model, 10., heads=[3, 5], profile=PROFILE[2:3])


# --- the background load and serve-bench ------------------------------------------------------------------
def load_children() -> set:
    """Our child processes that run the busy loop."""
    pids = set()
    for status in Path('/proc').glob('[0-9]*/status'):
        try:
            fields = dict(line.split(':\t', 1) for line in status.read_text().splitlines() if ':\t' in line)
            cmdline = (status.parent / 'cmdline').read_bytes()
        except (OSError, ValueError):
            continue
        if fields.get('PPid', '').strip() == str(os.getpid()) and b'getppid' in cmdline:
            pids.add(int(status.parent.name))
    return pids


def test_load_schedule_parsing_and_stop_on_interrupt():
    schedule = load.parse_schedule(['off:1', 'on:1.5', 'off:0.5'])
    assert [load.load_on(schedule, t) for t in (0, 0.99, 1, 2.49, 2.5, 3, 99)] == [
        False, False, True, True, False, False, False]
    assert load.load_windows(schedule) == [(1., 2.5)] and load.total_seconds(schedule) == 3.
    with pytest.raises(ValueError, match=r"each item is on:SECONDS or off:SECONDS with SECONDS > 0, got 'on:x'"):
        load.parse_schedule(['on:x'])
    with pytest.raises(KeyboardInterrupt):
        with load.CpuLoad(schedule, procs=2) as cpu_load:
            assert cpu_load.update(1.2) and len(load_children()) == 2
            raise KeyboardInterrupt  # Ctrl-C in the middle of a run
    assert load_children() == set()
    for pid in cpu_load.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope='module')
def trained_checkpoint(checkpoint, tmp_path_factory) -> Path:
    """The module's weights with the head set a training run records (as hydravit.train writes it)."""
    state = torch.load(checkpoint, weights_only=True)
    path = tmp_path_factory.mktemp('trained') / 'last.pth.tar'
    torch.save({**state, 'heads': [12, 3], 'class_names': ['cat', 'dog']}, path)
    return path


def hand_count(calls, budget_ms: float) -> tuple:
    """(top-1 %, goodput %) of recorded calls [t, k, ms, correct, images], counted here."""
    images = sum(c[4] for c in calls)
    return (100 * sum(c[3] for c in calls) / images,
            100 * sum(c[3] for c in calls if c[2] <= budget_ms) / images)


def test_serve_bench_three_policies_on_labelled_images(image_folder, trained_checkpoint, tmp_path, capsys):
    out, budget = tmp_path / 'sb', 1e4
    result = serve_bench.main([str(image_folder), '--checkpoint', str(trained_checkpoint), '-b', '2',
                               '--budget-ms', str(budget), '--repeats', '2', '--load-schedule', 'off:0.3', 'on:0.6',
                               'off:0.3', '--load-procs', '1', '--calibration-time', '0.05', '--log-every', '0.4',
                               '-o', str(out), '--device', 'cpu', '-j', '0'])
    stdout = capsys.readouterr().out
    assert load_children() == set()
    assert (out / 'serve_bench.png').read_bytes()[:4] == b'\x89PNG'
    assert json.loads((out / 'serve_bench.json').read_text())['summary'] == result['summary']
    assert result['settings']['heads'] == [3, 12]  # the checkpoint's trained set, not 1..12
    calibration = {row['heads']: row for row in result['calibration']}
    assert list(calibration) == [3, 12]
    best = max(calibration.values(), key=lambda row: (row['top1'], -row['latency_ms_p90']))['heads']
    fixed = {name: result['policies'][name] for name in ('pick', 'largest', 'elastic')}
    assert fixed == {'pick': [best], 'largest': [12], 'elastic': [3, 12]}
    policies = list(serve_bench.POLICIES)  # the two cascade policies: tests/test_cascade_runtime.py
    assert [rep['order'] for rep in result['repeats']] == [policies, policies[1:] + policies[:1]]
    for rep in result['repeats']:
        summary = {row['policy']: row for row in rep['summary']}
        for name, run in rep['runs'].items():
            calls = run['calls']
            assert {c[1] for c in calls} <= set(run['heads']) and summary[name]['outside_heads'] == 0
            assert summary[name]['calls'] == len(calls) and summary[name]['images'] == 2 * len(calls)
            top1, goodput = hand_count(calls, budget)
            assert summary[name]['top1'] == pytest.approx(top1, abs=1e-3)
            assert summary[name]['goodput'] == pytest.approx(goodput, abs=1e-3)
            on = [c for c in calls if 0.3 <= c[0] < 0.9]
            assert summary[name]['goodput_load'] == pytest.approx(hand_count(on, budget)[1], abs=1e-3)
        # 4 of the 8 images are served (2 batches), the other 4 calibrate: a fixed k answers each batch alike
        # every time it comes round.
        correct = [c[3] for c in rep['runs']['largest']['calls']]
        assert len(correct) >= 4 and correct == (correct[:2] * len(correct))[:len(correct)]
    rows = {row['policy']: row for row in result['summary']}
    for name in serve_bench.POLICIES:
        values = [row['goodput'] for rep in result['repeats'] for row in rep['summary'] if row['policy'] == name]
        assert rows[name]['repeats'] == 2 and rows[name]['goodput'] == pytest.approx(np.mean(values), abs=1e-3)
        assert rows[name]['goodput_std'] == pytest.approx(np.std(values, ddof=1), abs=1e-3)
    assert rows['largest']['k'] == 12 and rows['elastic']['k'] is None and rows['elastic']['runner_us_per_call'] > 0
    assert '[elastic 2/2]' in stdout and 'goodput under load: elastic' in stdout
    assert 'calls at a k outside the served set: 0 (target 0: met)' in stdout


def test_serve_bench_recovery_is_back_at_the_k_held_before_the_load():
    schedule = load.parse_schedule(['off:1', 'on:1', 'off:1', 'on:1', 'off:1'])
    calls = [(0.1, 7, 1., 1, 1), (0.2, 6, 1., 1, 1), (0.5, 6, 1., 1, 1), (1.2, 4, 1., 1, 1), (2.1, 5, 1., 1, 1),
             (2.4, 6, 1., 1, 1), (2.6, 5, 1., 1, 1), (3.5, 3, 1., 1, 1), (4.3, 6, 1., 0, 1)]
    # After the first load: back at 6 (held by most calls before it) 0.4 s after its end; after the second: at 5
    # (held most from 2 s to 3 s) 0.3 s after.
    row = serve_bench.summarize('elastic', calls, 10., schedule, 5., [3, 4, 5, 6, 7])
    assert row['recovery_s'] == pytest.approx(0.4) and row['goodput'] == pytest.approx(100 * 8 / 9)
    assert serve_bench.summarize('elastic', calls[:-1], 10., schedule, 5., [3, 4, 5, 6, 7])['recovery_s'] is None
    assert serve_bench.summarize('pick', calls, 10., schedule, 5., [6])['outside_heads'] == 5


def test_serve_bench_floor_and_bad_arguments(image_folder, checkpoint, trained_checkpoint, capsys):
    base = [str(image_folder), '--checkpoint', str(trained_checkpoint), '-b', '2', '--device', 'cpu', '-j', '0',
            '--calibration-time', '0.05', '--load-procs', '0', '--duration', '0.1']
    err = expect_exit(serve_bench.main, [*base, '--budget-ms', '1e4', '--min-top1', '100.5'], capsys)
    assert err.endswith('error: --min-top1 is a top-1 in %, 0..100, got 100.5\n')
    # The floor is judged on the calibration half (the images serve-bench fits on, disjoint from those it serves).
    session = create_session(serve_bench.create_serve_bench_parser().parse_args([*base, '--budget-ms', '1']),
                             trained_only=True)
    _, fit = serve_bench.replay_batches(session)
    top1 = {r['heads']: r['top1'] for r in accuracy.evaluate_heads(session.model, fit, [3, 12], session.device)}
    capsys.readouterr()
    floor = max(top1.values()) + 1e-3
    if floor <= 100:
        err = expect_exit(serve_bench.main, [*base, '--budget-ms', '1e4', '--min-top1', str(floor)], capsys)
        assert 'error: --budget-ms / --min-top1: no head count meets every bound' in err
    err = expect_exit(serve_bench.main, [*base, '--budget-ms', '1e-6'], capsys)
    assert 'error: --budget-ms / --min-top1: no head count meets every bound: --max-latency-ms 1e-06' in err
    err = expect_exit(serve_bench.main, [str(image_folder), '--checkpoint', str(checkpoint), '--budget-ms', '5',
                                         '--device', 'cpu'], capsys)
    assert err.endswith(f'error: --heads: {checkpoint} records no trained head counts (neither heads nor '
                        'args.heads); pass --heads with the k it was trained on\n')
    err = expect_exit(serve_bench.main, [*base, '--budget-ms', '5', '-b', '9'], capsys)
    assert err.endswith('error: -b/--batch-size 9: DATA has only 8 images, 4 of them served (the other half '
                        'calibrates)\n')
    err = expect_exit(serve_bench.main, ['--model', SMALL, '--budget-ms', '5'], capsys)
    assert err.endswith('error: DATA (or --data-dir) is required\n')
    err = expect_exit(serve_bench.main, [*base, '--budget-ms', '0'], capsys)
    assert err.endswith('error: --budget-ms must be > 0, got 0\n')
    err = expect_exit(serve_bench.main, [*base, '--budget-ms', '5', '--repeats', '0'], capsys)
    assert err.endswith('error: --repeats must be >= 1, got 0\n')
    err = expect_exit(serve_bench.main, [*base, '--budget-ms', '5', '--load-schedule', 'on:5', 'up:3'], capsys)
    assert err.endswith("error: --load-schedule: each item is on:SECONDS or off:SECONDS with SECONDS > 0, got 'up:3'\n")


def test_deploy_tools_default_to_the_trained_head_set(image_folder, trained_checkpoint, tmp_path, capsys):
    out = tmp_path / 'p.json'
    written = profile.main([str(image_folder), '--checkpoint', str(trained_checkpoint), '-b', '2', '-j', '0',
                            *QUICK_BENCH, '-o', str(out), '--device', 'cpu'])
    assert [r['heads'] for r in written['rows']] == [3, 12] and written['model']['trained_heads'] == [3, 12]
    capsys.readouterr()
    args = profile.create_profile_parser().parse_args(['--checkpoint', str(trained_checkpoint), '--heads', '2', '3'])
    assert create_session(args, trained_only=True).heads == [2, 3]
    assert capsys.readouterr().err.startswith(f'warning: --heads 2: not among the head counts {trained_checkpoint} '
                                              'was trained on (3 12)')
    # Random weights: no width is trained, every k is measured (costs only).
    args = profile.create_profile_parser().parse_args(['--model', SMALL, '--device', 'cpu'])
    assert create_session(args, trained_only=True).heads == list(range(1, 13))
    # A model loaded from the checkpoint knows its trained set; the runner serves that set by default.
    args = profile.create_profile_parser().parse_args(['--checkpoint', str(trained_checkpoint), '--device', 'cpu'])
    model = create_session(args).model
    assert model.trained_heads == [3, 12] and ElasticRunner(model, 1e4).heads == [3, 12]
