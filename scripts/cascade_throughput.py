#!/usr/bin/env python3
"""Throughput of a cascade against fixed widths, measured side by side in one process (issue 22's timed check).

    python scripts/cascade_throughput.py --run output/seeds/digits/seed0 --data data/digits \\
        --recipe 3,6,12@0.97 --fixed 4 12 -b 64 --reps 7

The cascade's threshold is fitted on one half of the validation images (``halves(records, seed 0)`` of the run's
per-image records, ``--records``: scripts/cascade_report.py's file for that checkpoint, written here when missing and
refused when another checkpoint wrote it; ``@S`` is the share of images that exits at the first stage) and
every figure is measured on the other half: its images are cut into batches of ``-b`` (the last partial batch
dropped) and held in memory. Each repetition runs one full pass of every policy over those batches, the policies'
order rotating between repetitions, so background load hits all alike; the table gives the median img/s, the ratio
to the cascade, and each policy's top-1 and mean GMACs on those images (from the records, exact). Eager PyTorch,
``OMP_NUM_THREADS`` as set; nothing else should run meanwhile.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / 'scripts'))

import torch  # noqa: E402
from cascade_report import _eval_args, run_records  # noqa: E402

from hydravit.deploy.cascade import CascadeRunner, eager_stages  # noqa: E402
from hydravit.evaluation.cascade import CascadeSpec, Recipe, evaluate_cascade, fit_spec, halves  # noqa: E402
from hydravit.evaluation.common import create_eval_dataset, create_eval_loader, create_session  # noqa: E402


def parse_recipe(text: str) -> Recipe:
    try:
        ladder, share = text.split('@')
        return Recipe(tuple(int(k) for k in ladder.split(',')), float(share))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'expected K1,K2[,K3]@SHARE, e.g. 3,6,12@0.97, got {text!r}') from e


def held_out_batches(run: Path, data: str, index: torch.Tensor, batch_size: int):
    """The validation images ``index`` (dataset order, as the records) as whole batches, in memory."""
    session = create_session(_eval_args(run, data), trained_only=True)
    loader = create_eval_loader(session, create_eval_dataset(session))  # the records' order: no shuffle
    images = torch.cat([session.prepare_input(x) for x, _ in loader])[index]
    usable = images.shape[0] // batch_size * batch_size
    if usable == 0:
        raise SystemExit(f'error: -b/--batch-size {batch_size}: only {images.shape[0]} held-out images')
    return session.model.eval(), list(images[:usable].split(batch_size))


def timed_pass(fn, batches) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            fn(batch)
    return sum(b.shape[0] for b in batches) / (time.perf_counter() - start)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--run', type=Path, required=True, help='a finished run folder of scripts/train_seeds.py')
    parser.add_argument('--data', required=True, help='its data set folder')
    parser.add_argument('--recipe', type=parse_recipe, required=True, metavar='K1,K2[,K3]@SHARE')
    parser.add_argument('--fixed', type=int, nargs='+', required=True, help='fixed widths to compare with')
    parser.add_argument('-b', '--batch-size', type=int, default=64)
    parser.add_argument('--reps', type=int, default=7)
    parser.add_argument('--records', type=Path, default=None,
                        help='per-image records of the run (default: docs/cascade/records/NAME_seedS.json for a '
                             'run folder RUNS/NAME/seedS)')
    parser.add_argument('--output-json', type=Path, default=None)
    args = parser.parse_args(argv)
    path = args.records or ROOT / 'docs' / 'cascade' / 'records' / f'{args.run.parent.name}_{args.run.name}.json'
    found = run_records(args.run, args.data, path)
    if found is None:
        parser.error(f'--run: {args.run} has not finished (no done file) and --records {path} does not exist')
    records, gmacs = found
    fit, report = halves(records, seed=0)
    spec = fit_spec(records.subset(fit), args.recipe, 'entropy')
    model, batches = held_out_batches(args.run, args.data, report, args.batch_size)
    n = sum(b.shape[0] for b in batches)
    measured = records.subset(report[:n])
    runner = CascadeRunner(eager_stages(model, spec.ladder), spec)

    def fixed(k):
        def run(batch):
            model.set_heads(k)
            return model(batch)
        return run

    policies = {spec.name: (runner, spec), **{f'k={k}': (fixed(k), CascadeSpec((k,))) for k in args.fixed}}
    names = list(policies)
    for name in names:  # warm-up pass
        timed_pass(policies[name][0], batches[:2])
    samples = {name: [] for name in names}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            samples[name].append(timed_pass(policies[name][0], batches))
        print(f'[rep {rep + 1}/{args.reps}] ' + '  '.join(f'{k}: {samples[k][-1]:.0f} img/s' for k in names),
              flush=True)
    base = statistics.median(samples[spec.name])
    rows = []
    for name in names:
        result = evaluate_cascade(measured, policies[name][1], gmacs)
        rows.append({'policy': name, 'img_s': statistics.median(samples[name]),
                     'ratio_to_cascade': statistics.median(samples[name]) / base, 'top1': result.top1,
                     'gmacs': result.mean_gmacs, 'samples': samples[name]})
    print(f'\n{n} held-out images in batches of {args.batch_size}, {args.reps} repetitions, medians; threads '
          f'{torch.get_num_threads()}')
    print('| policy | img/s | / cascade | top-1 (%) | GMACs |\n|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["policy"]} | {r["img_s"]:.0f} | {r["ratio_to_cascade"]:.2f} | {r["top1"]:.2f} | '
              f'{r["gmacs"]:.4f} |')
    if args.output_json:
        args.output_json.write_text(json.dumps({'spec': spec.name, 'images': n, 'rows': rows}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
