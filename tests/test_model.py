"""HydraViT model core: equality with timm's ViT, slicing semantics, timm features honoring k."""
import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from timm.models import VisionTransformer

import hydravit
from hydravit import HydraViT

SMALL = 'hydravit_dyn_patch4_32'
SMALL_VIT_ARGS = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=12)


def small_model(**kwargs) -> HydraViT:
    return timm.create_model(SMALL, num_classes=10, **kwargs)


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


@pytest.fixture(scope='module')
def vit_base():
    return timm.create_model('vit_base_patch16_224', num_classes=1000).eval()


def test_registered_with_timm_and_pretrained_cfg():
    assert {'hydravit_dyn_patch16_224', SMALL} <= set(timm.list_models('hydravit*'))
    model = timm.create_model(SMALL)
    assert isinstance(model, HydraViT)
    assert model.pretrained_cfg['input_size'] == (3, 32, 32)
    assert model.num_heads == 12 and model.head_dim == 16 and len(model.blocks) == 6
    cfg = timm.get_pretrained_cfg('hydravit_dyn_patch16_224').to_dict()
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.875
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN


def test_full_heads_equal_timm_vit_base(vit_base):
    model = timm.create_model('hydravit_dyn_patch16_224').eval()
    model.load_state_dict(vit_base.state_dict(), strict=True)
    x = images(2, 224)
    with torch.no_grad():
        assert torch.equal(model(x), vit_base(x))


def test_state_dict_layout_is_timm_vit_base(vit_base):
    model = timm.create_model('hydravit_dyn_patch16_224')
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in vit_base.state_dict().items()}


@pytest.mark.parametrize('num_classes', [10, 1000, 37])
def test_full_heads_equal_timm_vit_small_geometry(num_classes):
    ref = VisionTransformer(**SMALL_VIT_ARGS, num_classes=num_classes).eval()
    model = timm.create_model(SMALL, num_classes=num_classes).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = images(3)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, num_classes)
    assert torch.equal(out, ref(x))


def test_any_num_classes_including_headless():
    model = timm.create_model('hydravit_dyn_patch16_224', num_classes=7)
    assert model.head.weight.shape == (7, 768)
    model = small_model()
    model.reset_classifier(0)
    model.set_heads(5)
    assert model(images()).shape == (2, 5 * 16)
    model.reset_classifier(4)
    assert model(images()).shape == (2, 4)


@pytest.mark.parametrize('k', range(1, 13))
def test_sliced_equals_exported_small(k):
    model = small_model(active_heads=k).eval()
    vit = hydravit.export_subnetwork(model, k)
    assert type(vit) is VisionTransformer and vit.embed_dim == 16 * k and vit.blocks[0].attn.num_heads == k
    x = images(4)
    with torch.no_grad():
        assert (model(x) - vit(x)).abs().max() <= 1e-5


def test_sliced_equals_exported_base_k3(vit_base):
    model = timm.create_model('hydravit_dyn_patch16_224').eval()
    model.load_state_dict(vit_base.state_dict())
    model.set_heads(3)
    deit_tiny_shaped = hydravit.export_subnetwork(model, 3)
    assert sum(p.numel() for p in deit_tiny_shaped.parameters()) == 5_717_416  # DeiT-Tiny
    x = images(2, 224)
    with torch.no_grad():
        assert (model(x) - deit_tiny_shaped(x)).abs().max() <= 1e-5


def expected_active_region(name: str, shape, k: int, head_dim: int = 16, dim: int = 192):
    """Boolean mask of the entries the k-head subnetwork uses, written from the paper's rules."""
    p, mask = k * head_dim, torch.zeros(shape, dtype=torch.bool)
    hidden = 4 * p
    if name.endswith('attn.qkv.weight'):
        for block in range(3):  # q, k, v rows of the first k heads, first p input columns
            mask[block * dim:block * dim + p, :p] = True
    elif name.endswith('attn.qkv.bias'):
        for block in range(3):
            mask[block * dim:block * dim + p] = True
    elif name.endswith('mlp.fc1.weight'):
        mask[:hidden, :p] = True
    elif name.endswith('mlp.fc1.bias'):
        mask[:hidden] = True
    elif name.endswith('mlp.fc2.weight'):
        mask[:p, :hidden] = True
    elif name == 'head.weight':
        mask[:, :p] = True
    elif name == 'head.bias':
        mask[:] = True
    elif name in ('cls_token', 'pos_embed'):
        mask[..., :p] = True
    elif name == 'patch_embed.proj.weight':
        mask[:p] = True
    elif name.endswith('attn.proj.weight'):
        mask[:p, :p] = True
    else:  # LayerNorm weights/biases, patch-embed bias, proj and fc2 biases: first p features
        assert len(shape) == 1, name
        mask[:p] = True
    return mask


@pytest.mark.parametrize('k', [1, 3, 7])
def test_gradients_exactly_zero_outside_active_slice(k):
    model = small_model()
    with torch.no_grad():  # a zero-init head bias/cls token would hide wrong masks
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.set_heads(k)
    F.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3])).backward()
    for name, param in model.named_parameters():
        mask = expected_active_region(name, param.shape, k)
        assert param.grad is not None, name
        grad = param.grad
        assert torch.count_nonzero(grad[~mask]) == 0, f'{name}: gradient outside the active slice'
        if name.endswith('attn.qkv.bias'):  # the k rows' gradient is 0 up to rounding: softmax ignores a shift
            mask = mask.clone().view(3, -1)
            mask[1] = False
            grad = grad.view(3, -1)
        assert torch.count_nonzero(grad[mask]) > 0.9 * mask.sum(), f'{name}: active slice has no gradient'


def test_gradient_checkpointing_equals_plain_forward_and_backward():
    model = small_model(active_heads=5)
    x, y = images(4), torch.tensor([1, 2, 3, 4])
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_plain, grad_plain), (out_ckpt, grad_ckpt) = grads
    assert torch.equal(out_plain, out_ckpt)
    for name in grad_plain:
        assert torch.allclose(grad_plain[name], grad_ckpt[name], atol=1e-7), name
    assert torch.count_nonzero(grad_ckpt['blocks.0.mlp.fc1.weight'][4 * 80:]) == 0  # k=5 honored


@pytest.mark.parametrize('bad', [0, 13, -1, 3.0, '3', True, None, [3]])
def test_invalid_heads_raise_value_error_naming_range(bad):
    model = small_model()
    with pytest.raises(ValueError, match=r'1\.\.12'):
        model.set_heads(bad)
    assert model.active_heads == 12
    with pytest.raises(ValueError, match=r'1\.\.12'):
        hydravit.export_subnetwork(model, bad)


def test_set_heads_is_o1_and_readable():
    model = small_model()
    before = {n: (t.data_ptr(), t.shape) for n, t in model.named_parameters()}
    for k in (3, 12, 1, 7):
        model.set_heads(k)
        assert model.active_heads == k and model.active_embed_dim == 16 * k
    assert {n: (t.data_ptr(), t.shape) for n, t in model.named_parameters()} == before
    model.set_heads(torch.tensor(4).item())
    assert model.active_heads == 4


def test_create_model_active_heads_kwarg():
    assert small_model(active_heads=6).active_heads == 6
    with pytest.raises(ValueError, match=r'1\.\.12'):
        small_model(active_heads=13)


def test_forward_features_and_head_honor_k():
    model = small_model(active_heads=4).eval()
    x = images(2)
    features = model.forward_features(x)
    assert features.shape == (2, 1 + 64, 64)
    assert model.forward_head(features, pre_logits=True).shape == (2, 64)
    assert torch.equal(model.forward_head(features), model(x))


def test_autocast_bf16_close_to_fp32():
    model = small_model(active_heads=6).eval()
    x = images(2)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_torch_compile_fixed_k_fullgraph():
    model = small_model(active_heads=3).eval()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    x = images(2)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_eval_deterministic_train_stochastic():
    model = small_model(drop_path_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1, active_heads=4)
    x = images(2)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)  # timm's linear drop-path rule
    assert model.blocks[0].drop_path1.__class__.__name__ == 'Identity'


def test_no_weight_decay_and_group_matcher_with_timm_optim():
    model = small_model()
    assert {'pos_embed', 'cls_token'} <= model.no_weight_decay()
    optimizer = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    no_decay = {id(p) for g in optimizer.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert id(model.pos_embed) in no_decay and id(model.blocks[0].norm1.weight) in no_decay
    assert id(model.blocks[0].attn.qkv.weight) not in no_decay
    assert len({g['lr_scale'] for g in optimizer.param_groups}) == len(model.blocks) + 2


def test_separate_classifiers_pick_the_active_one():
    model = small_model(separate_classifiers=(3, 6, 12)).eval()
    assert [k for k in model.head.head_counts] == [3, 6, 12]
    assert model.head.classifiers['6'].weight.shape == (10, 96)
    x = images(2)
    for k in (3, 6, 12):
        model.set_heads(k)
        with torch.no_grad():
            features = model.forward_head(model.forward_features(x), pre_logits=True)
            expected = F.linear(features, model.head.classifiers[str(k)].weight, model.head.classifiers[str(k)].bias)
            assert torch.equal(model(x), expected)
            assert (model(x) - hydravit.export_subnetwork(model, k)(x)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match='separate classifiers'):
        model.set_heads(4)
    with pytest.raises(ValueError, match=r'1\.\.12'):
        small_model(separate_classifiers=(3, 13))


@pytest.mark.parametrize('kwargs, match', [
    (dict(global_pool='map'), 'global_pool'),
    (dict(embed_dim=100), 'divisible'),
])
def test_unsupported_options_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_model(**kwargs)


def test_avg_pool_variant_slices_fc_norm():
    ref = VisionTransformer(**SMALL_VIT_ARGS, num_classes=5, global_pool='avg', class_token=False).eval()
    model = timm.create_model(SMALL, num_classes=5, global_pool='avg', class_token=False).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = images(2)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-6
        model.set_heads(2)
        assert (model(x) - hydravit.export_subnetwork(model, 2)(x)).abs().max() <= 1e-5


@pytest.fixture(scope='module')
def hydra_base():
    return timm.create_model('hydravit_dyn_patch16_224').eval()


def test_p_is_the_settable_active_width(hydra_base):
    model = hydra_base
    model.set_heads(12)
    assert model.p == 768
    model.p = 192  # the official code's way of choosing the subnetwork
    assert model.active_heads == 3 and model.p == 192 and model.active_embed_dim == 192
    x = images(1, 224)
    with torch.no_grad():
        out_p = model(x)
        model.set_heads(12)
        model.set_heads(3)
        assert torch.equal(out_p, model(x))
    model.set_heads(7)
    assert model.p == 448


@pytest.mark.parametrize('bad', [0, -64, 100, 832, 192.0, '192', True, None])
def test_p_rejects_widths_that_are_not_head_multiples(hydra_base, bad):
    model = hydra_base
    model.set_heads(6)
    with pytest.raises(ValueError) as info:
        model.p = bad
    assert str(info.value) == f'p must be a positive multiple of head_dim 64 up to embed_dim 768, got {bad!r}'
    assert model.active_heads == 6 and model.p == 384


def test_p_on_separate_classifiers_needs_a_classifier():
    model = small_model(separate_classifiers=(3, 6, 12))
    model.p = 96
    assert model.active_heads == 6
    with pytest.raises(ValueError, match='separate classifiers'):
        model.p = 64
