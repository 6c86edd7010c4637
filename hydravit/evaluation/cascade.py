"""Confidence cascades over the nested widths, measured exactly from per-image records.

A cascade (ThinkingViT, Hojjat et al. 2025) runs the narrowest width of a ladder k1 < k2 < ... on every image and
re-runs only the images it is not confident about at the next width; each image is answered by the stage where it
exits. Whether image i exits at stage s depends only on the k_s logits of image i, so one pass that records, for
every image and every width, the prediction and the confidence (``CascadeRecords``) evaluates any ladder and any
thresholds exactly, without running the model again (``evaluate_cascade``). The deploy tools serve what these
functions choose (``hydravit.deploy.cascade``); ``validate.py --cascade`` prints them.

Exit rules (``RULES``): ``entropy``, the softmax's entropy in nats, exits when ``<= threshold`` (ThinkingViT's rule);
``max_prob``, the top-1 softmax probability, exits when ``>= threshold``.

**Re-run caps** (``CascadeSpec.rerun_cap``): a serving runtime with a latency budget can bound the sub-batch a later
stage runs: at most ``floor(share * B)`` images of a batch of B go on past stage s; when more are unconfident, the
least confident of them (highest entropy, lowest top-1 probability; the earlier in the batch on ties) go on and the
others are answered where they are. A capped cascade's answers depend on which images share a batch, so it is
evaluated on explicit batches of record indices (``exit_stages(..., batches=)``), e.g. random draws.
"""
import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

RULES = ('entropy', 'max_prob')


def confidence(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """Per-row confidence of ``logits`` ``(N, C)`` under ``rule``: entropy of the softmax in nats (lower is more
    confident) or the top-1 probability (higher is). Returns ``(N,)`` float32."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    if rule == 'entropy':
        return -(log_p.exp() * log_p).sum(-1)
    if rule == 'max_prob':
        return log_p.max(-1).values.exp()
    raise ValueError(f'exit rule must be one of {RULES}, got {rule!r}')


def exits(values: torch.Tensor, rule: str, threshold: float) -> torch.Tensor:
    """Which images are confident enough to exit: ``values`` (from ``confidence``) against ``threshold``."""
    if rule == 'entropy':
        return values <= threshold
    if rule == 'max_prob':
        return values >= threshold
    raise ValueError(f'exit rule must be one of {RULES}, got {rule!r}')


@dataclass(frozen=True)
class CascadeSpec:
    """A ladder of head counts (strictly increasing, 1 to 3 stages: a single k is a fixed-width model), the exit rule,
    and one threshold per stage but the last (the last stage answers every image that reaches it). ``rerun_cap``:
    none (``()``), or per stage but the last the largest share of a batch (in [0, 1]) that goes on past it (see the
    module doc)."""

    ladder: Tuple[int, ...]
    rule: str = 'entropy'
    thresholds: Tuple[float, ...] = ()
    rerun_cap: Tuple[float, ...] = ()

    def __post_init__(self) -> None:
        ladder = tuple(int(k) for k in self.ladder)
        object.__setattr__(self, 'ladder', ladder)
        object.__setattr__(self, 'thresholds', tuple(float(t) for t in self.thresholds))
        if not 1 <= len(ladder) <= 3 or any(a >= b for a, b in zip(ladder, ladder[1:], strict=False)):
            raise ValueError(f'a cascade ladder is 1 to 3 strictly increasing head counts, got {list(ladder)}')
        if self.rule not in RULES:
            raise ValueError(f'exit rule must be one of {RULES}, got {self.rule!r}')
        if len(self.thresholds) != len(ladder) - 1:
            raise ValueError(f'a ladder of {len(ladder)} stages takes {len(ladder) - 1} threshold(s), '
                             f'got {len(self.thresholds)}')
        if any(not math.isfinite(t) for t in self.thresholds):
            raise ValueError(f'thresholds must be finite, got {list(self.thresholds)}')
        object.__setattr__(self, 'rerun_cap', tuple(float(c) for c in self.rerun_cap))
        if self.rerun_cap and (len(self.rerun_cap) != len(ladder) - 1
                               or not all(0 <= c <= 1 for c in self.rerun_cap)):
            raise ValueError(f'rerun_cap takes one share in [0, 1] per stage but the last ({len(ladder) - 1}), '
                             f'got {list(self.rerun_cap)}')

    @property
    def name(self) -> str:
        if len(self.ladder) == 1:
            return f'k={self.ladder[0]}'
        ts = '/'.join(f'{t:.4g}' for t in self.thresholds)
        cap = f' rerun<={"/".join(f"{c:.3g}" for c in self.rerun_cap)}' if self.rerun_cap else ''
        return f'{"->".join(map(str, self.ladder))} {self.rule}{"<=" if self.rule == "entropy" else ">="}{ts}{cap}'

    def rerun_limit(self, stage: int, batch_size: int) -> Optional[int]:
        """Most images of a batch of ``batch_size`` that may go on past ``stage`` (None: no cap): the share rounded
        up, so a cap fitted as c images of B is c at B and at least one in a smaller batch."""
        if not self.rerun_cap:
            return None
        return math.ceil(self.rerun_cap[stage] * batch_size - 1e-9)


def cap_reruns(values: torch.Tensor, rule: str, stay: torch.Tensor, limit: Optional[int]) -> torch.Tensor:
    """Which of the images in ``stay`` go on when at most ``limit`` may: the ``limit`` least confident of them
    (``values`` from ``confidence``; ties: the earlier along the last dimension). ``values``/``stay``: ``(..., B)``;
    the limit applies per row. Returns a mask like ``stay``."""
    if limit is None:
        return stay
    doubt = (values if rule == 'entropy' else -values).masked_fill(~stay, -math.inf)
    first = torch.argsort(doubt, dim=-1, descending=True, stable=True)[..., :limit]
    return stay & torch.zeros_like(stay).scatter_(-1, first, True)


@dataclass
class CascadeRecords:
    """Per image and per head count: the top-1 prediction, whether the target is in the top 5, and the confidence
    under every rule. ``target``: ``(N,)`` class indices; the dicts map k to ``(N,)`` tensors (CPU)."""

    heads: List[int]
    target: torch.Tensor
    pred: Dict[int, torch.Tensor] = field(default_factory=dict)
    top5: Dict[int, torch.Tensor] = field(default_factory=dict)
    scores: Dict[str, Dict[int, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(self.target.numel())

    def subset(self, index: torch.Tensor) -> 'CascadeRecords':
        """The records of the images ``index`` (a 1-D index or boolean mask)."""
        return CascadeRecords(list(self.heads), self.target[index], {k: v[index] for k, v in self.pred.items()},
                              {k: v[index] for k, v in self.top5.items()},
                              {r: {k: v[index] for k, v in per_k.items()} for r, per_k in self.scores.items()})

    def correct(self, k: int) -> torch.Tensor:
        return self.pred[k] == self.target

    def state_dict(self) -> dict:
        """Plain lists (JSON): ``{'heads', 'target', 'pred', 'top5', 'scores'}``, keys of the per-k dicts as strings."""
        return {'heads': list(self.heads), 'target': self.target.tolist(),
                'pred': {str(k): v.tolist() for k, v in self.pred.items()},
                'top5': {str(k): v.tolist() for k, v in self.top5.items()},
                'scores': {r: {str(k): v.tolist() for k, v in per_k.items()} for r, per_k in self.scores.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> 'CascadeRecords':
        return cls([int(k) for k in state['heads']], torch.tensor(state['target'], dtype=torch.long),
                   {int(k): torch.tensor(v, dtype=torch.long) for k, v in state['pred'].items()},
                   {int(k): torch.tensor(v, dtype=torch.bool) for k, v in state['top5'].items()},
                   {r: {int(k): torch.tensor(v, dtype=torch.float32) for k, v in per_k.items()}
                    for r, per_k in state['scores'].items()})


def collect_records(
        model: torch.nn.Module,
        loader: Iterable,
        heads: Sequence[int],
        device: torch.device,
        amp_autocast: Callable[[], ContextManager] = contextlib.nullcontext,
        prepare_input: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> CascadeRecords:
    """One pass over ``loader`` running every head count on every batch; returns the per-image records. The model's
    active head count is restored afterwards."""
    heads, previous = sorted(int(k) for k in heads), model.active_heads
    targets, preds, top5s = [], {k: [] for k in heads}, {k: [] for k in heads}
    scores = {r: {k: [] for k in heads} for r in RULES}
    with torch.inference_mode():
        for images, target in loader:
            images = prepare_input(images) if prepare_input else images.to(device, non_blocking=True)
            targets.append(target.cpu())
            for k in heads:
                model.set_heads(k)
                with amp_autocast():
                    logits = model(images).float().cpu()
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                preds[k].append(top[:, 0])
                top5s[k].append(top.eq(target.cpu()[:, None]).any(1))
                for r in RULES:
                    scores[r][k].append(confidence(logits, r))
    model.set_heads(previous)
    if not targets:
        raise RuntimeError('the data loader yielded no images')
    return CascadeRecords(heads, torch.cat(targets), {k: torch.cat(v) for k, v in preds.items()},
                          {k: torch.cat(v) for k, v in top5s.items()},
                          {r: {k: torch.cat(v) for k, v in per_k.items()} for r, per_k in scores.items()})


def exit_stages(records: CascadeRecords, spec: CascadeSpec, batches: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The stage index (0-based) at which each image exits: the first stage whose confidence passes its threshold,
    else the last; with a re-run cap, also the stage past which the cap stops it. ``(N,)`` long; with ``batches``
    (``(M, B)`` record indices, one batch per row, an image may appear in several) ``(M, B)``, each batch on its own.
    ``ValueError`` for a k the records lack or a capped spec without ``batches``."""
    missing = [k for k in spec.ladder if k not in records.pred]
    if missing:
        raise ValueError(f'the records hold no outputs of head count(s) {missing} (recorded: {records.heads})')
    if spec.rerun_cap and batches is None:
        raise ValueError(f'{spec.name}: a re-run cap depends on which images share a batch; pass batches')
    index = torch.arange(records.num_images) if batches is None else batches
    stage = torch.full(index.shape, len(spec.ladder) - 1, dtype=torch.long)
    pending = torch.ones(index.shape, dtype=torch.bool)
    for s, (k, threshold) in enumerate(zip(spec.ladder[:-1], spec.thresholds, strict=True)):
        values = records.scores[spec.rule][k][index]
        go_on = cap_reruns(values, spec.rule, pending & ~exits(values, spec.rule, threshold),
                           spec.rerun_limit(s, index.shape[-1]))
        stage[pending & ~go_on] = s
        pending = go_on
    return stage


@dataclass
class CascadeResult:
    """What a cascade gives on a set of images. Accuracies in %; ``mean_gmacs``: forward GMACs per image, every stage
    an image ran counted; ``stage_share``: % of the images each stage answers; ``stage_top1``: top-1 (%) of each
    stage on the images it answers (None where it answers none); ``mean_passes``: stages run per image."""

    spec: CascadeSpec
    top1: float
    top5: float
    mean_gmacs: float
    stage_share: List[float]
    stage_top1: List[Optional[float]]
    mean_passes: float
    num_images: int

    def row(self) -> dict:
        return {'cascade': '->'.join(map(str, self.spec.ladder)), 'rule': self.spec.rule,
                'thresholds': list(self.spec.thresholds), 'top1': self.top1, 'top5': self.top5,
                'gmacs': self.mean_gmacs, 'passes': self.mean_passes, 'stage_share': self.stage_share,
                'stage_top1': self.stage_top1, 'num_images': self.num_images}


def evaluate_cascade(records: CascadeRecords, spec: CascadeSpec, gmacs: Dict[int, float],
                     batches: Optional[torch.Tensor] = None) -> CascadeResult:
    """The cascade ``spec`` on the recorded images, exactly (``gmacs``: forward GMACs per image of each k). With
    ``batches`` (``(M, B)`` record indices, see ``exit_stages``; needed for a re-run cap) the figures are over the
    M * B answers of those batches."""
    stage = exit_stages(records, spec, batches)
    if batches is not None:
        records, stage = records.subset(batches.reshape(-1)), stage.reshape(-1)
    n = records.num_images
    answer_correct = torch.zeros(n, dtype=torch.bool)
    answer_top5 = torch.zeros(n, dtype=torch.bool)
    shares, stage_top1 = [], []
    for s, k in enumerate(spec.ladder):
        mine = stage == s
        answer_correct[mine] = records.correct(k)[mine]
        answer_top5[mine] = records.top5[k][mine]
        count = int(mine.sum())
        shares.append(100. * count / n)
        stage_top1.append(100. * float(records.correct(k)[mine].double().mean()) if count else None)
    ran = [(stage >= s).double().mean().item() for s in range(len(spec.ladder))]  # share of images running stage s
    return CascadeResult(
        spec=spec, top1=100. * float(answer_correct.double().mean()), top5=100. * float(answer_top5.double().mean()),
        mean_gmacs=sum(r * gmacs[k] for r, k in zip(ran, spec.ladder, strict=True)), stage_share=shares,
        stage_top1=stage_top1, mean_passes=sum(ran), num_images=n)


def halves(records: CascadeRecords, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of the images for 2-fold cross-fitting, stratified by class and seeded: within each class
    the images are shuffled and alternately assigned. Returns two index tensors."""
    generator = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c in records.target.unique(sorted=True):
        members = (records.target == c).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        first.append(members[0::2])
        second.append(members[1::2])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def sweep(records: CascadeRecords, ladder: Sequence[int], rule: str, thresholds: Sequence[float],
          gmacs: Dict[int, float]) -> List[CascadeResult]:
    """One ``CascadeResult`` per threshold, each threshold applied at every stage but the last (ThinkingViT's
    sweep)."""
    return [evaluate_cascade(records, CascadeSpec(tuple(ladder), rule, (t,) * (len(ladder) - 1)), gmacs)
            for t in thresholds]


def fixed_results(records: CascadeRecords, heads: Sequence[int], gmacs: Dict[int, float]) -> List[CascadeResult]:
    """The fixed-width models (one-stage ladders) of ``heads``, for comparison with cascades."""
    return [evaluate_cascade(records, CascadeSpec((k,)), gmacs) for k in heads]


def summary_keys(stages: int) -> Tuple[str, ...]:
    """The columns of ``summary_row`` for ladders of up to ``stages`` stages."""
    per_stage = tuple(f'stage{s}_{key}' for s in range(1, stages + 1) for key in ('heads', 'share', 'top1'))
    return ('policy', 'ladder', 'rule', 'threshold', 'top1', 'top5', 'gmacs', 'passes', *per_stage, 'num_images')


def summary_row(result: CascadeResult, stages: int) -> dict:
    """ThinkingViT's summary columns as one flat row (CSV-friendly): ``policy`` (``cascade`` or ``fixed``), ``ladder``
    (``3->6->12``), ``rule`` and ``threshold`` (None for a fixed k; a list when the stages' thresholds differ), top-1 /
    top-5 (%), mean GMACs and passes per image, and per stage s its head count, the % of images it answers and its
    top-1 (%) on them (None past the ladder's end or where it answers none)."""
    spec = result.spec
    fixed = len(spec.ladder) == 1
    ts = list(spec.thresholds)
    row = {'policy': 'fixed' if fixed else 'cascade', 'ladder': '->'.join(map(str, spec.ladder)),
           'rule': None if fixed else spec.rule, 'threshold': None if fixed else ts[0] if len(set(ts)) == 1 else ts,
           'top1': result.top1, 'top5': result.top5, 'gmacs': result.mean_gmacs, 'passes': result.mean_passes}
    for s in range(stages):
        mine = s < len(spec.ladder)
        row[f'stage{s + 1}_heads'] = spec.ladder[s] if mine else None
        row[f'stage{s + 1}_share'] = result.stage_share[s] if mine else None
        row[f'stage{s + 1}_top1'] = result.stage_top1[s] if mine else None
    row['num_images'] = result.num_images
    return row


def format_summary(rows: Sequence[dict], stages: int) -> str:
    """A fixed-width table of ``summary_row`` rows: one line per cascade threshold or fixed k."""
    def num(v, spec='.2f'):
        return '-' if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)
    head = (f'{"policy":8} {"ladder":10} {"rule":8} {"T":>8} {"top1":>7} {"top5":>7} {"GMACs":>9} '
            + ' '.join(f'{f"s{s} k/share/top1":>19}' for s in range(1, stages + 1)))
    lines = [head]
    for r in rows:
        cells = ' '.join(f'{num(r[f"stage{s}_heads"], "d"):>4}/{num(r[f"stage{s}_share"], ".1f"):>6}/'
                         f'{num(r[f"stage{s}_top1"], ".2f"):>7}' for s in range(1, stages + 1))
        lines.append(f'{r["policy"]:8} {r["ladder"]:10} {num(r["rule"]):8} {num(r["threshold"], ".4g"):>8} '
                     f'{num(r["top1"]):>7} {num(r["top5"]):>7} {num(r["gmacs"], ".4g"):>9} {cells}')
    return '\n'.join(lines)


# --- calibration for a budget (deploy pick): candidates, fit on one half, report on the other ------------------
# A policy before fitting is a Recipe: a ladder and, for a cascade, the share of the fit images stage 1 lets exit.
# Its one threshold is that quantile of the fit images' stage-1 confidence, shared by every non-final stage
# (monotone), so the search has few degrees of freedom: a small grid of ladders times a small grid of shares.
# Nine shares, dense where cascades operate: most images are easy, so stage 1 answers most of them (ThinkingViT's
# operating points, and digits seed 0, where the useful thresholds let 93-97 % exit: a choice made after looking at it).
DEFAULT_EXIT_SHARES = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)
LATENCY_DRAWS = 200  # at least this many random batches price a cascade's calls (latency_draws)
# Objectives of a policy row and whether more is better (top1 is the accuracy; the rest are costs). Not peak_mb:
# a cascade's is its largest stage's, so it would keep every narrower fixed k on the frontier; it is a bound only.
POLICY_COSTS = (('gmacs', False), ('latency_ms_mean', False), ('latency_ms_p90', False), ('throughput', True))
Budget = Dict[str, Tuple[bool, float]]  # row key -> (upper bound?, value); e.g. {'gmacs': (True, 0.05)}


@dataclass(frozen=True)
class Recipe:
    """A policy before fitting: a ladder (one k: a fixed width) and, for a cascade, the share of the fit images
    that stage 1 lets exit (``fit_spec`` turns it into a threshold)."""

    ladder: Tuple[int, ...]
    exit_share: Optional[float] = None

    @property
    def name(self) -> str:
        if len(self.ladder) == 1:
            return f'k={self.ladder[0]}'
        return f'{"->".join(map(str, self.ladder))} @{100 * self.exit_share:.0f}%'


@dataclass
class PolicyCosts:
    """What the figures of a policy row are computed from. ``gmacs`` and ``peak_mb``: per k; ``latency[k][b]``:
    ``(mean_ms, p90_ms)`` of one call of width k on b images (measured batch sizes); ``batch_size``: the batch the
    latency columns are for; ``throughput_batch``: the batch the throughput column is for (default: the largest
    measured)."""

    gmacs: Dict[int, float]
    latency: Dict[int, Dict[int, Tuple[float, float]]]
    peak_mb: Dict[int, float]
    batch_size: int = 1
    throughput_batch: Optional[int] = None

    def __post_init__(self) -> None:
        largest = min(max(sizes) for sizes in self.latency.values())
        self.throughput_batch = self.throughput_batch or largest
        for name, b in (('batch_size', self.batch_size), ('throughput_batch', self.throughput_batch)):
            if not 1 <= b <= largest:
                raise ValueError(f'{name} must be between 1 and {largest} (the largest measured batch size), got {b}')


class NoFeasiblePolicy(ValueError):
    """No policy meets the budget on the fit images; ``best`` maps each budget key to (best value, policy name)."""

    def __init__(self, best: Dict[str, Tuple[float, str]]):
        super().__init__('no policy meets every bound: ' + '; '.join(f'{key} best {v:g} ({name})'
                                                                        for key, (v, name) in best.items()))
        self.best = best


def ladder_grid(heads: Sequence[int], size: int = 4) -> List[int]:
    """At most ``size`` of ``heads``, evenly spread from the smallest to the largest: the widths cascades are built
    from (a small grid keeps the search from overfitting the fit half)."""
    heads = sorted(set(int(k) for k in heads))
    if len(heads) <= size:
        return heads
    targets = torch.linspace(heads[0], heads[-1], size).tolist()
    return sorted({min(heads, key=lambda k, t=t: (abs(k - t), k)) for t in targets})


def cascade_candidates(heads: Sequence[int], grid: Optional[Sequence[int]] = None,
                       exit_shares: Sequence[float] = DEFAULT_EXIT_SHARES) -> List[Recipe]:
    """The search space: every fixed k of ``heads``; every 2-stage ladder k1 -> k2 and every 3-stage ladder
    k1 -> k2 -> max over ``grid`` (default ``ladder_grid(heads)``), each at every share of ``exit_shares``."""
    if not exit_shares or any(not 0 < s < 1 for s in exit_shares):
        raise ValueError(f'exit shares must be in (0, 1), got {list(exit_shares)}')
    grid = sorted(set(int(k) for k in (ladder_grid(heads) if grid is None else grid)))
    ladders = [(a, b) for i, a in enumerate(grid) for b in grid[i + 1:]]
    ladders += [(a, b, grid[-1]) for i, a in enumerate(grid) for b in grid[i + 1:-1]]
    return ([Recipe((int(k),)) for k in sorted(set(heads))]
            + [Recipe(ladder, float(s)) for ladder in ladders for s in sorted(set(exit_shares))])


def fit_threshold(records: CascadeRecords, k: int, rule: str, exit_share: float) -> float:
    """The threshold that lets a share ``exit_share`` of ``records``' images exit at width ``k``: the confidence of
    the ceil(share * N)-th most confident image (ties may let a few more exit)."""
    values = records.scores[rule][k].sort(descending=rule == 'max_prob').values
    return float(values[max(1, math.ceil(exit_share * values.numel() - 1e-9)) - 1])


def fit_spec(records: CascadeRecords, recipe: Recipe, rule: str) -> CascadeSpec:
    """``recipe`` fitted on ``records``: one threshold from their stage-1 confidence, used at every non-final
    stage."""
    if len(recipe.ladder) == 1:
        return CascadeSpec(recipe.ladder, rule)
    threshold = fit_threshold(records, recipe.ladder[0], rule, recipe.exit_share)
    return CascadeSpec(recipe.ladder, rule, (threshold,) * (len(recipe.ladder) - 1))


def interpolate_ms(points: Dict[int, float], size: float) -> float:
    """Call time at ``size`` images, piecewise linear through ``(0, 0)`` and the measured ``{size: ms}``; a size
    past the largest measured one is refused (``ValueError``)."""
    sizes = sorted(points)
    if size > sizes[-1]:
        raise ValueError(f'no latency measured at or above batch size {size:g} (largest: {sizes[-1]})')
    lo, lo_ms = 0, 0.
    for s in sizes:
        if size <= s:
            return lo_ms + (points[s] - lo_ms) * (size - lo) / (s - lo)
        lo, lo_ms = s, points[s]
    raise AssertionError('unreachable')


def batch_draws(num_images: int, batch_size: int, count: int, seed: int = 0) -> torch.Tensor:
    """``(count, batch_size)`` image indices: seeded random batches cut from consecutive permutations of the
    images, so every image appears about equally often (counts differ by at most one; exactly equally when
    ``count * batch_size`` is a multiple of ``num_images``)."""
    generator = torch.Generator().manual_seed(seed)
    rounds = math.ceil(count * batch_size / num_images)
    order = torch.cat([torch.randperm(num_images, generator=generator) for _ in range(rounds)])
    return order[:count * batch_size].view(count, batch_size)


@functools.lru_cache(maxsize=16)
def latency_draws(num_images: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    """The batches a cascade's calls are priced on (``policy_row``, serve-bench): at least ``LATENCY_DRAWS``, in
    whole rounds of the images, so that every image appears equally often and an uncapped cascade's figures on
    them are exactly its figures on the images (at batch 1: each image once). Cached: do not modify."""
    per_round = math.lcm(num_images, batch_size) // batch_size  # batches of whole rounds
    return batch_draws(num_images, batch_size, per_round * math.ceil(LATENCY_DRAWS / per_round), seed)


def nearest_rank(values: Sequence[float], quantile: float) -> float:
    """The nearest-rank quantile: the ceil(q * n)-th smallest of n values (p90 of 20: the 18th), the rule the
    runtime's controller applies to its window, so a priced p90 and a measured one mean the same."""
    ranked = sorted(values)
    return float(ranked[max(0, math.ceil(quantile * len(ranked) - 1e-9) - 1)])


def bucket_size(n: int, buckets: Optional[Sequence[int]]) -> int:
    """The smallest of ``buckets`` that holds ``n`` images (``n`` itself without buckets). ``ValueError`` when none
    does."""
    if not buckets:
        return n
    fitting = [b for b in buckets if b >= n]
    if not fitting:
        raise ValueError(f'a sub-batch of {n} images fits none of the buckets {sorted(buckets)}')
    return min(fitting)


def cascade_latency(stages: torch.Tensor, ladder: Sequence[int], latency: Dict[int, Dict[int, Tuple[float, float]]],
                    buckets: Optional[Sequence[int]] = None) -> Tuple[float, float, float]:
    """(mean, median, p90) milliseconds of one cascade call, over batches whose images exit at ``stages``
    (``(M, B)``, ``exit_stages(..., batches=)``): per batch, each stage that runs (stage s on the images with stage
    index >= s, padded up to the smallest of ``buckets`` when given) costs its k's time at that sub-batch size from
    ``latency[k][b] = (central_ms, p90_ms)`` (a mean or a median, and a p90, of one call on b images; sizes
    between the measured ones interpolated, ``interpolate_ms``); the mean and the median are of the batches' summed
    central times, the p90 the nearest-rank 90th percentile of their summed p90 times. The runner's own gathering is not
    counted."""
    central, tail = np.zeros(stages.shape[0]), np.zeros(stages.shape[0])
    for s, k in enumerate(ladder):
        sizes = (stages >= s).sum(1).tolist()
        centrals, p90s = ({b: t[i] for b, t in latency[k].items()} for i in (0, 1))
        times = {n: (interpolate_ms(centrals, bucket_size(n, buckets)), interpolate_ms(p90s, bucket_size(n, buckets)))
                 for n in set(sizes) if n}
        central += [times[n][0] if n else 0. for n in sizes]
        tail += [times[n][1] if n else 0. for n in sizes]
    return float(central.mean()), float(np.median(central)), nearest_rank(tail.tolist(), 0.9)


def policy_row(records: CascadeRecords, spec: CascadeSpec, costs: PolicyCosts) -> dict:
    """The figures of ``spec`` on ``records``: top1, top5 (%), gmacs (mean per image), latency_ms_mean and
    latency_ms_p90 (one call on ``costs.batch_size`` images: ``cascade_latency`` on ``latency_draws``), throughput
    (img/s at ``costs.throughput_batch``), peak_mb (the largest stage's), stage_share (% answered per stage)."""
    result = evaluate_cascade(records, spec, costs.gmacs)
    mean, _, p90 = cascade_latency(exit_stages(records, spec, latency_draws(records.num_images, costs.batch_size)),
                                   spec.ladder, costs.latency)
    batch_mean, _, _ = cascade_latency(
        exit_stages(records, spec, latency_draws(records.num_images, costs.throughput_batch)), spec.ladder,
        costs.latency)
    return {'top1': result.top1, 'top5': result.top5, 'gmacs': result.mean_gmacs, 'latency_ms_mean': mean,
            'latency_ms_p90': p90, 'throughput': costs.throughput_batch * 1e3 / batch_mean if batch_mean else math.inf,
            'peak_mb': max(costs.peak_mb[k] for k in spec.ladder), 'stage_share': result.stage_share}


def within(row: dict, budget: Budget) -> bool:
    """Whether ``row`` meets every bound of ``budget`` (inclusive)."""
    return all(row[key] <= value if upper else row[key] >= value for key, (upper, value) in budget.items())


def preference(row: dict, recipe: Recipe) -> tuple:
    """Sort key of the choice: most accurate first, then cheaper on each cost in turn, then fewer stages."""
    return (-row['top1'], *(-row[key] if more else row[key] for key, more in POLICY_COSTS), row['peak_mb'],
            len(recipe.ladder), recipe.ladder, recipe.exit_share or 0.)


def fit_cascade(records_fit: CascadeRecords, recipes: Sequence[Recipe], rule: str, costs: PolicyCosts,
                budget: Optional[Budget] = None) -> Tuple[Recipe, CascadeSpec, dict]:
    """Fit every recipe on ``records_fit`` and choose, by these images' own figures only, the most accurate policy
    within ``budget`` (ties: the cheaper). Returns the recipe, its fitted spec and its (in-sample) row; raises
    ``NoFeasiblePolicy`` when none fits."""
    budget = budget or {}
    specs = [fit_spec(records_fit, recipe, rule) for recipe in recipes]
    rows = [policy_row(records_fit, spec, costs) for spec in specs]
    feasible = [i for i, row in enumerate(rows) if within(row, budget)]
    if not feasible:
        best = {}
        for key, (upper, _) in budget.items():
            i = (min if upper else max)(range(len(rows)), key=lambda j, key=key: rows[j][key])
            best[key] = (rows[i][key], recipes[i].name)
        raise NoFeasiblePolicy(best)
    i = min(feasible, key=lambda j: preference(rows[j], recipes[j]))
    return recipes[i], specs[i], rows[i]


def average_rows(rows: Sequence[dict]) -> dict:
    """Key by key mean of policy rows (lists element by element; None where their lengths differ: the stage shares
    of different ladders)."""
    out = {}
    for key, value in rows[0].items():
        values = [row[key] for row in rows]
        if isinstance(value, list):
            same = len({len(v) for v in values}) == 1
            out[key] = [sum(v) / len(v) for v in zip(*values, strict=True)] if same else None
        else:
            out[key] = sum(values) / len(values)
    return out


@dataclass
class Fold:
    """One direction of cross-fitting: fitted on the images ``fit``, reported on ``report`` (index tensors)."""

    fit: torch.Tensor
    report: torch.Tensor
    recipe: Recipe
    spec: CascadeSpec
    fit_row: dict  # in-sample figures on the fit images (what the choice saw)
    reported: dict  # the fitted spec's figures on the other images


@dataclass
class CrossFit:
    """2-fold cross-fitting of the choice for a budget: ``folds`` (fit on half A report on B, then the reverse) and
    ``reported``, the average of the two reported rows."""

    folds: List[Fold]
    reported: dict


def cross_fit(records: CascadeRecords, recipes: Sequence[Recipe], rule: str, costs: PolicyCosts,
              budget: Optional[Budget] = None, seed: int = 0,
              split: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> CrossFit:
    """The whole choice (thresholds and ladder, ``fit_cascade``) fitted on one of ``halves(records, seed)`` (or
    ``split``) and measured on the other, both ways; the two measurements averaged. The fit never sees the reported
    half."""
    first, second = split if split is not None else halves(records, seed)
    folds = []
    for fit, report in ((first, second), (second, first)):
        recipe, spec, fit_row = fit_cascade(records.subset(fit), recipes, rule, costs, budget)
        folds.append(Fold(fit, report, recipe, spec, fit_row, policy_row(records.subset(report), spec, costs)))
    return CrossFit(folds, average_rows([fold.reported for fold in folds]))


def cross_fit_recipes(records: CascadeRecords, recipes: Sequence[Recipe], rule: str, costs: PolicyCosts,
                      seed: int = 0, split: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> List[dict]:
    """Each recipe's held-out row: its threshold fitted on one half (``halves(records, seed)`` or ``split``), its
    figures measured on the other, both ways, averaged; plus ``policy``, ``ladder``, ``exit_share``, ``rule`` and
    ``thresholds`` (one list per fold)."""
    first, second = split if split is not None else halves(records, seed)
    pairs = [(records.subset(first), records.subset(second)), (records.subset(second), records.subset(first))]
    rows = []
    for recipe in recipes:
        specs = [fit_spec(fit, recipe, rule) for fit, _ in pairs]
        row = average_rows([policy_row(report, spec, costs) for spec, (_, report) in zip(specs, pairs, strict=True)])
        rows.append({'policy': recipe.name, 'ladder': list(recipe.ladder), 'exit_share': recipe.exit_share,
                     'rule': rule if len(recipe.ladder) > 1 else None,
                     'thresholds': [list(spec.thresholds) for spec in specs], **row})
    return rows


# --- the accuracy-vs-GMACs frontier, cross-fitted (scripts/cascade_report.py) ------------------------------------
@dataclass
class BudgetChoice:
    """The cross-fitted choice for a GMACs budget: on each half the most accurate recipe whose fit-half mean GMACs
    are within ``budget`` (``fold_choices``: its name per fold), measured on the other half; ``top1`` / ``gmacs``:
    the two held-out measurements averaged."""

    budget: float
    top1: float
    gmacs: float
    fold_choices: List[str]


def budget_choices(records: CascadeRecords, recipes: Sequence[Recipe], rule: str, gmacs: Dict[int, float],
                   budgets: Sequence[float], split: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   seed: int = 0) -> List[BudgetChoice]:
    """For every budget (mean forward GMACs per image): the choice among ``recipes`` (thresholds fitted and the
    recipe chosen on one half, ``halves(records, seed)`` or ``split``), measured on the other half, both ways,
    averaged. The choice never sees the half it is measured on: the frontier this gives is what a user who calibrates
    on some images gets on others. Ties on top-1 go to the cheaper recipe."""
    first, second = split if split is not None else halves(records, seed)
    folds = []
    for fit, report in ((first, second), (second, first)):
        fit_records, report_records = records.subset(fit), records.subset(report)
        specs = [fit_spec(fit_records, recipe, rule) for recipe in recipes]
        fitted = [evaluate_cascade(fit_records, spec, gmacs) for spec in specs]
        folds.append((specs, fitted, report_records))
    choices = []
    for budget in budgets:
        top1s, costs, names = [], [], []
        for specs, fitted, report_records in folds:
            feasible = [i for i, r in enumerate(fitted) if r.mean_gmacs <= budget * (1 + 1e-9)]
            if not feasible:
                raise NoFeasiblePolicy({'gmacs': (min(r.mean_gmacs for r in fitted), 'cheapest')})
            i = min(feasible, key=lambda j: (-fitted[j].top1, fitted[j].mean_gmacs, len(recipes[j].ladder)))
            held_out = evaluate_cascade(report_records, specs[i], gmacs)
            top1s.append(held_out.top1)
            costs.append(held_out.mean_gmacs)
            names.append(recipes[i].name)
        choices.append(BudgetChoice(budget, sum(top1s) / 2, sum(costs) / 2, names))
    return choices
