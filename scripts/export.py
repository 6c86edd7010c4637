#!/usr/bin/env python3
"""Export one HydraViT subnetwork as a plain timm ViT (config.json + model.safetensors).

    python scripts/export.py --model hydravit_dyn_patch16_224 --checkpoint C.pth.tar --use-ema --heads 3 --output out/k3

Deploy with stock timm, no hydravit import:  timm.create_model('local-dir:out/k3', pretrained=True)
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hydravit.cli import add_model_args, create_model_from_args, resolve_heads  # noqa: E402
from hydravit.export import save_subnetwork  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument('--output', '-o', required=True, help='output folder (one per head count: OUTPUT/k{K})')
    args = parser.parse_args(argv)
    try:
        model, checkpoint = create_model_from_args(args)
        heads = resolve_heads(args, model, checkpoint)
    except (ValueError, FileNotFoundError, KeyError) as e:
        parser.error(str(e))
    model.eval()
    for k in heads:
        out = Path(args.output) if len(heads) == 1 else Path(args.output) / f'k{k}'
        save_subnetwork(model, k, out)
        print(f'heads={k}: embed_dim={k * model.head_dim} params={model.subnetwork_params(k):,} -> {out}')


if __name__ == '__main__':
    main()
