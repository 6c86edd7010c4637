"""Pick the subnetwork for a budget from a device profile.

    python -m hydravit.deploy pick profile.json [--max-latency-ms X] [--max-gmacs G] [--max-memory-mb M]
        [--min-throughput T] [--min-top1 A] [--json] [--verify [--model-dtype D] [--cuda-graph]]
        [-b B] [--max-mean-latency-ms X] [--exit-rule R] [--ladder-heads K ...] [--exit-shares S ...] [--seed N]
        [--fixed-only]

The choice is the most accurate k that meets every bound; ties go to the cheaper (fewer GMACs, then
lower latency, lower memory, higher throughput). Without accuracies in the profile the larger k is
taken as the more accurate, so the choice is the largest k that fits. The printed Pareto frontier
holds the rows that no other row beats on accuracy and on every cost at once; the choice is always
on it.

With a profile that holds per-image records and per-batch latencies (``profile`` with DATA), pick searches fixed k
and confidence cascades together (``hydravit.evaluation.cascade``: ``cascade_candidates``, ``fit_cascade``,
``cross_fit``), latency at batch ``-b``, and reports every figure by 2-fold cross-fitting (docs/deploy.md).
"""
import argparse
import math
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import timm
import torch

from ..checkpoint import to_json
from ..evaluation import cascade, throughput
from ..evaluation.common import MODEL_DTYPES, Row, UsageError, resolve_device
from ..evaluation.cuda_graph import GraphCache
from ..evaluation.environment import device_name
from .profile import ProfileError, batch_latency, cascade_records, read_profile

VERIFY_TOLERANCE = 0.15  # --verify warns when the re-measured latency is further off than this


@dataclass(frozen=True)
class Bound:
    flag: str
    key: str  # profile column it limits
    upper: bool  # True: the column must be <= the value; False: >=
    unit: str

    @property
    def dest(self) -> str:
        return self.flag.lstrip('-').replace('-', '_')

    def holds(self, row: Row, value: float) -> bool:
        return row[self.key] <= value if self.upper else row[self.key] >= value

    def best(self, rows: Sequence[Row]) -> Row:
        """The row that comes closest to meeting this bound."""
        return (min if self.upper else max)(rows, key=lambda row: row[self.key])


BOUNDS = (
    Bound('--max-latency-ms', 'latency_ms_p90', True, 'ms'),
    Bound('--max-mean-latency-ms', 'latency_ms_mean', True, 'ms'),
    Bound('--max-gmacs', 'gmacs', True, 'GMACs'),
    Bound('--max-memory-mb', 'peak_mb', True, 'MB'),
    Bound('--min-throughput', 'throughput', False, 'img/s'),
    Bound('--min-top1', 'top1', False, '%'),
)
# Costs and whether more is better; accuracy is the other side of the trade-off.
COSTS = (('gmacs', False), ('latency_ms_p90', False), ('peak_mb', False), ('throughput', True))


class NoFit(ValueError):
    """No head count meets every bound; the message names the best value reached for each bound."""


def accuracy_key(rows: Sequence[Row]) -> str:
    """``top1`` when the profile has accuracies, else ``heads`` (HydraViT: more heads, more accurate)."""
    return 'top1' if rows and all(row.get('top1') is not None for row in rows) else 'heads'


def _costs(rows: Sequence[Row]) -> List[tuple]:
    """The costs every row has (a profile has all; serve-bench's calibration only latency)."""
    return [(key, more) for key, more in COSTS if all(row.get(key) is not None for row in rows)]


def _objectives(row: Row, acc: str, costs: Sequence[tuple] = COSTS) -> tuple:
    """Every objective with "larger is better"."""
    return (row[acc], *(row[key] if more else -row[key] for key, more in costs))


def dominates(a: Row, b: Row, acc: str, costs: Sequence[tuple] = COSTS) -> bool:
    """``a`` is at least as good as ``b`` on accuracy and every cost, and better on one."""
    oa, ob = _objectives(a, acc, costs), _objectives(b, acc, costs)
    return all(x >= y for x, y in zip(oa, ob, strict=True)) and oa != ob


def pareto_frontier(rows: Sequence[Row]) -> List[Row]:
    """Rows no other row dominates, in head-count order."""
    acc, costs = accuracy_key(rows), _costs(rows)
    return sorted((row for row in rows if not any(dominates(other, row, acc, costs) for other in rows)),
                  key=lambda row: row['heads'])


def _preference(row: Row, acc: str, costs: Sequence[tuple]) -> tuple:
    # Most accurate first; among equals the cheaper on each cost in turn (so the choice is on the frontier).
    return (-row[acc], *(-row[key] if more else row[key] for key, more in costs), row['heads'])


def fits(row: Row, bounds: Dict[str, float]) -> bool:
    return all(bound.holds(row, bounds[bound.dest]) for bound in BOUNDS if bound.dest in bounds)


def choose(rows: Sequence[Row], bounds: Dict[str, float]) -> Row:
    """The most accurate row that meets every bound (``bounds``: Bound.dest -> value); ``NoFit`` if none. Rows
    need the columns of the bounds given; ties are broken on the costs the rows have."""
    acc = accuracy_key(rows)
    feasible = [row for row in rows if fits(row, bounds)]
    if not feasible:
        raise NoFit(_no_fit_message(rows, bounds))
    costs = _costs(rows)
    return min(feasible, key=lambda row: _preference(row, acc, costs))


def _no_fit_message(rows: Sequence[Row], bounds: Dict[str, float]) -> str:
    parts = []
    for bound in BOUNDS:
        if bound.dest in bounds:
            best = bound.best(rows)
            parts.append(f'{bound.flag} {bounds[bound.dest]:g} (best: {best[bound.key]:g} {bound.unit} '
                         f'at k={best["heads"]})')
    return 'no head count meets every bound: ' + '; '.join(parts)


# --- the command ----------------------------------------------------------------------------------------
def create_pick_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog='python -m hydravit.deploy pick', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('profile', metavar='PROFILE', help='profile JSON written by `python -m hydravit.deploy '
                                                           'profile`')
    for bound in BOUNDS:
        limit = 'at most' if bound.upper else 'at least'
        parser.add_argument(bound.flag, type=float, default=None, metavar='X',
                            help=f'{bound.key} {limit} X {bound.unit}'.replace('%', '%%'))
    parser.add_argument('--json', action='store_true', help='print one JSON object: {"chosen": row, "frontier": rows}')
    group = parser.add_argument_group('Cascades (profiles with per-image records and per-batch latencies)')
    group.add_argument('-b', '--batch-size', type=int, default=None, metavar='B',
                       help='batch of one call for the latency bounds and columns (default: 1)')
    group.add_argument('--exit-rule', default=None, choices=cascade.RULES, help='exit rule (default: entropy)')
    group.add_argument('--ladder-heads', type=int, nargs='+', default=None, metavar='K',
                       help='the widths cascades are built from (default: 4 of the profiled k, evenly spread)')
    group.add_argument('--exit-shares', type=float, nargs='+', default=None, metavar='S',
                       help='shares of the fit half that stage 1 lets exit, one threshold each '
                            '(default: 0.2 0.4 0.6 0.7 0.8 0.9 0.95 0.97 0.99)')
    group.add_argument('--seed', type=int, default=0, help='seed of the two stratified halves (default: 0)')
    group.add_argument('--fixed-only', action='store_true', help='search fixed k only')
    parser.add_argument('--verify', action='store_true',
                        help=f're-measure the chosen k\'s batch-1 latency here; warn when it is more than '
                             f'{VERIFY_TOLERANCE * 100:.0f}%% off the profile')
    parser.add_argument('--device', default=None, help="--verify's device (default: the profile's device type)")
    parser.add_argument('--model-dtype', default=None, choices=MODEL_DTYPES,
                        help="--verify: cast the model to this dtype, without autocast (default: as the profile was "
                             "measured)")
    parser.add_argument('--cuda-graph', action='store_true',
                        help='--verify: time replays of a CUDA graph (default: as the profile was measured)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = create_pick_parser()
    args = parser.parse_args(argv)
    try:
        profile = read_profile(args.profile)
    except ProfileError as e:
        parser.error(f'PROFILE: {e}')
    rows = profile['rows']
    try:
        bounds = _bounds(args, rows)
        if (args.model_dtype or args.cuda_graph) and not args.verify:
            raise UsageError(f'{"--model-dtype" if args.model_dtype else "--cuda-graph"}: only with --verify (pick '
                             'itself measures nothing)')
        search, fixed_why = search_setup(args, profile)
        device = _verify_device(args, profile) if args.verify else None
        result = run_search(search, bounds) if search else {'chosen': choose(rows, bounds),
                                                            'frontier': pareto_frontier(rows)}
    except (UsageError, NoFit) as e:
        parser.error(str(e))
    out = sys.stderr if args.json else sys.stdout
    if not args.json:
        print(format_search(search, result, bounds) if search else format_table(result['frontier'],
                                                                                 result['chosen'], bounds))
    if not search:  # on stderr: the fixed-k output stays as it was
        print(f'fixed k only: {fixed_why}', file=sys.stderr)
    if args.verify:
        settings, by_k = verify_settings(profile, args), {row['heads']: row for row in rows}
        ladder = result['chosen']['ladder'] if search else [result['chosen']['heads']]
        checks = [verify(profile, by_k[k], device, out=out, settings=settings) for k in ladder]
        result['verify'] = checks if search else checks[0]
    if args.json:
        print(to_json(result, indent=2))
    return result


def _bounds(args: argparse.Namespace, rows: Sequence[Row]) -> Dict[str, float]:
    bounds = {bound.dest: getattr(args, bound.dest) for bound in BOUNDS if getattr(args, bound.dest) is not None}
    for bound in BOUNDS:
        if bound.dest in bounds and not bounds[bound.dest] >= 0:  # NaN too
            raise UsageError(f'{bound.flag} must be >= 0, got {bounds[bound.dest]:g}')
    if 'min_top1' in bounds and accuracy_key(rows) != 'top1':
        raise UsageError('--min-top1: the profile has no top1 (profile with DATA or --accuracy)')
    return bounds


# --- fixed k and cascades together ----------------------------------------------------------------------
@dataclass
class Search:
    """What ``run_search`` searches: the profile's records and costs, the recipes, the exit rule, the halves' seed."""

    records: cascade.CascadeRecords
    costs: cascade.PolicyCosts
    recipes: List[cascade.Recipe]
    grid: List[int]
    shares: List[float]
    rule: str
    seed: int


CASCADE_FLAGS = (('batch_size', '-b/--batch-size'), ('max_mean_latency_ms', '--max-mean-latency-ms'),
                 ('exit_rule', '--exit-rule'), ('ladder_heads', '--ladder-heads'), ('exit_shares', '--exit-shares'))


def search_setup(args: argparse.Namespace, profile: dict) -> tuple:
    """``(Search, None)`` when the profile holds what cascades need, else ``(None, why fixed k only)``; a cascade
    flag on a profile without it, or a bad one, raises ``UsageError`` naming the flag."""
    records, latency = cascade_records(profile), batch_latency(profile)
    why = ('--fixed-only' if args.fixed_only else None if records is not None and latency is not None else
           'the profile has no per-image records and per-batch latencies (written before cascades, or without DATA; '
           're-profile with DATA to search cascades)')
    if why:
        given = [flag for dest, flag in CASCADE_FLAGS if getattr(args, dest) is not None]
        if given:
            reason = '--fixed-only is given' if args.fixed_only else why
            raise UsageError(f'{given[0]}: searches cascades, but {reason}')
        return None, why
    heads = [row['heads'] for row in profile['rows']]
    largest = min(max(sizes) for sizes in latency.values())
    if args.batch_size is not None and not 1 <= args.batch_size <= largest:
        raise UsageError(f'-b/--batch-size must be between 1 and {largest} (the largest batch size the profile '
                         f'timed), got {args.batch_size}')
    grid = sorted(set(args.ladder_heads)) if args.ladder_heads else cascade.ladder_grid(heads)
    if any(k not in heads for k in grid) or len(grid) < 2:
        raise UsageError(f'--ladder-heads: give at least two of the profiled head counts {heads}, got {grid}')
    shares = sorted(set(args.exit_shares or cascade.DEFAULT_EXIT_SHARES))
    if any(not 0 < share < 1 for share in shares):  # NaN fails too
        raise UsageError(f'--exit-shares: each share must be in (0, 1), got {args.exit_shares}')
    if (args.exit_rule or 'entropy') not in records.scores:
        raise UsageError(f'--exit-rule: the profile records no {args.exit_rule or "entropy"} confidences '
                         f'(recorded: {sorted(records.scores)})')
    if records.num_images < 4:
        raise UsageError(f'PROFILE: its cascade records hold {records.num_images} images; cross-fitting needs >= 4')
    rows = {row['heads']: row for row in profile['rows']}
    costs = cascade.PolicyCosts({k: row['gmacs'] for k, row in rows.items()}, latency,
                                {k: row['peak_mb'] for k, row in rows.items()}, args.batch_size or 1)
    return Search(records, costs, cascade.cascade_candidates(heads, grid, shares), grid, shares,
                  args.exit_rule or 'entropy', args.seed), None


def run_search(search: Search, bounds: Dict[str, float]) -> dict:
    """The frontier of every recipe's held-out (cross-fitted) row, the policy fitted on all images for the budget
    (what to deploy), and the held-out figures of that choice procedure (``cascade.cross_fit``)."""
    budget = {bound.key: (bound.upper, bounds[bound.dest]) for bound in BOUNDS if bound.dest in bounds}
    args = (search.recipes, search.rule, search.costs)
    rows = cascade.cross_fit_recipes(search.records, *args, seed=search.seed)
    try:
        recipe, spec, _ = cascade.fit_cascade(search.records, *args, budget)
        procedure = cascade.cross_fit(search.records, *args, budget, seed=search.seed)
    except cascade.NoFeasiblePolicy as e:
        raise NoFit(_no_policy_message(e.best, bounds)) from e
    chosen = next(row for row in rows if row['policy'] == recipe.name)
    halves = [fold.report.numel() for fold in procedure.folds]
    return {
        'chosen': {**chosen, 'deploy': {'ladder': list(spec.ladder), 'rule': spec.rule,
                                        'thresholds': list(spec.thresholds)},
                   'procedure': {'reported': procedure.reported,
                                 'folds': [{'policy': fold.recipe.name, 'thresholds': list(fold.spec.thresholds),
                                            'fit': fold.fit_row, 'reported': fold.reported}
                                           for fold in procedure.folds]}},
        'frontier': policy_frontier(rows, chosen),
        'search': {'fixed': sorted(search.costs.gmacs), 'ladder_heads': search.grid, 'exit_shares': search.shares,
                   'rule': search.rule, 'policies': len(search.recipes)},
        'split': {'method': '2-fold cross-fitting', 'images': search.records.num_images, 'halves': halves,
                  'seed': search.seed},
        'latency': {'batch_size': search.costs.batch_size, 'throughput_batch': search.costs.throughput_batch},
    }


def _no_policy_message(best: Dict[str, tuple], bounds: Dict[str, float]) -> str:
    parts = [f'{bound.flag} {bounds[bound.dest]:g} (best: {best[bound.key][0]:g} {bound.unit} at '
             f'{best[bound.key][1]})' for bound in BOUNDS if bound.key in best]
    return 'no head count or cascade meets every bound: ' + '; '.join(parts)


def policy_frontier(rows: Sequence[Row], chosen: Row) -> List[Row]:
    """The rows no other row dominates on top-1 and every cost (``cascade.POLICY_COSTS``), by GMACs, with
    ``chosen`` added when it is dominated (``on_frontier`` says which)."""
    def beaten(row: Row) -> bool:
        return any(dominates(other, row, 'top1', cascade.POLICY_COSTS) for other in rows)

    frontier = [dict(row, on_frontier=not beaten(row)) for row in rows if row is chosen or not beaten(row)]
    return sorted(frontier, key=lambda row: (row['gmacs'], -row['top1'], row['policy']))


SEARCH_COLUMNS = (  # key, header, format
    ('top1', 'top-1', '{:.2f}'), ('gmacs', 'GMACs', '{:.4g}'), ('latency_ms_mean', 'mean ms', '{:.3g}'),
    ('latency_ms_p90', 'p90 ms', '{:.3g}'), ('throughput', 'img/s', '{:.4g}'), ('peak_mb', 'peak MB', '{:.4g}'),
)


def format_search(search: Search, result: dict, bounds: Dict[str, float]) -> str:
    """The search space and the split, the frontier (fixed k and cascades, held-out figures) and the choice."""
    info, split, lat, chosen = result['search'], result['split'], result['latency'], result['chosen']
    grid, two, three = info['ladder_heads'], 0, 0
    for recipe in search.recipes:
        two += len(recipe.ladder) == 2 and recipe.exit_share == search.shares[0]
        three += len(recipe.ladder) == 3 and recipe.exit_share == search.shares[0]
    shares = ', '.join(f'{share:g}' for share in info['exit_shares'])
    lines = [
        f'search: fixed k {info["fixed"]}; cascades over k {grid}: {two} ladders k1->k2, {three} ladders '
        f'k1->k2->{grid[-1]}, exit rule {info["rule"]}, one threshold per cascade (every non-final stage): the fit '
        f'half: its stage-1 confidence quantile letting a share {shares} of it exit; {info["policies"]} policies',
        f'split: 2-fold cross-fitting on the {split["images"]} images (stratified halves of '
        f'{split["halves"][0]} and {split["halves"][1]}, --seed {split["seed"]}): thresholds and the choice are '
        'fitted on one half, every figure below is measured on the other; halves swapped, the two averaged',
        f'latency: one call on a batch of {lat["batch_size"]} (-b; a cascade priced on seeded batches of the '
        f'images, each stage at its sub-batch from the per-batch times of the profile, summed: mean, and p90 of '
        f'the summed p90s); img/s at batch {lat["throughput_batch"]}',
    ]
    table = [[' ', 'policy'] + [title for _, title, _ in SEARCH_COLUMNS] + ['answered % per stage']]
    for row in result['frontier']:
        mark = '*' if row['policy'] == chosen['policy'] else (' ' if fits(row, bounds) else 'x')
        table.append([mark, row['policy']] + [fmt.format(row[key]) for key, _, fmt in SEARCH_COLUMNS]
                     + ['/'.join(f'{v:.0f}' for v in row['stage_share'])])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines.append(f'Pareto frontier of held-out figures ({sum(r["on_frontier"] for r in result["frontier"])} of '
                 f'{info["policies"]} policies; * = chosen: most accurate within every bound on the fit images, '
                 'x = outside a bound held out)')
    lines += [' '.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
              .rstrip() for line in table]
    lines += _chosen_lines(result, bounds)
    return '\n'.join(lines)


def _chosen_lines(result: dict, bounds: Dict[str, float]) -> List[str]:
    chosen, deploy, procedure = result['chosen'], result['chosen']['deploy'], result['chosen']['procedure']
    rule = f'{deploy["rule"]} {"<=" if deploy["rule"] == "entropy" else ">="} ' + '/'.join(
        f'{t:.6g}' for t in deploy['thresholds']) if deploy['thresholds'] else 'none (fixed width)'
    reported = procedure['reported']
    figures = ', '.join(f'{title} {fmt.format(reported[key])}' for key, title, fmt in SEARCH_COLUMNS)
    folds = '; '.join(f'half {"AB"[i]} chose {fold["policy"]} (threshold '
                      f'{"/".join(f"{t:.4g}" for t in fold["thresholds"]) or "-"})'
                      for i, fold in enumerate(procedure['folds']))
    lines = [f'chosen: {chosen["policy"]}: ladder {deploy["ladder"]}, exit rule {rule} (fitted on all '
             f'{result["split"]["images"]} images: what to deploy)',
             f'held out (2-fold cross-fit of the choice for this budget; {folds}): {figures}']
    missed = [bound.flag for bound in BOUNDS if bound.dest in bounds and not math.isnan(reported[bound.key])
              and not bound.holds(reported, bounds[bound.dest])]
    if missed:
        lines.append(f'note: held out, the choice misses {", ".join(missed)} (fitted on one half, it does not meet '
                     'the bound on the other)')
    return lines


def _verify_device(args: argparse.Namespace, profile: dict) -> torch.device:
    info = profile.get('model') or {}
    if not (isinstance(info.get('name'), str) and timm.is_model(info['name']) and info.get('input_size')
            and info.get('num_classes')):
        raise UsageError('--verify: the profile has no usable "model" object (name, num_classes, input_size) '
                         'to rebuild the model from')
    device = resolve_device(args.device or profile['device'].get('type'))
    if verify_settings(profile, args)['cuda_graph'] and device.type != 'cuda':
        flag = '--cuda-graph' if args.cuda_graph else '--verify (the profile was measured with CUDA graphs)'
        raise UsageError(f'{flag}: CUDA graphs need a CUDA device, got {device}')
    return device


def verify_settings(profile: dict, args: Optional[argparse.Namespace] = None) -> dict:
    """How ``--verify`` runs the model: as the profile records it was measured (model dtype, autocast dtype, CUDA
    graphs), unless ``--model-dtype`` (then without autocast) or ``--cuda-graph`` say otherwise. A profile written
    before these were recorded gives its ``device.dtype`` as the autocast dtype."""
    info = profile.get('model') or {}
    legacy_amp = profile['device'].get('dtype', 'float32')
    settings = {
        'model_dtype': info.get('model_dtype') or 'float32',
        'amp_dtype': info['amp_dtype'] if 'amp_dtype' in info else (None if legacy_amp == 'float32' else legacy_amp),
        'cuda_graph': bool(info.get('cuda_graph')),
    }
    if args is not None and args.model_dtype:
        settings.update(model_dtype=args.model_dtype, amp_dtype=None)
    if args is not None and args.cuda_graph:
        settings['cuda_graph'] = True
    return settings


COLUMNS = (  # key, header, format
    ('heads', 'k', '{:d}'), ('embed_dim', 'embed', '{:d}'), ('top1', 'top-1', '{:.2f}'), ('gmacs', 'GMACs', '{:.4g}'),
    ('params_m', 'params M', '{:.3g}'), ('latency_ms_median', 'lat ms', '{:.3g}'),
    ('latency_ms_p90', 'p90 ms', '{:.3g}'), ('throughput', 'img/s', '{:.4g}'), ('peak_mb', 'peak MB', '{:.4g}'),
)


def format_table(frontier: Sequence[Row], chosen: Row, bounds: Dict[str, float]) -> str:
    """The frontier, one line per row: '*' marks the choice, 'x' a row outside the bounds."""
    header = ['  '] + [title for _, title, _ in COLUMNS]
    lines = [header]
    for row in frontier:
        mark = '* ' if row is chosen else ('  ' if fits(row, bounds) else 'x ')
        lines.append([mark] + ['-' if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = '\n'.join(' '.join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
    acc = 'top-1' if accuracy_key(frontier) == 'top1' else 'k (no accuracies in the profile)'
    return (f'Pareto frontier ({len(frontier)} rows; * = chosen: most accurate by {acc} within every bound, '
            f'x = outside a bound)\n{text}\nchosen: k={chosen["heads"]}')


# --- --verify --------------------------------------------------------------------------------------------
def verify(profile: dict, chosen: Row, device: torch.device, out=sys.stdout, settings: Optional[dict] = None) -> dict:
    """Re-measure the chosen k's batch-1 latency here; warn (stderr) when the median is >15 % off the profile.

    ``settings``: model dtype, autocast dtype and CUDA graphs (default ``verify_settings(profile)``: as profiled).
    """
    info, k = profile.get('model') or {}, chosen['heads']
    settings = settings or verify_settings(profile)
    dtype = getattr(torch, settings['model_dtype'])
    model = _rebuild_model(info).to(device=device, dtype=dtype).eval()
    model.set_heads(k)
    x = torch.randn(1, *info['input_size'], device=device, dtype=dtype)
    amp = settings['amp_dtype']

    def forward(inp: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=getattr(torch, amp or 'bfloat16'),
                                                    enabled=amp is not None):
            return model(inp)

    if settings['cuda_graph']:
        graphs = GraphCache(lambda _, inp: forward(inp), device)
        graphs.capture(k, x)
        measured = throughput.benchmark_latency(lambda: graphs(k, x), device)
    else:
        measured = throughput.benchmark_latency(lambda: forward(x), device)
    off = measured['latency_ms_median'] / chosen['latency_ms_median'] - 1
    here = f'{device_name(device)} with {torch.get_num_threads()} threads'
    print(f'verify k={k} on {here}: batch-1 latency median {measured["latency_ms_median"]:.3g} ms, '
          f'p90 {measured["latency_ms_p90"]:.3g} ms; profile {chosen["latency_ms_median"]:.3g} / '
          f'{chosen["latency_ms_p90"]:.3g} ms ({off:+.1%})', file=out)
    warn = abs(off) > VERIFY_TOLERANCE
    if warn:
        profiled = profile['device']
        print(f'warning: k={k} runs {off:+.0%} off the profile\'s batch-1 latency (profiled on {profiled.get("name")} '
              f'with {profiled.get("threads")} threads; here {here}): re-profile before trusting the choice',
              file=sys.stderr)
    return {'heads': k, **measured, 'off': off, 'warning': warn}


def _rebuild_model(info: dict) -> torch.nn.Module:
    # Latency does not depend on the weights' values: random weights of the profiled shape suffice.
    kwargs = {'num_classes': info['num_classes']}
    if info.get('separate_classifiers'):
        kwargs['separate_classifiers'] = tuple(info['separate_classifiers'])
    return timm.create_model(info['name'], **kwargs)
