#!/usr/bin/env python3
"""Re-draw the trade-off plots (top-1 vs GMACs / throughput / RAM) from a sweep CSV.

    python scripts/plot_tradeoff.py output/sweep/sweep.csv -o docs/figures/digits_tradeoff.png
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hydravit.evaluation.sweep import plot_main  # noqa: E402

if __name__ == '__main__':
    plot_main()
