#!/usr/bin/env python3
"""Cascades against fixed widths on real data, cross-fitted, over seeds: the tables and the figure of issue 22.

    python scripts/cascade_report.py --runs output/seeds --out docs/cascade      # every finished (data set, seed)

For each checkpoint ``RUNS/NAME/seedS/model_best.pth.tar`` whose run finished (``done``, scripts/train_seeds.py)
and each data set (digits: data/digits, mnist: data/mnist; their validation split), one pass records every image's
prediction and confidence at every trained k (``evaluation.cascade.collect_records``, EMA weights). The records are
written to ``OUT/records/NAME_seedS.json`` (with the GMACs per k and where they came from) and kept in git: every
table is recomputed from them alone, so seeds trained in different sessions (whose ``output/`` is gone) add up, and a
seed whose records are there is not recorded again. Then, all offline and exact:

* fixed k: top-1 of every k (the mean over the same two halves the cascades are measured on);
* cascades: the search space of ``deploy pick`` (``cascade_candidates``: 2-stage ladders and 3-stage ladders ending
  at 12 over 3, 6, 9, 12; one shared threshold at each of 9 exit shares), ThinkingViT's entropy rule. For each
  budget (the GMACs of every fixed k from 4 to 11, and half of k = 12's) the recipe and its threshold are chosen on
  one half of the validation images and measured on the other, both ways, averaged (``budget_choices``: 2-fold
  cross-fitting; the halves are stratified by class, seed 0);
* the targets: at every such budget the cascade against the best fixed k at or under it, and at half of k = 12's
  GMACs the cascade against the best fixed k overall. That best k is the max of several noisy figures measured on
  the very images it is reported on (an optimistic baseline on a few hundred images), so the tables also give the
  fixed k chosen as the cascades are, on one half and measured on the other (``heldout_fixed``).

Writes OUT/cascade.csv (one row per data set, seed and budget), OUT/cascade.md (mean +- std over seeds) and
OUT/cascade.png (top-1 against mean GMACs: the fixed-k curve and the cross-fitted cascade frontier, per data set).
"""
import argparse
import csv
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from hydravit.checkpoint import write_json  # noqa: E402
from hydravit.evaluation import accuracy  # noqa: E402
from hydravit.evaluation.cascade import (  # noqa: E402
    CascadeRecords,
    CascadeSpec,
    budget_choices,
    cascade_candidates,
    collect_records,
    evaluate_cascade,
    halves,
)
from hydravit.evaluation.common import (  # noqa: E402
    add_results_format_arg,
    create_eval_dataset,
    create_eval_loader,
    create_parser,
    create_session,
)

DATA = {'digits': 'data/digits', 'mnist': 'data/mnist'}
FIELDS = ('dataset', 'seed', 'budget', 'budget_gmacs', 'fixed_k', 'fixed_top1', 'fixed_gmacs', 'cascade_top1',
          'cascade_gmacs', 'margin', 'fold_choices', 'fixed_heldout_top1', 'margin_heldout')


def record_run(run: Path, data: str, path: Path) -> None:
    """Record the run's checkpoint on DATA's validation split into ``path`` (atomically; scores to float32's 9
    significant digits, which read back to the same float32)."""
    args = _eval_args(run, data)
    session = create_session(args, trained_only=True)
    loader = create_eval_loader(session, create_eval_dataset(session))
    print(f'{run}: recording k = {session.heads} on {data}', flush=True)
    records = collect_records(session.model, loader, session.heads, session.device,
                              prepare_input=session.prepare_input)
    gmacs = accuracy.head_gmacs(session.model, session.heads, session.input_size)
    state = records.state_dict()
    state['scores'] = {r: {k: [float(f'{v:.9g}') for v in values] for k, values in per_k.items()}
                       for r, per_k in state['scores'].items()}
    source = {'checkpoint': str(run / 'model_best.pth.tar'), 'sha256': checkpoint_sha256(run), 'weights': 'ema',
              'data': data, 'split': 'validation', 'recorded': time.strftime('%Y-%m-%d'), 'commit': _commit()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {'source': source, 'gmacs': {str(k): v for k, v in gmacs.items()}, 'records': state})


def checkpoint_sha256(run: Path) -> str:
    return hashlib.sha256((run / 'model_best.pth.tar').read_bytes()).hexdigest()


def run_records(run: Path, data: str, path: Path) -> Optional[tuple]:
    """``(records, gmacs per k)`` of the run folder's checkpoint on DATA: read from the records file ``path`` when it
    is there, else recorded from the finished run into it; ``None`` when there is neither. A records file that
    another checkpoint of the same (finished) run folder wrote is refused: the tables would silently mix the two
    (a seed trained again, e.g. in a later session)."""
    if not path.is_file():
        if not (run / 'done').is_file():
            return None
        record_run(run, data, path)
    saved = json.loads(path.read_text())
    recorded = saved['source'].get('sha256')
    if (run / 'done').is_file() and recorded is not None and recorded != checkpoint_sha256(run):
        raise SystemExit(f'{path}: recorded from another checkpoint than {run / "model_best.pth.tar"} (sha256 '
                         f'{recorded[:12]}...): delete the records file to record this one, or move the run away')
    return CascadeRecords.from_state_dict(saved['records']), {int(k): v for k, v in saved['gmacs'].items()}


def _commit() -> Optional[str]:
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True)
    except OSError:  # no git here
        return None
    return out.stdout.strip() or None


def _eval_args(run: Path, data: str) -> argparse.Namespace:
    """validate.py's arguments for the run's best checkpoint (EMA weights) on DATA's validation split."""
    tool = accuracy.TOOL
    parser = create_parser(tool.description, tool.data_required, tool.default_batch_size)
    add_results_format_arg(parser)
    tool.add_args(parser)
    return parser.parse_args([data, '--checkpoint', str(run / 'model_best.pth.tar'), '--use-ema', '-b', '200',
                              '-j', '0', '--device', 'cpu'])


def fixed_top1_per_half(records: CascadeRecords, heads: List[int], gmacs: Dict[int, float],
                        split) -> List[Dict[int, float]]:
    """Top-1 of every fixed k on each half of ``split``: ``[{k: top1}, {k: top1}]``, the one table both the fixed
    k's figures (the mean over the halves, as the cascades' are averaged) and ``heldout_fixed`` read."""
    per_half = []
    for half in split:
        subset = records.subset(half)
        per_half.append({k: evaluate_cascade(subset, CascadeSpec((k,)), gmacs).top1 for k in heads})
    return per_half


def heldout_fixed(per_half: List[Dict[int, float]], heads: List[int]) -> float:
    """Top-1 of the fixed k among ``heads`` chosen the way the cascades are: the best k on one half (ties to the
    smaller k), measured on the other, both ways, averaged (``per_half``: ``fixed_top1_per_half``). The best fixed
    k measured on all images is the max of several noisy figures on the very images it is reported on, an
    optimistic baseline; this one is not."""
    tops = []
    for fit, report in (per_half, per_half[::-1]):
        tops.append(report[max(heads, key=lambda k: (fit[k], -k))])
    return statistics.mean(tops)


def report_run(name: str, seed: int, records: CascadeRecords, gmacs: Dict[int, float]) -> List[dict]:
    heads = sorted(gmacs)
    split = halves(records, seed=0)
    per_half = fixed_top1_per_half(records, heads, gmacs, split)
    fixed = {k: statistics.mean(top1[k] for top1 in per_half) for k in heads}
    budgets = [(f'k={k}', gmacs[k]) for k in heads if 3 < k < heads[-1]] + [('half of k=12', gmacs[heads[-1]] / 2)]
    recipes = cascade_candidates(heads)
    choices = budget_choices(records, recipes, 'entropy', gmacs, [b for _, b in budgets], split=split)
    rows = []
    for (label, budget), choice in zip(budgets, choices, strict=True):
        within = [k for k in heads if gmacs[k] <= budget * (1 + 1e-9)]
        if label == 'half of k=12':
            within = heads  # the target: the best fixed k overall, at no more than half of k = 12's GMACs
        best = max(within, key=lambda k: (fixed[k], -k))
        heldout = heldout_fixed(per_half, within)
        rows.append({'dataset': name, 'seed': seed, 'budget': label, 'budget_gmacs': budget, 'fixed_k': best,
                     'fixed_top1': fixed[best], 'fixed_gmacs': gmacs[best], 'cascade_top1': choice.top1,
                     'cascade_gmacs': choice.gmacs, 'margin': choice.top1 - fixed[best],
                     'fold_choices': ' | '.join(choice.fold_choices), 'fixed_heldout_top1': heldout,
                     'margin_heldout': choice.top1 - heldout})
    rows += [{'dataset': name, 'seed': seed, 'budget': f'fixed k={k}', 'budget_gmacs': gmacs[k], 'fixed_k': k,
              'fixed_top1': fixed[k], 'fixed_gmacs': gmacs[k], 'cascade_top1': None, 'cascade_gmacs': None,
              'margin': None, 'fold_choices': '', 'fixed_heldout_top1': None, 'margin_heldout': None} for k in heads]
    return rows


def mean_std(values: List[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f'{values[0]:.{digits}f}'
    return f'{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}'


def mean_std4(values: List[float]) -> str:
    return mean_std(values, 4)


def markdown(rows: List[dict]) -> str:
    lines = []
    for name in sorted({r['dataset'] for r in rows}):
        mine = [r for r in rows if r['dataset'] == name and r['cascade_top1'] is not None]
        seeds = sorted({r['seed'] for r in mine})
        lines += [f'### {name} ({len(seeds)} seed{"s" if len(seeds) > 1 else ""}: {", ".join(map(str, seeds))})', '',
                  '| budget (GMACs) | best fixed k within it | its top-1 | cascade top-1 (held out) | cascade GMACs '
                  '| margin (p.p.) | met | fixed k chosen on the other half: top-1 | margin to it (p.p.) |',
                  '|---|---|---|---|---|---|---|---|---|']
        for budget in dict.fromkeys(r['budget'] for r in mine):
            rs = [r for r in mine if r['budget'] == budget]
            margins = [r['margin'] for r in rs]
            ks = sorted({r['fixed_k'] for r in rs})
            met = 'yes' if statistics.mean(margins) >= 0 else 'no'
            lines.append(f'| {budget}: {statistics.mean(r["budget_gmacs"] for r in rs):.4f} '
                         f'| {"/".join(map(str, ks))} | {mean_std([r["fixed_top1"] for r in rs])} '
                         f'| {mean_std([r["cascade_top1"] for r in rs])} '
                         f'| {mean_std4([r["cascade_gmacs"] for r in rs])} | {mean_std(margins)} | {met} '
                         f'| {mean_std([r["fixed_heldout_top1"] for r in rs])} '
                         f'| {mean_std([r["margin_heldout"] for r in rs])} |')
        lines.append('')
    return '\n'.join(lines)


def plot(rows: List[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    names = sorted({r['dataset'] for r in rows})
    fig = Figure(figsize=(6 * len(names), 4.2), dpi=80, layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        mine = [r for r in rows if r['dataset'] == name]
        fixed = {}
        for r in mine:
            if r['cascade_top1'] is None:
                fixed.setdefault(r['fixed_k'], []).append((r['fixed_gmacs'], r['fixed_top1']))
        ks = sorted(fixed)
        ax.plot([statistics.mean(g for g, _ in fixed[k]) for k in ks],
                [statistics.mean(t for _, t in fixed[k]) for k in ks], 'o-', color='tab:blue', label='fixed k')
        for k in ks:
            ax.annotate(f'k={k}', (statistics.mean(g for g, _ in fixed[k]), statistics.mean(t for _, t in fixed[k])),
                        textcoords='offset points', xytext=(3, -10), fontsize='x-small')
        cascade = {}
        for r in mine:
            if r['cascade_top1'] is not None:
                cascade.setdefault(r['budget'], []).append((r['cascade_gmacs'], r['cascade_top1']))
        points = sorted((statistics.mean(g for g, _ in v), statistics.mean(t for _, t in v)) for v in cascade.values())
        ax.plot(*zip(*points, strict=True), 's--', color='tab:orange',
                label='cascade, chosen per budget (held-out halves)')
        seeds = len({r['seed'] for r in mine})
        ax.set_title(f'{name}: mean of {seeds} seed{"s" if seeds > 1 else ""}')
        ax.set_xlabel('mean GMACs per image')
        ax.set_ylabel('top-1 (%)')
        ax.grid(alpha=.3)
        ax.legend(loc='lower right', fontsize='small')
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', type=Path, default=Path('output/seeds'))
    parser.add_argument('--datasets', nargs='+', default=list(DATA), choices=list(DATA))
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--out', type=Path, default=Path('docs/cascade'))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.datasets:
        for seed in args.seeds:
            run, path = args.runs / name / f'seed{seed}', args.out / 'records' / f'{name}_seed{seed}.json'
            found = run_records(run, DATA[name], path)
            if found is None:
                print(f'{name} seed {seed}: no records ({path}) and no finished run ({run}): left out', flush=True)
                continue
            rows += report_run(name, seed, *found)
    if not rows:
        parser.error(f'no records under {args.out / "records"} and no finished run under {args.runs}')
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / 'cascade.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (args.out / 'cascade.md').write_text(markdown(rows))
    plot(rows, args.out / 'cascade.png')
    print(markdown(rows))
    print(f'wrote {args.out}/cascade.csv, cascade.md, cascade.png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
