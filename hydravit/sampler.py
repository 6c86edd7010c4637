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

__all__ = ['HeadSampler', 'normalize_weights']


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
