"""Dispatched-op counts: what a call costs the host, independent of the machine's timing noise.

On a GPU a small model's eager call is bound by what the host dispatches: every aten op costs a few microseconds
of CPU time, and every op that is not a view launches at least one kernel. Counting the ops that reach the
dispatcher below autograd (composite ops appear as the ops they decompose into) gives a deterministic measure that
any machine can take and a test can assert. The counter is a ``TorchDispatchMode``, torch's documented extension
point for intercepting aten calls (``torch.utils._python_dispatch``, which torch's own ``FlopCounterMode`` uses).
"""
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['OpCount', 'count_ops', 'inference_ops', 'training_step_ops']


@dataclass
class OpCount:
    """Ops dispatched by one call.

    ``total``: all aten ops; ``non_view``: those that are not views (each allocates or writes memory: a kernel on a
    GPU); ``allocated_bytes``: bytes of the fresh (non-view) tensors those ops returned; ``by_op``: count per op.
    """

    total: int = 0
    non_view: int = 0
    allocated_bytes: int = 0
    by_op: Dict[str, int] = field(default_factory=dict)


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.non_view = 0
        self.allocated = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[str(func)] += 1
        if not func.is_view:
            self.non_view += 1
            self.allocated += _fresh_bytes(out, args)
        return out


def _fresh_bytes(out, args) -> int:
    """Bytes of the output tensors that are new allocations (an in-place op returns its input)."""
    inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(t.untyped_storage().nbytes() for t in outs if isinstance(t, torch.Tensor) and id(t) not in inputs)


def count_ops(fn: Callable[[], object]) -> OpCount:
    """Count the aten ops that ``fn()`` dispatches (forward and, if ``fn`` calls it, backward)."""
    counter = _Counter()
    with counter:
        fn()
    return OpCount(total=sum(counter.ops.values()), non_view=counter.non_view, allocated_bytes=counter.allocated,
                   by_op=dict(counter.ops.most_common()))


def inference_ops(model: nn.Module, x: torch.Tensor) -> OpCount:
    """Ops of one ``model(x)`` under ``torch.inference_mode`` in eval mode, after one uncounted warm-up call
    (what a model builds once, at its first call at a width, is not a per-call cost)."""
    model.eval()
    with torch.inference_mode():
        model(x)
        return count_ops(lambda: model(x))


def training_step_ops(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                      loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> OpCount:
    """Ops of one forward + backward in train mode, counted on a step that follows an in-place parameter update.

    One uncounted step, then an SGD update of every parameter in place (as every step after an optimizer step
    sees: version counters bumped, which turns a cached autograd view of a parameter into a generic ``as_strided``
    one), then gradients set to None (``zero_grad(set_to_none=True)``, timm's default), then the counted step.
    ``x``: ``(B, C, H, W)``; ``target``: ``(B,)`` class indices. The model's gradients are left set.
    """
    loss_fn = loss_fn or F.cross_entropy
    model.train()

    def step() -> None:
        loss_fn(model(x), target).backward()

    step()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return count_ops(step)
