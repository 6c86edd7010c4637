#!/usr/bin/env python3
"""Parameters, torchinfo memory estimate and measured peak memory per head count.

    python validate_memory.py [DATA] --model hydravit_dyn_patch16_224 --heads 3 6 12 [-b 1]

See docs/evaluation.md; `python validate_memory.py --help` lists every flag.
"""
from hydravit.evaluation.memory import main

if __name__ == '__main__':
    main()
