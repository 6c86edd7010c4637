"""Top-1 / top-5 accuracy and loss of every requested head count on one pass over the data.

Each batch is decoded once and run through all head counts, so evaluating k = 3, 6, 12 costs one
data pass, not three.
"""
import argparse
import contextlib
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .common import (
    EvalSession,
    Row,
    Tool,
    add_amp_args,
    add_precision_args,
    autocast,
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
    config = torch._dynamo.config
    name = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'  # torch < 2.6
    setattr(config, name, max(getattr(config, name), 2 * len(list(heads))))
    torch._dynamo.reset()
    return torch.compile(session.model, backend=backend, mode=session.args.torchcompile_mode)


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
    print(f'Validating {session.args.model} on {len(dataset)} images, heads {session.heads}', flush=True)
    return evaluate_accuracy(session, loader, session.heads, session.args.log_freq)


def add_args(parser: argparse.ArgumentParser) -> None:
    add_amp_args(parser)
    add_precision_args(parser)
    group = parser.add_argument_group('Compilation')
    group.add_argument('--torchcompile', nargs='?', default=None, const='inductor', metavar='BACKEND',
                       help='torch.compile the model with BACKEND (default: inductor), one graph per head count')
    group.add_argument('--torchcompile-mode', default=None, metavar='MODE', help='torch.compile mode')


TOOL = Tool(
    description='Top-1 / top-5 / loss per head count on an image folder (timm dataset + loader).\n\n'
                '  python validate.py DATA --model hydravit_dyn_patch16_224 --checkpoint C -b 256 --use-ema \\\n'
                '      --heads 3 6 12',
    keys=KEYS,
    data_required=True,
    default_batch_size=256,
    add_args=add_args,
    measure=measure,
)


def main(argv=None) -> List[Row]:
    return run_tool(TOOL, argv)
