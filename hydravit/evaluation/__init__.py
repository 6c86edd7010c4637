"""Evaluation suite: accuracy, throughput, MACs and memory per head count, from one shared core.

The root scripts ``validate*.py`` are thin wrappers over the ``main`` functions here; ``sweep`` runs
all four for every head count and plots the trade-off curves.
"""
from . import accuracy, macs, memory, sweep, throughput
from .common import EvalSession, UsageError, create_session, read_results, write_results

__all__ = [
    'EvalSession', 'UsageError', 'accuracy', 'create_session', 'macs', 'memory', 'read_results', 'sweep',
    'throughput', 'write_results',
]
