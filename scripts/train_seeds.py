#!/usr/bin/env python3
"""Train one config on several seeds (and data sets), resumable: the checkpoints the cascade tables rest on.

    python scripts/train_seeds.py --runs output/seeds --seeds 0 1 2 \\
        --job digits:data/digits:configs/digits_plus.yaml --job mnist:data/mnist:configs/mnist.yaml

Each (job, seed) is one ``python -m hydravit.train DATA --config CONFIG --seed S`` into RUNS/NAME/seedS. The jobs run
one after another, seed-major (seed 0 of every job first), so the first seed of every data set is ready early. A
run that finished (``done`` marker) is skipped; one that stopped part-way continues from its ``last.pth.tar`` with
``--resume`` (exact), so the script can be killed and restarted at any time. Missing data folders are prepared with
``scripts/prepare_digits.py`` / ``scripts/prepare_mnist.py`` when NAME is ``digits`` / ``mnist``.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import List, NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
PREPARE = {'digits': 'scripts/prepare_digits.py', 'mnist': 'scripts/prepare_mnist.py'}


class Job(NamedTuple):
    name: str
    data: Path
    config: Path


def parse_job(text: str) -> Job:
    parts = text.split(':')
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f'expected NAME:DATA:CONFIG, got {text!r}')
    return Job(parts[0], Path(parts[1]), Path(parts[2]))


def command(job: Job, seed: int, runs: Path, extra: List[str]) -> List[str]:
    out = runs / job.name / f'seed{seed}'
    cmd = [sys.executable, '-m', 'hydravit.train', str(job.data), '--config', str(job.config), '--device', 'cpu',
           '--seed', str(seed), '--output', str(out.parent), '--experiment', out.name, *extra]
    if (out / 'last.pth.tar').is_file():
        cmd += ['--resume', str(out / 'last.pth.tar')]
    return cmd


def prepare(job: Job) -> None:
    if job.data.is_dir() or job.name not in PREPARE:
        return
    subprocess.run([sys.executable, str(ROOT / PREPARE[job.name]), str(job.data)], check=True, cwd=ROOT)


def run(job: Job, seed: int, runs: Path, extra: List[str]) -> Optional[int]:
    """Train (job, seed) unless done; returns the exit code, None when skipped."""
    out = runs / job.name / f'seed{seed}'
    if (out / 'done').is_file():
        return None
    prepare(job)
    cmd = command(job, seed, runs, extra)
    print(f'[{time.strftime("%H:%M:%S")}] {job.name} seed {seed}: {" ".join(cmd)}', flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc == 0:
        (out / 'done').write_text(time.strftime('%Y-%m-%d %H:%M:%S\n'))
    return rc


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--job', type=parse_job, action='append', required=True, metavar='NAME:DATA:CONFIG')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--runs', type=Path, default=Path('output/seeds'), help='runs folder (default: output/seeds)')
    parser.add_argument('train_args', nargs=argparse.REMAINDER, help='after --: more hydravit.train flags')
    args = parser.parse_args(argv)
    extra = args.train_args[1:] if args.train_args[:1] == ['--'] else args.train_args
    for job in args.job:
        if not job.config.is_file():
            parser.error(f'--job {job.name}: config not found: {job.config}')
    failed = 0
    for seed in args.seeds:
        for job in args.job:
            rc = run(job, seed, args.runs, extra)
            failed += rc not in (None, 0)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
