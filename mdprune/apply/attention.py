"""The slim attention module: separate q, k and v projections so q/k and v widths can differ."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..space import PruningSpace
from .indices import Positions


class PrunedAttention(nn.Module):
    """Multi-head self-attention with ``heads`` heads of q/k width ``qk_dim`` and v width ``v_dim``.

    Keeps the dense model's softmax ``scale`` so that a slim model computes what the masked one does.
    With ``returns_tuple`` it is a drop-in for ``nn.MultiheadAttention`` (returns ``(output, None)``).
    """

    def __init__(self, dim_in: int, heads: int, qk_dim: int, v_dim: int, dim_out: int, scale: float,
                 qkv_bias: bool = True, proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 batch_first: bool = True, returns_tuple: bool = False):
        super().__init__()
        self.heads, self.qk_dim, self.v_dim, self.scale = heads, qk_dim, v_dim, scale
        self.batch_first, self.returns_tuple, self.attn_drop = batch_first, returns_tuple, attn_drop
        self.q = nn.Linear(dim_in, heads * qk_dim, bias=qkv_bias)
        self.k = nn.Linear(dim_in, heads * qk_dim, bias=qkv_bias)
        self.v = nn.Linear(dim_in, heads * v_dim, bias=qkv_bias)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.norm: nn.Module = nn.Identity()
        self.proj = nn.Linear(heads * v_dim, dim_out, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.batch_first:
            x = x.transpose(0, 1)
        b, n, _ = x.shape
        q = self.q_norm(self.q(x).view(b, n, self.heads, self.qk_dim).transpose(1, 2))
        k = self.k_norm(self.k(x).view(b, n, self.heads, self.qk_dim).transpose(1, 2))
        v = self.v(x).view(b, n, self.heads, self.v_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           scale=self.scale)
        o = self.proj_drop(self.proj(self.norm(o.transpose(1, 2).reshape(b, n, self.heads * self.v_dim))))
        if not self.batch_first:
            o = o.transpose(0, 1)
        return (o, None) if self.returns_tuple else o


def _rows(space: PruningSpace, pos: Positions, name: str) -> list[torch.Tensor]:
    """Kept absolute positions of each segment of axis 0 of tensor ``name`` (q, k, v of a fused weight)."""
    out, base = [], 0
    for s in space.tensors[name].axes[0]:
        out.append(pos.seg(s) + base)
        base += pos.seg_width(s)
    return out


def slim_attention(space: PruningSpace, pos: Positions, path: str, m: nn.Module) -> PrunedAttention:
    """Build the slim :class:`PrunedAttention` of attention module ``path`` for the kept positions."""
    info = space.attention[path]
    if info["kind"] == "timm":
        w_in, proj = f"{path}.qkv.weight", m.proj
        in_w, in_b = m.qkv.weight, m.qkv.bias
        attn_drop, proj_drop, batch_first, returns_tuple = m.attn_drop.p, m.proj_drop.p, True, False
        scale = m.scale
    else:  # nn.MultiheadAttention
        w_in, proj = f"{path}.in_proj_weight", m.out_proj
        in_w, in_b = m.in_proj_weight, m.in_proj_bias
        attn_drop, proj_drop, batch_first, returns_tuple = m.dropout, 0.0, m.batch_first, True
        scale = m.head_dim ** -0.5
    cols = pos.axis(space.tensors[w_in].axes[1])
    q_rows, k_rows, v_rows = _rows(space, pos, w_in)
    out_name = f"{path}.proj.weight" if info["kind"] == "timm" else f"{path}.out_proj.weight"
    out_rows = pos.axis(space.tensors[out_name].axes[0])
    out_cols = pos.axis(space.tensors[out_name].axes[1])
    heads = len(pos.kept[info["heads"]])
    qk_dim, v_dim = len(pos.kept[info["qk"]]), len(pos.kept[info["v"]])
    new = PrunedAttention(len(cols), heads, qk_dim, v_dim, len(out_rows), scale, in_b is not None,
                          proj.bias is not None, attn_drop, proj_drop, batch_first, returns_tuple)
    new = new.to(device=in_w.device, dtype=in_w.dtype)
    with torch.no_grad():
        for lin, rows in ((new.q, q_rows), (new.k, k_rows), (new.v, v_rows)):
            lin.weight.copy_(in_w[rows][:, cols])
            if in_b is not None:
                lin.bias.copy_(in_b[rows])
        new.proj.weight.copy_(proj.weight[out_rows][:, out_cols])
        if proj.bias is not None:
            new.proj.bias.copy_(proj.bias[out_rows])
    if info["kind"] == "timm":
        new.q_norm, new.k_norm = copy.deepcopy(m.q_norm), copy.deepcopy(m.k_norm)
        new.norm = copy.deepcopy(getattr(m, "norm", nn.Identity()))
    new.train(m.training)
    return new
