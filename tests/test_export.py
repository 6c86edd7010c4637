"""Export to a plain timm ViT, loading it back with stock timm, and checkpoint loading safety."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import hydravit
from hydravit.checkpoint import atomic_torch_save, load_model_weights
from hydravit.export import leading_slice

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model():
    return timm.create_model('hydravit_dyn_patch4_32', num_classes=10).eval()


def test_export_script_loads_with_stock_timm_only(tmp_path, model):
    ckpt = tmp_path / 'hydra.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'state_dict_ema': model.state_dict()}, ckpt)
    out = tmp_path / 'k3'
    subprocess.run([sys.executable, str(ROOT / 'scripts/export.py'), '--model', 'hydravit_dyn_patch4_32',
                    '--checkpoint', str(ckpt), '--use-ema', '--heads', '3', '-o', str(out)], check=True)
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['embed_dim'] == 48 and config['model_args']['num_heads'] == 3
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / 'x.pt')
    # A fresh interpreter with stock timm only: the export must not need hydravit.
    code = (
        'import sys, timm, torch\n'
        f'vit = timm.create_model("local-dir:{out}", pretrained=True).eval()\n'
        'assert "hydravit" not in sys.modules and type(vit).__name__ == "VisionTransformer"\n'
        f'torch.save(vit(torch.load("{tmp_path / "x.pt"}")).detach(), "{tmp_path / "y.pt"}")\n'
    )
    subprocess.run([sys.executable, '-c', code], check=True, cwd=tmp_path)
    model.set_heads(3)
    with torch.no_grad():
        assert (torch.load(tmp_path / 'y.pt') - model(x)).abs().max() <= 1e-5


def test_export_script_several_heads(tmp_path, model):
    ckpt = tmp_path / 'hydra.safetensors'
    save_file(model.state_dict(), str(ckpt))
    subprocess.run([sys.executable, str(ROOT / 'scripts/export.py'), '--model', 'hydravit_dyn_patch4_32',
                    '--checkpoint', str(ckpt), '--heads', '2', '12', '-o', str(tmp_path / 'out')], check=True)
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['k12', 'k2']


def test_export_script_rejects_bad_heads(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts/export.py'), '--model', 'hydravit_dyn_patch4_32',
                           '--heads', '13', '-o', str(tmp_path / 'out')], capture_output=True, text=True)
    assert proc.returncode == 2 and '--heads' in proc.stderr and '1..12' in proc.stderr
    assert not (tmp_path / 'out').exists()


def test_leading_slice_writes_small_vit_into_leading_slices(model):
    """The inverse use: a narrower ViT's tensors placed into the leading slices reproduce it."""
    small = timm.models.VisionTransformer(**hydravit.subnetwork_vit_args(model, 4)).eval()
    full = model.state_dict()  # timm's layout (qkv: a copy of the head-major parameter), so write, then load
    with torch.no_grad():
        for name, tensor in small.state_dict().items():
            view = leading_slice(name, full[name], tensor.shape)
            view.copy_(tensor.reshape(view.shape))
    model.load_state_dict(full)
    model.set_heads(4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - small(x)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match='does not fit'):
        leading_slice('pos_embed', torch.zeros(1, 65, 16), (1, 65, 32))


def test_load_model_weights_variants(tmp_path, model):
    reference = model.state_dict()
    fresh = lambda: timm.create_model('hydravit_dyn_patch4_32', num_classes=10)  # noqa: E731
    torch.save({f'module.{k}': v for k, v in reference.items()}, tmp_path / 'ddp.pth')
    save_file(reference, str(tmp_path / 'w.safetensors'))
    for path in ('ddp.pth', 'w.safetensors'):
        other = fresh()
        load_model_weights(other, tmp_path / path)
        assert all(torch.equal(other.state_dict()[k], v) for k, v in reference.items())
    with pytest.raises(KeyError, match='EMA'):
        load_model_weights(fresh(), tmp_path / 'w.safetensors', use_ema=True)


def test_timm_train_checkpoint_with_namespace_args_loads(tmp_path, model):
    """Checkpoints from timm's train.py (e.g. the released HydraViT ones) pickle an argparse.Namespace."""
    import argparse
    torch.save({'epoch': 3, 'arch': 'hydravit_dyn_patch16_224', 'args': argparse.Namespace(heads=[3, 6]),
                'state_dict': model.state_dict(), 'state_dict_ema': model.state_dict()}, tmp_path / 'timm.pth.tar')
    checkpoint = load_model_weights(timm.create_model('hydravit_dyn_patch4_32', num_classes=10),
                                    tmp_path / 'timm.pth.tar', use_ema=True)
    assert checkpoint['args'].heads == [3, 6]


def test_wrong_architecture_named_in_error(tmp_path, model):
    torch.save(timm.create_model('vit_tiny_patch16_224', num_classes=10).state_dict(), tmp_path / 'tiny.pth')
    with pytest.raises(ValueError, match=r'shape mismatches: .*pos_embed'):
        load_model_weights(model, tmp_path / 'tiny.pth')
    with pytest.raises(FileNotFoundError):
        load_model_weights(model, tmp_path / 'missing.pth')


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path('/tmp/hydravit_pwned'),))


def test_loading_never_executes_code(tmp_path, model):
    marker = Path('/tmp/hydravit_pwned')
    marker.unlink(missing_ok=True)
    with open(tmp_path / 'evil.pth', 'wb') as f:
        pickle.dump({'state_dict': _Exploit()}, f)
    with pytest.raises(ValueError, match='weights-only'):
        load_model_weights(model, tmp_path / 'evil.pth')
    assert not marker.exists()


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / 'last.pth.tar'
    atomic_torch_save({'a': torch.ones(2)}, target)

    def broken_save(obj, f):
        Path(f).write_bytes(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        atomic_torch_save({'a': torch.zeros(2)}, target)
    assert torch.equal(torch.load(target, weights_only=True)['a'], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ['last.pth.tar']
