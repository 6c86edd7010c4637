"""HydraViT: one ViT whose first k of H heads (and the matching slice of every layer) form a ViT.

The model is timm's ``VisionTransformer`` built from sliceable layers, so its state dict is
key-for-key and shape-for-shape that of the full-size timm ViT.
"""
import numbers
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model

from .layers import (
    ActiveParams,
    SeparateClassifiers,
    SliceableAttention,
    SliceableLayerNorm,
    SliceableLinear,
    SliceableMlp,
    SliceablePatchEmbed,
)

__all__ = ['HydraViT']

SUPPORTED_POOLS = ('token', 'avg', 'max', 'avgmax', '')


class HydraViT(ActiveParams, VisionTransformer):
    """Vision Transformer with a run-time selectable number of leading attention heads.

    ``set_heads(k)`` selects the subnetwork made of the first ``k`` heads: embedding width
    ``k * head_dim`` in every layer, MLP hidden width scaled alike, all classes out.
    """

    def __init__(
            self,
            img_size: int = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            class_token: bool = True,
            no_embed_class: bool = False,
            reg_tokens: int = 0,
            fc_norm: Optional[bool] = None,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            patch_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            weight_init: str = '',
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
            separate_classifiers: Optional[Sequence[int]] = None,
            active_heads: Optional[int] = None,
            device=None,
            dtype=None,
    ) -> None:
        if global_pool not in SUPPORTED_POOLS:
            raise ValueError(f'global_pool must be one of {SUPPORTED_POOLS}, got {global_pool!r}')
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})')
        vit_args = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, class_token=class_token,
            no_embed_class=no_embed_class, reg_tokens=reg_tokens, fc_norm=fc_norm,
            dynamic_img_size=dynamic_img_size, dynamic_img_pad=dynamic_img_pad,
        )
        super().__init__(
            **vit_args,
            drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate,
            patch_drop_rate=patch_drop_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            weight_init=weight_init,
            embed_layer=SliceablePatchEmbed,
            norm_layer=SliceableLayerNorm,
            mlp_layer=SliceableMlp,
            attn_layer=SliceableAttention,
            device=device,
            dtype=dtype,
        )
        self.vit_args = vit_args  # rebuilds the subnetwork as a plain timm ViT (hydravit.export)
        self.head_dim = embed_dim // num_heads
        self.num_heads = num_heads
        self.separate_classifiers = sorted(set(separate_classifiers)) if separate_classifiers else None
        if self.separate_classifiers:
            bad = [k for k in self.separate_classifiers if not _is_head_count(k, num_heads)]
            if bad:
                raise ValueError(f'separate_classifiers must hold head counts in 1..{num_heads}, got {bad}')
        self.head = self._make_head(num_classes)
        # The head counts the weights were trained on: set from a training checkpoint's record by hydravit's
        # loader (cli.create_model_from_args); the deploy tools serve only these. None: unknown.
        self.trained_heads: Optional[List[int]] = None
        self._active_heads = num_heads
        self.set_heads(num_heads if active_heads is None else active_heads)

    # --- choosing the subnetwork -------------------------------------------------------------
    @property
    def active_heads(self) -> int:
        """Number of leading attention heads currently in use."""
        return self._active_heads

    @property
    def active_embed_dim(self) -> int:
        """Embedding width of the active subnetwork (``active_heads * head_dim``)."""
        return self._active_heads * self.head_dim

    # timm's ViT sets num_features = head_hidden_size = embed_dim once; here they follow the active subnetwork, so
    # code sizing a layer from them (``nn.Linear(model.num_features, n)`` after ``reset_classifier(0)``) fits the
    # features the model returns, as the exported ViT of that width reports.
    @property
    def num_features(self) -> int:
        """Width of the features ``forward_features`` returns: the active embedding width."""
        return self.active_embed_dim if '_active_heads' in self.__dict__ else self.embed_dim

    @num_features.setter
    def num_features(self, value: int) -> None:
        self._set_derived_width('num_features', value)

    @property
    def head_hidden_size(self) -> int:
        """Width of the pooled features the classifier sees (``forward_head(pre_logits=True)``): the active width."""
        return self.num_features

    @head_hidden_size.setter
    def head_hidden_size(self, value: int) -> None:
        self._set_derived_width('head_hidden_size', value)

    def _set_derived_width(self, name: str, value: int) -> None:
        # timm's __init__ assigns these before set_heads exists; afterwards they are read-only views of k
        if '_active_heads' in self.__dict__:
            raise AttributeError(f'{name} follows the active head count ({self.active_embed_dim}); use set_heads')

    @property
    def p(self) -> int:
        """Active embedding width, the official HydraViT code's name for it: ``model.p = 192`` is ``set_heads(3)``
        on the 224 model. A width that is not a positive multiple of ``head_dim`` up to ``embed_dim`` raises."""
        return self.active_embed_dim

    @p.setter
    def p(self, width: int) -> None:
        if not (_is_int(width) and 0 < width <= self.embed_dim and width % self.head_dim == 0):
            raise ValueError(f'p must be a positive multiple of head_dim {self.head_dim} up to embed_dim '
                             f'{self.embed_dim}, got {width!r}')
        self.set_heads(width // self.head_dim)

    def set_heads(self, k: int) -> None:
        """Select the subnetwork of the first ``k`` heads. O(1): nothing is allocated or copied."""
        if not _is_head_count(k, self.num_heads):
            raise ValueError(f'heads must be an int in 1..{self.num_heads}, got {k!r}')
        if self.separate_classifiers and k not in self.separate_classifiers:
            raise ValueError(
                f'heads={k} has no classifier; this model has separate classifiers for {self.separate_classifiers}')
        self._active_heads = int(k)
        # A plain int attribute: torch.compile specializes on it and guards it, so every k gets its own graph
        # (docs/training.md, --torchcompile) instead of silently reusing another width's.
        self.patch_embed.proj.active_out_channels = self.active_embed_dim
        # timm's feature introspection (feature_info.channels(), and the FeatureInfo of a features_only model, which
        # holds these same dicts) reports the width the features have.
        for info in self.feature_info:
            info['num_chs'] = self.active_embed_dim

    # --- timm hooks ------------------------------------------------------------------------------
    def _make_head(self, num_classes: int) -> nn.Module:
        dd = {'device': self.cls_token.device if self.cls_token is not None else None}
        if num_classes <= 0:
            return nn.Identity()
        if self.separate_classifiers:
            head = SeparateClassifiers(self.separate_classifiers, self.head_dim, num_classes, **dd)
        else:
            head = SliceableLinear(self.embed_dim, num_classes, **dd)
        for m in head.modules():  # timm's ViT head init
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                nn.init.zeros_(m.bias)
        return head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None and global_pool not in SUPPORTED_POOLS:
            raise ValueError(f'global_pool must be one of {SUPPORTED_POOLS}, got {global_pool!r}')
        super().reset_classifier(num_classes, global_pool)
        self.head = self._make_head(num_classes).train(self.training)
        # nothing else to record: hydravit.export reads the class count, pooling and norm placement from the model

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's ``set_input_size`` (position table resampled, patch kernel resampled for a new patch size),
        keeping the patch projection sliceable: timm swaps in a plain ``nn.Conv2d`` for a new patch size, which
        would emit the full width whatever k is."""
        proj_cls = type(self.patch_embed.proj)
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        proj = self.patch_embed.proj
        if type(proj) is not proj_cls:
            sliceable = proj_cls(proj.in_channels, proj.out_channels, proj.kernel_size, stride=proj.stride,
                                 padding=proj.padding, bias=proj.bias is not None, device=proj.weight.device,
                                 dtype=proj.weight.dtype)
            sliceable.load_state_dict(proj.state_dict())
            for new, old in zip(sliceable.parameters(), proj.parameters(), strict=True):
                new.requires_grad_(old.requires_grad)
            self.patch_embed.proj = sliceable.train(proj.training)
        self.set_heads(self.active_heads)  # the (new) projection emits the active width

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, L, width)``, or ``(B, H, W, width)`` with ``dynamic_img_size`` (the position table is then
        resampled to the H x W grid, as timm does); returns ``(B, prefix + L, width)``."""
        width = x.shape[-1]
        tokens = (self.cls_token, self.reg_token, self.pos_embed)
        cls_token, reg_token, pos_embed = self.leading(tokens, [None if t is None else (None, None, width)
                                                                for t in tokens])
        if self.dynamic_img_size:
            B, H, W, _ = x.shape
            if pos_embed is not None:
                pos_embed = resample_abs_pos_embed(
                    pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size,
                    num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens)
            x = x.reshape(B, H * W, width)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (cls_token, reg_token) if t is not None]
        if pos_embed is None:
            x = torch.cat(prefix + [x], dim=1)
        elif self.no_embed_class:
            x = torch.cat(prefix + [x + pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos_embed
        return self.pos_drop(x)

    def subnetwork_params(self, k: Optional[int] = None) -> int:
        """Parameter count of the subnetwork with ``k`` heads (default: the active one)."""
        from .export import subnetwork_state_dict  # local import: export depends on this module
        return sum(t.numel() for t in subnetwork_state_dict(self, self.active_heads if k is None else k).values())

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: refuse in one line rather than fail deep inside the compiler.
        raise RuntimeError('HydraViT cannot be compiled by torch.jit.script (its width is chosen at run time); use '
                           'torch.compile, torch.export, hydravit.export_subnetwork (a plain timm ViT) or the ONNX '
                           'export (python -m hydravit.deploy export)')


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_head_count(k: Any, num_heads: int) -> bool:
    return _is_int(k) and 1 <= k <= num_heads


def _create_hydravit(variant: str, pretrained: bool = False, **kwargs) -> HydraViT:
    return build_model_with_cfg(
        HydraViT, variant, pretrained,
        feature_cfg=dict(out_indices=3, feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': .875,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # DeiT's data config: the paper trains with the DeiT recipe.
    'hydravit_dyn_patch16_224': _cfg(),
    # CPU-scale sibling for demos and tests (32px, e.g. the bundled digits).
    'hydravit_dyn_patch4_32': _cfg(input_size=(3, 32, 32), crop_pct=1.0),
    # Geometries of timm's other common ViTs, the targets of hydravit.convert.
    'hydravit_dyn_small_patch16_224': _cfg(),
    'hydravit_dyn_large_patch16_224': _cfg(),
})


@register_model
def hydravit_dyn_patch16_224(pretrained: bool = False, **kwargs) -> HydraViT:
    """ViT-B/16 geometry; 3/6/12 heads are exactly DeiT-Tiny/Small/Base."""
    model_args = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_hydravit('hydravit_dyn_patch16_224', pretrained, **dict(model_args, **kwargs))


@register_model
def hydravit_dyn_patch4_32(pretrained: bool = False, **kwargs) -> HydraViT:
    """32px, patch 4, depth 6, 12 heads x 16 (embed 192): the CPU-scale sibling."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=12)
    return _create_hydravit('hydravit_dyn_patch4_32', pretrained, **dict(model_args, **kwargs))


@register_model
def hydravit_dyn_small_patch16_224(pretrained: bool = False, **kwargs) -> HydraViT:
    """DeiT-S / ViT-S/16 geometry (embed 384, 6 heads x 64, depth 12): k = 1..6, k = 3 is DeiT-Tiny-shaped."""
    model_args = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_hydravit('hydravit_dyn_small_patch16_224', pretrained, **dict(model_args, **kwargs))


@register_model
def hydravit_dyn_large_patch16_224(pretrained: bool = False, **kwargs) -> HydraViT:
    """ViT-L/16 geometry (embed 1024, 16 heads x 64, depth 24): k = 1..16."""
    model_args = dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_hydravit('hydravit_dyn_large_patch16_224', pretrained, **dict(model_args, **kwargs))
