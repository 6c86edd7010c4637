"""The step objective: which subnetworks one optimizer step trains, and the loss each of them minimizes.

A step trains one head count (the paper's recipe) or several (``--subnets-per-step N`` with a
``--subnet-policy``), largest first. Each subnetwork's loss is its own backward pass, so only one graph is alive
at a time; the gradients of the step's subnetworks are **summed**, then the optimizer steps once. Summing (as
US-Nets, OFA and Scala do) keeps every subnetwork's gradient at the scale it has in a one-subnetwork step, so the
paper's learning rate, clipping and weight decay carry over and N = 1 is exactly the paper's step; a mean would
silently divide each subnetwork's learning rate by N.

Losses: cross-entropy with the target (the mixed target under Mixup/CutMix), optionally blended with distillation,
``(1 - alpha) * CE + alpha * KD``. The KD reference of a subnetwork is, in this order: the external teacher for
the largest subnetwork of the step; for the others, the detached logits of the step's largest subnetwork
(``--kd-chain largest``) or of the next larger one (``progressive``) with ``--inplace-kd``, else the external
teacher. Soft KD is ``tau^2 * KL(softmax(t / tau) || softmax(s / tau))``; the teacher's ``hard`` KD is DeiT's
cross-entropy with the teacher's argmax (alpha = 0.5 is DeiT's plain average).
"""
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import unwrap_model

from .sampler import HeadSampler

__all__ = ['StepLosses', 'StepObjective', 'hard_distillation_loss', 'soft_distillation_loss']

KD_CHAINS = ('largest', 'progressive')
TEACHER_KD = ('soft', 'hard')


def soft_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """``tau^2 * KL(softmax(t / tau) || softmax(s / tau))``, mean over the batch, computed in float32."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction='batchmean', log_target=True) * temperature ** 2


def hard_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DeiT's hard distillation: cross-entropy with the teacher's top-1 class."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))


@dataclass
class StepLosses:
    """Detached sums over the subnetworks trained so far in a step: the optimized loss, its CE and KD terms."""
    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    num_subnets: int = 0  # subnetwork forward/backward passes summed
    num_distilled: int = 0  # of which with a KD term
    heads: List[int] = field(default_factory=list)

    @classmethod
    def zeros(cls, device: torch.device) -> 'StepLosses':
        zero = torch.zeros((), device=device)
        return cls(zero, zero.clone(), zero.clone())


class StepObjective:
    """Draws the head counts of a step and runs forward, loss and backward for each of them on a micro-batch.

    Args:
        sampler: the run's HeadSampler (its generator is the only randomness of the draws; its state is
            checkpointed, so a resume continues the same sequence).
        num_subnets: subnetworks per optimizer step; 1 is the paper's step (one draw per rank, or
            ``shared_heads``). With more, every rank trains the same set.
        policy: ``random``, ``sandwich`` or ``stratified`` (see ``HeadSampler.draw_step``).
        base_loss: the criterion against the target (timm's, mixed targets included).
        inplace_kd, kd_chain, kd_alpha, kd_temperature: in-place distillation between the step's subnetworks.
        teacher, teacher_kd: the external frozen teacher (or None) and its ``soft`` or ``hard`` KD.
        full_warmup_epochs: epochs that train only the largest head count.
    """

    def __init__(self, sampler: HeadSampler, base_loss: nn.Module, num_subnets: int = 1, policy: str = 'random',
                 shared_heads: bool = False, world_size: int = 1, rank: int = 0, inplace_kd: bool = False,
                 kd_chain: str = 'largest', kd_alpha: float = 0.5, kd_temperature: float = 1.0,
                 teacher: Optional[nn.Module] = None, teacher_kd: str = 'soft', full_warmup_epochs: int = 0) -> None:
        sampler.check_step(num_subnets, policy)
        self.sampler = sampler
        self.base_loss = base_loss
        self.num_subnets = num_subnets
        self.policy = policy
        self.shared_heads = shared_heads
        self.world_size = world_size
        self.rank = rank
        self.inplace_kd = inplace_kd
        self.kd_chain = kd_chain
        self.kd_alpha = kd_alpha
        self.kd_temperature = kd_temperature
        self.teacher = teacher
        self.teacher_kd = teacher_kd
        self.full_warmup_epochs = full_warmup_epochs

    @property
    def distills(self) -> bool:
        return self.inplace_kd or self.teacher is not None

    def draw(self, epoch: int) -> List[int]:
        """This rank's head counts for the next optimizer step, largest first (a draw on every rank alike)."""
        if epoch < self.full_warmup_epochs:
            heads = [max(self.sampler.heads)]
            self.sampler.record(heads * self.world_size)
            return heads
        if self.num_subnets == 1:  # the paper's step: one k per rank, each rank its own unless shared
            ks = self.sampler.sample(self.world_size)
            if self.shared_heads:
                ks = [ks[0]] * len(ks)
            self.sampler.record(ks)
            return [ks[self.rank]]
        heads = self.sampler.draw_step(self.num_subnets, self.policy)
        self.sampler.record(heads * self.world_size)
        return heads

    def micro_batch(self, model: nn.Module, input: torch.Tensor, target: torch.Tensor, heads: Sequence[int],
                    autocast: Callable[[], AbstractContextManager], backward: Callable[[torch.Tensor, bool], None],
                    sync: Callable[[bool], AbstractContextManager], last_micro_batch: bool, divisor: int,
                    losses: StepLosses) -> None:
        """Train ``heads`` (largest first) on one micro-batch: for each, set the width, forward, loss,
        ``backward(loss / divisor, final)`` (the
        micro-batches of an accumulated step). ``final`` is True only for the last backward of the optimizer step,
        and ``sync(final)`` wraps its forward and backward (DDP's no_sync for all others). Adds to ``losses``."""
        module = unwrap_model(model)  # set_heads lives on the HydraViT itself, under any DDP / compile wrapper
        teacher_logits = self._teacher_logits(input, autocast)
        previous: List[torch.Tensor] = []
        for i, k in enumerate(heads):
            final = last_micro_batch and i == len(heads) - 1
            with sync(final):
                module.set_heads(k)
                with autocast():
                    output = model(input)
                    ce = self.base_loss(output, target)
                kd = self._kd_term(output, i, previous, teacher_logits)
                loss = ce if kd is None else (1.0 - self.kd_alpha) * ce + self.kd_alpha * kd
                backward(loss / divisor, final)
            if self.inplace_kd:
                previous.append(output.detach())
            losses.total = losses.total + loss.detach()
            losses.ce = losses.ce + ce.detach()
            if kd is not None:
                losses.kd = losses.kd + kd.detach()
                losses.num_distilled += 1
            losses.num_subnets += 1
        losses.heads = list(heads)

    @torch.no_grad()
    def _teacher_logits(self, input: torch.Tensor, autocast) -> Optional[torch.Tensor]:
        if self.teacher is None:
            return None
        with autocast():
            return self.teacher(input).float()

    def _kd_term(self, output: torch.Tensor, index: int, previous: List[torch.Tensor],
                 teacher_logits: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The distillation term of the step's ``index``-th subnetwork, or None when it learns from CE alone."""
        if index > 0 and self.inplace_kd:
            reference = previous[0] if self.kd_chain == 'largest' else previous[index - 1]
            return soft_distillation_loss(output, reference, self.kd_temperature)
        if teacher_logits is None:
            return None
        if self.teacher_kd == 'hard':
            return hard_distillation_loss(output, teacher_logits)
        return soft_distillation_loss(output, teacher_logits, self.kd_temperature)


def no_sync_unless(model: nn.Module) -> Callable[[bool], AbstractContextManager]:
    """``sync(final)``: DDP's ``no_sync()`` for every backward but the final one of a step (no-op without DDP)."""
    def sync(final: bool) -> AbstractContextManager:
        if final or not hasattr(model, 'no_sync'):
            return nullcontext()
        return model.no_sync()
    return sync
