#!/usr/bin/env python3
"""Build a HydraViT, run every head count and print a per-k table (params, GMACs-free smoke check)."""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import hydravit  # noqa: E402, F401  registers the models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--model', default='hydravit_dyn_patch4_32')
    parser.add_argument('-b', '--batch-size', type=int, default=8)
    args = parser.parse_args()
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.batch_size, *model.pretrained_cfg['input_size'])
    print(f'{args.model}: {model.num_heads} heads x {model.head_dim}, depth {len(model.blocks)}')
    print(f'{"heads":>5} {"embed":>6} {"params":>12} {"out":>12} {"ms/batch":>9}')
    for k in range(1, model.num_heads + 1):
        model.set_heads(k)
        with torch.inference_mode():
            model(x)
            start = time.perf_counter()
            out = model(x)
            ms = (time.perf_counter() - start) * 1e3
        params = model.subnetwork_params()
        print(f'{k:>5} {model.active_embed_dim:>6} {params:>12,} {str(tuple(out.shape)):>12} {ms:>9.1f}')


if __name__ == '__main__':
    main()
