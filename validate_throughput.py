#!/usr/bin/env python3
"""Batch-1 latency and batch-B throughput of a HydraViT per head count.

    python validate_throughput.py [DATA] --model hydravit_dyn_patch16_224 -b 512 --heads 3 6 12 [--amp] [--compile]

See docs/evaluation.md; `python validate_throughput.py --help` lists every flag.
"""
from hydravit.evaluation.throughput import main

if __name__ == '__main__':
    main()
