"""Sliceable layers: cached leading blocks of parameters, the state-dict contract, and what a call dispatches."""
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
from hydravit.layers import SliceableLinear, SliceableQKV

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
    return {n: p.grad for n, p in model.named_parameters()}


def test_state_dict_hands_out_the_parameters_in_timms_layout():
    """timm's contract, which its EMA and every in-place state-dict writer rely on: a write through ``state_dict()``
    reaches the model. Keys, shapes and tensors are those of timm's ViT."""
    model = small_model(active_heads=3)
    state = model.state_dict()
    vit = VisionTransformer(**hydravit.subnetwork_vit_args(model, 12))
    assert {n: t.shape for n, t in state.items()} == {n: t.shape for n, t in vit.state_dict().items()}
    assert list(state) == list(vit.state_dict())
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        tensor.add_(1.0)  # in place, as timm's ModelEmaV2/V3 update the EMA's state dict
        assert torch.equal(params[name], tensor), name
    vit.load_state_dict(state)
    model.set_heads(12)
    model.eval(), vit.eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), vit(x))


def test_qkv_rows_of_the_first_k_heads_are_timms_q_k_v_blocks():
    """At k heads the projection uses rows [s * dim, s * dim + k * head_dim) of timm's fused weight for s = q, k, v:
    the dedicated ViT built by slicing those rows out gives the same q, k and v."""
    layer = SliceableQKV(8, 4, bias=True)  # 4 heads of width 2
    x = torch.randn(2, 5, 4)  # k = 2 heads
    rows = torch.cat([torch.arange(s * 8, s * 8 + 4) for s in range(3)])
    dedicated = F.linear(x, layer.weight[rows, :4], layer.bias[rows]).reshape(2, 5, 3, 2, 2).permute(2, 0, 3, 1, 4)
    for grad_mode in (True, False):  # the autograd and the serving (as_strided) paths
        with torch.set_grad_enabled(grad_mode):
            for got, want in zip(layer(x), dedicated.unbind(0), strict=True):
                torch.testing.assert_close(got, want)


@pytest.mark.parametrize('ema_class', ['ModelEmaV2', 'ModelEmaV3'])
def test_timm_ema_with_defaults_tracks_every_weight(ema_class):
    """The public report: timm's EMA with its defaults, decay 0, two training steps at k = 3: the EMA must equal the
    model (it used to differ by 1.5 in the logits, the qkv weights never averaged)."""
    model = small_model(active_heads=3)
    ema = getattr(timm.utils, ema_class)(model, decay=0.)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        F.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
    for (name, p), e in zip(model.named_parameters(), ema.module.parameters(), strict=True):
        assert torch.equal(e, p), name
    model.eval(), ema.module.eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(ema.module(x), model(x))


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
    step at most one extra non-view op per parameter tensor (the gradient scatter of a sliced leaf), plus one per qkv
    projection (issue 21: the sum of its q, k and v blocks' input gradients, the price of timm's layout)."""
    torch.manual_seed(0)
    model = small_model(active_heads=k)
    dedicated = hydravit.export_subnetwork(model, k)
    x, y = images(), torch.tensor([1, 2])
    assert inference_ops(model, x).total <= 1.05 * inference_ops(dedicated, x).total
    sliced, plain = training_step_ops(model, x, y), training_step_ops(dedicated, x, y)
    allowance = sum(1 for _ in model.parameters()) + len(model.blocks)
    assert sliced.non_view - plain.non_view <= allowance
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
    assert '<= dedicated + 80 + 6' in out  # the small model's parameter tensors and qkv projections


def test_optimizer_state_resumes_exactly():
    def run(model, optimizer, steps):
        torch.manual_seed(7)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(images(4)), torch.randint(0, 10, (4,))).backward()
            optimizer.step()

    model = small_model(active_heads=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run(model, optimizer, 2)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    resumed = small_model(active_heads=5)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    run(model, optimizer, 1)
    run(resumed, resumed_opt, 1)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_training_ema_moves_the_qkv_weights():
    """Training's EMA (timm's ModelEmaV3, as timm's train.py builds it) averages every weight, qkv included."""
    from argparse import Namespace

    from hydravit.training.builders import create_model_ema
    model = small_model(active_heads=3)
    ema = create_model_ema(Namespace(model_ema=True, model_ema_decay=0.5, model_ema_warmup=False,
                                     model_ema_force_cpu=False), model)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight - 0.5)
