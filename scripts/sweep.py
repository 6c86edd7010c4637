#!/usr/bin/env python3
"""Accuracy, throughput, GMACs and memory for every head count: one CSV and the trade-off plots.

    python scripts/sweep.py DATA --model hydravit_dyn_patch4_32 --checkpoint C -o output/sweep \
        [--reference docs/deit_reference.csv]

Writes OUTPUT/sweep.csv (one row per k) and OUTPUT/tradeoff.png. See docs/evaluation.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hydravit.evaluation.sweep import main  # noqa: E402

if __name__ == '__main__':
    main()
