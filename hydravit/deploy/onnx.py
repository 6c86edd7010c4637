"""ONNX export of one head count, checked against PyTorch with onnxruntime.

What is exported is the plain timm ViT of the k-head subnetwork (``hydravit.export_subnetwork``),
not the sliced HydraViT: the sliced model would carry the full model's weights into the file and
slice them at run time. The file therefore holds only the subnetwork (its initializers add up to the
k-head parameter count), has a dynamic batch axis, and runs without hydravit or timm.

Needs the ``deploy`` extra (onnx, onnxscript for torch's exporter, onnxruntime); imported lazily so
that the rest of hydravit works without them.
"""
import importlib.util
import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..checkpoint import atomic_write
from ..evaluation.throughput import benchmark_latency
from ..export import check_label_names, export_subnetwork
from ..model import HydraViT

DEFAULT_OPSET = 18  # the torch.export-based exporter's own opset; 17 is the oldest accepted
MIN_OPSET = 17
TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| in fp32
INPUT_NAME, OUTPUT_NAME = 'input', 'logits'
REQUIRED = ('onnx', 'onnxscript', 'onnxruntime')


def missing_requirements() -> Tuple[str, ...]:
    """The ONNX packages that are not installed (``pip install 'hydravit[deploy]'`` brings them)."""
    return tuple(name for name in REQUIRED if importlib.util.find_spec(name) is None)


def export_onnx(model: HydraViT, k: int, path, input_size: Sequence[int], opset: int = DEFAULT_OPSET,
                label_names: Optional[Sequence[str]] = None) -> Path:
    """Write the k-head subnetwork of ``model`` as ONNX to ``path`` (batch axis dynamic); weights holding NaN or
    inf are refused before anything is traced or written (``NonFiniteWeightsError``, from ``export_subnetwork``).
    ``label_names`` (class names in label order) go into the model's metadata as ``label_names``, a JSON list."""
    check_label_names(label_names, model.num_classes)
    vit = export_subnetwork(model, k).to('cpu').float().eval()
    example = torch.randn(2, *input_size)  # a batch of 1 would be specialized into the graph as a constant
    program = torch.onnx.export(
        vit, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim('batch', min=1)},), verbose=False)
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()  # the exporter's per-node stack traces: build-machine paths, 3x the weights
    program.model.metadata_props.update({
        'hydravit.heads': str(k), 'hydravit.source_heads': str(model.num_heads),
        'hydravit.embed_dim': str(k * model.head_dim), 'hydravit.input_size': ','.join(map(str, input_size)),
    })
    if label_names is not None:  # what each logit means (timm's name for it), readable without hydravit
        program.model.metadata_props['label_names'] = json.dumps([str(name) for name in label_names])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: program.save(str(tmp), external_data=False))
    return path


def initializer_count(path) -> int:
    """Numbers stored in the file's initializers (the weights it carries)."""
    import onnx
    graph = onnx.load(str(path)).graph
    return sum(int(np.prod(tensor.dims)) for tensor in graph.initializer)


def onnx_session(path, threads: int = 0):
    """onnxruntime CPU session for ``path`` (``threads``: intra-op threads, 0 = onnxruntime's default)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def max_abs_diff(session, vit: torch.nn.Module, batch: torch.Tensor) -> float:
    """max |onnxruntime - PyTorch| of the logits on ``batch``."""
    with torch.inference_mode():
        expected = vit(batch).float().numpy()
    (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
    return float(np.abs(actual - expected).max())


def compare_latency(session, vit: torch.nn.Module, x: torch.Tensor) -> Dict[str, Dict[str, float]]:
    """Batch-1 latency (median, p90 ms) of onnxruntime and of PyTorch on the same input, CPU."""
    x = x[:1]
    feed = {INPUT_NAME: x.numpy()}

    def torch_call():
        with torch.inference_mode():
            return vit(x)

    cpu = torch.device('cpu')
    return {'onnxruntime': benchmark_latency(lambda: session.run(None, feed), cpu),
            'pytorch': benchmark_latency(torch_call, cpu)}
