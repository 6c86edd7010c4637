"""What timm code does to a timm ViT works on HydraViT, at the active k: feature introspection, the fused-attention
switch, FX tracing, dynamic image sizes; TorchScript, which cannot work, is refused in one line."""
import pytest
import timm
import torch
import torch.fx
import torch.nn as nn
from timm.models import VisionTransformer

import hydravit


def small_model(**kwargs):
    return timm.create_model('hydravit_dyn_patch4_32', num_classes=10, **kwargs)


def images(n=2, size=32):
    return torch.randn(n, 3, size, size)


@pytest.mark.parametrize('created_at', [12, 3])
def test_features_only_introspection_follows_the_active_k(created_at):
    model = small_model(features_only=True, out_indices=(1, 3), active_heads=created_at)
    for k in (created_at, 5):
        model.model.set_heads(k)
        features = model(images())
        assert model.feature_info.channels() == [f.shape[1] for f in features] == [16 * k, 16 * k]
        neck = nn.Conv2d(model.feature_info.channels()[-1], 8, 1)  # a neck sized from timm's introspection
        assert neck(features[-1]).shape == (2, 8, 8, 8)
    assert {info['num_chs'] for info in model.model.feature_info} == {16 * 5}


def test_plain_model_feature_info_follows_the_active_k():
    model = small_model(active_heads=4)
    assert {info['num_chs'] for info in model.feature_info} == {64}
    assert model.forward_intermediates(images(), indices=1, intermediates_only=True)[0].shape[1] == 64


@pytest.mark.parametrize('k', [3, 12])
def test_unfused_attention_is_timms_switch(k):
    """``fused_attn = False`` (set by attention-rollout tools) computes the attention matrix and passes it through
    ``attn_drop``, where hooks see it; the logits stay those of the fused path."""
    model = small_model(active_heads=k).eval()
    x = images()
    with torch.no_grad():
        fused = model(x)
        maps = []
        for block in model.blocks:
            block.attn.fused_attn = False
            block.attn.attn_drop.register_forward_hook(lambda m, inputs, out: maps.append(out))
        unfused = model(x)
    torch.testing.assert_close(unfused, fused)
    assert len(maps) == len(model.blocks)
    assert maps[0].shape == (2, k, 65, 65)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, k, 65))  # rows of a softmax
    vit = hydravit.export_subnetwork(model, k).eval()  # timm's own Attention with the same switch
    for block in vit.blocks:
        block.attn.fused_attn = False
    with torch.no_grad():
        torch.testing.assert_close(vit(x), unfused)


def test_unfused_attention_honours_masks_like_sdpa():
    attn = small_model().blocks[0].attn.eval()
    x = torch.randn(2, 7, 48)
    mask = torch.rand(7, 7) > 0.3
    mask.fill_diagonal_(True)
    with torch.no_grad():
        for kwargs in ({'attn_mask': mask}, {'is_causal': True}):
            attn.fused_attn = True
            fused = attn(x, **kwargs)
            attn.fused_attn = False
            torch.testing.assert_close(attn(x, **kwargs), fused)


@pytest.mark.parametrize('k', [3, 12])
def test_fx_symbolic_trace(k):
    """timm's and torchvision's FX feature extractors start from ``torch.fx.symbolic_trace``."""
    model = small_model(active_heads=k).eval()
    traced = torch.fx.symbolic_trace(model)
    x = images()
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_fx_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor
    model = small_model(active_heads=6).eval()
    extractor = create_feature_extractor(model, return_nodes={'blocks.2': 'mid', 'fc_norm': 'pooled'})
    with torch.no_grad():
        out = extractor(images())
        assert out['mid'].shape == (2, 65, 96)
        torch.testing.assert_close(model.forward_head(model.forward_features(images(2)), pre_logits=True).shape,
                                   out['pooled'].shape)


def test_dynamic_img_size_as_timm():
    """timm ViTs take ``dynamic_img_size=True``: any input size, the position table resampled per call."""
    model = small_model(dynamic_img_size=True, active_heads=3).eval()
    args = hydravit.subnetwork_vit_args(model, 3)
    assert args['dynamic_img_size'] is True  # the exported ViT keeps it
    vit = VisionTransformer(**args).eval()
    vit.load_state_dict(hydravit.subnetwork_state_dict(model, 3))
    x = images(size=48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x))
        assert model(images(size=32)).shape == (2, 10)


def test_torchscript_is_refused_in_one_line():
    with pytest.raises(RuntimeError, match=r'^HydraViT cannot be compiled by torch.jit.script \(its width is chosen '
                                           r'at run time\); use torch.compile, torch.export'):
        torch.jit.script(small_model())


def test_initial_checkpoint_takes_the_ema_as_timm_does(tmp_path, caplog):
    """timm's ``load_checkpoint`` (behind timm's and the original code's --initial-checkpoint) prefers
    ``state_dict_ema``; ``--initial-checkpoint-weights`` chooses."""
    import logging

    from timm.models import load_checkpoint

    from hydravit.training.builders import load_initial_checkpoint
    from hydravit.training.config import ConfigError
    raw, ema = small_model().state_dict(), small_model().state_dict()
    path = tmp_path / 'ckpt.pth.tar'
    torch.save({'state_dict': raw, 'state_dict_ema': ema}, path)
    stock = small_model()
    load_checkpoint(stock, str(path))  # timm's own choice
    for weights, expected in (('auto', ema), ('ema', ema), ('model', raw)):
        model = small_model()
        with caplog.at_level(logging.INFO, logger='train'):
            load_initial_checkpoint(model, str(path), init_slices=False, weights=weights)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items()), weights
        assert f'loaded the {"model" if weights == "model" else "EMA"} weights of {path}' in caplog.text
    assert all(torch.equal(stock.state_dict()[k], v) for k, v in ema.items())
    torch.save({'state_dict': raw}, path)
    with pytest.raises(ConfigError, match=f'^--initial-checkpoint-weights ema: {path} holds no EMA weights'):
        load_initial_checkpoint(small_model(), str(path), init_slices=False, weights='ema')
