#!/usr/bin/env python3
"""GMACs / GFLOPs (DeepSpeed flops profiler) and parameters of each head count's subnetwork.

    python validate_macs.py [DATA] --model hydravit_dyn_patch16_224 -b 1 --heads 3 6 12

See docs/evaluation.md; `python validate_macs.py --help` lists every flag.
"""
from hydravit.evaluation.macs import main

if __name__ == '__main__':
    main()
