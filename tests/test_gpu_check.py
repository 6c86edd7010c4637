"""scripts/gpu_check.sh on the CPU: the dry run of the plan, failures reported in the table and the exit status;
and the flags of scripts/bench_slicing.py that the plan relies on.

The full dry run (every step, about 4 minutes of CPU) is too slow for the suite; here it runs a training step with
torch.compile, fp16 + GradScaler, channels-last, sandwich + in-place KD through distributed_train.sh, and validate.py
on its checkpoint, and the compiled bench_slicing step. Steps are selected with --steps, the same code path as the
full plan.
"""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import ROOT, load

SCRIPT = ROOT / 'scripts' / 'gpu_check.sh'


def bench_slicing():
    spec = importlib.util.spec_from_file_location('bench_slicing', ROOT / 'scripts' / 'bench_slicing.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    # no GPU, even on a machine that has one: these tests check the plan, not CUDA
    full_env = {k: v for k, v in os.environ.items() if k != 'NPROC'}
    full_env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1', **env)
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def table(out: Path) -> dict:
    """summary.md as {step: (status, detail)}."""
    rows = {}
    for line in (out / 'summary.md').read_text().splitlines()[2:]:
        cells = [c.strip() for c in line.strip('|').split('|')]
        rows[cells[0]] = (cells[1], cells[3])
    return rows


def test_dry_run_trains_compiled_and_validates(tmp_path):
    out = tmp_path / 'check'
    proc = gpu_check('--dry-run', '--out', str(out), '--steps', 'train-base-fp16-compile,validate')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table(out)
    assert list(rows) == ['env', 'data', 'nccl-ddp', 'train-base-fp16-compile', 'validate']
    assert [status for status, _ in rows.values()] == ['ok', 'ok', 'SKIP', 'ok', 'ok']
    assert rows['nccl-ddp'][1] == '1 training process (NPROC=1, dry run): DDP over nccl needs 2 GPUs'
    assert proc.stdout.rstrip().endswith(f'5 of 5 steps ok or skipped, 0 failed; everything is in {out}')
    assert 'train-base-fp16-compile: started' in proc.stdout and 'train-base-fp16-compile: ok in' in proc.stdout

    log = (out / 'logs' / 'train-base-fp16-compile.log').read_text()
    assert 'AMP: torch.autocast(cpu, float16), GradScaler: True' in log
    assert 'torch.compile: first step at k=12,3 took' in log and '2 subnetwork(s) per step (sandwich)' in log
    ckpt = load(out / 'train' / 'base-fp16-compile' / 'last.pth.tar')
    assert ckpt['sampler']['counts'] == [2, 2] and 'amp_scaler' in ckpt
    with open(out / 'results' / 'validate.csv') as f:
        assert [int(row['heads']) for row in csv.DictReader(f)] == [3, 6, 12]


def test_failed_steps_are_reported_and_the_rest_still_runs(tmp_path):
    out = tmp_path / 'check'
    proc = gpu_check('--dry-run', '--out', str(out), '--steps', 'train-small-bf16-compile,train-small-fp16',
                     NPROC='two')
    assert proc.returncode == 1
    rows = table(out)
    error = "./distributed_train.sh: error: NPROC must be a positive number of processes (or gpu, cpu, auto), got 'two'"
    for step in ('train-small-bf16-compile', 'train-small-fp16'):
        assert rows[step] == ('FAILED (exit 2)', error[:100])  # the table cuts details at 100 characters
        assert (out / 'logs' / f'{step}.log').read_text() == error + '\n'
        assert f'{step}: FAILED (exit 2); end of {out / "logs" / step}.log:' in proc.stderr
    assert proc.stdout.rstrip().endswith(f'2 of 4 steps ok or skipped, 2 failed; everything is in {out}')


def test_without_cuda_only_the_environment_is_checked(tmp_path):
    out = tmp_path / 'check'
    proc = gpu_check('--out', str(out))
    assert proc.returncode == 1
    assert table(out) == {'env': ('FAILED (exit 1)', 'error: CUDA is not available (use --dry-run to check the plan '
                                                    'on the CPU)')}
    assert 'the environment is not usable; nothing else is run' in proc.stderr
    assert not (out / 'data').exists()


@pytest.mark.parametrize('args, error', [
    (('--steps', 'train,validate'), "--steps: unknown step 'train' (steps: env data bench-slicing-fp32 "
                                    "bench-slicing-amp bench-slicing-compile-fp32 bench-slicing-compile-amp "
                                    "cuda-graph train-small-bf16-compile train-small-fp16 train-base-fp16-compile "
                                    "validate throughput-fp32 throughput-amp memory)"),
    (('--fast',), "unknown argument '--fast' (see --help)"),
    (('--budget', '0'), '--budget needs a whole number of seconds > 0'),
    (('--budget', '5m'), '--budget needs a whole number of seconds > 0'),
])
def test_bad_arguments(tmp_path, args, error):
    proc = gpu_check('--out', str(tmp_path / 'check'), *args)
    assert proc.returncode == 2
    assert proc.stderr == f'{SCRIPT}: error: {error}\n'
    assert not (tmp_path / 'check').exists()


def test_budget_skips_the_steps_it_leaves_no_time_for(tmp_path):
    out = tmp_path / 'check'
    proc = gpu_check('--dry-run', '--out', str(out), '--steps', 'validate,memory', '--budget', '1')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table(out)
    assert list(rows) == ['env', 'data', 'validate', 'memory']  # env and data run whatever the budget
    assert [status for status, _ in rows.values()] == ['ok', 'ok', 'SKIP', 'SKIP']
    assert rows['validate'][1] == '--budget 1 s: 0 s left'
    assert not (out / 'logs' / 'validate.log').exists()


def test_dry_run_benchmarks_compiled_and_skips_cuda_graphs(tmp_path):
    out = tmp_path / 'check'
    proc = gpu_check('--dry-run', '--out', str(out), '--steps', 'bench-slicing-compile-amp,cuda-graph')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table(out)
    assert list(rows) == ['env', 'data', 'bench-slicing-compile-amp', 'cuda-graph']
    assert [status for status, _ in rows.values()] == ['ok', 'ok', 'ok', 'SKIP']
    assert rows['bench-slicing-compile-amp'][1].startswith('/ 3 / forward+backward (ms) / ')
    assert '/ <= 1.03 /' in rows['bench-slicing-compile-amp'][1]  # the compiled target
    assert rows['cuda-graph'][1] == 'dry run: CUDA graphs need a GPU (their dispatch is tested on the CPU)'
    cmd = (out / 'logs' / 'bench-slicing-compile-amp.cmd').read_text()
    assert '--compile aot_eager' in cmd and '--metrics train' in cmd and '--amp' in cmd
    result = json.loads((out / 'results' / 'bench_slicing_compile_amp.json').read_text())
    assert (result['args']['compile'], result['args']['amp'], result['args']['metrics']) == ('aot_eager', True,
                                                                                            ['train'])
    assert [r['k'] for r in result['results']] == [3]
    assert set(result['results'][0]['metrics']) == {'fwd_bwd_ms', 'adamw_ms'}


@pytest.mark.parametrize('args, error', [
    (['--device', 'cpu', '--cuda-graph'], '--cuda-graph: CUDA graphs need --device cuda, got cpu'),
    (['--device', 'cpu', '--compile', '--warmup', '0'], '--compile needs --warmup >= 1 so that compilation is not '
                                                          'timed'),
    (['--device', 'cpu', '--metrics', 'eval', 'speed'], "--metrics: invalid choice: 'speed'"),
])
def test_bench_slicing_refuses_bad_flags(args, error, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_slicing().parse_args(args)
    assert exc.value.code == 2 and error in capsys.readouterr().err


def test_bench_slicing_targets_and_phases():
    bench = bench_slicing()
    args = bench.parse_args(['--device', 'cpu', '--metrics', 'train', 'eval', 'train', '--amp-dtype', 'float16'])
    assert args.metrics == ['eval', 'train'] and args.compile is None and args.amp_dtype == 'float16'
    assert bench.parse_args(['--device', 'cpu', '--compile']).compile == 'inductor'
    # seconds per call: the sliced model 4 % slower in forward+backward, as fast from a CUDA graph
    samples = {v: {'fwd_bwd_ms': [0.0104, 0.0104], 'latency_graph_ms': [0.001, 0.001]} for v in bench.VARIANTS}
    samples['dedicated']['fwd_bwd_ms'] = [0.0100, 0.0100]
    eager = bench.summarize(samples, {}, compiled=False)
    compiled = bench.summarize(samples, {}, compiled=True)
    assert eager['fwd_bwd_ms']['ratio'] == pytest.approx(1.04) and eager['fwd_bwd_ms']['sliced'] == 10.4
    assert eager['fwd_bwd_ms']['target'] == 1.05 and eager['fwd_bwd_ms']['met']
    assert compiled['fwd_bwd_ms']['target'] == 1.03 and not compiled['fwd_bwd_ms']['met']
    assert compiled['latency_graph_ms']['target'] == 1.03 and compiled['latency_graph_ms']['met']
