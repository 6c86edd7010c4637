#!/usr/bin/env python3
"""Top-1 / top-5 / loss of a HydraViT checkpoint per head count on an image folder.

    python validate.py DATA --model hydravit_dyn_patch16_224 --checkpoint C -b 256 --use-ema --heads 3 6 12

See docs/evaluation.md; `python validate.py --help` lists every flag.
"""
from hydravit.evaluation.accuracy import main

if __name__ == '__main__':
    main()
