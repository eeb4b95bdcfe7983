"""The slim attention module: separate q, k and v projections so q/k and v widths can differ.

:func:`slim_attention` builds it from any attention module mdprune recognises, following the module's
:class:`~mdprune.space.attention.Layout`: the kept rows of q, k, v (fused or not) and their biases, the kept
heads of a relative position bias table, the kept columns of a rotary embedding, sliced norms and gate.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..space import PruningSpace, Seg
from ..space.attention import Layout, Proj, attention_layout, window_geometry
from .indices import Positions


class RelPosBias(nn.Module):
    """Additive attention logits per head: ``table`` (a row or column per head) indexed by ``index``."""

    def __init__(self, table: torch.Tensor, index: torch.Tensor, head_axis: int, tokens: tuple[int, int]):
        super().__init__()
        self.table = nn.Parameter(table)
        self.register_buffer("index", index, persistent=False)
        self.head_axis, self.tokens = head_axis, tokens

    def forward(self, tokens: int | None = None) -> torch.Tensor:
        """The bias; ``tokens`` fewer than the index holds: its first ``tokens`` rows and columns (a window
        shrunk to a smaller input, as torchvision's 3-D Swin does)."""
        t = self.table if self.head_axis == 0 else self.table.t()
        if tokens is None or tokens == self.tokens[0]:
            return t[:, self.index.reshape(-1)].view(1, t.shape[0], *self.tokens)
        index = self.index.reshape(self.tokens)[:tokens, :tokens]
        return t[:, index.reshape(-1)].view(1, t.shape[0], tokens, tokens)


class ContinuousPosBias(nn.Module):
    """Swin V2's position bias: ``scale sigmoid(mlp(coords))`` per head (``scale`` None: ``mlp(coords)``),
    indexed by relative position (``index`` None: ``coords`` holds every pair of tokens)."""

    def __init__(self, mlp: nn.Module, coords: torch.Tensor, index: torch.Tensor | None, heads: int, tokens: int,
                 scale: float | None):
        super().__init__()
        self.mlp, self.heads, self.tokens, self.scale = mlp, heads, tokens, scale
        self.register_buffer("coords", coords, persistent=False)
        self.register_buffer("index", index, persistent=False)

    def forward(self) -> torch.Tensor:
        table = self.mlp(self.coords).reshape(-1, self.heads)
        if self.index is not None:
            table = table[self.index.reshape(-1)]
        bias = table.view(self.tokens, self.tokens, -1).permute(2, 0, 1)
        return (bias if self.scale is None else self.scale * torch.sigmoid(bias)).unsqueeze(0)


class PrunedAttention(nn.Module):
    """Multi-head self-attention with ``heads`` heads of q/k width ``qk_dim`` and v width ``v_dim``.

    Keeps the dense model's softmax ``scale`` so that a slim model computes what the masked one does.
    With ``returns_tuple`` it is a drop-in for ``nn.MultiheadAttention`` (returns ``(output, None)``).
    Optional parts (set by :func:`slim_attention`): ``pos_bias`` (a :class:`RelPosBias`), per-head ``q_norm`` /
    ``k_norm``, ``norm`` of the merged heads, a sigmoid ``gate``, a rotary embedding read from the forward
    argument ``rope_arg`` (``rope`` layout ``"interleaved"`` or ``"half"``, columns ``rope_index``), an additive
    windows mask from argument ``mask_arg``, shifted windows over an NHWC input (``window``, ``shift``), and
    Swin V2's cosine attention (``logit_scale`` per head; ``pos_bias`` then a :class:`ContinuousPosBias`).
    """

    def __init__(self, dim_in: int, heads: int, qk_dim: int, v_dim: int, dim_out: int, scale: float,
                 qkv_bias: bool = True, proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 batch_first: bool = True, returns_tuple: bool = False, *,
                 biases: tuple[bool, bool, bool] | None = None, gate_bias: bool | None = None,
                 arg_names: tuple[str, ...] = (), rope: str | None = None,
                 rope_arg: str | None = None, rope_prefix: int = 0, mask_arg: str | None = None,
                 window: tuple[int, ...] | None = None, shift: tuple[int, ...] = (0, 0), window_fit: bool = False):
        super().__init__()
        self.heads, self.qk_dim, self.v_dim, self.scale = heads, qk_dim, v_dim, scale
        self.batch_first, self.returns_tuple, self.attn_drop = batch_first, returns_tuple, attn_drop
        self.arg_names, self.rope, self.rope_arg, self.rope_prefix = tuple(arg_names), rope, rope_arg, rope_prefix
        self.mask_arg, self.window, self.shift, self.window_fit = mask_arg, window, tuple(shift), window_fit
        qb, kb, vb = biases if biases is not None else (qkv_bias,) * 3
        self.q = nn.Linear(dim_in, heads * qk_dim, bias=qb)
        self.k = nn.Linear(dim_in, heads * qk_dim, bias=kb)
        self.v = nn.Linear(dim_in, heads * v_dim, bias=vb)
        self.gate = nn.Linear(dim_in, heads * v_dim, bias=gate_bias) if gate_bias is not None else None
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.norm: nn.Module = nn.Identity()
        self.pos_bias: nn.Module | None = None
        self.register_parameter("logit_scale", None)  # cosine attention's per-head scale (Swin V2)
        self.zero_k_bias = False  # k's bias kept as a parameter but not applied (torchvision's Swin V2 does so)
        self.register_buffer("rope_index", torch.arange(2 * qk_dim), persistent=False)
        self.register_buffer("rope_heads", torch.arange(heads), persistent=False)
        self.proj = nn.Linear(heads * v_dim, dim_out, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        call = dict(zip(self.arg_names, args, strict=False)) | kwargs
        rope = call.get(self.rope_arg) if self.rope_arg else None
        mask = call.get(self.mask_arg) if self.mask_arg else None
        if self.window is not None:
            o = self._windows(x)
        elif not self.batch_first:
            o = self._attend(x.transpose(0, 1), rope, mask).transpose(0, 1)
        else:
            o = self._attend(x, rope, mask)
        return (o, None) if self.returns_tuple else o

    def _attend(self, x: torch.Tensor, rope: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        *lead, n, _ = x.shape
        x = x.reshape(-1, n, x.shape[-1])
        b = x.shape[0]
        q = self.q_norm(self.q(x).view(b, n, self.heads, self.qk_dim).transpose(1, 2))
        k = F.linear(x, self.k.weight, None if self.zero_k_bias else self.k.bias)
        k = self.k_norm(k.view(b, n, self.heads, self.qk_dim).transpose(1, 2))
        v = self.v(x).view(b, n, self.heads, self.v_dim).transpose(1, 2)
        if rope is not None:
            q, k = self._rotate(q, rope).type_as(v), self._rotate(k, rope).type_as(v)
        bias = None
        if isinstance(self.pos_bias, RelPosBias):
            bias = self.pos_bias(n)
        elif self.pos_bias is not None:
            bias = self.pos_bias()
        scale = self.scale
        if self.logit_scale is not None:  # cosine attention: the scale is per head, learnt
            q = F.normalize(q, dim=-1) * torch.clamp(self.logit_scale, max=math.log(100.0)).exp().view(-1, 1, 1)
            k, scale = F.normalize(k, dim=-1), 1.0
        if mask is not None:  # (windows, N, N), the same for every head and image
            w = mask.shape[0]
            mask = mask.view(1, w, 1, n, n).expand(b // w, -1, self.heads, -1, -1).reshape(-1, self.heads, n, n)
            bias = mask if bias is None else bias + mask
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        o = self.norm(o.transpose(1, 2).reshape(b, n, self.heads * self.v_dim))
        if self.gate is not None:
            o = o * self.gate(x).sigmoid()
        o = self.proj_drop(self.proj(o))
        return o.view(*lead, n, o.shape[-1])

    def _rotate(self, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """The rotary embedding on the kept q/k columns (kept in pairs, so rotation stays within the kept)."""
        if rope.dim() >= 3 and rope.shape[-3] != 1:  # one embedding per head
            rope = rope.index_select(-3, self.rope_heads)
        sin, cos = rope.index_select(-1, self.rope_index).chunk(2, -1)
        npt = self.rope_prefix
        head, rest = t[:, :, :npt], t[:, :, npt:]
        if self.rope == "half":
            a, b = rest.chunk(2, dim=-1)
            rot = torch.cat([-b, a], dim=-1)
        else:
            rot = torch.stack([-rest[..., 1::2], rest[..., ::2]], -1).reshape(rest.shape)
        return torch.cat([head, (rest * cos + rot * sin).to(t.dtype)], dim=2)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """Shifted-window attention over a channels-last map with 2 or 3 spatial axes (torchvision's swin):
        pad, shift, partition, attend, and back."""
        b, *size, c = x.shape
        k = len(size)
        window, shift, padded = window_geometry(tuple(size), tuple(self.window), self.shift, self.window_fit)
        pad: list[int] = [0, 0]
        for n, p in zip(reversed(size), reversed(padded), strict=True):
            pad += [0, p - n]
        x = F.pad(x, pad)
        axes = tuple(range(1, k + 1))
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=axes)
        grid = [p // w for p, w in zip(padded, window, strict=True)]
        split = [d for g, w in zip(grid, window, strict=True) for d in (g, w)]
        # (b, g1, w1, g2, w2, ..., c) -> (b, g1, g2, ..., w1, w2, ..., c)
        order = (0, *range(1, 2 * k, 2), *range(2, 2 * k + 1, 2), 2 * k + 1)
        x = x.view(b, *split, c).permute(order).reshape(b * math.prod(grid), math.prod(window), c)
        mask = _shift_mask(padded, window, shift, x) if any(shift) else None
        o = self._attend(x, None, mask)
        back = [0] + [j for i in range(k) for j in (1 + i, 1 + k + i)] + [2 * k + 1]
        o = o.view(b, *grid, *window, -1).permute(back).reshape(b, *padded, -1)
        if any(shift):
            o = torch.roll(o, shifts=shift, dims=axes)
        return o[(slice(None), *(slice(0, n) for n in size))].contiguous()


def _shift_mask(padded: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...], like: torch.Tensor
                ) -> torch.Tensor:
    """The (windows, N, N) mask of shifted windows: -100 between tokens from different regions."""
    region = like.new_zeros(padded)
    cuts = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(window, shift, strict=True)]
    for count, box in enumerate(itertools.product(*cuts)):
        region[tuple(slice(a, z) for a, z in box)] = count
    k = len(window)
    split = [d for p, w in zip(padded, window, strict=True) for d in (p // w, w)]
    order = (*range(0, 2 * k, 2), *range(1, 2 * k, 2))
    region = region.view(split).permute(order).reshape(-1, math.prod(window))
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


# ---- slimming ------------------------------------------------------------------------------------------------

def _tensor(m: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(m.get_submodule(owner) if owner else m, attr)


def _part_rows(space: PruningSpace, pos: Positions, name: str, part: int) -> torch.Tensor:
    """Kept absolute positions of segment ``part`` of axis 0 of tensor ``name``."""
    segs = space.tensors[name].axes[0]
    base = sum(pos.seg_width(s) for s in segs[:part])
    return pos.seg(segs[part]) + base


def _rows(space: PruningSpace, pos: Positions, path: str, lay: Layout, heads: torch.Tensor, name: str, part: int
          ) -> torch.Tensor:
    """Kept rows of part ``part`` (q 0, k 1, v 2) of tensor ``name``."""
    if not lay.per_head:
        return _part_rows(space, pos, f"{path}.{name}", part)
    widths = (lay.qk_dim, lay.qk_dim, lay.v_dim)  # whole heads: [q | k | v] per head
    start = sum(widths[:part])
    return (heads[:, None] * sum(widths) + start + torch.arange(widths[part])[None, :]).reshape(-1)


def _copy_linear(lin: nn.Linear, m: nn.Module, p: Proj, rows: torch.Tensor, bias_rows: torch.Tensor,
                 cols: torch.Tensor) -> None:
    """Copy the kept rows (and columns) of projection ``p`` into ``lin``."""
    lin.weight.copy_(_tensor(m, p.weight)[rows][:, cols])
    if p.bias is not None:
        lin.bias.copy_(_tensor(m, p.bias)[bias_rows])


def slim_attention(space: PruningSpace, pos: Positions, path: str, m: nn.Module) -> nn.Module:
    """The slim module of attention module ``path`` for the kept positions: a :class:`PrunedAttention`, or for
    a module sliced in place (heads only, e.g. LeViT's) a smaller copy of it."""
    lay = attention_layout(m)
    info = space.attention[path]
    heads = pos.kept[info["heads"]]
    if lay.in_place:
        return _slim_in_place(space, pos, path, m, lay, len(heads))
    cols = pos.axis(space.tensors[f"{path}.{lay.q.weight}"].axes[1])
    q_rows = _rows(space, pos, path, lay, heads, lay.q.weight, lay.q.part)
    v_rows = _rows(space, pos, path, lay, heads, lay.v.weight, lay.v.part)
    proj = m.get_submodule(lay.proj)
    out_rows = pos.axis(space.tensors[f"{path}.{lay.proj}.weight"].axes[0])
    n_heads = len(heads)
    new = PrunedAttention(
        len(cols), n_heads, len(q_rows) // n_heads, len(v_rows) // n_heads, len(out_rows), lay.scale,
        proj_bias=proj.bias is not None, attn_drop=lay.attn_drop, proj_drop=lay.proj_drop,
        batch_first=lay.input != "seq_first", returns_tuple=lay.returns_tuple,
        biases=(lay.q.bias is not None, lay.k.bias is not None, lay.v.bias is not None),
        gate_bias=None if lay.gate is None else lay.gate.bias is not None, arg_names=lay.arg_names,
        rope=lay.rope, rope_arg=lay.rope_arg, rope_prefix=lay.rope_prefix, mask_arg=lay.mask_arg,
        window=lay.window, shift=lay.shift, window_fit=lay.window_fit)
    new.zero_k_bias = lay.zero_k_bias
    w = _tensor(m, lay.q.weight)
    new = new.to(device=w.device, dtype=w.dtype)
    _copy_weights(new, space, pos, path, m, lay, heads, cols)
    if lay.per_head:  # whole heads
        q_cols = (heads[:, None] * lay.qk_dim + torch.arange(lay.qk_dim)[None, :]).reshape(-1)
    else:  # relative to the start of q
        q_cols = pos.seg(space.tensors[f"{path}.{lay.q.weight}"].axes[0][lay.q.part])
    _extras(new, space, pos, path, m, lay, heads, q_cols)
    new.train(m.training)
    return new


@torch.no_grad()
def _copy_weights(new: PrunedAttention, space: PruningSpace, pos: Positions, path: str, m: nn.Module, lay: Layout,
                  heads: torch.Tensor, cols: torch.Tensor) -> None:
    """The kept rows and columns of q, k, v, gate and the output projection."""
    for lin, p in ((new.q, lay.q), (new.k, lay.k), (new.v, lay.v), (new.gate, lay.gate)):
        if p is not None:
            rows = _rows(space, pos, path, lay, heads, p.weight, p.part)
            bias_rows = _rows(space, pos, path, lay, heads, p.bias, p.bias_part) if p.bias else rows
            _copy_linear(lin, m, p, rows, bias_rows, cols)
    proj, axes = m.get_submodule(lay.proj), space.tensors[f"{path}.{lay.proj}.weight"].axes
    out_rows = pos.axis(axes[0])
    new.proj.weight.copy_(proj.weight[out_rows][:, pos.axis(axes[1])])
    if proj.bias is not None:
        new.proj.bias.copy_(proj.bias[out_rows])


def _extras(new: PrunedAttention, space: PruningSpace, pos: Positions, path: str, m: nn.Module, lay: Layout,
            heads: torch.Tensor, q_cols: torch.Tensor) -> None:
    """Position bias, norms and rotary columns of the slim module."""
    dev = new.q.weight.device
    if lay.table is not None:
        table = _tensor(m, lay.table).detach().index_select(lay.table_head_axis, heads.to(dev)).clone()
        index = _tensor(m, lay.table_index).detach().clone()
        n = int(round(index.numel() ** 0.5))
        tokens = (index.shape[0], index.shape[1]) if index.dim() == 2 else (n, n)
        new.pos_bias = RelPosBias(table, index, lay.table_head_axis, tokens)
    if lay.cpb is not None:
        new.pos_bias = _slim_cpb(m, lay, heads.to(dev))
    if lay.cosine is not None:
        new.logit_scale = nn.Parameter(_tensor(m, lay.cosine).detach()[heads.to(dev)].clone())
    for attr in ("q_norm", "k_norm", "norm"):
        local = getattr(lay, attr)
        if local is not None:
            setattr(new, attr, _slim_norm(space, pos, f"{path}.{local}", m.get_submodule(local)))
    qk_dense = lay.qk_dim
    first = q_cols[:new.qk_dim] - heads[0] * qk_dense  # kept q/k columns of one head, in the dense head
    new.rope_index = torch.cat([first, first + qk_dense]).to(dev)
    new.rope_heads = heads.clone().to(dev)


def _slim_cpb(m: nn.Module, lay: Layout, heads: torch.Tensor) -> ContinuousPosBias:
    """The position bias MLP with its last layer's rows cut to the kept heads."""
    mlp = copy.deepcopy(m.get_submodule(lay.cpb))
    last = [c for c in mlp.modules() if isinstance(c, nn.Linear)][-1]
    last.weight = nn.Parameter(last.weight.detach()[heads].clone())
    if last.bias is not None:
        last.bias = nn.Parameter(last.bias.detach()[heads].clone())
    last.out_features = len(heads)
    coords = _tensor(m, lay.cpb_coords).detach().clone()
    index = _tensor(m, lay.table_index).detach().clone() if lay.table_index else None
    pairs = index.numel() if index is not None else coords.numel() // coords.shape[-1]
    return ContinuousPosBias(mlp, coords, index, len(heads), int(round(pairs ** 0.5)), lay.cpb_scale)


def _slim_norm(space: PruningSpace, pos: Positions, name: str, norm: nn.Module) -> nn.Module:
    new = copy.deepcopy(norm)
    segs: tuple[Seg, ...] | None = space.normalized.get(name)
    if segs is None:  # kept whole
        return new
    keep = pos.axis(segs)
    with torch.no_grad():
        for t in ("weight", "bias"):
            p = getattr(new, t, None)
            if p is not None:
                setattr(new, t, nn.Parameter(p[keep.to(p.device)].clone(), requires_grad=p.requires_grad))
    new.normalized_shape = (len(keep),)
    return new


def _slim_in_place(space: PruningSpace, pos: Positions, path: str, m: nn.Module, lay: Layout, heads: int
                   ) -> nn.Module:
    """A copy of ``m`` with every bound tensor sliced, its layers and head counts resized (its forward kept)."""
    new = copy.deepcopy(m)
    with torch.no_grad():
        for local, t in [*new.named_parameters(), *new.named_buffers()]:
            name = f"{path}.{local}"
            if name not in space.tensors:
                continue
            out = t.detach()
            for axis, segs in space.tensors[name].axes.items():
                out = out.index_select(axis, pos.axis(segs).to(out.device))
            owner, _, attr = local.rpartition(".")
            mod = new.get_submodule(owner) if owner else new
            if isinstance(t, nn.Parameter):
                setattr(mod, attr, nn.Parameter(out.clone(), requires_grad=t.requires_grad))
            else:
                mod.register_buffer(attr, out.clone(), persistent=attr not in mod._non_persistent_buffers_set)
    for sub in new.modules():
        if isinstance(sub, nn.Linear):
            sub.out_features, sub.in_features = sub.weight.shape
        elif isinstance(sub, nn.Conv2d):
            sub.out_channels, sub.in_channels = sub.weight.shape[0], sub.weight.shape[1] * sub.groups
        elif isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.num_features = sub.running_mean.shape[0] if sub.running_mean is not None else sub.weight.shape[0]
    for attr, width in lay.in_place:
        setattr(new, attr, heads * width)
    if hasattr(new, "attention_bias_cache"):
        new.attention_bias_cache = {}
    new.train(m.training)
    return new
