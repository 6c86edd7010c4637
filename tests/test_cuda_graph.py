"""CUDA graphs for serving (``hydravit.evaluation.cuda_graph``) and the serving flags, on the CPU.

The capture/replay mechanism is injected: ``FakeGraphs`` does what a CUDA graph does with its buffers (a replay reads
the static input buffer captured for its key and overwrites that key's static output), so which graph answers which
call, the buffers and the refusals are checked here; the CUDA path itself runs in scripts/gpu_check.sh
(scripts/check_cuda_graph.py).
"""
import argparse
import functools

import pytest
import timm
import torch

import hydravit  # noqa: F401  registers the models
from hydravit.deploy import ElasticRunner, pick, profile, serve_bench
from hydravit.evaluation import cuda_graph, throughput
from hydravit.evaluation.common import EvalSession
from hydravit.evaluation.cuda_graph import GraphCache, heads_forward

SMALL = 'hydravit_dyn_patch4_32'


class FakeGraphs:
    """A ``GraphBackend`` for the CPU: capture warms ``fn`` up, runs it once and keeps it; a replay reruns it into the
    captured output buffer. Records what happened."""

    def __init__(self) -> None:
        self.warmups = 0
        self.captured = []  # static outputs, in capture order
        self.replays = 0
        self.autocast_cache_at_capture = []

    def capture(self, fn, warmup):
        for _ in range(warmup):
            fn()
            self.warmups += 1
        self.autocast_cache_at_capture.append(torch.is_autocast_cache_enabled())
        out = fn()
        self.captured.append(out)

        def replay():
            self.replays += 1
            out.copy_(fn())
        return replay, out


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model(SMALL, num_classes=5).eval()


def eager(model, k, x):
    model.set_heads(k)
    with torch.inference_mode():
        return model(x)


def test_one_graph_per_key_replayed_in_any_order(model):
    fake = FakeGraphs()
    cache = GraphCache(heads_forward(model), torch.device('cpu'), warmup=2, backend=fake)
    for k in (3, 12, 6, 3, 12, 6, 6):
        x = torch.randn(2, 3, 32, 32)
        out = cache(k, x)
        assert out.shape == (2, 5) and torch.equal(out, eager(model, k, x)), k
    assert cache.keys() == [3, 12, 6] and len(fake.captured) == 3  # captured once per key, at first use
    assert fake.warmups == 6 and fake.replays == 7
    assert cache.signature_of(6) == ((2, 3, 32, 32), torch.float32, torch.device('cpu'))
    cache.release(12)
    assert 12 not in cache and len(cache) == 2
    cache.clear()
    assert len(cache) == 0


def test_capture_ahead_reads_a_copy_of_the_example(model):
    fake = FakeGraphs()
    cache = GraphCache(heads_forward(model), torch.device('cpu'), backend=fake)
    example = torch.randn(1, 3, 32, 32)
    cache.capture(3, example)
    example.zero_()  # the graph's input buffer is its own: the caller's tensor is free to change
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(cache(3, x), eager(model, 3, x)) and len(fake.captured) == 1


def test_output_is_a_clone_unless_asked(model):
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    cache = GraphCache(heads_forward(model), torch.device('cpu'), backend=FakeGraphs())
    first = cache(3, x)
    second = cache(3, y)
    assert torch.equal(first, eager(model, 3, x)) and torch.equal(second, eager(model, 3, y))  # not overwritten
    first.add_(1)
    assert torch.equal(cache(3, y), second)
    reuse = GraphCache(heads_forward(model), torch.device('cpu'), clone_output=False, backend=FakeGraphs())
    first = reuse(3, x)
    assert reuse(3, y) is first and torch.equal(first, eager(model, 3, y))  # the static output, overwritten


@pytest.mark.parametrize('batch, message', [
    (torch.randn(1, 3, 32, 32), r'got shape \(1, 3, 32, 32\), float32 on cpu'),
    (torch.randn(2, 3, 32, 32, dtype=torch.float64), r'got shape \(2, 3, 32, 32\), float64 on cpu'),
    (torch.randn(2, 3, 32, 32, device='meta'), r'got shape \(2, 3, 32, 32\), float32 on meta'),
    ('image', 'got str'),
])
def test_a_batch_unlike_the_captured_one_is_refused(model, batch, message):
    cache = GraphCache(heads_forward(model), torch.device('cpu'), backend=FakeGraphs())
    x = torch.randn(2, 3, 32, 32)
    cache.capture(6, x)
    captured = r"the CUDA graph of 6 was captured for shape \(2, 3, 32, 32\), float32 on cpu; "
    with pytest.raises(ValueError, match=captured + message):
        cache(6, batch)
    assert torch.equal(cache(6, x), eager(model, 6, x))  # still usable


def test_capture_runs_without_the_autocast_cache_and_restores_it(model):
    fake = FakeGraphs()
    cache = GraphCache(heads_forward(model), torch.device('cpu'), backend=fake)
    assert torch.is_autocast_cache_enabled()
    cache.capture(3, torch.randn(1, 3, 32, 32))
    assert fake.autocast_cache_at_capture == [False] and torch.is_autocast_cache_enabled()


def test_bad_construction(model):
    with pytest.raises(ValueError, match='CUDA graphs need a CUDA device, got cpu'):
        GraphCache(heads_forward(model), torch.device('cpu'))
    with pytest.raises(ValueError, match='warmup must be >= 1'):
        GraphCache(heads_forward(model), torch.device('cpu'), warmup=0, backend=FakeGraphs())
    with pytest.raises(ValueError, match='CUDA graphs need a CUDA device, got cpu'):
        cuda_graph.CudaGraphBackend(torch.device('cpu'))
    cache = GraphCache(lambda k, x: (x, x), torch.device('cpu'), backend=FakeGraphs())
    with pytest.raises(TypeError, match='the captured forward must return one tensor, got tuple'):
        cache.capture(1, torch.randn(1))


# --- the ElasticRunner on graphs -------------------------------------------------------------------------------
def test_runner_captures_every_k_at_construction_and_switches_between_graphs(model):
    fake = FakeGraphs()
    x = torch.randn(2, 3, 32, 32)
    runner = ElasticRunner(model, 1e4, heads=[3, 6, 12], cuda_graph=True, example_input=x, graph_backend=fake)
    assert len(fake.captured) == 3 and runner.graphs.keys() == [3, 6, 12]  # before any call
    assert runner.active_heads == 12 and model.active_heads == 12
    for k in (12, 3, 6, 3):
        runner.controller.k = k  # what a step down / up does
        y = torch.randn(2, 3, 32, 32)
        with torch.inference_mode():
            out = runner(y)
        assert torch.equal(out, eager(model, k, y)), k
    assert len(fake.captured) == 3 and fake.replays == 4  # no call captured anything
    assert [k for _, k, _ in runner.history] == [12, 3, 6, 3]
    with pytest.raises(ValueError, match=r'captured for shape \(2, 3, 32, 32\)'):
        runner(torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match='takes one input tensor per call'):
        runner(x, x)


def test_runner_forward_is_what_is_captured(model):
    calls = []

    def forward(x):
        calls.append(model.active_heads)
        return model(x) * 2

    fake = FakeGraphs()
    x = torch.randn(1, 3, 32, 32)
    runner = ElasticRunner(model, 1e4, heads=[3, 12], forward=forward, cuda_graph=True, example_input=x,
                           graph_backend=fake)
    assert set(calls) == {3, 12}  # warm-up and capture ran at each k
    runner.controller.k = 3
    assert torch.equal(runner(x), 2 * eager(model, 3, x))
    plain = ElasticRunner(model, 1e4, heads=[3, 12], forward=forward)  # without graphs: the forward per call
    calls.clear()
    assert torch.equal(plain(x), 2 * eager(model, 12, x)) and calls == [12]


def test_runner_graph_arguments_are_checked(model):
    with pytest.raises(ValueError, match='cuda_graph needs example_input'):
        ElasticRunner(model, 10., cuda_graph=True)
    with pytest.raises(ValueError, match='CUDA graphs need a CUDA device, got cpu'):
        ElasticRunner(model, 10., heads=[3], cuda_graph=True, example_input=torch.randn(1, 3, 32, 32))


# --- the throughput benchmark on graphs ---------------------------------------------------------------------------
def test_throughput_times_replays_of_graphs_captured_before_timing(model, monkeypatch):
    fake = FakeGraphs()
    monkeypatch.setattr(throughput, 'GraphCache', functools.partial(GraphCache, backend=fake))
    args = argparse.Namespace(cuda_graph=True, amp=False, exported=False, compile=False, num_warm_iter=2,
                              num_bench_iter=3, bench_time=None)
    session = EvalSession(args, model, [3, 12], torch.device('cpu'), {'input_size': (3, 32, 32)})
    batch = torch.randn(4, 3, 32, 32)
    for k in (3, 12):
        row = throughput.benchmark_heads(session, k, batch)
        assert row['heads'] == k and row['batch_size'] == 4 and row['throughput'] > 0
    # per k: batch 1 and batch 4 captured first, then (2 warm-up + 3 timed) replays of each
    assert [tuple(out.shape) for out in fake.captured] == [(1, 5), (4, 5)] * 2
    assert fake.replays == 2 * 2 * (2 + 3)


# --- flags ----------------------------------------------------------------------------------------------------------
def one_error_line(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if 'error:' in line]
    assert exc.value.code == 2 and len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


@pytest.mark.parametrize('main, extra', [
    (throughput.main, []), (profile.main, ['-o', 'never.json']), (serve_bench.main, ['--budget-ms', '5']),
], ids=['validate_throughput', 'profile', 'serve-bench'])
def test_cuda_graph_flag_on_cpu_is_one_error_line(main, extra, capsys):
    line = one_error_line(main, ['--model', SMALL, '--cuda-graph', '--device', 'cpu', *extra], capsys)
    assert line.endswith('error: --cuda-graph: CUDA graphs need a CUDA device, got cpu')
    if not torch.cuda.is_available():
        line = one_error_line(main, ['--model', SMALL, '--cuda-graph', *extra], capsys)
        assert line.endswith('error: --cuda-graph: CUDA graphs need a CUDA device, got cpu (no GPU is available)')


def test_cuda_graph_flag_conflicts(capsys, tmp_path):
    line = one_error_line(throughput.main, ['--model', SMALL, '--cuda-graph', '--compile', '--device', 'cpu'], capsys)
    assert 'error: --cuda-graph: cannot be combined with --compile' in line
    line = one_error_line(throughput.main, ['--model', SMALL, '--model-dtype', 'float16', '--amp'], capsys)
    assert 'error: --model-dtype: float16 cannot be combined with --amp' in line
    prof = tmp_path / 'p.json'
    rows = [{'heads': k, 'embed_dim': 16 * k, 'top1': None, 'gmacs': k, 'params_m': 1., 'latency_ms_median': k,
             'latency_ms_p90': k, 'throughput': 1., 'peak_mb': 1.} for k in (3, 12)]
    profile.write_profile({'device': {'type': 'cpu', 'dtype': 'float32'}, 'rows': rows}, prof)
    line = one_error_line(pick.main, [str(prof), '--cuda-graph'], capsys)
    assert line.endswith('error: --cuda-graph: only with --verify (pick itself measures nothing)')


def test_throughput_model_dtype_casts_model_and_inputs(capsys):
    rows = throughput.main(['--model', SMALL, '--device', 'cpu', '--heads', '3', '-b', '2', '--model-dtype',
                            'bfloat16', '--num-warm-iter', '1', '--num-bench-iter', '2'])
    assert [(r['heads'], r['dtype']) for r in rows] == [(3, 'bfloat16')]
    assert 'model dtype bfloat16' in capsys.readouterr().out


def test_profile_records_how_it_measured_and_verify_follows(tmp_path, capsys):
    out = tmp_path / 'profile.json'
    result = profile.main(['--model', SMALL, '--device', 'cpu', '--heads', '3', '12', '-b', '2', '--model-dtype',
                           'bfloat16', '--num-warm-iter', '1', '--num-bench-iter', '2', '-o', str(out)])
    info = result['model']
    assert (info['model_dtype'], info['amp_dtype'], info['cuda_graph']) == ('bfloat16', None, False)
    assert result['device']['dtype'] == 'bfloat16' and all(r['peak_mb'] > 0 for r in result['rows'])
    saved = profile.read_profile(out)
    assert pick.verify_settings(saved) == {'model_dtype': 'bfloat16', 'amp_dtype': None, 'cuda_graph': False}
    args = pick.create_pick_parser().parse_args([str(out), '--verify', '--model-dtype', 'float32'])
    assert pick.verify_settings(saved, args) == {'model_dtype': 'float32', 'amp_dtype': None, 'cuda_graph': False}
    legacy = {'device': {'dtype': 'bfloat16'}, 'model': {}}  # written before the settings were recorded: --amp
    assert pick.verify_settings(legacy) == {'model_dtype': 'float32', 'amp_dtype': 'bfloat16', 'cuda_graph': False}
    verified = pick.main([str(out), '--verify', '--device', 'cpu'])['verify']
    assert verified['heads'] == 12 and verified['latency_ms_median'] > 0
    capsys.readouterr()
