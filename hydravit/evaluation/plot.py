"""The paper's trade-off figures: top-1 against GMACs, throughput and RAM, one panel each; and the cascade
sweep (``plot_cascade``): top-1 against mean GMACs, each cascade's threshold sweep beside the fixed-k curve."""
from pathlib import Path
from typing import Optional, Sequence

from .common import Row

PANELS = (
    ('gmacs', 'GMACs per image'),
    ('throughput', 'throughput (img/s)'),
    ('ram', 'RAM (MB)'),
)
RAM_KEYS = {
    'total_mb': 'RAM: torchinfo estimated total (MB)',
    'peak_mb': 'RAM: measured peak of one forward (MB)',
}


def plot_tradeoff(rows: Sequence[Row], path, reference: Sequence[Row] = (), ram_key: str = 'total_mb',
                  title: str = '', dpi: int = 80) -> Path:
    """Write a PNG with one panel per cost metric; every point is labelled with its head count.

    ``reference`` rows (e.g. DeiT-Ti/S/B) need ``name`` and ``top1``; they appear in the panels whose
    metric they have.
    """
    # The object-oriented API with the Agg canvas: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), dpi=dpi, layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PANELS), sharey=True)
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        key, label = (ram_key, RAM_KEYS[ram_key]) if key == 'ram' else (key, label)
        _plot_panel(ax, rows, reference, key)
        ax.set_xlabel(label)
        ax.grid(alpha=.3)
    axes[0].set_ylabel('top-1 (%)')
    if reference:
        axes[0].legend(loc='lower right', fontsize='small')
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _plot_panel(ax, rows: Sequence[Row], reference: Sequence[Row], key: str) -> None:
    # Joined in head-count order: the curve walks k = 1..H whatever the metric's direction.
    points = sorted(((row[key], row['top1'], row['heads']) for row in rows if _has(row, key)), key=lambda p: p[2])
    if points:
        xs, ys, ks = zip(*points, strict=True)
        ax.plot(xs, ys, 'o-', color='tab:blue', label='HydraViT (k heads)')
        for x, y, k in points:
            ax.annotate(str(k), (x, y), textcoords='offset points', xytext=(3, -10), fontsize='x-small')
    refs = [row for row in reference if _has(row, key)]
    for row in refs:
        ax.plot(row[key], row['top1'], 's', color='tab:red', label='reference' if row is refs[0] else None)
        ax.annotate(str(row['name']), (row[key], row['top1']), textcoords='offset points', xytext=(4, 4),
                    fontsize='x-small', color='tab:red')


def plot_cascade(rows: Sequence[Row], path, title: str = '', dpi: int = 80) -> Path:
    """Write top-1 against mean GMACs per image: the fixed-k rows (``policy`` ``fixed``, labelled with k) as one curve
    and every cascade ladder's rows (``policy`` ``cascade``, one curve per ladder and rule, labelled with the
    threshold) beside it. ``rows``: ``evaluation.cascade.summary_row`` rows (``validate.py --cascade`` writes them)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), dpi=dpi, layout='constrained')
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    fixed = sorted((r['gmacs'], r['top1'], r['ladder']) for r in rows if r['policy'] == 'fixed')
    if fixed:
        xs, ys, ks = zip(*fixed, strict=True)
        ax.plot(xs, ys, 'o-', color='tab:blue', label='fixed k')
        for x, y, k in fixed:
            ax.annotate(f'k={k}', (x, y), textcoords='offset points', xytext=(3, -10), fontsize='x-small')
    curves = {}
    for r in rows:
        if r['policy'] == 'cascade':
            curves.setdefault((r['ladder'], r['rule']), []).append((r['gmacs'], r['top1'], r['threshold']))
    colors = ('tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'tab:brown')  # fixed k is blue
    for i, ((ladder, rule), points) in enumerate(curves.items()):
        points.sort(key=lambda p: p[0])
        xs, ys, ts = zip(*points, strict=True)
        color = colors[i % len(colors)]
        ax.plot(xs, ys, 's--', color=color, label=f'cascade {ladder} ({rule})')
        for x, y, t in points:
            ax.annotate(f'T={t:.3g}' if isinstance(t, float) else f'T={t}', (x, y), textcoords='offset points',
                        xytext=(3, 4), fontsize='xx-small', color=color)
    ax.set_xlabel('mean GMACs per image')
    ax.set_ylabel('top-1 (%)')
    ax.grid(alpha=.3)
    ax.legend(loc='lower right', fontsize='small')
    if title:
        ax.set_title(title, fontsize='medium')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _has(row: Row, key: str) -> bool:
    return isinstance(row.get(key), (int, float)) and isinstance(row.get('top1'), (int, float))


def check_reference(rows: Sequence[Row], source: str) -> Optional[str]:
    """Why ``rows`` cannot serve as reference points, or None if they can."""
    if not rows:
        return f'{source} has no rows'
    missing = [col for col in ('name', 'top1') if col not in rows[0]]
    if missing:
        return f'{source} lacks the column(s) {missing} (has {list(rows[0])})'
    return None
