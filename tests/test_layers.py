"""Sliceable layers: cached leading blocks of parameters, the head-major qkv layout, and what a call dispatches."""
import copy
import importlib.util
import pickle
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import VisionTransformer

import hydravit
from hydravit.evaluation.opcount import count_ops, inference_ops, training_step_ops
from hydravit.export import leading_slice
from hydravit.layers import SliceableLinear, qkv_to_head_major, qkv_to_timm

ROOT = Path(__file__).resolve().parents[1]


def small_model(**kwargs):
    return timm.create_model('hydravit_dyn_patch4_32', num_classes=10, **kwargs)


def images(n=2):
    return torch.randn(n, 3, 32, 32)


def reference_grads(model, k, x, y):
    """Gradients of the k-head subnetwork computed by a dedicated timm ViT, scattered into full-size tensors
    in timm's layout: what every sliced backward must produce."""
    vit = hydravit.export_subnetwork(model, k)
    F.cross_entropy(vit(x), y).backward()
    full = {n: torch.zeros_like(t) for n, t in model.state_dict().items()}
    for name, p in vit.named_parameters():
        target = leading_slice(name, full[name], p.grad.shape)
        target.copy_(p.grad.reshape(target.shape))
    return full


def model_grads(model):
    """The model's gradients in timm's layout."""
    return {n: qkv_to_timm(p.grad, model.num_heads) if '.qkv.' in n else p.grad for n, p in model.named_parameters()}


def test_qkv_layout_round_trip_and_state_dict_is_timms():
    t = torch.arange(3 * 8 * 2.).reshape(24, 2)  # 4 heads of width 2
    head_major = qkv_to_head_major(t, 4)
    # rows of head 0: q0 (rows 0-1), k0 (rows 8-9), v0 (rows 16-17)
    assert head_major[:6, 0].tolist() == [0., 2., 16., 18., 32., 34.]
    assert torch.equal(qkv_to_timm(head_major, 4), t)
    model = small_model()
    state = model.state_dict()
    for name, p in model.named_parameters():
        expected = qkv_to_timm(p, model.num_heads) if '.qkv.' in name else p
        assert torch.equal(state[name], expected), name
    assert list(state) == list(VisionTransformer(**hydravit.subnetwork_vit_args(model, 12)).state_dict())


def test_load_state_dict_converts_to_head_major():
    vit = VisionTransformer(**hydravit.subnetwork_vit_args(small_model(), 12)).eval()
    model = small_model().eval()
    model.load_state_dict(vit.state_dict())
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), vit(x))
    stored = model.blocks[0].attn.qkv.weight
    assert torch.equal(stored, qkv_to_head_major(vit.blocks[0].attn.qkv.weight, 12))


@pytest.mark.parametrize('k', [3, 7])
def test_gradients_equal_dedicated_vit_across_optimizer_steps(k):
    """The cached blocks are reused after in-place updates: every step's gradient must still be exact."""
    model = small_model(active_heads=k)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        x, y = images(4), torch.randint(0, 10, (4,))
        expected = reference_grads(model, k, x, y)
        optimizer.zero_grad(set_to_none=step % 2 == 0)
        F.cross_entropy(model(x), y).backward()
        for name, grad in model_grads(model).items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=f'step {step}: {name}')
        optimizer.step()


def test_accumulated_gradients_sum_micro_batches():
    model = small_model(active_heads=5)
    x, y = images(4), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()
    once = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for half in (slice(0, 2), slice(2, 4)):
        (F.cross_entropy(model(x[half]), y[half]) / 2).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, once[name], rtol=1e-5, atol=1e-6, msg=name)


def test_blocks_follow_new_storage_and_freezing():
    model = small_model(active_heads=4).eval()
    x = images()
    with torch.inference_mode():
        model(x)  # builds the cache
    model.double()  # new storage for every parameter
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()), hydravit.export_subnetwork(model, 4).eval()(x.double()))
    model.float()
    fc1 = model.blocks[0].mlp.fc1
    fc1.weight.data = torch.randn_like(fc1.weight)  # storage swapped behind the module's back
    with torch.no_grad():
        torch.testing.assert_close(model(x), hydravit.export_subnetwork(model, 4).eval()(x))
    # Built under inference_mode, then trained: gradients must reach the parameters; frozen ones get none.
    model.train()
    fc1.weight.requires_grad_(False)
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert fc1.weight.grad is None
    assert model.blocks[0].mlp.fc2.weight.grad is not None and model.blocks[0].mlp.fc2.weight.grad.abs().sum() > 0


def test_deepcopy_and_pickle_drop_the_cache_and_stay_independent():
    model = small_model(active_heads=3).eval()
    x = images()
    with torch.no_grad():
        before = model(x)
        ema = copy.deepcopy(model)
        clone = pickle.loads(pickle.dumps(model))
        for m in (ema, clone):
            for p in m.parameters():
                p.add_(1.0)
            assert not torch.equal(m(x), before)
        assert torch.equal(model(x), before)


def test_ema_of_parameters_tracks_the_model():
    """timm's ModelEmaV3 over parameters (exclude_buffers=True, what training uses) sees the real weights."""
    model = small_model(active_heads=3)
    ema = timm.utils.ModelEmaV3(model, decay=0.5, exclude_buffers=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for (name, p), e in zip(model.named_parameters(), ema.module.parameters(), strict=True):
        torch.testing.assert_close(e, p - 0.5, msg=name)


def test_compile_path_slices_without_cache():
    layer = SliceableLinear(8, 6)
    x = torch.randn(2, 4)
    expected = F.linear(x, layer.weight[:3, :4], layer.bias[:3])
    compiled = torch.compile(lambda t: layer(t, 3), backend='eager', fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)
    assert '_leading_cache' not in layer.__dict__


def test_count_ops_sees_views_and_allocations():
    a = torch.randn(4, 4)
    counted = count_ops(lambda: (a[:2] + 1).sum())
    assert counted.by_op == {'aten.slice.Tensor': 1, 'aten.add.Tensor': 1, 'aten.sum.default': 1}
    assert (counted.total, counted.non_view) == (3, 2)
    assert counted.allocated_bytes == 2 * 4 * 4 + 4  # the (2, 4) sum input and the scalar


@pytest.mark.parametrize('k', [3, 6, 12])
def test_op_count_targets(k):
    """Issue 17's targets: a sliced inference forward dispatches at most 1.05x the dedicated ViT's ops; a training
    step at most one extra non-view op per parameter tensor (the gradient scatter of a sliced leaf)."""
    torch.manual_seed(0)
    model = small_model(active_heads=k)
    dedicated = hydravit.export_subnetwork(model, k)
    x, y = images(), torch.tensor([1, 2])
    assert inference_ops(model, x).total <= 1.05 * inference_ops(dedicated, x).total
    sliced, plain = training_step_ops(model, x, y), training_step_ops(dedicated, x, y)
    assert sliced.non_view - plain.non_view <= sum(1 for _ in model.parameters())
    if k == model.num_heads:  # nothing is sliced: exactly timm's ops
        assert sliced.by_op == plain.by_op


def test_count_ops_script_reports_targets(capsys):
    spec = importlib.util.spec_from_file_location('count_ops', ROOT / 'scripts' / 'count_ops.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(['--model', 'hydravit_dyn_patch4_32', '--ks', '3', '--num-classes', '10']) == 0
    out = capsys.readouterr().out
    targets = [line.split() for line in out.splitlines() if '<=' in line]
    assert len(targets) == 2 and all(line[-1] == 'yes' for line in targets), out
    assert '<= dedicated + 80' in out  # the small model's parameter tensors


def test_optimizer_state_dict_is_in_timms_layout_and_resumes_exactly():
    from hydravit.layers import timm_layout_optimizer_state

    def run(model, optimizer, steps):
        torch.manual_seed(7)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(images(4)), torch.randint(0, 10, (4,))).backward()
            optimizer.step()

    model = small_model(active_heads=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    timm_layout_optimizer_state(optimizer, model)
    run(model, optimizer, 2)
    qkv = model.blocks[0].attn.qkv.weight
    index = [id(p) for p in model.parameters()].index(id(qkv))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    live = optimizer.state[qkv]['exp_avg']
    assert torch.equal(saved_opt['state'][index]['exp_avg'], qkv_to_timm(live, model.num_heads))
    assert torch.equal(optimizer.state[qkv]['exp_avg'], live)  # saving changed nothing in the optimizer

    resumed = small_model(active_heads=5)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    timm_layout_optimizer_state(resumed_opt, resumed)
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    assert torch.equal(saved_opt['state'][index]['exp_avg'], qkv_to_timm(live, model.num_heads))  # input kept
    run(model, optimizer, 1)
    run(resumed, resumed_opt, 1)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_training_ema_moves_the_qkv_weights():
    """timm's default EMA lerps state_dict() values in place, which for qkv are copies; training's must not."""
    from argparse import Namespace

    from hydravit.training.builders import create_model_ema
    model = small_model(active_heads=3)
    ema = create_model_ema(Namespace(model_ema=True, model_ema_decay=0.5, model_ema_warmup=False,
                                     model_ema_force_cpu=False), model)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight - 0.5)
