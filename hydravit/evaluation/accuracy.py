"""Top-1 / top-5 accuracy and loss of every requested head count on one pass over the data.

Each batch is decoded once and run through all head counts, so evaluating k = 3, 6, 12 costs one
data pass, not three.

With ``--cascade K1 K2 [K3]`` and ``--exit-entropy T [T ...]`` (or ``--exit-max-prob``) the same pass records every
image's prediction and confidence at each k (``cascade.collect_records``), and each threshold's cascade is evaluated
from them exactly (``cascade.sweep``): ThinkingViT's summary columns per threshold, then the fixed-k rows.
"""
import argparse
import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .cascade import collect_records, fixed_results, format_summary, summary_keys, summary_row, sweep
from .common import (
    EvalSession,
    Row,
    Tool,
    UsageError,
    add_amp_args,
    add_precision_args,
    autocast,
    check_output_file,
    create_eval_dataset,
    create_eval_loader,
    run_tool,
)

KEYS = ('heads', 'embed_dim', 'top1', 'top5', 'loss', 'num_images')


@dataclass
class _Tally:
    """Running sums for one head count."""

    correct1: int = 0
    correct5: int = 0
    loss_sum: float = 0.
    count: int = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        maxk = min(5, logits.shape[1])  # top-5 of a < 5-class problem is top-(num_classes)
        hits = logits.topk(maxk, dim=1).indices.eq(target[:, None])
        self.correct1 += int(hits[:, 0].sum())
        self.correct5 += int(hits.any(dim=1).sum())
        self.loss_sum += float(F.cross_entropy(logits.float(), target, reduction='sum'))
        self.count += target.numel()

    @property
    def top1(self) -> float:
        return 100. * self.correct1 / max(self.count, 1)

    def row(self, k: int, head_dim: int) -> Row:
        return {
            'heads': k,
            'embed_dim': k * head_dim,
            'top1': self.top1,
            'top5': 100. * self.correct5 / self.count,
            'loss': self.loss_sum / self.count,
            'num_images': self.count,
        }


def evaluate_heads(
        model: torch.nn.Module,
        loader,
        heads: Iterable[int],
        device: torch.device,
        amp_autocast: Callable[[], ContextManager] = contextlib.nullcontext,
        distributed: bool = False,
        log_freq: int = 0,
        prepare_input: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> List[Row]:
    """One pass over ``loader``; per head count: top-1, top-5 (in %), mean cross-entropy, image count.

    Used by ``validate.py`` and by the trainer's periodic validation. With ``distributed`` the sums are
    all-reduced over the process group, and the copies a distributed sampler pads the ranks with are left out, so
    every image counts once on any number of processes (``RuntimeError`` if the ranks did not see each image once).
    ``prepare_input`` moves a batch to the device (and the model's dtype / layout); by default it is ``.to(device)``.
    The model's active head count is restored afterwards.
    """
    heads, previous = list(heads), model.active_heads
    tallies: Dict[int, _Tally] = {k: _Tally() for k in heads}
    num_batches, start = len(loader), time.perf_counter()
    genuine = genuine_samples(getattr(loader, 'sampler', None)) if distributed else None
    seen = 0
    with torch.inference_mode():
        for step, (images, target) in enumerate(loader, 1):
            if genuine is not None:  # the padding copies come last on every rank
                keep, seen = max(0, genuine - seen), seen + target.shape[0]
                images, target = images[:keep], target[:keep]
                if keep == 0:
                    continue
            images = prepare_input(images) if prepare_input else images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            for k in heads:
                model.set_heads(k)
                with amp_autocast():
                    logits = model(images)
                tallies[k].update(logits, target)
            if log_freq and (step % log_freq == 0 or step == num_batches):
                _log_progress(step, num_batches, start, tallies)
    model.set_heads(previous)
    if distributed:
        _all_reduce(tallies, device)
        _check_each_image_once(loader, tallies[heads[0]].count)
    if tallies[heads[0]].count == 0:
        raise RuntimeError('the data loader yielded no images')
    return [tallies[k].row(k, model.head_dim) for k in heads]


def genuine_samples(sampler) -> Optional[int]:
    """How many of a distributed sampler's indices on this rank are dataset images rather than padding, or None for
    a sampler that is not split over ranks.

    timm's ``OrderedDistributedSampler`` and torch's ``DistributedSampler`` give rank r the positions r, r + W,
    r + 2W, ... of the dataset's (possibly shuffled) order, wrapped around to reach the same count on every rank: the
    positions at or past the dataset's length are copies, and they are the last ones of each rank.
    """
    if not all(hasattr(sampler, name) for name in ('num_replicas', 'rank', 'dataset')):
        return None
    size, replicas = len(sampler.dataset), sampler.num_replicas
    return min(len(sampler), max(0, (size - sampler.rank + replicas - 1) // replicas))


def _check_each_image_once(loader, count: int) -> None:
    """After the all-reduce: the ranks together counted each dataset image once (a sampler that drops or pads
    differently would make every metric a wrong fraction)."""
    dataset = getattr(loader, 'dataset', None)
    if dataset is not None and hasattr(dataset, '__len__') and count != len(dataset):
        raise RuntimeError(f'distributed evaluation counted {count} images, but the dataset has {len(dataset)}: '
                           f'the sampler ({type(loader.sampler).__name__}) must give each image to one rank once')


def _all_reduce(tallies: Dict[int, _Tally], device: torch.device) -> None:
    sums = torch.tensor([[t.correct1, t.correct5, t.loss_sum, t.count] for t in tallies.values()],
                        dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    for tally, (correct1, correct5, loss_sum, count) in zip(tallies.values(), sums.tolist(), strict=True):
        tally.correct1, tally.correct5, tally.loss_sum, tally.count = int(correct1), int(correct5), loss_sum, int(count)


def evaluate_accuracy(session: EvalSession, loader, heads: Iterable[int], log_freq: int = 10) -> List[Row]:
    """``evaluate_heads`` with the session's model, device, ``--amp``, ``--model-dtype`` / ``--channels-last`` and
    ``--torchcompile`` settings."""
    return evaluate_heads(compiled(session, heads), loader, heads, session.device,
                          amp_autocast=lambda: autocast(session.args, session.device), log_freq=log_freq,
                          prepare_input=session.prepare_input)


def compiled(session: EvalSession, heads: Iterable[int]) -> torch.nn.Module:
    """The session's model, under ``torch.compile`` with ``--torchcompile [BACKEND]`` (timm's flag).

    The active width is an int attribute dynamo guards, so each k gets its own graph; the recompile limit is
    raised to fit them all (past it dynamo would silently run the model eagerly).
    """
    backend = getattr(session.args, 'torchcompile', None)
    if not backend:
        return session.model
    raise_recompile_limit(2 * len(list(heads)))
    torch._dynamo.reset()
    return torch.compile(session.model, backend=backend, mode=session.args.torchcompile_mode)


def raise_recompile_limit(graphs: int) -> None:
    """Let dynamo keep at least ``graphs`` graphs of one function (past its limit it silently runs eagerly)."""
    config = torch._dynamo.config
    name = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'  # torch < 2.6
    setattr(config, name, max(getattr(config, name), graphs))


def _log_progress(step: int, num_batches: int, start: float, tallies: Dict[int, _Tally]) -> None:
    elapsed = time.perf_counter() - start
    seen = next(iter(tallies.values())).count
    eta = elapsed / step * (num_batches - step)
    accs = '  '.join(f'k={k} top1 {t.top1:6.2f}' for k, t in tallies.items())
    print(f'Test: [{step:>{len(str(num_batches))}}/{num_batches}]  {accs}  '
          f'{seen / elapsed:7.1f} img/s  ETA {eta:6.0f}s', flush=True)


def measure(session: EvalSession) -> List[Row]:
    dataset = create_eval_dataset(session)
    loader = create_eval_loader(session, dataset)
    if session.args.cascade:
        return measure_cascade(session, loader)
    print(f'Validating {session.args.model} on {len(dataset)} images, heads {session.heads}', flush=True)
    return evaluate_accuracy(session, loader, session.heads, session.args.log_freq)


# --- --cascade -------------------------------------------------------------------------------------------------
CASCADE_FLAG = '--cascade/--thinking-stages'
RULE_FLAGS = {'entropy': '--exit-entropy/--threshold', 'max_prob': '--exit-max-prob'}


def measure_cascade(session: EvalSession, loader) -> List[Row]:
    """``--cascade``: one pass recording every k of the ladder and of ``--heads``; per threshold the cascade's
    summary row, then one row per fixed k; GMACs per image of each k from DeepSpeed (``macs.profile_heads``)."""
    args = session.args
    ladder = _trained_ladder(session)
    heads = sorted(set(ladder) | set(session.heads))
    rule, thresholds = cascade_rule(args)
    gmacs = head_gmacs(session.model, heads, session.input_size)
    print(f'Cascade {"->".join(map(str, ladder))} ({rule}) on {args.model}: recording heads {heads}', flush=True)
    records = collect_records(compiled(session, heads), loader, heads, session.device,
                              amp_autocast=lambda: autocast(args, session.device), prepare_input=session.prepare_input)
    cascades, fixed = sweep(records, ladder, rule, thresholds, gmacs), fixed_results(records, heads, gmacs)
    rows = [summary_row(result, len(ladder)) for result in (*cascades, *fixed)]
    print(format_summary(rows, len(ladder)), flush=True)
    if args.plot:
        from .plot import plot_cascade
        plot_cascade(rows, args.plot, title=f'{args.model}: cascade {"->".join(map(str, ladder))} ({rule})')
        print(f'plot: {args.plot}', flush=True)
    return rows


def head_gmacs(model: torch.nn.Module, heads: Iterable[int], input_size) -> Dict[int, float]:
    """Forward GMACs per image of each k (DeepSpeed, ``macs.profile_heads``); the active head count is restored."""
    from .macs import profile_heads
    previous = model.active_heads
    gmacs = {k: profile_heads(model, k, tuple(input_size))['gmacs'] for k in heads}
    model.set_heads(previous)
    return gmacs


def cascade_rule(args: argparse.Namespace):
    """``(rule, thresholds)`` of the flags: ``entropy`` with ``--exit-entropy``, ``max_prob`` with
    ``--exit-max-prob``."""
    if args.exit_max_prob is not None:
        return 'max_prob', list(args.exit_max_prob)
    return 'entropy', list(args.exit_entropy)


def _trained_ladder(session: EvalSession) -> List[int]:
    """The ladder, each k trained (when the checkpoint records its head set) and runnable by the model."""
    model, ladder = session.model, list(session.args.cascade)
    trained = model.trained_heads
    untrained = [k for k in ladder if trained is not None and k not in trained]
    if untrained:
        raise UsageError(f'{CASCADE_FLAG}: k={" ".join(map(str, untrained))} not among the head counts '
                         f'{session.args.checkpoint} was trained on ({" ".join(map(str, trained))})')
    previous = model.active_heads
    try:
        for k in ladder:
            model.set_heads(k)  # raises ValueError with the model's own message
    except ValueError as e:
        raise UsageError(f'{CASCADE_FLAG}: {e}') from e
    finally:
        model.set_heads(previous)
    return ladder


def check_args(args: argparse.Namespace) -> None:
    """The ``--cascade`` flags, before any model is built: one ``UsageError`` naming the flag."""
    given = {rule: getattr(args, dest) for rule, dest in (('entropy', 'exit_entropy'), ('max_prob', 'exit_max_prob'))
             if getattr(args, dest) is not None}
    if len(given) == 2:
        raise UsageError(f'{RULE_FLAGS["entropy"]} and {RULE_FLAGS["max_prob"]}: give one exit rule, not both')
    if args.plot and not args.cascade:
        raise UsageError('--plot: needs --cascade (it plots the threshold sweep against the fixed k)')
    if args.plot and Path(args.plot).suffix.lower() not in ('.png', '.pdf', '.svg'):
        raise UsageError(f'--plot: FILE must end in .png, .pdf or .svg, got {args.plot}')
    if args.plot:
        check_output_file(args.plot, '--plot')
    if not args.cascade:
        if given:
            raise UsageError(f'{RULE_FLAGS[next(iter(given))]}: needs {CASCADE_FLAG} K1 K2 [K3] (the ladder the '
                             'thresholds apply to)')
        return
    ladder = args.cascade
    if not 2 <= len(ladder) <= 3:
        raise UsageError(f'{CASCADE_FLAG}: a cascade is 2 or 3 head counts, got {len(ladder)} '
                         f'({" ".join(map(str, ladder))})')
    if any(a >= b for a, b in zip(ladder, ladder[1:], strict=False)):
        raise UsageError(f'{CASCADE_FLAG}: head counts must be strictly increasing, got {" ".join(map(str, ladder))}')
    if not given:
        raise UsageError(f'{CASCADE_FLAG}: needs thresholds: --exit-entropy T [T ...] or --exit-max-prob T [T ...]')
    (rule, thresholds), = given.items()
    _check_thresholds(RULE_FLAGS[rule], rule, thresholds)


def _check_thresholds(flag: str, rule: str, thresholds: List[float]) -> None:
    bad = [t for t in thresholds if not math.isfinite(t)]
    if bad:
        raise UsageError(f'{flag}: thresholds must be finite, got {bad[0]}')
    if rule == 'entropy' and min(thresholds) < 0:
        raise UsageError(f'{flag}: an entropy threshold is >= 0 nats (below 0 no image exits), got {min(thresholds)}')
    if rule == 'max_prob' and not all(0 <= t <= 1 for t in thresholds):
        raise UsageError(f'{flag}: a top-1 probability threshold is in [0, 1], got '
                         f'{next(t for t in thresholds if not 0 <= t <= 1)}')


def result_keys(args: argparse.Namespace) -> List[str]:
    """The result columns: the per-k keys, or with ``--cascade`` the summary columns of its stages."""
    return list(summary_keys(len(args.cascade))) if args.cascade else list(KEYS)


def add_args(parser: argparse.ArgumentParser) -> None:
    add_amp_args(parser)
    add_precision_args(parser)
    group = parser.add_argument_group('Compilation')
    group.add_argument('--torchcompile', nargs='?', default=None, const='inductor', metavar='BACKEND',
                       help='torch.compile the model with BACKEND (default: inductor), one graph per head count')
    group.add_argument('--torchcompile-mode', default=None, metavar='MODE', help='torch.compile mode')
    group = parser.add_argument_group('Confidence cascade (ThinkingViT)')
    group.add_argument('--cascade', '--thinking-stages', dest='cascade', type=int, nargs='+', default=None,
                       metavar='K', help='a ladder of 2 or 3 increasing trained head counts: each image runs at K1, '
                                         'the unconfident ones again at K2, ... (see docs/evaluation.md)')
    group.add_argument('--exit-entropy', '--threshold', dest='exit_entropy', type=float, nargs='+', default=None,
                       metavar='T', help='exit where the softmax entropy (nats) is <= T; one cascade per T, T at '
                                         'every stage but the last')
    group.add_argument('--exit-max-prob', type=float, nargs='+', default=None, metavar='T',
                       help='exit where the top-1 probability is >= T (instead of --exit-entropy)')
    group.add_argument('--plot', default='', metavar='FILE',
                       help='with --cascade: write top-1 against mean GMACs, the sweep beside the fixed-k curve')


TOOL = Tool(
    description='Top-1 / top-5 / loss per head count on an image folder (timm dataset + loader).\n\n'
                '  python validate.py DATA --model hydravit_dyn_patch16_224 --checkpoint C -b 256 --use-ema \\\n'
                '      --heads 3 6 12',
    keys=KEYS,
    data_required=True,
    default_batch_size=256,
    add_args=add_args,
    measure=measure,
    check_args=check_args,
    result_keys=result_keys,
)


def main(argv=None) -> List[Row]:
    return run_tool(TOOL, argv)
