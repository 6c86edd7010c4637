#!/usr/bin/env python3
"""Export HydraViT subnetworks as plain timm ViTs (config.json + model.safetensors) or as checked ONNX files.

    python scripts/export.py --model hydravit_dyn_patch16_224 --checkpoint C.pth.tar --use-ema --heads 3 --output out/k3
    python scripts/export.py [DATA] --checkpoint C.pth.tar --use-ema --heads 3 6 12 --format onnx -o out/onnx

Deploy with stock timm, no hydravit import:  timm.create_model('local-dir:out/k3', pretrained=True)
or with onnxruntime. See docs/deploy.md; `python scripts/export.py --help` lists every flag.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hydravit.deploy.export_cli import main  # noqa: E402

if __name__ == '__main__':
    main()
