"""Attention modules as pruning units: heads, query/key width per head and value width per head.

An adapter recognises one attention implementation and declares its :class:`Layout`: where q, k and v live
(a fused qkv weight or separate projections, and their biases), the output projection, and what else its
forward does (relative position bias, rotary embedding, q/k norms, an output norm, a sigmoid gate, windows).
The analysis ties the module's input and output to the embedding channels, opens three dimensions (heads H,
q/k width Q, v width V) and lists its ops; a fused qkv weight is bound as three segments ``H x Q``, ``H x Q``,
``H x V``, so q/k and v widths are pruned independently. The slim model (:mod:`mdprune.apply.attention`) builds a
:class:`mdprune.PrunedAttention` from the same layout, with separate q, k and v projections.

What cannot be pruned exactly is kept whole with a reason (q/k width under q/k norms); a variant an adapter
does not cover (masks, shared position bias, grouped-query attention, ...) raises an AnalysisError naming it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from .errors import AnalysisError, where
from .modules import linear_fixed
from .values import Chan, RawSeg, Several

if TYPE_CHECKING:
    from .channels import Propagation


@dataclass(frozen=True)
class Proj:
    """Where q, k or v comes from: segment ``part`` of axis 0 of ``weight`` (a fused qkv: q 0, k 1, v 2)."""

    weight: str  # name of the weight inside the attention module
    part: int = 0
    bias: str | None = None  # its bias (a parameter), None without one
    bias_part: int = 0


@dataclass(frozen=True)
class Layout:
    """How an attention module maps onto :class:`mdprune.PrunedAttention` (names inside the module)."""

    kind: str
    heads: int
    qk_dim: int  # q/k width of one head
    v_dim: int  # v width of one head
    q: Proj
    k: Proj
    v: Proj
    proj: str  # the output projection (an nn.Linear)
    scale: float  # softmax scale of the dense module: kept when q/k width shrinks
    input: str = "tokens"  # "tokens" (..., N, C), "seq_first" (N, B, C), "windows" (B, [T,] H, W, C: shifted windows)
    # or "nchw" (B, C, H, W: LeViT's convolution mode)
    arg_names: tuple[str, ...] = ()  # forward parameters after the input, in order
    returns_tuple: bool = False  # nn.MultiheadAttention: (output, weights)
    gate: Proj | None = None  # output * sigmoid(gate(x)) before the projection
    table: str | None = None  # relative position bias table (one column or row per head)
    table_index: str | None = None  # its index buffer
    table_head_axis: int = 1
    q_norm: str | None = None  # per-head norms of q and k (None: identity)
    k_norm: str | None = None
    norm: str | None = None  # norm of the merged heads before the projection (None: identity)
    per_head: bool = False  # a fused weight laid out head by head, [q | k | v] within each (not q | k | v)
    rope: str | None = None  # rotary embedding layout: "interleaved" or "half"
    rope_arg: str | None = None  # the forward argument carrying it
    rope_prefix: int = 0  # leading tokens (class, registers) the rotary embedding skips
    mask_arg: str | None = None  # forward argument with an additive (windows, N, N) mask (timm's swin)
    window: tuple[int, ...] | None = None  # "windows" input: window size and cyclic shift per spatial axis
    shift: tuple[int, ...] = (0, 0)
    window_fit: bool = False  # the window shrinks to an axis no longer than it, unshifted there (torchvision's 3-D)
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    cosine: str | None = None  # cosine attention (Swin V2): normalised q, k times exp(this per-head logit scale)
    cpb: str | None = None  # continuous position bias (Swin V2): this MLP on ``cpb_coords``, indexed by table_index
    cpb_coords: str | None = None  # (without table_index: the coordinates of every pair of tokens)
    cpb_scale: float | None = 16.0  # the bias is cpb_scale * sigmoid(MLP output), or (None) the output itself
    zero_k_bias: bool = False  # the forward zeroes k's part of the bias (torchvision's Swin V2)
    unsupported: tuple[str, ...] = field(default=())  # why this module cannot be pruned (AnalysisError)
    # sliced in place (its own forward kept), heads only: attribute -> width per head, set to kept heads x width
    in_place: tuple[tuple[str, int], ...] = ()


# ---- the adapters ----------------------------------------------------------------------------------------------

class _Adapter:
    """An attention implementation: its :class:`Layout`; the analysis is the same for all."""

    kind = ""

    def layout(self, m: nn.Module) -> Layout:
        raise NotImplementedError

    def analyse(self, prop: Propagation, node: fx.Node, m: nn.Module) -> Any:
        return analyse_attention(prop, node, m)


def _arg_names(m: nn.Module) -> tuple[str, ...]:
    params = list(inspect.signature(m.forward).parameters.values())
    return tuple(p.name for p in params[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                            p.KEYWORD_ONLY))


def _norm_name(m: nn.Module, attr: str) -> str | None:
    sub = getattr(m, attr, None)
    return None if sub is None or isinstance(sub, nn.Identity) else attr


def _drop(m: nn.Module, attr: str) -> float:
    d = getattr(m, attr, None)
    return float(d.p) if isinstance(d, nn.Dropout) else float(d or 0.0)


def _fused_or_separate(m: nn.Module, q_bias: str | None, v_bias: str | None) -> tuple[Proj, Proj, Proj, list[str]]:
    """q, k, v of a module with either ``qkv`` (fused, maybe with q_bias/k_bias/v_bias) or q/k/v_proj."""
    why = []
    if getattr(m, "qkv", None) is not None:
        if m.qkv.bias is not None:
            return Proj("qkv.weight", 0, "qkv.bias", 0), Proj("qkv.weight", 1, "qkv.bias", 1), \
                Proj("qkv.weight", 2, "qkv.bias", 2), why
        kb = getattr(m, "k_bias", None)
        if kb is not None and bool(kb.ne(0).any()):
            why.append("a non-zero k_bias buffer")
        return Proj("qkv.weight", 0, q_bias), Proj("qkv.weight", 1), Proj("qkv.weight", 2, v_bias), why
    projs = []
    for p in ("q_proj", "k_proj", "v_proj"):
        lin = getattr(m, p)
        projs.append(Proj(f"{p}.weight", 0, f"{p}.bias" if lin.bias is not None else None))
    return projs[0], projs[1], projs[2], why


def _table(m: nn.Module, attr: str, index: str, heads: int) -> dict[str, Any]:
    t = getattr(m, attr, None)
    if t is None:
        return {}
    axis = 1 if t.dim() == 2 and t.shape[1] == heads else 0
    return {"table": attr, "table_index": index, "table_head_axis": axis}


class TimmAttention(_Adapter):
    """timm's ``Attention`` (ViT, DeiT, ...): fused qkv Linear, optional q/k norms, output norm and gate."""

    kind = "timm"

    def layout(self, m: nn.Module) -> Layout:
        q, k, v = Proj("qkv.weight", 0, "qkv.bias" if m.qkv.bias is not None else None, 0), \
            Proj("qkv.weight", 1, "qkv.bias" if m.qkv.bias is not None else None, 1), \
            Proj("qkv.weight", 2, "qkv.bias" if m.qkv.bias is not None else None, 2)
        gate = getattr(m, "gate", None)
        return Layout(self.kind, m.num_heads, m.head_dim, m.head_dim, q, k, v, "proj", float(m.scale),
                      arg_names=_arg_names(m), q_norm=_norm_name(m, "q_norm"), k_norm=_norm_name(m, "k_norm"),
                      norm=_norm_name(m, "norm"), attn_drop=_drop(m, "attn_drop"), proj_drop=_drop(m, "proj_drop"),
                      gate=Proj("gate.weight", 0, "gate.bias" if gate.bias is not None else None)
                      if gate is not None else None)


class MetaFormerAttention(_Adapter):
    """timm's MetaFormer ``Attention`` (CAFormer): fused qkv Linear, heads of ``head_dim``, no norms."""

    kind = "metaformer"

    def layout(self, m: nn.Module) -> Layout:
        bias = "qkv.bias" if m.qkv.bias is not None else None
        return Layout(self.kind, m.num_heads, m.head_dim, m.head_dim, Proj("qkv.weight", 0, bias, 0),
                      Proj("qkv.weight", 1, bias, 1), Proj("qkv.weight", 2, bias, 2), "proj", float(m.scale),
                      arg_names=_arg_names(m), attn_drop=_drop(m, "attn_drop"), proj_drop=_drop(m, "proj_drop"))


class BeitAttention(_Adapter):
    """timm's BEiT ``Attention``: fused qkv with q_bias/v_bias, a per-block relative position bias table."""

    kind = "beit"

    def layout(self, m: nn.Module) -> Layout:
        q, k, v, why = _fused_or_separate(m, "q_bias" if m.q_bias is not None else None,
                                          "v_bias" if m.v_bias is not None else None)
        head_dim = m.qkv.weight.shape[0] // 3 // m.num_heads
        return Layout(self.kind, m.num_heads, head_dim, head_dim, q, k, v, "proj", float(m.scale),
                      arg_names=_arg_names(m), attn_drop=_drop(m, "attn_drop"), proj_drop=_drop(m, "proj_drop"),
                      unsupported=tuple(why),
                      **_table(m, "relative_position_bias_table", "relative_position_index", m.num_heads))


class EvaAttention(_Adapter):
    """timm's ``EvaAttention`` and ``AttentionRope``: fused or separate q/k/v, rotary embedding, norms, gate."""

    kind = "eva"

    def layout(self, m: nn.Module) -> Layout:
        q, k, v, why = _fused_or_separate(m, "q_bias" if getattr(m, "q_bias", None) is not None else None,
                                          "v_bias" if getattr(m, "v_bias", None) is not None else None)
        if getattr(m, "num_kv_heads", m.num_heads) != m.num_heads:
            why.append(f"grouped-query attention ({m.num_kv_heads} key/value heads for {m.num_heads})")
        gate = getattr(m, "gate", None)
        return Layout(self.kind, m.num_heads, m.head_dim, m.head_dim, q, k, v, "proj", float(m.scale),
                      arg_names=_arg_names(m), q_norm=_norm_name(m, "q_norm"), k_norm=_norm_name(m, "k_norm"),
                      norm=_norm_name(m, "norm"), rope="half" if getattr(m, "rotate_half", False) else "interleaved",
                      rope_arg="rope", rope_prefix=int(m.num_prefix_tokens), attn_drop=_drop(m, "attn_drop"),
                      proj_drop=_drop(m, "proj_drop"), unsupported=tuple(why),
                      gate=Proj("gate.weight", 0, "gate.bias" if gate.bias is not None else None)
                      if gate is not None else None)


class TimmWindowAttention(_Adapter):
    """timm's swin ``WindowAttention``: windows already partitioned, relative position bias, shift mask."""

    kind = "timm_window"

    def layout(self, m: nn.Module) -> Layout:
        bias = "qkv.bias" if m.qkv.bias is not None else None
        head_dim = m.qkv.weight.shape[0] // 3 // m.num_heads
        return Layout(self.kind, m.num_heads, head_dim, head_dim, Proj("qkv.weight", 0, bias, 0),
                      Proj("qkv.weight", 1, bias, 1), Proj("qkv.weight", 2, bias, 2), "proj", float(m.scale),
                      arg_names=_arg_names(m), mask_arg="mask", attn_drop=_drop(m, "attn_drop"),
                      proj_drop=_drop(m, "proj_drop"),
                      **_table(m, "relative_position_bias_table", "relative_position_index", m.num_heads))


class TorchvisionWindowAttention(_Adapter):
    """torchvision's swin ``ShiftedWindowAttention``: pads, shifts and partitions an NHWC map itself."""

    kind = "tv_window"

    def layout(self, m: nn.Module) -> Layout:
        bias = "qkv.bias" if m.qkv.bias is not None else None
        dim = m.qkv.in_features
        head_dim = dim // m.num_heads
        return Layout(self.kind, m.num_heads, head_dim, head_dim, Proj("qkv.weight", 0, bias, 0),
                      Proj("qkv.weight", 1, bias, 1), Proj("qkv.weight", 2, bias, 2), "proj", head_dim ** -0.5,
                      input="windows", window=tuple(m.window_size), shift=tuple(m.shift_size),
                      attn_drop=float(m.attention_dropout), proj_drop=float(m.dropout),
                      **_table(m, "relative_position_bias_table", "relative_position_index", m.num_heads))


class TorchvisionWindowAttention3d(_Adapter):
    """torchvision's video swin ``ShiftedWindowAttention3d``: V1's windows over a (B, T, H, W, C) map; the window
    shrinks to an axis no longer than it, and then takes the first entries of the relative position index."""

    kind = "tv_window_3d"

    def layout(self, m: nn.Module) -> Layout:
        return replace(TorchvisionWindowAttention().layout(m), kind=self.kind, window_fit=True)


class TimmWindowAttentionV2(_Adapter):
    """timm's swin V2 ``WindowAttention``: cosine attention, continuous position bias, q and v biases."""

    kind = "timm_window_v2"

    def layout(self, m: nn.Module) -> Layout:
        q, k, v, why = _fused_or_separate(m, "q_bias" if m.q_bias is not None else None,
                                          "v_bias" if m.v_bias is not None else None)
        head_dim = m.qkv.weight.shape[0] // 3 // m.num_heads
        return Layout(self.kind, m.num_heads, head_dim, head_dim, q, k, v, "proj", 1.0, arg_names=_arg_names(m),
                      mask_arg="mask", attn_drop=_drop(m, "attn_drop"), proj_drop=_drop(m, "proj_drop"),
                      unsupported=tuple(why + _cpb_problems(m, "cpb_mlp", m.num_heads)), **_V2)


class TorchvisionWindowAttentionV2(_Adapter):
    """torchvision's swin V2 ``ShiftedWindowAttentionV2``: V1's windows with cosine attention, a continuous
    position bias, and k's bias zeroed by the forward."""

    kind = "tv_window_v2"

    def layout(self, m: nn.Module) -> Layout:
        lay = TorchvisionWindowAttention().layout(m)
        return replace(lay, kind=self.kind, scale=1.0, zero_k_bias=lay.k.bias is not None,
                       unsupported=tuple(_cpb_problems(m, "cpb_mlp", m.num_heads)), **_V2)


class TimmWindowAttentionV2Cr(_Adapter):
    """timm's swin V2 "cr" ``WindowMultiHeadAttention``: cosine attention, a position bias MLP over every pair
    of tokens (no index, no sigmoid)."""

    kind = "timm_window_v2cr"

    def layout(self, m: nn.Module) -> Layout:
        bias = "qkv.bias" if m.qkv.bias is not None else None
        head_dim = m.qkv.weight.shape[1] // m.num_heads
        q, k, v = (Proj("qkv.weight", i, bias, i) for i in range(3))
        return Layout(self.kind, m.num_heads, head_dim, head_dim, q, k, v, "proj", 1.0, arg_names=_arg_names(m),
                      mask_arg="mask", attn_drop=_drop(m, "attn_drop"), proj_drop=_drop(m, "proj_drop"),
                      cosine="logit_scale", cpb="meta_mlp", cpb_coords="relative_coordinates_log", cpb_scale=None,
                      unsupported=tuple(_cpb_problems(m, "meta_mlp", m.num_heads)))


_V2 = {"cosine": "logit_scale", "cpb": "cpb_mlp", "cpb_coords": "relative_coords_table",
       "table_index": "relative_position_index"}


def _cpb_problems(m: nn.Module, attr: str, heads: int) -> list[str]:
    """Why the position bias MLP is not two Linear layers (the last one output per head) with parameter-free
    layers between them, or the logit scale not one per head."""
    mlp, scale = m.get_submodule(attr), getattr(m, "logit_scale", None)
    linears = [c for c in mlp.modules() if isinstance(c, nn.Linear)]
    ok = len(linears) == 2 and linears[-1].out_features == heads and \
        sum(p.numel() for p in mlp.parameters()) == sum(p.numel() for c in linears for p in c.parameters()) and \
        isinstance(scale, nn.Parameter) and scale.shape[0] == heads and scale.numel() == heads
    return [] if ok else ["a continuous position bias MLP or logit scale of another structure"]


class TorchvisionMaxVitAttention(_Adapter):
    """torchvision's MaxViT ``RelativePositionalMultiHeadAttention``: (B, G, P, D) windows or grids."""

    kind = "tv_maxvit"

    def layout(self, m: nn.Module) -> Layout:
        return Layout(self.kind, m.n_heads, m.head_dim, m.head_dim, Proj("to_qkv.weight", 0, "to_qkv.bias", 0),
                      Proj("to_qkv.weight", 1, "to_qkv.bias", 1), Proj("to_qkv.weight", 2, "to_qkv.bias", 2),
                      "merge", float(m.scale_factor),
                      **_table(m, "relative_position_bias_table", "relative_position_index", m.n_heads))


class EfficientFormerAttention(_Adapter):
    """timm's EfficientFormer ``Attention``: one qkv Linear laid out head by head, a bias per head and offset.

    q, k and v are interleaved within each head, which the pruning space cannot describe per column: heads
    are pruned, q/k and v widths are kept whole.
    """

    kind = "efficientformer"

    def layout(self, m: nn.Module) -> Layout:
        b = "qkv.bias" if m.qkv.bias is not None else None
        q, k, v = (Proj("qkv.weight", i, b, i) for i in range(3))
        return Layout(self.kind, m.num_heads, m.key_dim, m.val_dim, q, k, v, "proj", float(m.scale), per_head=True,
                      table="attention_biases", table_index="attention_bias_idxs", table_head_axis=0)


class LevitAttention(_Adapter):
    """timm's LeViT ``Attention`` and ``AttentionDownsample`` (linear mode): Linear + BatchNorm projections laid
    out head by head, an activation before the output projection, a bias per head and offset; the downsampling
    one takes its queries from every ``stride``-th token. Sliced in place: heads are pruned, widths kept."""

    kind = "levit"

    def layout(self, m: nn.Module) -> Layout:
        down = hasattr(m, "kv")
        fused = "kv.linear.weight" if down else "qkv.linear.weight"
        q = Proj("q.ln.linear.weight") if down else Proj(fused, 0)
        k, v = (Proj(fused, 0), Proj(fused, 1)) if down else (Proj(fused, 1), Proj(fused, 2))
        return Layout(self.kind, m.num_heads, m.key_dim, m.val_dim, q, k, v, "proj.ln.linear", float(m.scale),
                      per_head=True, table="attention_biases", table_index="attention_bias_idxs", table_head_axis=0,
                      input="nchw" if m.use_conv else "tokens", in_place=(("num_heads", 1), ("key_attn_dim", m.key_dim),
                                                 ("val_attn_dim", m.val_dim)))

    def analyse(self, prop: Propagation, node: fx.Node, m: nn.Module) -> Any:
        return analyse_levit(prop, node, m, self.layout(m))


class TorchMultiheadAttention(_Adapter):
    """``nn.MultiheadAttention`` used as self-attention (query, key and value the same tensor)."""

    kind = "mha"

    def layout(self, m: nn.MultiheadAttention) -> Layout:
        why = []
        if not m._qkv_same_embed_dim:
            why.append("separate key/value input widths (kdim/vdim)")
        if m.bias_k is not None or m.add_zero_attn:
            why.append("add_bias_kv / add_zero_attn")
        bias = "in_proj_bias" if m.in_proj_bias is not None else None
        return Layout(self.kind, m.num_heads, m.head_dim, m.head_dim, Proj("in_proj_weight", 0, bias, 0),
                      Proj("in_proj_weight", 1, bias, 1), Proj("in_proj_weight", 2, bias, 2), "out_proj",
                      m.head_dim ** -0.5, input="tokens" if m.batch_first else "seq_first",
                      arg_names=_arg_names(m), returns_tuple=True, attn_drop=float(m.dropout),
                      unsupported=tuple(why))


def _timm_types() -> dict[type, _Adapter]:
    import importlib

    out: dict[type, _Adapter] = {}
    for module, name, adapter in (
            ("timm.layers", "Attention", TimmAttention()), ("timm.layers", "AttentionRope", EvaAttention()),
            ("timm.models.beit", "Attention", BeitAttention()), ("timm.models.eva", "EvaAttention", EvaAttention()),
            ("timm.models.metaformer", "Attention", MetaFormerAttention()),
            ("timm.models.swin_transformer", "WindowAttention", TimmWindowAttention()),
            ("timm.models.swin_transformer_v2", "WindowAttention", TimmWindowAttentionV2()),
            ("timm.models.swin_transformer_v2_cr", "WindowMultiHeadAttention", TimmWindowAttentionV2Cr()),
            ("timm.models.efficientformer", "Attention", EfficientFormerAttention()),
            ("timm.models.levit", "Attention", LevitAttention()),
            ("timm.models.levit", "AttentionDownsample", LevitAttention())):
        try:
            out[getattr(importlib.import_module(module), name)] = adapter
        except (ImportError, AttributeError):  # an older or newer timm without it
            continue
    return out


def _torchvision_types() -> dict[type, _Adapter]:
    try:
        from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
        from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
        from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d
    except ImportError:
        return {}
    return {ShiftedWindowAttention: TorchvisionWindowAttention(),
            ShiftedWindowAttention3d: TorchvisionWindowAttention3d(),
            ShiftedWindowAttentionV2: TorchvisionWindowAttentionV2(),
            RelativePositionalMultiHeadAttention: TorchvisionMaxVitAttention()}


_ADAPTERS: dict[type, _Adapter] = {
    nn.MultiheadAttention: TorchMultiheadAttention(), **_timm_types(), **_torchvision_types()}


def attention_adapter(m: nn.Module) -> _Adapter | None:
    """The adapter for an attention module, or None if ``m`` is not one mdprune recognises.

    A known type, or a subclass that keeps its forward (and so computes what the known type does).
    """
    for cls in type(m).__mro__:
        adapter = _ADAPTERS.get(cls)
        if adapter is not None:
            return adapter if type(m).forward is cls.forward else None
    return None


def attention_layout(m: nn.Module) -> Layout:
    """The layout of an attention module mdprune recognises."""
    adapter = attention_adapter(m)
    if adapter is None:
        raise TypeError(f"{type(m).__name__} is not an attention module mdprune knows")
    return adapter.layout(m)


# ---- analysis ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Dims:
    """The spaces of one attention module and the segments they make."""

    h: int  # heads
    q: int  # q/k width per head (rotary pairs when ``pairs``)
    v: int  # v width per head
    qk: RawSeg  # the rows of q (and of k): heads x q/k width
    qk_cols: RawSeg  # the q/k columns of one head
    hv: RawSeg  # heads x v width
    eo: RawSeg  # output features
    pairs: bool


def analyse_attention(prop: Propagation, node: fx.Node, m: nn.Module) -> Any:
    """The channel rule of an attention module: dimensions, bindings and ops from its layout."""
    lay = attention_layout(m)
    x, shape, uses_rope = _start(prop, node, m, lay)
    d = _open(prop, node, lay, m, uses_rope and lay.rope is not None)
    name = node.target
    if lay.per_head:
        _bind_per_head(prop, node, lay, x, d)
    else:
        _bind_projections(prop, node, lay, x, d.qk, d.hv)
    prop.bind(f"{name}.{lay.proj}.weight", 0, (d.eo,), node, "out")
    prop.bind(f"{name}.{lay.proj}.weight", 1, (d.hv,), node, "in")
    if m.get_submodule(lay.proj).bias is not None:
        prop.bind(f"{name}.{lay.proj}.bias", 0, (d.eo,), node, "out")
    if lay.table is not None:
        prop.bind(f"{name}.{lay.table}", lay.table_head_axis, (RawSeg((d.h,)),), node, "param")
    if lay.cosine is not None:
        prop.bind(f"{name}.{lay.cosine}", 0, (RawSeg((d.h,)),), node, "param")
    if lay.cpb is not None:
        _position_mlp(prop, node, m, lay, d.h)
    for norm in (lay.q_norm, lay.k_norm):
        if norm is not None:
            _bind_norm(prop, node, m, norm, (d.qk_cols,), (d.q,))
    if lay.norm is not None:
        _bind_norm(prop, node, m, lay.norm, (d.hv,), (d.h, d.v))
    _add_ops(prop, node, lay, m, x, _geometry(node, lay, shape), shape[-1], d)
    prop.attention[name] = {"kind": lay.kind, "heads": d.h, "qk": d.q, "v": d.v}
    out_shape = node.meta["mdp_shape"][0] if lay.returns_tuple else node.meta["mdp_shape"]
    out = Chan(len(out_shape) - 1, (d.eo,))
    return Several((out, None)) if lay.returns_tuple else out


def _open(prop: Propagation, node: fx.Node, lay: Layout, m: nn.Module, pairs: bool) -> _Dims:
    """Open the heads, q/k, v and output spaces. Under a rotary embedding q/k columns go in rotation pairs."""
    name = node.target
    if pairs and lay.qk_dim % 2:
        raise AnalysisError(f"{where(node)}: rotary embedding over an odd q/k width {lay.qk_dim}")
    h = prop.new_space(lay.heads, "heads", f"{name}.heads")
    q = prop.new_space(lay.qk_dim // 2 if pairs else lay.qk_dim, "qk", f"{name}.qk")
    v = prop.new_space(lay.v_dim, "v", f"{name}.v")
    e = prop.new_space(m.get_submodule(lay.proj).weight.shape[0], "mlp", f"{name}.out")
    if not pairs:
        qk, cols = RawSeg((h, q)), RawSeg((q,))
    elif lay.rope == "interleaved":  # rotation pairs are adjacent columns: pruned two by two
        qk, cols = RawSeg((h, q), 2), RawSeg((q,), 2)
    else:  # pairs are columns i and i + width/2: heads x halves x pairs
        halves = prop.new_space(2, "qk", f"{name}.rope_halves", protected="rotary embedding halves")
        qk, cols = RawSeg((h, halves, q)), RawSeg((halves, q))
    return _Dims(h, q, v, qk, cols, RawSeg((h, v)), RawSeg((e,)), pairs)


def _add_ops(prop: Propagation, node: fx.Node, lay: Layout, m: nn.Module, x: Chan, geo: dict[str, Any],
             features: int, d: _Dims) -> None:
    """The projections and the attention core, with the tokens and batch each runs over."""
    name = node.target
    lin = linear_fixed(prop, (geo["rows_batch"], geo["rows"] // geo["rows_batch"], features), False)
    projs = [("q", lay.q, d.qk), ("k", lay.k, d.qk), ("v", lay.v, d.hv)]
    if lay.gate is not None:
        projs.append(("gate", lay.gate, d.hv))
    for part, p, seg in projs:
        prop.add_op(f"{name}.{part}", "linear", {"in": x.segs, "out": (seg,)}, {**lin, "bias": p.bias is not None},
                    node)
    core: dict[str, Any] = {"tokens": geo["tokens"], "batch": geo["batch"]}
    if geo["batch"] != prop.batch and geo["batch"] % prop.batch == 0:
        core["windows"] = geo["batch"] // prop.batch  # windows (or grids) per image
    if lay.table is not None or lay.cpb is not None or geo["masked"]:
        core["bias"] = True
    if lay.cosine is not None:
        core["cosine"] = True
    if d.pairs:
        core["rope"] = True
    roles = {"heads": (RawSeg((d.h,)),), "qk": (RawSeg((d.q,), 2 if d.pairs else 1),), "v": (RawSeg((d.v,)),)}
    prop.add_op(f"{name}.attn", "attention", roles, core, node)
    prop.add_op(f"{name}.proj", "linear", {"in": (d.hv,), "out": (d.eo,)},
                {**lin, "bias": m.get_submodule(lay.proj).bias is not None}, node)


def _position_mlp(prop: Propagation, node: fx.Node, m: nn.Module, lay: Layout, heads: int) -> None:
    """Swin V2's position bias MLP: its last layer's rows are the heads; its ops run once per forward, on the
    relative coordinates, whatever the input (the hidden width kept whole)."""
    name, first, last = f"{node.target}.{lay.cpb}", *_cpb_linears(m, lay)
    prop.bind(f"{name}.{last}.weight", 0, (RawSeg((heads,)),), node, "out")
    if m.get_submodule(f"{lay.cpb}.{last}").bias is not None:
        prop.bind(f"{name}.{last}.bias", 0, (RawSeg((heads,)),), node, "out")
    coords = m.get_buffer(lay.cpb_coords)
    lin0, lin1 = m.get_submodule(f"{lay.cpb}.{first}"), m.get_submodule(f"{lay.cpb}.{last}")
    why = f"position bias MLP of {node.target} (its width does not depend on the input)"
    inp = prop.new_space(lin0.in_features, "linear", f"{name}.{first}:in", protected=why)
    hid = prop.new_space(lin0.out_features, "linear", f"{name}.{first}", protected=why)
    fixed = {"tokens": coords.numel() // coords.shape[-1], "batch": 1, "rank": 3}
    prop.add_op(f"{name}.{first}", "linear", {"in": (RawSeg((inp,)),), "out": (RawSeg((hid,)),)},
                {**fixed, "bias": lin0.bias is not None}, node)
    prop.add_op(f"{name}.{last}", "linear", {"in": (RawSeg((hid,)),), "out": (RawSeg((heads,)),)},
                {**fixed, "bias": lin1.bias is not None}, node)


def _cpb_linears(m: nn.Module, lay: Layout) -> tuple[str, str]:
    """The names of the first and last Linear of the position bias MLP (inside it)."""
    names = [n for n, c in m.get_submodule(lay.cpb).named_modules() if isinstance(c, nn.Linear)]
    return names[0], names[-1]


def analyse_levit(prop: Propagation, node: fx.Node, m: nn.Module, lay: Layout) -> Chan:
    """LeViT's attention: whole heads of [q | k | v] (or [k | v] and a separate q) Linear + BatchNorm rows (1x1
    convolutions over an NCHW map in convolution mode)."""
    x, shape, _ = _start(prop, node, m, lay)
    out_shape = node.meta["mdp_shape"]
    d = _open(prop, node, lay, m, False)
    for s in (d.q, d.v):
        prop.spaces[s].protected.append(f"q, k and v interleaved head by head in {node.target}")
    name, down = node.target, hasattr(m, "kv")
    fused = "kv" if down else "qkv"
    per_head = RawSeg((d.h,), lay.qk_dim * (1 if down else 2) + lay.v_dim)
    _bind_linear_norm(prop, node, f"{name}.{fused}", (per_head,), x.segs)
    if down:
        _bind_linear_norm(prop, node, f"{name}.q.ln", (d.qk,), x.segs)
    _bind_linear_norm(prop, node, f"{name}.proj.ln", (d.eo,), (d.hv,))
    prop.bind(f"{name}.attention_biases", 0, (RawSeg((d.h,)),), node, "param")
    conv = lay.input == "nchw"
    n_k, n_q = (math.prod(shape[2:]), math.prod(out_shape[2:])) if conv else (shape[1], out_shape[1])
    lin_k = linear_fixed(prop, (shape[0], n_k, shape[1 if conv else -1]), False)
    lin_q = linear_fixed(prop, (shape[0], n_q, shape[1 if conv else -1]), False)
    prop.add_op(f"{name}.{fused}", "linear", {"in": x.segs, "out": (per_head,)}, lin_k, node)
    if down:
        prop.add_op(f"{name}.q", "linear", {"in": x.segs, "out": (d.qk,)}, lin_q, node)
    core = {"tokens": n_q, "batch": shape[0], "bias": True, **({"tokens_kv": n_k} if n_k != n_q else {})}
    prop.add_op(f"{name}.attn", "attention", {"heads": (RawSeg((d.h,)),), "qk": (RawSeg((d.q,)),),
                                              "v": (RawSeg((d.v,)),)}, core, node)
    prop.add_op(f"{name}.proj", "linear", {"in": (d.hv,), "out": (d.eo,)}, {**lin_q, "rank": 3}, node)
    prop.attention[name] = {"kind": lay.kind, "heads": d.h, "qk": d.q, "v": d.v}
    return Chan(1 if conv else 2, (d.eo,))


def _bind_linear_norm(prop: Propagation, node: fx.Node, prefix: str, out: tuple[RawSeg, ...],
                      inp: tuple[RawSeg, ...]) -> None:
    """A Linear (no bias) followed by a BatchNorm over its outputs (timm's LinearNorm)."""
    prop.bind(f"{prefix}.linear.weight", 0, out, node, "out")
    prop.bind(f"{prefix}.linear.weight", 1, inp, node, "in")
    for t, role in (("weight", "affine"), ("bias", "affine"), ("running_mean", "stat"), ("running_var", "stat")):
        prop.bind(f"{prefix}.bn.{t}", 0, out, node, role)


def _start(prop: Propagation, node: fx.Node, m: nn.Module, lay: Layout) -> tuple[Chan, tuple[int, ...], bool]:
    """Refuse what the adapter does not cover; the input's channels and shape, and whether rope is passed."""
    if lay.unsupported:
        raise AnalysisError(f"{where(node)} ({type(m).__name__}) uses {', '.join(lay.unsupported)}, which "
                            f"mdprune cannot prune. Pass ignored_layers=['{node.target}'] to keep it whole.")
    if isinstance(getattr(m, "attention_bias_cache", None), dict):
        m.attention_bias_cache = {}  # filled while shapes were recorded: would go stale when weights are loaded
    call = _call(node, m)
    x_arg = call.pop(next(iter(inspect.signature(m.forward).parameters)))
    uses_rope = _check_call(prop, node, m, lay, call, x_arg)
    x, shape = _input(prop, node, x_arg, 1 if lay.input == "nchw" else -1)
    return x, shape, uses_rope


def _call(node: fx.Node, m: nn.Module) -> dict[str, Any]:
    """The call's arguments by parameter name (defaults filled in)."""
    try:
        bound = inspect.signature(m.forward).bind(*node.args, **node.kwargs)
    except TypeError as e:
        raise AnalysisError(f"{where(node)}: cannot read the call's arguments: {e}") from e
    bound.apply_defaults()
    return dict(bound.arguments)


def _is_off(v: Any) -> bool:
    return v is None or v is False


def _check_call(prop: Propagation, node: fx.Node, m: nn.Module, lay: Layout, call: dict[str, Any], x: Any) -> bool:
    """Refuse call options the slim module would not reproduce; return whether a rotary embedding is passed.

    ``call``: the arguments after the input ``x``, by name.
    """
    uses_rope = False
    for arg, value in call.items():
        if arg in (lay.rope_arg, lay.mask_arg) and not _is_off(value):
            if isinstance(prop.value(value), (Chan, Several)):
                raise AnalysisError(f"{where(node)}: its {arg} argument carries channels; not supported")
            uses_rope = uses_rope or arg == lay.rope_arg
        elif lay.kind == "mha" and arg in ("key", "value"):
            if value is not x:
                raise AnalysisError(f"{where(node)}: only self-attention (query is key is value) is supported")
        elif lay.kind == "mha" and arg in ("need_weights", "average_attn_weights"):
            continue
        elif not _is_off(value):
            raise AnalysisError(f"{where(node)} ({type(m).__name__}) is called with {arg}={_show(value)}; "
                                f"mdprune supports it only without. Pass ignored_layers=['{node.target}'] to keep "
                                "it whole.")
    if lay.kind == "mha":
        _check_mha_users(node, call)
    return uses_rope


def _show(v: Any) -> str:
    return f"the value of node {v.name}" if isinstance(v, fx.Node) else repr(v)


def _check_mha_users(node: fx.Node, call: dict[str, Any]) -> None:
    """The attention weights (item 1) may be taken only when nobody reads them or they are None anyway."""
    weights_off = call.get("need_weights") is False
    for user in node.users:
        item = user.args[1] if user.op == "call_function" and len(user.args) == 2 else None
        if item == 0 or (item == 1 and (weights_off or not user.users)):
            continue
        raise AnalysisError(f"{where(node)}: its attention weights are used (by node {user.name}); not supported")


def _input(prop: Propagation, node: fx.Node, arg: Any, axis: int) -> tuple[Chan, tuple[int, ...]]:
    v = prop.value(arg)
    shape = arg.meta.get("mdp_shape") if isinstance(arg, fx.Node) else None
    if not isinstance(v, Chan) or not isinstance(shape, tuple) or v.axis != axis % len(shape):
        what = "its last axis" if axis == -1 else f"axis {axis}"
        raise AnalysisError(f"{where(node)}: the attention input must carry features on {what}")
    return v, shape


def _geometry(node: fx.Node, lay: Layout, shape: tuple[int, ...]) -> dict[str, Any]:
    """Tokens per attention, attention batch (images x windows), rows through the projections."""
    if lay.input == "seq_first":
        n, b = shape[0], shape[1]
        return {"tokens": n, "batch": b, "rows": n * b, "rows_batch": b, "masked": False}
    if lay.input == "windows":
        assert lay.window is not None
        k = len(lay.window)
        if len(shape) != k + 2:
            raise AnalysisError(f"{where(node)}: expects a channels-last input with {k} spatial axes, got {shape}")
        window, shift, padded = window_geometry(shape[1:-1], lay.window, lay.shift, lay.window_fit)
        windows = math.prod(p // w for p, w in zip(padded, window, strict=True))
        return {"tokens": math.prod(window), "batch": shape[0] * windows, "rows": shape[0] * math.prod(padded),
                "rows_batch": shape[0], "masked": any(shift)}
    if len(shape) < 3:
        raise AnalysisError(f"{where(node)}: expects (batch, tokens, features), got shape {shape}")
    b = math.prod(shape[:-2])
    return {"tokens": shape[-2], "batch": b, "rows": b * shape[-2], "rows_batch": shape[0],
            "masked": lay.mask_arg is not None}


def window_geometry(size: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...], fit: bool
                    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Window, shift and padded size of shifted-window attention over spatial ``size``: with ``fit`` the window
    shrinks to an axis no longer than it (torchvision's 3-D Swin); the input is padded to whole windows; an axis
    that one window covers is not shifted (torchvision's Swin, 2-D and 3-D)."""
    if fit:
        window = tuple(min(w, n) for w, n in zip(window, size, strict=True))
    padded = tuple(n + (w - n % w) % w for n, w in zip(size, window, strict=True))
    shift = tuple(0 if w >= p else s for w, p, s in zip(window, padded, shift, strict=True))
    return window, shift, padded


def _bind_projections(prop: Propagation, node: fx.Node, lay: Layout, x: Chan, qk: RawSeg, hv: RawSeg) -> None:
    """Bind q, k, v (and gate) weights and biases: each tensor's axis 0 is its parts in order."""
    name = node.target
    parts: dict[str, dict[int, tuple[RawSeg, str]]] = {}
    projs = [(lay.q, qk, "q"), (lay.k, qk, "k"), (lay.v, hv, "v")]
    if lay.gate is not None:
        projs.append((lay.gate, hv, "gate"))
    for p, seg, what in projs:
        parts.setdefault(p.weight, {})[p.part] = (seg, what)
        if p.bias is not None:
            parts.setdefault(p.bias, {})[p.bias_part] = (seg, what)
    weights = {p.weight for p, _, _ in projs}
    for tensor, by_part in parts.items():
        if sorted(by_part) != list(range(len(by_part))):
            raise AnalysisError(f"{where(node)}: tensor {tensor} holds parts {sorted(by_part)} of q, k, v")
        whats = {w for _, w in by_part.values()}
        role = "key" if whats == {"k"} else "gate" if whats == {"gate"} else "out"
        prop.bind(f"{name}.{tensor}", 0, tuple(s for _, (s, _) in sorted(by_part.items())), node, role)
        if tensor in weights:
            prop.bind(f"{name}.{tensor}", 1, x.segs, node, "in")


def _bind_per_head(prop: Propagation, node: fx.Node, lay: Layout, x: Chan, d: _Dims) -> None:
    """A fused weight laid out head by head: whole heads are pruned, q/k and v widths kept."""
    name = node.target
    seg = RawSeg((d.h,), 2 * lay.qk_dim + lay.v_dim)
    prop.bind(f"{name}.{lay.q.weight}", 0, (seg,), node, "out")
    prop.bind(f"{name}.{lay.q.weight}", 1, x.segs, node, "in")
    if lay.q.bias is not None:
        prop.bind(f"{name}.{lay.q.bias}", 0, (seg,), node, "out")
    for s in (d.q, d.v):
        prop.spaces[s].protected.append(f"q, k and v interleaved head by head in {name}")


def _bind_norm(prop: Propagation, node: fx.Node, m: nn.Module, attr: str, segs: tuple[RawSeg, ...],
               spaces: tuple[int, ...]) -> None:
    """A norm inside the module (per-head q/k norms, the norm of the merged heads) over ``segs``.

    A LayerNorm (or RMSNorm: any norm over the last axis with a masked stand-in) normalises over the kept
    features (masked model: ``MaskedLayerNorm``, ``MaskedRMSNorm``; slim: a smaller norm); any other norm keeps
    the dimensions it normalises over whole.
    """
    from ..layers.norm import last_axis_norm

    norm = m.get_submodule(attr)
    if last_axis_norm(norm):
        for t in ("weight", "bias"):
            if getattr(norm, t, None) is not None:
                prop.bind(f"{node.target}.{attr}.{t}", 0, segs, node, "norm")
        prop.normalized[f"{node.target}.{attr}"] = segs
        return
    for s in spaces:
        prop.spaces[s].protected.append(f"{type(norm).__name__} over the heads in {node.target}")
