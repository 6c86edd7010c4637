"""Sliceable layers: each uses the leading slice of its full-size parameters.

A layer infers its active width from the last dimension of its input, so only the
patch embedding has to be told how many channels to produce. Everything downstream
follows from tensor shapes, which keeps ``set_heads`` O(1) and makes activation
recomputation (gradient checkpointing) see the same width as the forward pass.
Parameter names equal those of timm's layers, so state dicts are interchangeable.
"""
from typing import List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed

Shape = Tuple[int, ...]


class _LeadingAliases(torch.autograd.Function):
    """The leading blocks of parameters, as tensors over the parameters' own storage.

    Forward gives, for each parameter, a tensor with the parameter's storage and strides and a smaller shape: no copy,
    and, unlike a view, no per-call op. It is not an autograd view of the parameter, so an optimizer step that updates
    the parameter in place leaves this node as its gradient function (autograd would replace a view's by a generic
    ``as_strided`` backward of two ops): ``ActiveParams`` builds the aliases once per width and reuses them across
    steps. Backward zero-pads each gradient to its parameter's shape, one op per parameter: the floor for a sliced
    leaf (gradient hooks, DDP, accumulation and clipping then see an ordinary full-size gradient).
    """

    @staticmethod
    def forward(ctx, shapes: Sequence[Shape], *params: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.pads = [_padding(shape, p.shape) for p, shape in zip(params, shapes, strict=True)]
        return tuple(_storage_alias(p, shape) for p, shape in zip(params, shapes, strict=True))

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]) -> tuple:
        return (None, *(None if g is None else F.pad(g, pad) for g, pad in zip(grads, ctx.pads, strict=True)))


def _storage_alias(p: torch.Tensor, shape: Shape) -> torch.Tensor:
    # The leading block of a strided tensor keeps its strides and storage offset.
    return p.new_empty(0).set_(p.untyped_storage(), p.storage_offset(), shape, p.stride())


def _padding(shape: Shape, full: Sequence[int]) -> List[int]:
    """``F.pad`` amounts (last dimension first) that grow ``shape`` to ``full`` at the end of every dimension."""
    return [amount for n, m in zip(reversed(shape), reversed(full), strict=True) for amount in (0, m - n)]


def _leading_view(p: torch.Tensor, shape: Shape) -> torch.Tensor:
    for dim, (n, m) in enumerate(zip(shape, p.shape, strict=True)):
        if n != m:
            p = p.narrow(dim, 0, n)
    return p


def _can_alias(params: Sequence[torch.Tensor]) -> bool:
    """Aliases are for eager calls on plain parameters; tracers and compilers (and torch.func's functional
    parameters) see ordinary slices, which they fuse or trace themselves."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return all(type(p) is nn.Parameter and not p.is_inference() and p.device.type != 'meta' for p in params)


class ActiveParams(nn.Module):
    """Mixin for sliceable layers: the leading blocks of their parameters at the active width, built once per width.

    ``leading(params, shapes)`` returns each parameter itself where the shape is its full shape, else its leading
    block. In eager mode the blocks come from ``_LeadingAliases`` and are cached per set of shapes, so a call at a
    width seen before dispatches no slicing op at all, in training as in inference. A cached block is rebuilt when
    its parameter was replaced, moved to other storage (``.to()``, ``param.data = ...``) or (un)frozen; in-place
    updates (optimizer steps, ``load_state_dict``) need no rebuild since the blocks share the parameter's storage.
    One caveat, as for any tensor that shares storage without being a view: autograd cannot see an in-place change
    of a parameter made between a forward and its backward (training loops never make one).
    """

    def leading(self, params: Sequence[Optional[torch.Tensor]], shapes: Sequence[Optional[Shape]]) -> tuple:
        todo = [i for i, (p, s) in enumerate(zip(params, shapes, strict=True))
                if p is not None and tuple(p.shape) != tuple(s)]
        if not todo:
            return tuple(params)
        sliced = [params[i] for i in todo]
        if not _can_alias(sliced):
            out = list(params)
            for i in todo:
                out[i] = _leading_view(params[i], shapes[i])
            return tuple(out)
        key = tuple(None if s is None else tuple(s) for s in shapes)
        stamp = tuple((id(p), p.data_ptr(), p.requires_grad) for p in sliced)
        cache = self.__dict__.setdefault('_leading_cache', {})
        hit = cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        with torch.inference_mode(False), torch.enable_grad():
            aliases = _LeadingAliases.apply([tuple(shapes[i]) for i in todo], *sliced)
        out = list(params)
        for i, alias in zip(todo, aliases, strict=True):
            out[i] = alias
        cache[key] = (stamp, tuple(out))
        return cache[key][1]

    def clear_leading_cache(self) -> None:
        self.__dict__.pop('_leading_cache', None)

    def _apply(self, fn, recurse: bool = True):
        self.clear_leading_cache()  # .to()/.half()/...: the cached blocks would pin the old storage
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        # deepcopy (timm's EMA) and pickling: the cache holds non-leaf tensors, and rebuilding it is cheap.
        state = self.__dict__.copy()
        state.pop('_leading_cache', None)
        return state


class SliceableLinear(ActiveParams, nn.Linear):
    """``nn.Linear`` that reads its input width from ``x`` and emits ``out_features`` outputs.

    ``x``: ``(..., in)`` with ``in <= in_features``; returns ``(..., out_features)``.
    """

    def forward(self, x: torch.Tensor, out_features: Optional[int] = None) -> torch.Tensor:
        out_features = self.out_features if out_features is None else out_features
        weight, bias = self.leading((self.weight, self.bias), ((out_features, x.shape[-1]), (out_features,)))
        return F.linear(x, weight, bias)


class SliceableLayerNorm(ActiveParams, nn.LayerNorm):
    """LayerNorm over the first ``x.shape[-1]`` features with the matching affine parameters."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(normalized_shape, eps=eps, **kwargs)  # timm's ViT LayerNorm eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        weight, bias = self.leading((self.weight, self.bias), ((width,), (width,)))
        return F.layer_norm(x, (width,), weight, bias, self.eps)


class SliceableConv2d(ActiveParams, nn.Conv2d):
    """Conv2d producing only its first ``active_out_channels`` output channels (all when None)."""

    active_out_channels: Optional[int] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.active_out_channels or self.out_channels
        weight, bias = self.leading((self.weight, self.bias), ((n, *self.weight.shape[1:]), (n,)))
        return self._conv_forward(x, weight, bias)


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


def qkv_to_head_major(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """timm's fused qkv rows (q of every head, then k, then v) -> head-major rows (q, k, v of head 0, then head 1,
    ...). ``t``: ``(3 * dim, ...)``; returns a contiguous copy of the same shape."""
    return t.unflatten(0, (3, num_heads, -1)).transpose(0, 1).reshape(t.shape).contiguous()


def qkv_to_timm(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of ``qkv_to_head_major``."""
    return t.unflatten(0, (num_heads, 3, -1)).transpose(0, 1).reshape(t.shape).contiguous()


class SliceableAttention(nn.Module):
    """Multi-head self-attention over the first ``x.shape[-1] // head_dim`` heads.

    ``qkv`` is stored head-major (rows: q, k, v of head 0, then of head 1, ...), so the rows of the first k heads are
    one leading block and the projection is a single GEMM on it, with no gather copy. ``state_dict`` and
    ``load_state_dict`` convert to and from timm's fused layout (all q heads, all k heads, all v heads), so keys and
    tensors stay exactly those of timm's ``Attention``; ``state_dict()`` therefore returns a copy of the qkv
    tensors, and code that updates a state dict in place (an EMA) must use ``parameters()`` instead.
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
        self.qkv = SliceableLinear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = SliceableLinear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_state_dict_post_hook(_qkv_state_dict_to_timm)
        self.register_load_state_dict_pre_hook(_qkv_state_dict_from_timm)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """``x``: ``(B, N, width)``, width a multiple of ``head_dim``; returns ``(B, N, width)``."""
        B, N, width = x.shape
        heads = width // self.head_dim
        qkv = self.qkv(x, 3 * width).reshape(B, N, heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.,
            is_causal=is_causal,
        )
        x = x.transpose(1, 2).reshape(B, N, width)
        return self.proj_drop(self.proj(x, width))


def _qkv_state_dict_to_timm(module: SliceableAttention, state_dict: dict, prefix: str, local_metadata) -> None:
    for name in ('qkv.weight', 'qkv.bias'):
        if prefix + name in state_dict:
            state_dict[prefix + name] = qkv_to_timm(state_dict[prefix + name].detach(), module.num_heads)


def _qkv_state_dict_from_timm(module: SliceableAttention, state_dict: dict, prefix: str, *args) -> None:
    for name in ('qkv.weight', 'qkv.bias'):
        t = state_dict.get(prefix + name)
        # A tensor of another shape is left for load_state_dict's own size-mismatch error.
        if isinstance(t, torch.Tensor) and t.shape == getattr(module.qkv, name.split('.')[1]).shape:
            state_dict[prefix + name] = qkv_to_head_major(t, module.num_heads)


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


def timm_layout_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Make ``optimizer.state_dict()`` hold the qkv parameters' state (AdamW's moments, SGD's momentum) in timm's
    layout, as the model's state dict does, and ``optimizer.load_state_dict`` take it back.

    Checkpoints then hold one layout throughout, the one hydravit wrote before it stored qkv head-major, so those
    resume exactly too. ``model`` may be wrapped (DDP, compile); the hooks find its ``SliceableAttention`` modules.
    """
    heads_of = {}
    for module in model.modules():
        if isinstance(module, SliceableAttention):
            heads_of.update({id(p): module.num_heads for p in module.qkv.parameters()})

    def qkv_indices() -> dict:
        # state_dict() numbers parameters in param_groups order, from 0
        params = (p for group in optimizer.param_groups for p in group['params'])
        return {i: (heads_of[id(p)], p.shape) for i, p in enumerate(params) if id(p) in heads_of}

    def convert(state_dict: dict, fn) -> None:
        for i, (heads, shape) in qkv_indices().items():
            state = state_dict['state'].get(i)
            if state is not None:  # a new dict: the optimizer's own state must not change
                state_dict['state'][i] = {key: fn(t, heads) if isinstance(t, torch.Tensor) and t.shape == shape else t
                                          for key, t in state.items()}

    optimizer.register_state_dict_post_hook(lambda opt, state_dict: convert(state_dict, qkv_to_timm))

    def load_pre_hook(opt, state_dict: dict) -> dict:
        state_dict = dict(state_dict, state=dict(state_dict['state']))  # the caller's dict stays as it was
        convert(state_dict, qkv_to_head_major)
        return state_dict

    optimizer.register_load_state_dict_pre_hook(load_pre_hook)
