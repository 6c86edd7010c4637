"""Sliceable layers: each uses the leading slice of its full-size parameters.

A layer infers its active width from the last dimension of its input, so only the
patch embedding has to be told how many channels to produce. Everything downstream
follows from tensor shapes, which keeps ``set_heads`` O(1) and makes activation
recomputation (gradient checkpointing) see the same width as the forward pass.
Parameter names equal those of timm's layers, so state dicts are interchangeable.
"""
from typing import Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed


def _leading(t: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    return None if t is None else t[:n]


class SliceableLinear(nn.Linear):
    """``nn.Linear`` that reads its input width from ``x`` and emits ``out_features`` outputs."""

    def forward(self, x: torch.Tensor, out_features: Optional[int] = None) -> torch.Tensor:
        out_features = self.out_features if out_features is None else out_features
        return F.linear(x, self.weight[:out_features, :x.shape[-1]], _leading(self.bias, out_features))


class SliceableLayerNorm(nn.LayerNorm):
    """LayerNorm over the first ``x.shape[-1]`` features with the matching affine parameters."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(normalized_shape, eps=eps, **kwargs)  # timm's ViT LayerNorm eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        return F.layer_norm(x, (width,), _leading(self.weight, width), _leading(self.bias, width), self.eps)


class SliceableConv2d(nn.Conv2d):
    """Conv2d producing only its first ``active_out_channels`` output channels (all when None)."""

    active_out_channels: Optional[int] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.active_out_channels or self.out_channels
        return self._conv_forward(x, self.weight[:n], _leading(self.bias, n))


class SliceablePatchEmbed(PatchEmbed):
    """timm's PatchEmbed whose projection emits a selectable number of leading channels."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        conv = self.proj
        self.proj = SliceableConv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, bias=conv.bias is not None,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )


class SliceableAttention(nn.Module):
    """Multi-head self-attention over the first ``x.shape[-1] // head_dim`` heads.

    ``qkv`` keeps timm's fused layout (rows: all q heads, all k heads, all v heads), so the
    active rows are three separate blocks; they are gathered into one weight (a view when all
    heads are active, a small copy otherwise) so the projection stays a single GEMM.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[Type[nn.Module]] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        if qk_norm or scale_norm:
            raise ValueError('qk_norm and scale_norm are not supported by HydraViT attention')
        dd = {'device': device, 'dtype': dtype}
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = SliceableLinear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, width = x.shape
        heads = width // self.head_dim
        weight = self.qkv.weight.unflatten(0, (3, self.dim))[:, :width, :width].reshape(3 * width, width)
        bias = self.qkv.bias
        if bias is not None:
            bias = bias.unflatten(0, (3, self.dim))[:, :width].reshape(3 * width)
        qkv = F.linear(x, weight, bias).reshape(B, N, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.,
            is_causal=is_causal,
        )
        x = x.transpose(1, 2).reshape(B, N, width)
        return self.proj_drop(self.proj(x, width))


class SliceableMlp(nn.Module):
    """ViT MLP whose hidden width scales with the input width (``mlp_ratio`` kept)."""

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Optional[Type[nn.Module]] = None,
            bias: bool = True,
            drop: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if norm_layer is not None:
            raise ValueError('an MLP norm (scale_mlp_norm) is not supported by HydraViT')
        dd = {'device': device, 'dtype': dtype}
        hidden_features = hidden_features or in_features
        self.fc1 = SliceableLinear(in_features, hidden_features, bias=bias, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = SliceableLinear(hidden_features, in_features, bias=bias, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        hidden = width * self.fc1.out_features // self.fc1.in_features
        x = self.drop1(self.act(self.fc1(x, hidden)))
        return self.drop2(self.fc2(x, width))


class SeparateClassifiers(nn.Module):
    """One classifier per head count (the paper's "separate classifiers" variant).

    The classifier is chosen by the width of the pooled features, i.e. by the active head count.
    """

    def __init__(self, head_counts, head_dim: int, num_classes: int, device=None, dtype=None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.classifiers = nn.ModuleDict({
            str(k): nn.Linear(k * head_dim, num_classes, device=device, dtype=dtype) for k in sorted(head_counts)
        })

    @property
    def head_counts(self) -> list:
        return [int(k) for k in self.classifiers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifiers[str(x.shape[-1] // self.head_dim)](x)
