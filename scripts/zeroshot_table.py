"""Zero-shot table of the converter: each seed's dedicated 12-head digits ViT converted with every importance score and
channel option, top-1 per k on the validation split, against the source sliced in its original order.

    python scripts/zeroshot_table.py [--seeds 0 1 2] [--runs output/compare] [--out output/zeroshot] \\
        [--table docs/comparison/zeroshot.md]

The sources are the ``dedicated_k12`` runs of ``scripts/compare_recipes.py`` (``RUNS/dedicated_k12/seedS/
teacher_ema.safetensors``); a seed without one is skipped with a note. Each conversion runs
``python -m hydravit.convert ... --seed S --report --report-file OUT/sS_SCORE_CHANNELS.json`` and is skipped when
that file exists, so the script resumes. The table gives, per order, the mean +- sample std over the seeds and each
seed's row.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = [('magnitude', 'score'), ('magnitude', 'original'), ('taylor', 'score'), ('taylor', 'original')]
HEADS = list(range(3, 13))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=str(ROOT / 'data' / 'digits'), help='digits image folder')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--runs', default=str(ROOT / 'output' / 'compare'), help="compare_recipes.py's run folder")
    parser.add_argument('--out', default=str(ROOT / 'output' / 'zeroshot'), help='converted models and reports')
    parser.add_argument('--table', default=str(ROOT / 'docs' / 'comparison' / 'zeroshot.md'))
    return parser.parse_args(argv)


def convert(args: argparse.Namespace, seed: int, score: str, channels: str) -> Optional[dict]:
    """The report of one conversion (run it if its file is missing); None without the seed's source."""
    source = Path(args.runs) / 'dedicated_k12' / f'seed{seed}' / 'teacher_ema.safetensors'
    report = Path(args.out) / f's{seed}_{score}_{channels}.json'
    if not report.is_file():
        if not source.is_file():
            return None
        cmd = [sys.executable, '-m', 'hydravit.convert', args.data, '--model', 'hydravit_dyn_patch4_32',
               '--checkpoint', str(source), '--num-classes', '10', '--seed', str(seed), '--score', score,
               '--channels', channels, '-o', str(Path(args.out) / f's{seed}_{score}_{channels}.pth'), '--report',
               '--heads', *map(str, HEADS), '--report-file', str(report)]
        print(f'[zeroshot] seed {seed}: {score}, channels {channels}', flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads(report.read_text())


def table(reports: Dict[int, Dict[tuple, dict]]) -> str:
    """Markdown: mean +- std over seeds per order, then every seed's rows."""
    seeds = sorted(reports)
    orders = [('original order', None)] + [(f'{s}, channels {"sorted" if c == "score" else "original"}', (s, c))
                                           for s, c in OPTIONS]

    def top1(seed: int, option) -> List[float]:
        rep = reports[seed][option or OPTIONS[0]]['top1']
        row = rep['original order' if option is None else 'converted']
        return [float(row[str(k)]) for k in HEADS]

    lines = ['| order | seeds | ' + ' | '.join(f'k={k}' for k in HEADS) + ' |', '|---|---|' + '---|' * len(HEADS)]
    for name, option in orders:
        values = np.array([top1(seed, option) for seed in seeds])
        std = values.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(len(HEADS))
        cells = [f'{m:.2f} ± {s:.2f}' if len(seeds) > 1 else f'{m:.2f}' for m, s in zip(values.mean(0), std,
                                                                                         strict=True)]
        lines.append(f'| **{name}** | {len(seeds)} | ' + ' | '.join(cells) + ' |')
    for seed in seeds:
        for name, option in orders:
            lines.append(f'| seed {seed}: {name} | 1 | ' + ' | '.join(f'{v:.2f}' for v in top1(seed, option)) + ' |')
    return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    reports: Dict[int, Dict[tuple, dict]] = {}
    for seed in args.seeds:
        done = {option: convert(args, seed, *option) for option in OPTIONS}
        if any(rep is None for rep in done.values()):
            print(f'[zeroshot] seed {seed}: no source in {args.runs}/dedicated_k12/seed{seed}; skipped', flush=True)
            continue
        reports[seed] = done
    if not reports:
        print('[zeroshot] no source found: run scripts/compare_recipes.py --recipes dedicated_k12 first')
        return 1
    text = table(reports)
    Path(args.table).write_text(text)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
