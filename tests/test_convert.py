"""hydravit.convert: importance-ordered permutations of a trained ViT that keep its function at full width."""
import json

import pytest
import timm
import torch
import torch.nn as nn

import hydravit
from hydravit.convert import (
    SCORES,
    Importance,
    check_convertible,
    convert_state_dict,
    grow_state_dict,
    main,
    orders_from,
    permute_state_dict,
    target_model_name,
)
from hydravit.evaluation import accuracy


def vit(name='vit_base_patch16_224', **kwargs):
    """A random timm ViT of ``name``'s widths, shallow and small-input so the test stays quick."""
    kwargs = dict(dict(depth=2, img_size=64, num_classes=5), **kwargs)
    return timm.create_model(name, **kwargs).eval()


def perturbed(model):
    """Random LayerNorm affines and biases: timm's init (ones, zeros) would hide a wrongly permuted vector."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize('name,kwargs', [
    ('vit_base_patch16_224', {}),
    ('deit_small_patch16_224', {}),
    ('deit_small_patch16_224', dict(qkv_bias=False)),
    ('vit_base_patch16_224', dict(global_pool='avg', class_token=False, fc_norm=True)),
    ('vit_base_patch16_224', dict(reg_tokens=2, no_embed_class=True)),
])
@pytest.mark.parametrize('score', SCORES)
def test_permuted_vit_computes_the_same_function(name, kwargs, score):
    source = perturbed(vit(name, **kwargs))
    x = torch.randn(2, 3, 64, 64)
    state_dict, orders = convert_state_dict(source, score, [x])
    for order, n in [(orders.channels, source.embed_dim)] + [(o, source.blocks[0].attn.num_heads)
                                                             for o in orders.heads]:
        assert sorted(order.tolist()) == list(range(n))  # a bijection
    assert any(not torch.equal(o, torch.arange(len(o))) for o in orders.heads)  # and not the identity
    permuted = vit(name, **kwargs)
    permuted.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), source(x), rtol=0, atol=1e-4)


def test_converted_small_model_slices_like_its_export(tmp_path):
    source = perturbed(timm.create_model('hydravit_dyn_patch4_32', num_classes=5)).eval()
    plain = timm.models.VisionTransformer(**source.vit_args).eval()
    plain.load_state_dict(source.state_dict())
    x = torch.randn(2, 3, 32, 32)
    state_dict, _ = convert_state_dict(plain, 'taylor', [x])
    model = timm.create_model(target_model_name(plain), num_classes=5).eval()
    model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=1e-4)
        model.set_heads(4)
        torch.testing.assert_close(model(x), hydravit.export_subnetwork(model, 4).eval()(x), rtol=0, atol=1e-5)


def test_orders_put_the_highest_score_first_and_are_deterministic():
    scores = Importance(heads=torch.tensor([[0.1, 0.9, 0.5]]), mlp=torch.tensor([[1., 1., 2.]]),
                        channels=torch.tensor([3., 1., 3., 2.]))
    orders = orders_from(scores)
    assert orders.heads[0].tolist() == [1, 2, 0]
    assert orders.mlp[0].tolist() == [2, 0, 1]  # ties keep their order
    assert orders.channels.tolist() == [0, 2, 3, 1]
    source = perturbed(vit('deit_small_patch16_224'))
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    first = convert_state_dict(source, 'taylor', [x])[1]
    again = convert_state_dict(source, 'taylor', [x.clone()])[1]
    assert all(torch.equal(a, b) for a, b in zip(first.heads + [first.channels], again.heads + [again.channels],
                                                 strict=True))


def test_head_permutation_moves_qkv_rows_and_proj_columns_together():
    source = perturbed(vit('deit_small_patch16_224', depth=1))
    sd = {n: t.clone() for n, t in source.state_dict().items()}
    heads = torch.tensor([5, 4, 3, 2, 1, 0])
    orders = orders_from(Importance(heads=torch.tensor([[0., 1, 2, 3, 4, 5]]), mlp=torch.zeros(1, 1536),
                                    channels=torch.zeros(384)))
    assert torch.equal(orders.heads[0], heads)
    out = permute_state_dict(sd, orders, 6)
    qkv, proj = sd['blocks.0.attn.qkv.weight'], sd['blocks.0.attn.proj.weight']
    # new head 0 is old head 5: its q rows, k rows (offset 384) and proj columns
    assert torch.equal(out['blocks.0.attn.qkv.weight'][:64], qkv[320:384])
    assert torch.equal(out['blocks.0.attn.qkv.weight'][384:448], qkv[704:768])
    assert torch.equal(out['blocks.0.attn.proj.weight'][:, :64], proj[:, 320:384])


@pytest.mark.parametrize('make,message', [
    (lambda: timm.create_model('resnet18', num_classes=5), 'not a timm VisionTransformer: ResNet'),
    (lambda: vit(qk_norm=True), 'qk_norm'),
    (lambda: vit('deit3_small_patch16_224'), 'layer scale'),
    (lambda: vit(global_pool='map'), "attention pooling"),
])
def test_geometries_hydravit_cannot_express_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        check_convertible(make())


def test_unregistered_geometry_names_what_differs():
    def full(name):
        return timm.create_model(name, device='meta')
    with pytest.raises(ValueError, match=r'no registered HydraViT has this geometry \(head_dim 64\); closest '
                                         r'hydravit_dyn_patch16_224: embed_dim 192 vs 768, num_heads 3 vs 12'):
        target_model_name(full('deit_tiny_patch16_224'))
    assert target_model_name(full('deit_small_patch16_224')) == 'hydravit_dyn_small_patch16_224'
    assert target_model_name(full('deit_small_patch16_224'), num_heads=12) == 'hydravit_dyn_patch16_224'  # grown
    assert target_model_name(full('deit_tiny_patch16_224'), num_heads=12) == 'hydravit_dyn_patch16_224'
    assert target_model_name(full('vit_base_patch16_224.augreg_in21k')) == 'hydravit_dyn_patch16_224'
    assert target_model_name(full('vit_large_patch16_224')) == 'hydravit_dyn_large_patch16_224'


def test_cli_writes_a_checkpoint_that_validate_loads(tmp_path, image_folder, capsys):
    source = perturbed(timm.create_model('hydravit_dyn_patch4_32', num_classes=2))
    torch.save({'state_dict': source.state_dict()}, tmp_path / 'src.pth')
    out = tmp_path / 'converted.pth'
    assert main([str(image_folder), '--model', 'hydravit_dyn_patch4_32', '--checkpoint', str(tmp_path / 'src.pth'),
                 '-o', str(out), '--calib-images', '4', '--report', '--heads', '3', '12', '--report-file',
                 str(tmp_path / 'report.json')]) == 0
    printed = capsys.readouterr().out
    assert 'original order' in printed and 'converted' in printed
    report = json.loads((tmp_path / 'report.json').read_text())
    assert (report['score'], report['channels'], report['seed']) == ('magnitude', 'score', 0)
    validated = accuracy.main([str(image_folder), '--checkpoint', str(out), '--num-classes', '2', '--heads', '3', '12',
                               '-j', '0', '--device', 'cpu'])
    capsys.readouterr()
    assert {int(k): v for k, v in report['top1']['converted'].items()} == {r['heads']: r['top1'] for r in validated}
    assert report['top1']['original order']['12'] == report['top1']['converted']['12']  # the same function at k = 12
    model = timm.create_model('hydravit_dyn_patch4_32', num_classes=2).eval()
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint['arch'] == 'hydravit_dyn_patch4_32'
    model.load_state_dict(checkpoint['state_dict'], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source.eval()(x), rtol=0, atol=1e-4)


def test_cli_errors_before_any_work(tmp_path, image_folder, capsys):
    with pytest.raises(SystemExit):
        main([str(image_folder), '--model', 'hydravit_dyn_patch4_32', '--checkpoint', str(tmp_path / 'none.pth'),
              '-o', str(tmp_path / 'o.pth')])
    assert '--checkpoint: file not found' in capsys.readouterr().err
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / 'linear.pth')
    assert main([str(image_folder), '--model', 'hydravit_dyn_patch4_32', '--checkpoint', str(tmp_path / 'linear.pth'),
                 '-o', str(tmp_path / 'o.pth')]) == 2
    assert 'does not match' in capsys.readouterr().err and not (tmp_path / 'o.pth').exists()


def test_a_grown_model_with_the_sources_heads_is_the_source_and_keeps_its_init_elsewhere():
    source = perturbed(vit('deit_small_patch16_224'))  # 6 heads of 64: DeiT-Small into the 12-head Base
    x = torch.randn(2, 3, 64, 64)
    converted, _ = convert_state_dict(source, 'magnitude', [x])
    torch.manual_seed(0)
    model = timm.create_model('hydravit_dyn_patch16_224', depth=2, img_size=64, num_classes=5).eval()
    init = {n: t.clone() for n, t in model.state_dict().items()}
    model.load_state_dict(grow_state_dict(converted, model), strict=True)
    with torch.no_grad():
        model.set_heads(6)
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=1e-4)
        model.set_heads(12)
        assert torch.isfinite(model(x)).all()
    grown = model.state_dict()
    qkv = grown['blocks.0.attn.qkv.weight'].unflatten(0, (3, 768))  # q, k and v: the source in each block's top
    assert torch.equal(qkv[:, :384, :384], converted['blocks.0.attn.qkv.weight'].unflatten(0, (3, 384)))
    assert torch.equal(qkv[:, 384:], init['blocks.0.attn.qkv.weight'].unflatten(0, (3, 768))[:, 384:])
    assert torch.equal(grown['blocks.1.mlp.fc1.weight'][1536:], init['blocks.1.mlp.fc1.weight'][1536:])
    assert torch.equal(grown['pos_embed'][..., 384:], init['pos_embed'][..., 384:])


def test_grow_refuses_what_does_not_fit():
    model = timm.create_model('hydravit_dyn_patch4_32', num_classes=5)
    wider = timm.create_model('hydravit_dyn_patch4_32', num_classes=5, embed_dim=384, num_heads=24).state_dict()
    with pytest.raises(ValueError, match=r'^cls_token: shape \(1, 1, 384\) does not fit inside \(1, 1, 192\)$'):
        grow_state_dict(wider, model)
    deeper = timm.create_model('hydravit_dyn_patch4_32', num_classes=5, depth=7).state_dict()
    with pytest.raises(ValueError, match='^the ViT and the HydraViT to grow it into have different keys: blocks.6'):
        grow_state_dict(deeper, model)


def test_cli_grows_a_narrower_checkpoint(tmp_path, image_folder, capsys):
    source = perturbed(timm.create_model('hydravit_dyn_patch4_32', num_classes=2, embed_dim=96, num_heads=6)).eval()
    torch.save({'state_dict': source.state_dict()}, tmp_path / 'src.pth')
    out = tmp_path / 'grown.pth'
    args = [str(image_folder), '--model', 'hydravit_dyn_patch4_32', '--model-kwargs', 'embed_dim=96', 'num_heads=6',
            '--checkpoint', str(tmp_path / 'src.pth'), '-o', str(out), '--calib-images', '4']
    assert main(args + ['--grow-heads', '6']) == 2 and not out.exists()
    assert capsys.readouterr().err == "error: --grow-heads: 6 must exceed the source's 6 heads\n"
    assert main(args + ['--grow-heads', '12', '--report', '--heads', '3', '6', '12']) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [len(line.split()) for line in printed[-2:]] == [4, 4]  # 'original order' at k = 3, 6; converted at all
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint['hydravit_convert']['grow_heads'] == 12
    model = timm.create_model('hydravit_dyn_patch4_32', num_classes=2).eval()  # the registered 12-head model
    model.load_state_dict(checkpoint['state_dict'], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_heads(6)
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=1e-4)


def test_grow_flags_refuse_in_one_line_and_follow_the_sources_image_size(tmp_path, image_folder, capsys):
    # a plain timm ViT of the digits geometry, loaded through a stock name at another size: calibrated at 32 px
    source = perturbed(timm.models.VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3,
                                                     num_classes=2)).eval()
    torch.save(source.state_dict(), tmp_path / 'src.pth')
    base = [str(image_folder), '--model', 'vit_tiny_patch16_224', '--checkpoint', str(tmp_path / 'src.pth'),
            '--calib-images', '4', '--grow-heads', '12']
    kwargs = ['--model-kwargs', 'img_size=32', 'patch_size=4', 'embed_dim=48', 'depth=6', 'num_heads=3']
    out = tmp_path / 'grown.pth'
    assert main(base + kwargs + ['-o', str(out)]) == 0
    assert torch.load(out, weights_only=True)['arch'] == 'hydravit_dyn_patch4_32'
    capsys.readouterr()
    assert main(base + kwargs + ['foo=1', '-o', str(tmp_path / 'x.pth')]) == 2
    assert capsys.readouterr().err.startswith("error: --model-kwargs: ") and not (tmp_path / 'x.pth').exists()
    assert main(base + kwargs + ['-o', str(tmp_path / 'x.pth'), '--report', '--heads', '3', '13']) == 2
    assert capsys.readouterr().err == "error: --heads: each in 1..12 (the converted model's heads), got [3, 13]\n"
    with pytest.raises(SystemExit):
        main(base + kwargs + ['in_chans=1', '-o', str(tmp_path / 'x.pth')])
    assert 'error: --model-kwargs: in_chans is not supported (calibration images are RGB)' in capsys.readouterr().err
    assert not (tmp_path / 'x.pth').exists()
