"""Sliceable layers: each uses the leading slice of its full-size parameters.

A layer infers its active width from the last dimension of its input, so only the
patch embedding has to be told how many channels to produce. Everything downstream
follows from tensor shapes, which keeps ``set_heads`` O(1) and makes activation
recomputation (gradient checkpointing) see the same width as the forward pass.
Parameter names, shapes and layouts equal those of timm's layers, and ``state_dict()`` hands out the parameters
themselves, so state dicts are interchangeable and a write through one reaches the model (timm's EMA relies on it).
"""
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, maybe_add_mask, resolve_self_attn_mask, use_fused_attn

Shape = Tuple[int, ...]
Sizes = Tuple[Any, ...]  # per dimension: a length (int, or an FX proxy while tracing), or None for the full length


@dataclass(frozen=True)
class Block:
    """Which part of a parameter a layer uses: the leading ``sizes`` of the parameter seen as ``grid`` (its own
    shape when None), with the dimensions then ordered as ``perm`` (as they are when None).

    A plain leading block (``Block((n, m))``) covers every layer but the fused qkv projection, whose first k heads'
    rows are the leading rows of each of its q, k and v blocks: ``grid = (3, dim, in)``.
    """

    sizes: Sizes
    grid: Optional[Shape] = None
    perm: Optional[Tuple[int, ...]] = None


def _is_concrete(block: Block) -> bool:
    return all(s is None or isinstance(s, int) for s in block.sizes)


def _resolved(block: Block, p: torch.Tensor) -> Shape:
    """The block's lengths in ``grid``, None resolved to the full length."""
    grid = tuple(p.shape) if block.grid is None else block.grid
    return tuple(g if s is None else int(s) for s, g in zip(block.sizes, grid, strict=True))


def _is_whole(block: Block, p: torch.Tensor) -> bool:
    grid = tuple(p.shape) if block.grid is None else block.grid
    return block.perm is None and block.grid is None and _resolved(block, p) == grid


def _block_view(p: torch.Tensor, block: Block) -> torch.Tensor:
    """The block as an ordinary view (tracers, compilers, torch.func; FX proxies too, as it never compares)."""
    t = p if block.grid is None else p.view(block.grid)
    for dim, n in enumerate(block.sizes):
        if n is not None:
            t = t.narrow(dim, 0, n)
    return t if block.perm is None else t.permute(block.perm)


class _LeadingAliases(torch.autograd.Function):
    """Blocks of parameters (``Block``), as tensors over the parameters' own storage.

    Forward gives, for each parameter, a tensor with the parameter's storage and the block's shape and strides: no
    copy, and, unlike a view, no per-call op. It is not an autograd view of the parameter, so an optimizer step that
    updates the parameter in place leaves this node as its gradient function (autograd would replace a view's by a
    generic ``as_strided`` backward of two ops): ``ActiveParams`` builds the aliases once per width and reuses them
    across steps. Backward zero-pads each gradient to its parameter's shape, one op per parameter: the floor for a
    sliced leaf (gradient hooks, DDP, accumulation and clipping then see an ordinary full-size gradient).
    """

    @staticmethod
    def forward(ctx, blocks: Sequence[Block], *params: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.blocks = blocks
        ctx.shapes = [p.shape for p in params]
        return tuple(_storage_alias(p, b) for p, b in zip(params, blocks, strict=True))

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]) -> tuple:
        return (None, *(None if g is None else _grad_of_block(g, b, shape)
                        for g, b, shape in zip(grads, ctx.blocks, ctx.shapes, strict=True)))


def _storage_alias(p: torch.Tensor, block: Block) -> torch.Tensor:
    # A leading block of a strided tensor keeps its strides and storage offset; a permutation reorders both.
    grid_strides = p.stride() if block.grid is None else p.view(block.grid).stride()
    sizes, order = _resolved(block, p), block.perm or tuple(range(len(block.sizes)))
    return p.new_empty(0).set_(p.untyped_storage(), p.storage_offset(), [sizes[d] for d in order],
                               [grid_strides[d] for d in order])


def _grad_of_block(g: torch.Tensor, block: Block, shape: torch.Size) -> torch.Tensor:
    """The full-size gradient of a parameter of ``shape`` whose ``block`` got gradient ``g``: one ``F.pad``."""
    if block.perm is not None:
        g = g.permute([block.perm.index(d) for d in range(len(block.perm))])
    grid = tuple(shape) if block.grid is None else block.grid
    pad = [amount for n, m in zip(reversed(g.shape), reversed(grid), strict=True) for amount in (0, m - n)]
    return F.pad(g, pad).view(shape)


def _can_alias(params: Sequence[torch.Tensor]) -> bool:
    """Aliases are for eager calls on plain parameters; tracers and compilers (and torch.func's functional
    parameters) see ordinary slices, which they fuse or trace themselves."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return all(type(p) is nn.Parameter and not p.is_inference() and p.device.type != 'meta' for p in params)


class ActiveParams(nn.Module):
    """Mixin for sliceable layers: the blocks of their parameters at the active width, built once per width.

    ``leading(params, blocks)`` returns each parameter itself where its block is the whole of it, else the block
    (a ``Block``, or a tuple of per-dimension lengths for a plain leading block, None meaning the full length). In
    eager mode the blocks come from ``_LeadingAliases`` and are cached per set of blocks, so a call at a width seen
    before dispatches no slicing op at all, in training as in inference. A cached block is rebuilt when its parameter
    was replaced, moved to other storage (``.to()``, ``param.data = ...``) or (un)frozen; in-place updates
    (optimizer steps, ``load_state_dict``, an EMA writing through ``state_dict()``) need no rebuild since the blocks
    share the parameter's storage. One caveat, as for any tensor that shares storage without being a view: autograd
    cannot see an in-place change of a parameter made between a forward and its backward (training loops never make
    one).
    """

    def leading(self, params: Sequence[Optional[torch.Tensor]], blocks: Sequence[Any]) -> tuple:
        blocks = [b if b is None or isinstance(b, Block) else Block(tuple(b)) for b in blocks]
        if not all(b is None or _is_concrete(b) for b in blocks) or not all(
                p is None or isinstance(p, torch.Tensor) for p in params):  # FX symbolic tracing: record views
            return tuple(p if p is None else _block_view(p, b) for p, b in zip(params, blocks, strict=True))
        todo = [i for i, (p, b) in enumerate(zip(params, blocks, strict=True))
                if p is not None and not _is_whole(b, p)]
        if not todo:
            return tuple(params)
        sliced = [params[i] for i in todo]
        if not _can_alias(sliced):
            out = list(params)
            for i in todo:
                out[i] = _block_view(params[i], blocks[i])
            return tuple(out)
        key = tuple(None if b is None else (_resolved(b, p), b.grid, b.perm) for p, b in zip(params, blocks,
                                                                                              strict=True))
        stamp = tuple((id(p), p.data_ptr(), p.requires_grad) for p in sliced)
        cache = self.__dict__.setdefault('_leading_cache', {})
        hit = cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        with torch.inference_mode(False), torch.enable_grad():
            aliases = _LeadingAliases.apply([blocks[i] for i in todo], *sliced)
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
        weight, bias = self.leading((self.weight, self.bias), ((n, None, None, None), (n,)))
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


class SliceableQKV(ActiveParams, nn.Linear):
    """timm's fused qkv projection, ``nn.Linear(dim, 3 * dim)`` whose rows are every head's q, then k, then v, that
    projects onto the first ``x.shape[-1] // head_dim`` heads.

    At full width it runs timm's ops (one GEMM). Below it, the active rows are the leading rows of each of the q, k
    and v blocks: three equal blocks of one strided alias of the weight, projected by one batched GEMM
    (``baddbmm``) with no copy of the weight. The parameter keeps timm's layout, so ``state_dict()`` hands out the
    parameter itself. The price in training is one op per block in the backward: the three blocks' input gradients
    are summed (``x`` feeds all three), which a single GEMM over a contiguous weight does inside the GEMM.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__(dim, 3 * dim, bias=bias, device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x``: ``(B, N, width)``; returns q, k, v, each ``(B, width // head_dim, N, head_dim)``."""
        B, N, width = x.shape
        heads = width // self.head_dim
        if isinstance(width, int) and width == self.in_features:  # timm's ops, exactly
            qkv = F.linear(x, self.weight, self.bias).reshape(B, N, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
            return qkv.unbind(0)
        dim = self.in_features
        weight, bias = self.leading((self.weight, self.bias), (
            Block((None, width, width), grid=(3, dim, dim), perm=(0, 2, 1)),  # (3, in, out): x @ block.T per s
            Block((None, None, width), grid=(3, 1, dim))))
        # Without autograd (serving), one as_strided replaces each pair of views: same tensors, one op less each,
        # which keeps the forward's dispatched ops at timm's count (docs/benchmarks.md).
        metadata_only = not torch.is_grad_enabled() and isinstance(width, int) and x.is_contiguous()
        if metadata_only:
            x3 = x.as_strided((3, B * N, width), (0, width, 1))
        else:
            x3 = x.reshape(1, B * N, width).expand(3, -1, -1)
        qkv = torch.bmm(x3, weight) if bias is None else torch.baddbmm(bias, x3, weight)  # (3, B * N, width)
        if metadata_only:
            hd = self.head_dim
            qkv = qkv.as_strided((3, B, heads, N, hd), (B * N * width, N * width, hd, width, 1))
        else:
            qkv = qkv.view(3, B, N, heads, self.head_dim).transpose(2, 3)
        return qkv.unbind(0)


class SliceableAttention(nn.Module):
    """Multi-head self-attention over the first ``x.shape[-1] // head_dim`` heads; timm's ``Attention`` otherwise.

    Keys, shapes and layouts of the parameters are timm's (``qkv``: all q heads, all k heads, all v heads).
    ``fused_attn`` is timm's switch: True runs ``F.scaled_dot_product_attention``; False computes the attention
    matrix explicitly and passes it through ``attn_drop``, where attention-rollout and explainability tools hook it.
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
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = SliceableQKV(dim, num_heads, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = SliceableLinear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """``x``: ``(B, N, width)``, width a multiple of ``head_dim``; returns ``(B, N, width)``. ``attn_mask`` and
        ``is_causal`` as in ``F.scaled_dot_product_attention``."""
        B, N, width = x.shape
        q, k, v = self.qkv(x)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.,
                is_causal=is_causal,
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
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
