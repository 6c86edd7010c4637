"""Elastic runtime: run each batch at the most accurate trained head count that holds a latency budget.

``ElasticRunner(model, latency_budget_ms)`` is a callable. Every call is timed with the evaluation
core's ``time_call`` (CUDA events on GPU, i.e. synchronized; a clock elsewhere) and fed to a
``HeadController``, which picks the k of the next call. It serves only the k the model was trained on
(or ``heads``), less any k a profile puts under ``min_top1``. Latencies are carried across head counts
by costs: per k, a running low quantile of that k's own calls; a profile's latency medians, or without
one k² (the linear layers' MACs grow with the square of the width), only seed the k not yet run.

* Step down as soon as calls run over: when the p90 of the calls at the current k (the last
  ``window`` of them) is over the budget -- 3 of 20 calls over, or already 1 of a k's first 9 --
  go straight to the most accurate k whose predicted latency is ``headroom`` (15 %) under the budget.
  The smallest allowed k is the floor: when nothing fits, it serves there, over budget.
* Step up after a full window with headroom: to the most accurate k whose predicted p90 (the
  window's p90 scaled by the costs) is ``up_margin`` (5 %) under the budget. When the window has the
  full headroom but the scaled prediction rules every larger k out, try the next k if it fits with its
  cost added as a fixed delay instead: CPU time-slicing adds a delay per call rather than scaling it.
* Hysteresis: entering a k needs that margin and leaving it needs its p90 over the budget, so a
  steady load settles on one k. A k just left is blocked for ``backoff_s`` (0.5 s), doubling on each
  quick repeat up to ``max_backoff_s``; a prediction of the full headroom at that k lifts the block,
  so the runner climbs back as soon as a load ends. Learned costs make that prediction right after a load:
  the k held before it kept its measured cost, where k² would overstate it.
* ``objective='goodput'`` replaces the p90 target by the level of highest expected goodput (top-1 times the share
  of the window's latencies, scaled to the level, within the budget); the p90 step down stays as a safety net.
  The p90 rule lets the level it holds run over on up to one call in ten, which costs goodput as soon as levels are
  fine enough to sit at that edge (a cascade's thresholds are).

``ElasticCascadeRunner(CascadeRunner(...), latency_budget_ms, points)`` serves a confidence cascade
(``hydravit.deploy.cascade``) the same way. Its levels are operating points, not head counts: cascade specs (a fixed
k is one) with their calibrated top-1 and latency, cheapest first, each more accurate than every cheaper one
(``operating_frontier``). A ``CascadeController`` is the ``HeadController`` above over those levels: the same step
down, step up, hysteresis, back-off and learned costs. Along one ladder, neighbouring levels differ by a threshold,
which moves a few images between widths: a finer knob than one step of k; between ladders, the widths change.

On CUDA, ``cuda_graph=True`` serves every call by replaying a CUDA graph of its k (``evaluation.cuda_graph``): one
graph per k of the runner, all captured at construction from ``example_input``, so no served call ever pays a
warm-up or a capture (a capture at first use would show up as an over-budget call and push the controller down), and
a switch of k is a dictionary lookup, with nothing recompiled. The cost: one private memory pool per k, holding that
k's forward activations at the example's batch, for the runner's lifetime (small at batch 1, where
scripts/check_cuda_graph.py prints the figure; restrict ``heads`` for large batches). Batches must have the
example's shape, dtype and device (another is refused with a ``ValueError``); on the CPU nothing changes:
``cuda_graph`` is refused there.
"""
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..cli import parse_heads
from ..evaluation.cascade import CascadeSpec, nearest_rank
from ..evaluation.common import Row
from ..evaluation.cuda_graph import GraphBackend, GraphCache, heads_forward
from ..evaluation.throughput import time_call
from .cascade import CascadeOutput, CascadeRunner
from .pick import accuracy_key
from .profile import profile_rows

ProfileLike = Union[str, dict, Sequence[Row]]
OBJECTIVES = ('p90', 'goodput')


class HeadController:
    """The decision rule alone: latencies in, head count out (no model, no timing).

    ``costs``: the seed latency per k (ms, e.g. a profile's medians; default k²). The controller replaces them
    with what it measures: each time it enters a k, the first call there against the last call at the k it came
    from, two calls under the same load, gives that k's cost relative to the other's (the median of the last
    ``samples`` such measurements per k); the seed is only scaled for the k it has not run yet. So a k measured
    before a load and a k measured under it are comparable, and after a load the runner returns to the k it held.
    Given ``costs`` are taken as measured without load: when a full window at the current k has its median within
    ``recalibrate_within`` (a fraction; None: never) of that k's seed, the device is as it was when measured, and
    the costs learned since are dropped, so the seeds' ratios hold again. (Under a load that time-slices the CPU
    the ratio of two widths' latencies grows -- a k = 4 call waits about as long for its slices as a k = 8 call --
    so a cost learned when the runner stepped down under load overstates the larger k once the load is gone, and
    kept it at the smaller k.) Without ``costs`` (k² seeds, not milliseconds) nothing is dropped.
    ``accuracy``: top-1 per k; among the k that fit, the most accurate is chosen (without it: the largest).
    The "head counts" are only ordered levels whose cost grows with the level: ``CascadeController`` passes the
    indices of its operating points.

    ``objective``: ``'p90'`` (default) holds the window's p90 within the budget, so the level it settles on may run
    over on up to one call in ten. ``'goodput'`` (needs ``accuracy``) chooses the level of highest expected goodput
    instead, the share of requests answered right within the budget: ``accuracy[j]`` times the share of the
    window's latencies that, scaled to level j by the costs, are within the budget (the entry margin for a larger
    level). Every call with at least ``min_samples`` in the window may step down to such a level; a full window may
    step up to one (blocked levels as above); the p90 rule still steps down. A level 0.2 p.p. more accurate is then
    not worth one call in ten over the budget, where the p90 rule would hold it.
    """

    def __init__(self, heads: Sequence[int], budget_ms: float, costs: Optional[Dict[int, float]] = None,
                 start: Optional[int] = None, window: int = 20, quantile: float = 0.9, headroom: float = 0.15,
                 up_margin: float = 0.05, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 stable_s: float = 10.0, accuracy: Optional[Dict[int, float]] = None, objective: str = 'p90',
                 min_samples: int = 5, recalibrate_within: Optional[float] = 0.1) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f'objective must be one of {OBJECTIVES}, got {objective!r}')
        if objective == 'goodput' and not accuracy:
            raise ValueError("objective 'goodput' needs the accuracy of every level (a profile with top1)")
        if budget_ms <= 0:
            raise ValueError(f'latency budget must be > 0 ms, got {budget_ms}')
        if window < 2 or not 0 < quantile < 1 or not 0 <= headroom < 1:
            raise ValueError(f'need window >= 2, 0 < quantile < 1, 0 <= headroom < 1; got {window}, {quantile}, '
                             f'{headroom}')
        self.heads = sorted(heads)
        self.budget_ms = float(budget_ms)
        seeds = dict(costs) if costs else {k: float(k * k) for k in self.heads}
        if any(k not in seeds for k in self.heads):
            raise ValueError(f'costs must cover every head count {self.heads}, got {sorted(seeds)}')
        self.seed_costs = {k: float(seeds[k]) for k in self.heads}
        self.recalibrate_within = recalibrate_within if costs else None  # k² seeds are no latencies to return to
        self.learned: Dict[int, Deque[float]] = {}  # per k: its cost (ms) measured at each entry
        self.samples = 5
        self._entered_from: Optional[Tuple[int, float]] = None  # (k, latency of its last call) at the last switch
        self.rank = {k: (accuracy[k] if accuracy else k, -k) for k in self.heads}  # larger is preferred
        self.accuracy = {k: float(accuracy[k]) for k in self.heads} if accuracy else None
        self.objective, self.min_samples = objective, max(1, min(min_samples, window))
        self.window, self.quantile, self.headroom = window, quantile, headroom
        self.up_margin = up_margin
        self.backoff_s, self.max_backoff_s, self.stable_s = backoff_s, max_backoff_s, stable_s
        self.k = self.heads[-1] if start is None else start
        if self.k not in self.heads:
            raise ValueError(f'start k={self.k} is not one of heads {self.heads}')
        self._recent: Deque[float] = deque(maxlen=window)
        self._over = 0
        self._since = float('-inf')  # when the current k was entered
        self._blocked_until: Dict[int, float] = {}
        self._backoff: Dict[int, float] = {}
        self._costs: Optional[Dict[int, float]] = None  # the cost table, rebuilt after each call

    def update(self, latency_ms: float, now: float) -> int:
        """Record one call at the current k (``now``: seconds) and return the k for the next call."""
        if len(self._recent) == self.window:
            self._over -= self._recent[0] > self.budget_ms
        self._recent.append(latency_ms)
        self._over += latency_ms > self.budget_ms
        self._learn(latency_ms)
        self._recalibrate()
        if self._over > int(len(self._recent) * (1 - self.quantile) + 1e-9):  # the p90 of the calls so far is over
            self._step_down(now)
        elif self.objective == 'goodput':
            if len(self._recent) >= self.min_samples:
                self._to_best_goodput(now)
        elif len(self._recent) == self.window:
            self._step_up(now)
        return self.k

    def _learn(self, latency_ms: float) -> None:
        """The first call at a k: its cost relative to the k the runner came from (the very first call sets the
        scale)."""
        if self._entered_from is None and self.learned:
            return
        if self._entered_from is None:
            cost = latency_ms
        else:
            previous, previous_ms = self._entered_from
            cost = self.costs[previous] * latency_ms / previous_ms
        self.learned.setdefault(self.k, deque(maxlen=self.samples)).append(cost)
        self._entered_from, self._costs = None, None

    def _recalibrate(self) -> None:
        """Drop the learned costs when a full window at the current k runs as fast as its seed said (see the class
        docstring); only when another k's cost was learned, so that there is something to forget."""
        if (self.recalibrate_within is None or len(self._recent) < self.window
                or not set(self.learned) - {self.k}):
            return
        if float(np.median(self._recent)) <= self.seed_costs[self.k] * (1 + self.recalibrate_within):
            self.learned.clear()  # the next call at this k sets the scale again, as the very first call did
            self._entered_from, self._costs = None, None

    @property
    def costs(self) -> Dict[int, float]:
        """Latency per k (ms, at the load of the first call): the median of the k's own measurements where it has
        run, else the seed scaled to the nearest k that has (the one below, else above) and capped by the next
        measured k above; made non-decreasing in k, since a larger k never costs less."""
        if self._costs is None:
            known = {k: float(np.median(values)) for k, values in self.learned.items()}
            table, previous = {}, 0.
            for k in self.heads:
                if k in known:
                    cost = known[k]
                else:
                    below = [j for j in known if j < k]
                    ref = max(below) if below else min(known, default=None)
                    cost = self.seed_costs[k] if ref is None else known[ref] * self.seed_costs[k] / self.seed_costs[ref]
                    cost = min([cost] + [known[j] for j in known if j > k])
                previous = table[k] = max(cost, previous)
            self._costs = table
        return self._costs

    def predicted_ms(self, latency_ms: float, k: int) -> float:
        """``latency_ms`` measured at the current k, scaled to k by the relative costs."""
        costs = self.costs
        return latency_ms * costs[k] / costs[self.k]

    def _target_ms(self) -> float:
        return self.budget_ms * (1 - self.headroom)

    def _entry_ms(self) -> float:
        """The latency a larger k must be predicted under to be entered."""
        return self.budget_ms * (1 - self.up_margin)

    def _ceiling(self, now: float) -> int:
        """The smallest larger k still blocked after a recent failure (past the largest when none is)."""
        return min((k for k, until in self._blocked_until.items() if until > now and k > self.k),
                   default=self.heads[-1] + 1)

    def _best(self, candidates: Sequence[int]) -> int:
        return max(candidates, key=self.rank.__getitem__)

    def _block(self, now: float) -> None:
        """Back off before trying the current k again: briefly after a long stay, twice as long after each quick
        failure."""
        stable = now - self._since >= self.stable_s
        backoff = self.backoff_s if stable else min(2 * self._backoff.get(self.k, self.backoff_s / 2),
                                                    self.max_backoff_s)
        self._backoff[self.k] = backoff
        self._blocked_until[self.k] = now + backoff

    def expected_goodput(self, k: int, limit_ms: Optional[float] = None) -> float:
        """accuracy[k] (%) times the share of the window's latencies that, scaled from the current k to k by the
        costs, are within ``limit_ms`` (default: the budget)."""
        limit = self.budget_ms if limit_ms is None else limit_ms
        scale = self.costs[k] / self.costs[self.k]
        return self.accuracy[k] * sum(ms * scale <= limit for ms in self._recent) / len(self._recent)

    def _to_best_goodput(self, now: float) -> None:
        scores = {k: self.expected_goodput(k) for k in self.heads if k <= self.k}
        if len(self._recent) == self.window:
            ceiling, entry_ms = self._ceiling(now), self._entry_ms()
            scores.update({k: self.expected_goodput(k, entry_ms) for k in self.heads if self.k < k < ceiling})
        best = max(scores, key=lambda k: (scores[k], self.rank[k]))
        if scores[best] > scores[self.k]:
            if best < self.k:
                self._block(now)
            self._switch(best, now)

    def _step_down(self, now: float) -> None:
        lower = [k for k in self.heads if k < self.k]
        if not lower:
            return  # the smallest allowed k: it keeps serving, over budget, and never goes below the set
        self._block(now)
        recent = sorted(list(self._recent)[-3:])  # the latest calls, the one that ran over among them
        estimate = recent[len(recent) // 2]
        fitting = [k for k in lower if self.predicted_ms(estimate, k) <= self._target_ms()]
        self._switch(self._best(fitting) if fitting else lower[0], now)

    def _step_up(self, now: float) -> None:
        ceiling = self._ceiling(now)
        p = nearest_rank(self._recent, self.quantile)
        entry_ms = self._entry_ms()
        # A k predicted to fit is entered unless it failed recently; a prediction of clear headroom overrides that.
        fitting = [k for k in self.heads if k > self.k and (
            self.predicted_ms(p, k) <= self._target_ms() or (k < ceiling and self.predicted_ms(p, k) <= entry_ms))]
        larger = [k for k in self.heads if k > self.k]
        if not fitting and larger and larger[0] < ceiling and p <= self._target_ms():
            # Clear headroom here, yet the scaled prediction says no: a load that adds a fixed delay per call
            # (CPU time-slicing) inflates that prediction. Try the next k if it fits with the delay added instead.
            costs = self.costs
            if p + costs[larger[0]] - costs[self.k] <= entry_ms:
                fitting = larger[:1]
        if fitting and self.rank[self._best(fitting)] > self.rank[self.k]:
            self._switch(self._best(fitting), now)

    def _switch(self, k: int, now: float) -> None:
        self._entered_from = (self.k, self._recent[-1])
        self.k, self._since = k, now
        self._recent.clear()
        self._over = 0


class ElasticRunner:
    """Callable that runs ``model`` at a head count chosen to keep the recent p90 latency within budget.

    ``model``: any module with ``set_heads(k)`` and ``num_heads`` (a HydraViT). ``heads``: the head counts it
    may serve; default: those the model was trained on (``model.trained_heads``, set when hydravit loads a
    training checkpoint), else the profile's; never every k by default, since a width outside training answers at
    chance. ``profile``: a profile (file, object, or rows with ``heads`` and latency columns, optionally
    ``top1``) that seeds the costs and gives the start: the most accurate k whose profiled p90 is within the
    budget less ``up_margin`` (without accuracies: the largest such k), else the smallest k. Without a profile it
    starts at the largest k and seeds the costs with k². Either way the costs are then learned from the runner's
    own calls (``HeadController``).

    ``min_top1``: drop every k whose profiled top-1 (%) is below it; needs a profile with ``top1``. When no
    allowed k fits the budget the runner serves the smallest allowed k and those calls count as over budget: it
    never steps below the floor.

    ``runner.active_heads`` is the current k and ``runner.history`` holds ``(seconds since creation, k,
    latency_ms)`` per call (the last ``max_history``). Calls are not thread-safe; wrap them in
    ``torch.inference_mode()`` as usual.

    ``forward``: what one call runs on its input (default ``model(x)``), e.g. the model under ``torch.autocast``.
    ``cuda_graph``: serve from one CUDA graph per k, all captured here from ``example_input`` (a batch of the shape,
    dtype and device every call will have); calls then take that one tensor and return a fresh output tensor.
    ``graph_backend`` replaces the CUDA capture (tests). ``objective``: the controller's rule, ``'p90'`` or
    ``'goodput'`` (``HeadController``; goodput needs a profile with ``top1``).

    Raises ``TypeError`` for a model without ``set_heads``; ``ValueError`` for a bad head set, no head set to
    default to, a floor without profiled accuracies or one no k reaches, ``cuda_graph`` without
    ``example_input`` or off CUDA.
    """

    def __init__(self, model, latency_budget_ms: float, heads: Optional[Sequence[int]] = None,
                 profile: Optional[ProfileLike] = None, *, min_top1: Optional[float] = None, window: int = 20,
                 quantile: float = 0.9, headroom: float = 0.15, up_margin: float = 0.05,
                 clock: Callable[[], float] = time.perf_counter, max_history: Optional[int] = 100_000,
                 forward: Optional[Callable[..., Any]] = None, cuda_graph: bool = False,
                 example_input: Optional[torch.Tensor] = None, graph_backend: Optional[GraphBackend] = None,
                 objective: str = 'p90') -> None:
        if not (hasattr(model, 'set_heads') and hasattr(model, 'num_heads')):
            raise TypeError('ElasticRunner needs a model with set_heads(k) and num_heads (e.g. a HydraViT)')
        if cuda_graph and example_input is None:
            raise ValueError('cuda_graph needs example_input: a batch of the shape, dtype and device the calls will '
                             'have (the graphs are captured from it at construction)')
        self.model = model
        self.forward = forward if forward is not None else model
        profiled = _latency_rows(profile) if profile is not None else None
        heads = sorted(parse_heads(_default_heads(model, heads, profiled), model.num_heads, 'heads'))
        rows = _rows_of(profiled, heads) if profiled is not None else None
        accuracy = _accuracy(rows) if rows is not None else None
        self.dropped = _below_floor(accuracy, min_top1) if min_top1 is not None else []
        heads = [k for k in heads if k not in self.dropped]
        entry_ms = latency_budget_ms * (1 - up_margin)  # the runner enters a k only with this margin
        if rows is not None:
            rows = [row for row in rows if row['heads'] in heads]
            accuracy = _accuracy(rows)
        costs, start = _from_profile(rows, entry_ms) if rows is not None else (None, None)
        self.controller = HeadController(heads, latency_budget_ms, costs, start, window, quantile, headroom,
                                         up_margin, accuracy=accuracy, objective=objective)
        self.clock = clock
        self.device = _device_of(model)
        self.history: Deque[Tuple[float, int, float]] = deque(maxlen=max_history)
        self.graphs: Optional[GraphCache] = None
        if cuda_graph:
            self.graphs = GraphCache(heads_forward(model, self.forward), self.device, backend=graph_backend)
            for k in self.heads:  # all at construction: no served call includes a capture
                self.graphs.capture(k, example_input)
        self.t0 = clock()  # history times are seconds since this
        self._set(self.controller.k)

    @property
    def active_heads(self) -> int:
        return self.controller.k

    @property
    def heads(self) -> List[int]:
        return self.controller.heads

    @property
    def latency_budget_ms(self) -> float:
        return self.controller.budget_ms

    def __call__(self, *args, **kwargs):
        k = self.controller.k
        if k != self._k:
            self._set(k)
        return _timed_call(self, k, self._call(k, args, kwargs), self.device)

    def _call(self, k: int, args: tuple, kwargs: dict) -> Callable[[], Any]:
        """The work of one call at k: the forward, or the replay of k's graph (one tensor in)."""
        if self.graphs is None:
            return lambda: self.forward(*args, **kwargs)
        if len(args) != 1 or kwargs:
            raise TypeError('an ElasticRunner with cuda_graph takes one input tensor per call')
        return lambda: self.graphs(k, args[0])

    def _set(self, k: int) -> None:
        self.model.set_heads(k)  # O(1) for a HydraViT; with graphs only bookkeeping (each graph has its k)
        self._k = k


@dataclass(frozen=True)
class OperatingPoint:
    """One way to serve a batch and what calibration says of it: ``spec`` (a cascade; a single k is a fixed width),
    ``top1`` (%, calibrated on images the benchmark does not report on), ``latency_ms`` (median per call at the
    serving batch without load) and ``latency_ms_p90`` (the controller's seed cost and the start's criterion)."""

    spec: CascadeSpec
    top1: float
    latency_ms: float
    latency_ms_p90: float

    def __post_init__(self) -> None:
        values = (self.top1, self.latency_ms, self.latency_ms_p90)
        if not all(math.isfinite(v) for v in values) or self.latency_ms <= 0 or self.latency_ms_p90 <= 0:
            raise ValueError(f'operating point {self.spec.name}: top1 and latencies must be finite, latencies > 0; '
                             f'got {values}')


def operating_frontier(points: Sequence[OperatingPoint], min_top1: Optional[float] = None,
                       min_gain: float = 0.0) -> List[OperatingPoint]:
    """The points a load controller moves along: those at or above ``min_top1``, ordered by p90 latency (the
    controller's criterion; then by median), each more accurate than every cheaper one (a point that costs more for
    no more accuracy is never worth entering), by at least ``min_gain`` (p.p.) when it is > 0.

    ``min_gain``: a cascade's calibrated top-1 is a mean over batch draws, so two points can differ by a fraction of
    one calibration image, a difference no held-out image can confirm; a level that buys such a difference costs
    latency under load (calls over the budget) for nothing. ``100 / n`` for ``n`` calibration images keeps only
    points that answer at least one more image right, the resolution of a fixed k's top-1 (what the head
    controller's levels differ by). ``ValueError`` for no points, a negative ``min_gain``, or when none reaches the
    floor."""
    if not points:
        raise ValueError('no operating points given')
    if not min_gain >= 0:  # NaN too
        raise ValueError(f'min_gain must be >= 0 p.p., got {min_gain}')
    allowed = [p for p in points if min_top1 is None or p.top1 >= min_top1]
    if not allowed:
        best = max(points, key=lambda p: p.top1)
        raise ValueError(f'min_top1 {min_top1:g}: no operating point reaches it (best: {best.top1:g} % at '
                         f'{best.spec.name})')
    frontier: List[OperatingPoint] = []
    for point in sorted(allowed, key=lambda p: (p.latency_ms_p90, p.latency_ms, -p.top1)):
        gain = point.top1 - frontier[-1].top1 if frontier else math.inf
        if gain > 0 and gain >= min_gain * (1 - 1e-9):  # a one-image gain, whatever its float rounding
            frontier.append(point)
    return frontier


class CascadeController(HeadController):
    """``HeadController`` whose levels are operating points instead of head counts: level i is ``points[i]`` of
    ``operating_frontier(points, min_top1, min_gain)`` (cheapest first), so every rule of the head controller
    -- step down at once to the most accurate point predicted to fit with headroom, step up after a full window
    with margin, hysteresis, back-off, costs learned on entry -- applies unchanged. Moving one level changes a
    cascade's thresholds (a finer knob than one step of k) or, between ladders, its widths; fixed k are levels too.
    The seed costs are the points' ``latency_ms_p90``: the controller's criterion is the p90 of its calls, and a
    cascade's calls spread more than a fixed k's (their re-run share varies by batch), so scaling by medians would
    underestimate a cascade's p90. The start is the most accurate point whose ``latency_ms_p90`` is within the budget
    less ``up_margin``, else the cheapest. ``point`` is the current operating point."""

    def __init__(self, points: Sequence[OperatingPoint], budget_ms: float, min_top1: Optional[float] = None,
                 up_margin: float = 0.05, min_gain: float = 0.0, **kwargs) -> None:
        self.points = operating_frontier(points, min_top1, min_gain)
        rows = [{'heads': i, 'latency_ms_p90': p.latency_ms_p90, 'top1': p.top1} for i, p in enumerate(self.points)]
        costs, start = _from_profile(rows, budget_ms * (1 - up_margin), cost_key='latency_ms_p90')
        super().__init__(range(len(self.points)), budget_ms, costs, start, up_margin=up_margin,
                         accuracy={i: p.top1 for i, p in enumerate(self.points)}, **kwargs)

    @property
    def point(self) -> OperatingPoint:
        return self.points[self.k]


class ElasticCascadeRunner:
    """Callable that serves a ``CascadeRunner`` at the operating point a ``CascadeController`` chooses to keep the
    recent p90 latency within budget: before each call it sets ``runner.spec`` to the current point's cascade.

    ``points``: the operating points (e.g. every ladder at a grid of thresholds, and the fixed k, evaluated on
    calibration records); ``min_top1`` drops those under the floor, ``min_gain`` those not that much more accurate
    than a cheaper one (``operating_frontier``), and when no allowed point fits, the runner serves
    the cheapest allowed one, over budget, never one below. ``runner.history`` holds ``(seconds since creation,
    level, latency_ms)`` per call, the level indexing ``runner.points``. Calls take one batch ``(B, C, H, W)`` and
    return the ``CascadeOutput``; they are timed on the batch's device (``time_call``); ``objective`` as for the
    ``HeadController``. Raises ``ValueError`` when a
    point's ladder uses a k the ``CascadeRunner`` has no stage for.
    """

    def __init__(self, runner: CascadeRunner, latency_budget_ms: float, points: Sequence[OperatingPoint], *,
                 min_top1: Optional[float] = None, min_gain: float = 0.0, window: int = 20, quantile: float = 0.9,
                 headroom: float = 0.15, up_margin: float = 0.05, clock: Callable[[], float] = time.perf_counter,
                 max_history: Optional[int] = 100_000, objective: str = 'p90') -> None:
        self.controller = CascadeController(points, latency_budget_ms, min_top1, up_margin=up_margin,
                                            min_gain=min_gain, window=window, quantile=quantile, headroom=headroom,
                                            objective=objective)
        missing = sorted({k for p in self.points for k in p.spec.ladder if k not in runner.stages})
        if missing:
            raise ValueError(f'the cascade runner has no stage for head count(s) {missing} of the operating points')
        self.runner = runner
        self.clock = clock
        self.history: Deque[Tuple[float, int, float]] = deque(maxlen=max_history)
        self.t0 = clock()

    @property
    def points(self) -> List[OperatingPoint]:
        return self.controller.points

    @property
    def point(self) -> OperatingPoint:
        return self.controller.point

    @property
    def latency_budget_ms(self) -> float:
        return self.controller.budget_ms

    def __call__(self, images: torch.Tensor) -> CascadeOutput:
        level = self.controller.k
        self.runner.spec = self.points[level].spec
        return _timed_call(self, level, lambda: self.runner(images), images.device)


def _timed_call(runner, level: int, work: Callable[[], Any], device: torch.device) -> Any:
    """Run ``work`` timed (``time_call``), record ``(seconds since t0, level, ms)`` in ``runner.history`` and feed the
    latency to ``runner.controller``: the one timing path of both runners."""
    start = runner.clock()
    out, latency_ms = time_call(work, device, runner.clock)
    runner.history.append((start - runner.t0, level, latency_ms))
    runner.controller.update(latency_ms, start + latency_ms / 1e3)
    return out


def _default_heads(model, heads: Optional[Sequence[int]], rows: Optional[List[Row]]) -> List[int]:
    if heads is not None:
        return list(heads)
    trained = getattr(model, 'trained_heads', None)
    if trained:
        return list(trained)
    if rows is not None:
        return [row['heads'] for row in rows]
    raise ValueError('heads: the model records no trained head counts and no profile was given; pass heads=[...] '
                     '(the k it was trained on): the runner never serves every k by default')


def _rows_of(rows: List[Row], heads: Sequence[int]) -> List[Row]:
    """The profile's row of each k of ``heads``, in that order; ``ValueError`` naming the k it lacks."""
    by_k = {row['heads']: row for row in rows}
    missing = [k for k in heads if k not in by_k]
    if missing:
        raise ValueError(f'profile has no latency for heads {missing}')
    return [by_k[k] for k in heads]


def _accuracy(rows: List[Row]) -> Optional[Dict[int, float]]:
    """Profiled top-1 per k, or None when the profile has no accuracies."""
    if rows[0].get('top1') is None:
        return None
    return {row['heads']: float(row['top1']) for row in rows}


def _below_floor(accuracy: Optional[Dict[int, float]], min_top1: float) -> List[int]:
    """The k under the accuracy floor; ``ValueError`` without accuracies or when every k is under it."""
    if accuracy is None:
        raise ValueError('min_top1 needs a profile with top1 for every k (profile with DATA or --accuracy)')
    below = sorted(k for k, top1 in accuracy.items() if top1 < min_top1)
    if len(below) == len(accuracy):
        best = max(accuracy, key=accuracy.__getitem__)
        raise ValueError(f'min_top1 {min_top1:g}: no head count reaches it (best: {accuracy[best]:g} % at k={best})')
    return below


def _device_of(model) -> torch.device:
    tensors = getattr(model, 'parameters', None)
    first = next(tensors(), None) if callable(tensors) else None
    return first.device if first is not None else torch.device('cpu')


def _from_profile(rows: List[Row], entry_ms: float, cost_key: str = 'latency_ms_median'
                  ) -> Tuple[Dict[int, float], int]:
    """(seed cost per k in ms: each row's ``cost_key``, start k) from the rows of the served k, in k order: the start
    is the most accurate k whose profiled p90 is within ``entry_ms``, else the smallest."""
    # A larger k never costs less; a noisy measurement that says so would make the runner jump too far.
    seeds = np.maximum.accumulate([float(row[cost_key]) for row in rows])
    costs = {row['heads']: cost for row, cost in zip(rows, seeds.tolist(), strict=True)}
    fitting = [row for row in rows if row['latency_ms_p90'] <= entry_ms]
    if not fitting:
        return costs, rows[0]['heads']
    acc = accuracy_key(fitting)
    return costs, max(fitting, key=lambda row: (row[acc], -row['heads']))['heads']


def _latency_rows(profile: ProfileLike) -> List[Row]:
    """A whole profile (file or object, checked against the schema), or bare rows with latency columns."""
    if isinstance(profile, (str, Path, dict)):
        return profile_rows(profile)
    rows = [{'top1': None, **row} for row in profile]
    needed = ('heads', 'latency_ms_median', 'latency_ms_p90')
    bad = [row for row in rows if not all(isinstance(row.get(key), (int, float)) for key in needed)]
    if not rows or bad:
        raise ValueError(f'profile rows need numeric {needed}; got {bad[:1] or "no rows"}')
    if len({row['top1'] is None for row in rows}) > 1:
        raise ValueError('profile rows: give top1 for every row or none')
    return rows
