#!/usr/bin/env python3
"""serve-bench over seeds: the mean +- std over checkpoints (one per seed) of each policy's figures, per data set.

    python scripts/serve_bench_seeds.py docs/cascade/measured-*/serve_bench_*_goodput.json \\
        --out docs/cascade/serve_bench.md

Each input is the JSON that ``python -m hydravit.deploy serve-bench ... -o DIR`` wrote (``DIR/serve_bench.json``):
its ``summary`` already holds each policy's mean over that run's repeats. The files are grouped by their data folder
(``settings.data``); within a group every file must have been run with the same budget, batch size, floor, objective,
load schedule and repeats (else the script refuses: those figures do not average), and from different checkpoints.
Per group it writes one table (each seed counts once: the mean and sample std over the seeds' repeat means, with
``hydravit.deploy.serve_bench.aggregate``) and, per seed, the load-driven cascade against the ElasticRunner, which
is issue 22's serve-bench target.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from hydravit.deploy.serve_bench import aggregate, cascade_targets  # noqa: E402

SAME = ('budget_ms', 'batch_size', 'min_top1', 'objective', 'load_schedule', 'load_procs', 'repeats', 'duration_s')
COLUMNS = (  # key, header, format
    ('goodput', 'goodput %', '{:.1f}'), ('goodput_load', 'load on', '{:.1f}'),
    ('goodput_no_load', 'load off', '{:.1f}'), ('top1', 'top-1 %', '{:.2f}'),
    ('within_budget_load', 'within budget, load on %', '{:.1f}'), ('mean_k', 'mean k', '{:.2f}'),
    ('mean_k_load', 'mean k, load on', '{:.2f}'),
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('results', nargs='+', help="serve-bench's serve_bench.json files, one per checkpoint")
    parser.add_argument('--out', default=None, help='also write the tables to this markdown file')
    return parser.parse_args(argv)


def group_by_data(results: Sequence[dict], names: Sequence[str]) -> Dict[str, List[dict]]:
    """The results per data set (the data folder's name), in the given order.

    Raises:
        ValueError: two results of one data set differ in a setting of ``SAME`` or share a checkpoint.
    """
    groups: Dict[str, List[dict]] = {}
    for result, name in zip(results, names, strict=True):
        result = dict(result, file=name)
        groups.setdefault(Path(result['settings']['data']).name, []).append(result)
    for data, group in groups.items():
        first = group[0]
        for other in group[1:]:
            for key in SAME:
                if other['settings'][key] != first['settings'][key]:
                    raise ValueError(f'{other["file"]} was run with {key}={other["settings"][key]!r}, '
                                     f'{first["file"]} with {first["settings"][key]!r}: {data} figures do not average')
        checkpoints = [r['settings']['checkpoint'] for r in group]
        if len(set(checkpoints)) != len(checkpoints):
            raise ValueError(f'{data}: one checkpoint counted twice ({checkpoints})')
    return groups


def served(result: dict, policy: str) -> str:
    """What the policy served in that run: pick's k, or the cascade pick chose; '-' for the runners' sets."""
    choice = result['policies'][policy]
    if policy in ('pick', 'largest'):
        return f'k={choice[0]}'
    return choice[0] if policy == 'pick-cascade' else '-'


def format_group(data: str, group: Sequence[dict]) -> str:
    """One markdown table (mean +- std over the seeds) and the per-seed cascade-against-runner lines."""
    settings = group[0]['settings']
    rows = aggregate([result['summary'] for result in group])
    seeds = ', '.join(result['settings']['checkpoint'] for result in group)
    lines = [f'### {data}: {len(group)} checkpoint{"s" if len(group) > 1 else ""}', '',
             f'Budget {settings["budget_ms"]:g} ms at batch {settings["batch_size"]}, floor {settings["min_top1"]} %, '
             f'objective {settings["objective"]}, load {" ".join(settings["load_schedule"])} with '
             f'{settings["load_procs"]} processes, {settings["repeats"]} repeats per checkpoint; mean ± std over the '
             f'checkpoints ({seeds}).', '',
             '| policy | served (per checkpoint) | ' + ' | '.join(title for _, title, _ in COLUMNS) + ' |',
             '| --- | --- |' + ' ---: |' * len(COLUMNS)]
    for row in rows:
        name = row['policy']
        cells = [_cell(row, key, fmt) for key, _, fmt in COLUMNS]
        lines.append(f'| {name} | {"; ".join(served(r, name) for r in group)} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    for result in group:
        parts = [f'{diff:+.1f} p.p. {what} (target {target}: {"met" if met else "missed"})'
                 for _, what, target, diff, met in cascade_targets(result['summary'])]
        lines.append(f'- {result["settings"]["checkpoint"]}: elastic-cascade against elastic {", ".join(parts)}')
    return '\n'.join(lines)


def _cell(row: dict, key: str, fmt: str) -> str:
    if row[key] is None:
        return '-'
    return fmt.format(row[key]) + (f' ± {fmt.format(row[f"{key}_std"])}' if row['repeats'] > 1 else '')


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse_args(argv)
    results = [json.loads(Path(name).read_text()) for name in args.results]
    try:
        groups = group_by_data(results, args.results)
    except ValueError as err:
        sys.exit(f'error: {err}')
    text = '\n\n'.join(format_group(data, group) for data, group in sorted(groups.items())) + '\n'
    print(text, end='')
    if args.out:
        Path(args.out).write_text(f'<!-- written by: python scripts/serve_bench_seeds.py '
                                  f'{" ".join(args.results)} --out {args.out} -->\n\n' + text)
    return text


if __name__ == '__main__':
    main()
