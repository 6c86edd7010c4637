"""What a run prints and writes about itself: loss meters, per-k validation tables, summary.csv columns."""
import argparse
from collections import OrderedDict
from datetime import timedelta
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
from timm import utils

from .objective import StepLosses


class EpochMeters:
    """Running means over an epoch's optimizer steps: the optimized loss and its CE and KD terms (per
    subnetwork forward pass), and the time per step."""

    def __init__(self) -> None:
        self.loss, self.ce, self.kd = utils.AverageMeter(), utils.AverageMeter(), utils.AverageMeter()
        self.update_time = utils.AverageMeter()

    def update(self, losses: StepLosses, samples: int, seconds: float) -> None:
        self.loss.update(losses.total.item() / losses.num_subnets, samples)
        self.ce.update(losses.ce.item() / losses.num_subnets, samples)
        if losses.num_distilled:
            self.kd.update(losses.kd.item() / losses.num_distilled, samples)
        self.update_time.update(seconds)

    def epoch_metrics(self, args: argparse.Namespace, device: torch.device) -> Dict[str, float]:
        """loss, loss_ce, loss_kd (summary.csv's train_loss, train_loss_ce, train_loss_kd), averaged over ranks."""
        metrics = OrderedDict(zip(TRAIN_METRICS, (self.loss.avg, self.ce.avg, self.kd.avg), strict=True))
        if args.distributed:
            values = utils.reduce_tensor(torch.tensor(list(metrics.values()), device=device), args.world_size)
            metrics = OrderedDict(zip(metrics, values.tolist(), strict=True))
        return metrics


def format_table(model: nn.Module, heads: Sequence[int], metrics: Dict[str, float], label: str) -> str:
    lines = [f'Per-k validation ({label}):',
             f'{"k":>4} {"embed":>6} {"params":>11} {"top1":>7} {"top5":>7} {"loss":>7}']
    for k in heads:
        lines.append(f'{k:>4} {k * model.head_dim:>6} {model.subnetwork_params(k):>11,} '
                     f'{metrics[f"top1_k{k}"]:>7.2f} {metrics[f"top5_k{k}"]:>7.2f} {metrics[f"loss_k{k}"]:>7.4f}')
    lines.append(f'{"mean":>4} {"":>6} {"":>11} {metrics["top1"]:>7.2f} {metrics["top5"]:>7.2f} '
                 f'{metrics["loss"]:>7.4f}')
    return '\n'.join(lines)


def format_final_table(model: nn.Module, heads: Sequence[int], metrics: Dict[str, float]) -> str:
    """Last validation, model and EMA side by side."""
    with_ema = f'ema_top1_k{heads[0]}' in metrics
    lines = ['Final per-k top-1 / top-5 (last validation):',
             f'{"k":>4} {"embed":>6} {"params":>11} {"top1":>7} {"top5":>7}'
             + (f' {"EMA top1":>9} {"EMA top5":>9}' if with_ema else '')]
    for k in heads:
        line = (f'{k:>4} {k * model.head_dim:>6} {model.subnetwork_params(k):>11,} '
                f'{metrics[f"top1_k{k}"]:>7.2f} {metrics[f"top5_k{k}"]:>7.2f}')
        if with_ema:
            line += f' {metrics[f"ema_top1_k{k}"]:>9.2f} {metrics[f"ema_top5_k{k}"]:>9.2f}'
        lines.append(line)
    return '\n'.join(lines)


def format_seconds(seconds: float) -> str:
    return str(timedelta(seconds=int(max(0.0, seconds))))


TRAIN_METRICS = ('loss', 'loss_ce', 'loss_kd')  # summary.csv's train_* columns, in this order
PER_K_METRICS = ('loss', 'top1', 'top5')  # per head count, in this order
MEAN_METRICS = ('top1', 'top5', 'loss')  # means over the head counts, after the per-k ones


def heads_metrics(rows: Sequence[dict]) -> Dict[str, float]:
    """Validation rows (one per k) as summary metrics: loss_k3, top1_k3, top5_k3, ..., then the means."""
    metrics = OrderedDict((f'{name}_k{row["heads"]}', row[name]) for row in rows for name in PER_K_METRICS)
    metrics.update((name, sum(row[name] for row in rows) / len(rows)) for name in MEAN_METRICS)
    return metrics


def summary_keys(heads: Sequence[int], with_ema: bool) -> List[str]:
    """summary.csv's eval columns, in the order ``heads_metrics`` fills them: timm's update_summary writes every
    row in its own key order under the first row's header, so the placeholder row of an epoch without validation
    must list the keys exactly as a validated epoch does."""
    keys = [f'{m}_k{k}' for k in heads for m in PER_K_METRICS] + list(MEAN_METRICS)
    return keys + (['ema_' + key for key in keys] if with_ema else [])


def summary_header(heads: Sequence[int], with_ema: bool) -> List[str]:
    """The header timm's ``update_summary`` writes for this run: epoch, train_*, eval_* (``summary_keys``), lr."""
    return (['epoch'] + [f'train_{m}' for m in TRAIN_METRICS] + [f'eval_{k}' for k in summary_keys(heads, with_ema)]
            + ['lr'])


def header_layout(header: Sequence[str]) -> Dict[str, str]:
    """What a summary.csv header says of the run that wrote it, as ``run_layout`` words it: its head counts (the
    eval_top1_kK columns, in order) and whether EMA was validated."""
    heads = [name[len('eval_top1_k'):] for name in header if name.startswith('eval_top1_k')]
    return {'--heads': ' '.join(heads) or '(none)',
            '--model-ema': 'EMA validated' if 'eval_ema_top1' in header else 'no EMA validated'}
