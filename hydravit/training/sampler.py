"""Which subnetwork (head count k) trains next: seeded, reproducible, checkpointable.

One ``HeadSampler`` draws for the whole job. Every DDP rank holds an identical copy (same seed, same
draws); each optimizer step draws one k per rank, so rank r trains ``draws[r]`` ("per-rank" policy, as
the original HydraViT where every GPU picks its own k) or every rank trains ``draws[0]`` ("shared"
policy). Because all copies stay identical, rank 0's state is the state of every rank: that is what goes
into checkpoints, and a resume continues the exact same sequence of head counts.
"""
import math
import numbers
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ['HeadSampler', 'SUBNET_POLICIES', 'normalize_weights', 'split_strata']

SUBNET_POLICIES = ('random', 'sandwich', 'stratified', 'largest')


def normalize_weights(weights: Optional[Sequence[float]], num_choices: int, flag: str = '--weights') -> List[float]:
    """Probabilities from positive weights (any scale; the original used percentages), uniform if None."""
    if weights is None:
        return [1.0 / num_choices] * num_choices
    weights = list(weights)
    if len(weights) != num_choices:
        raise ValueError(f'{flag}: got {len(weights)} weights for {num_choices} head counts '
                         '(give one per --heads entry)')
    bad = [w for w in weights if not isinstance(w, numbers.Real) or isinstance(w, bool) or not math.isfinite(w)]
    if bad:
        raise ValueError(f'{flag}: weights must be finite numbers, got {bad}')
    negative = [w for w in weights if w < 0]
    if negative:
        raise ValueError(f'{flag}: weights must be >= 0, got {negative}')
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f'{flag}: weights are all zero; at least one must be positive')
    return [float(w) / total for w in weights]


class HeadSampler:
    """Draws head counts from ``heads`` with probabilities ``weights`` (normalized; uniform if None).

    Args:
        heads: head counts to sample from (order matches ``weights``).
        weights: non-negative weights, any scale; None for uniform.
        seed: seed of the sampler's private ``torch.Generator`` (the global RNGs are untouched).
    """

    def __init__(self, heads: Sequence[int], weights: Optional[Sequence[float]] = None, seed: int = 0) -> None:
        if not heads:
            raise ValueError('--heads: give at least one head count')
        self.heads = [int(k) for k in heads]
        self.probs = normalize_weights(weights, len(self.heads))
        self._probs_tensor = torch.tensor(self.probs, dtype=torch.float64)
        self.generator = torch.Generator(device='cpu')
        self.generator.manual_seed(int(seed))
        self.counts = [0] * len(self.heads)  # draws used so far, per head count

    def sample(self, num: int = 1) -> List[int]:
        """Draw ``num`` i.i.d. head counts (one per rank). ``record`` counts the ones actually trained."""
        idx = torch.multinomial(self._probs_tensor, num, replacement=True, generator=self.generator).tolist()
        return [self.heads[i] for i in idx]

    def sample_distinct(self, candidates: Sequence[int], num: int) -> List[int]:
        """``num`` distinct head counts from ``candidates`` (a subset of ``heads``), weighted by their
        probabilities: successive draws without replacement (``check_step`` ensures enough positive weights)."""
        if num <= 0:
            return []
        probs = torch.tensor([self.probs[self.heads.index(k)] for k in candidates], dtype=torch.float64)
        idx = torch.multinomial(probs, num, replacement=False, generator=self.generator).tolist()
        return [candidates[i] for i in idx]

    def draw_step(self, num_subnets: int, policy: str) -> List[int]:
        """The head counts of one multi-subnetwork step, distinct and largest first (the same on every rank).

        ``random``: ``num_subnets`` weighted draws without replacement. ``sandwich``: the largest and the
        smallest head count plus ``num_subnets - 2`` weighted draws from the others (US-Nets' sandwich rule).
        ``stratified``: the largest and the smallest plus one weighted draw from each of ``num_subnets - 2``
        equal-size strata of the others (Scala's stable sampling). ``largest``: the largest plus
        ``num_subnets - 1`` weighted draws from the others (the full width every step at the least extra cost:
        with N = 2, one drawn subnetwork instead of the sandwich's three).
        """
        if policy == 'random':
            drawn = self.sample_distinct(self.heads, num_subnets)
        elif policy == 'largest':
            top = max(self.heads)
            drawn = [top] + self.sample_distinct([k for k in self.heads if k != top], num_subnets - 1)
        else:
            ends = [max(self.heads), min(self.heads)][:num_subnets]
            middle = sorted(k for k in self.heads if k not in ends)
            if policy == 'sandwich':
                drawn = ends + self.sample_distinct(middle, num_subnets - len(ends))
            elif policy == 'stratified':
                drawn = ends + [self.sample_distinct(stratum, 1)[0]
                                for stratum in split_strata(middle, num_subnets - len(ends))]
            else:
                raise ValueError(f'--subnet-policy: one of {", ".join(SUBNET_POLICIES)}, got {policy!r}')
        return sorted(drawn, reverse=True)

    def check_step(self, num_subnets: int, policy: str) -> None:
        """Raise ValueError, naming the flag, when ``draw_step(num_subnets, policy)`` cannot be drawn."""
        if policy not in SUBNET_POLICIES:
            raise ValueError(f'--subnet-policy: one of {", ".join(SUBNET_POLICIES)}, got {policy!r}')
        if num_subnets < 1:
            raise ValueError(f'--subnets-per-step: must be >= 1, got {num_subnets}')
        if num_subnets > len(self.heads):
            raise ValueError(f'--subnets-per-step: {num_subnets} distinct subnetworks per step, but --heads has '
                             f'only {len(self.heads)} head counts')
        if policy != 'random' and num_subnets < 2:
            every_step = 'the largest head count' if policy == 'largest' else 'the largest and the smallest head count'
            raise ValueError(f'--subnet-policy {policy}: needs --subnets-per-step >= 2 ({every_step} every step)')
        positive = {k for k, p in zip(self.heads, self.probs, strict=True) if p > 0}
        ends = {max(self.heads), min(self.heads)}
        if policy == 'random':
            pools, draws = [self.heads], [num_subnets]
        elif policy == 'largest':
            pools, draws = [[k for k in self.heads if k != max(self.heads)]], [num_subnets - 1]
        elif policy == 'sandwich':
            pools, draws = [[k for k in self.heads if k not in ends]], [num_subnets - 2]
        else:
            pools = split_strata(sorted(k for k in self.heads if k not in ends), num_subnets - 2)
            draws = [1] * len(pools)
        for pool, num in zip(pools, draws, strict=True):
            if sum(k in positive for k in pool) < num:
                raise ValueError(f'--weights: --subnet-policy {policy} draws {num} distinct head count(s) from '
                                 f'{sorted(pool)}, but fewer have a positive weight')

    def record(self, ks: Sequence[int]) -> None:
        """Count head counts that were actually trained (for the histogram)."""
        for k in ks:
            self.counts[self.heads.index(k)] += 1

    def histogram(self) -> Dict[int, int]:
        """{k: times trained so far}."""
        return dict(zip(self.heads, self.counts, strict=True))

    def format_histogram(self) -> str:
        total = max(1, sum(self.counts))
        return ' '.join(f'{k}:{100.0 * c / total:.0f}%' for k, c in zip(self.heads, self.counts, strict=True))

    def state_dict(self) -> dict:
        """Weights-only-loadable state: generator state as a uint8 tensor, plain lists otherwise."""
        return {
            'heads': list(self.heads),
            'probs': list(self.probs),
            'counts': list(self.counts),
            'generator': self.generator.get_state().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state['heads']) != self.heads:
            raise ValueError(f'sampler state is for heads {list(state["heads"])}, this run samples {self.heads}')
        if not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(state['probs'], self.probs, strict=True)):
            raise ValueError(f'sampler state has probabilities {list(state["probs"])}, this run uses {self.probs}')
        self.counts = [int(c) for c in state['counts']]
        self.generator.set_state(state['generator'])

    def __repr__(self) -> str:
        pairs = ', '.join(f'{k}: {p:.3f}' for k, p in zip(self.heads, self.probs, strict=True))
        return f'HeadSampler({{{pairs}}})'


def split_strata(values: Sequence[int], num: int) -> List[List[int]]:
    """``values`` (sorted) cut into ``num`` contiguous strata whose sizes differ by at most one."""
    if num <= 0:
        return []
    if num > len(values):
        raise ValueError(f'cannot split {len(values)} head counts into {num} strata')
    base, extra = divmod(len(values), num)
    strata, start = [], 0
    for i in range(num):
        size = base + (1 if i < extra else 0)
        strata.append(list(values[start:start + size]))
        start += size
    return strata
