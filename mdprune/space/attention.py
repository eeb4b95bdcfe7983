"""Attention modules as pruning units: heads, query/key width per head and value width per head.

An adapter recognises one attention implementation, ties its input and output to the embedding channels,
opens three dimensions (heads H, q/k width Q, v width V) and lists its ops. The fused qkv weight is bound as
three segments ``H x Q``, ``H x Q``, ``H x V``, so q/k and v widths are pruned independently; the slim model
(:mod:`mdprune.apply.attention`) has separate q, k and v projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from .errors import AnalysisError, where
from .values import Chan, RawSeg, Several

if TYPE_CHECKING:
    from .channels import Propagation


def _input(prop: Propagation, node: fx.Node, arg: Any) -> tuple[Chan, tuple[int, ...]]:
    v = prop.value(arg)
    shape = arg.meta.get("mdp_shape") if isinstance(arg, fx.Node) else None
    if not isinstance(v, Chan) or v.axis != len(shape) - 1:
        raise AnalysisError(f"{where(node)}: the attention input must carry features on its last axis")
    return v, shape


def _open(prop: Propagation, node: fx.Node, kind: str, x: Chan, heads: int, head_dim: int, out: int,
          tokens: int, batch: int, in_bias: bool, out_bias: bool, prefix: dict[str, str]) -> RawSeg:
    """Open the H, Q, V and output spaces, bind the projections, and list the ops of one attention module."""
    name = node.target
    h = prop.new_space(heads, "heads", f"{name}.heads")
    q = prop.new_space(head_dim, "qk", f"{name}.qk")
    v = prop.new_space(head_dim, "v", f"{name}.v")
    e = prop.new_space(out, "mlp", f"{name}.out")
    qk, hv, eo = RawSeg((h, q)), RawSeg((h, v)), RawSeg((e,))
    prop.bind(prefix["in_w"], 0, (qk, qk, hv), node, "out")
    prop.bind(prefix["in_w"], 1, x.segs, node, "in")
    if in_bias:
        prop.bind(prefix["in_b"], 0, (qk, qk, hv), node, "out")
    prop.bind(prefix["out_w"], 0, (eo,), node, "out")
    prop.bind(prefix["out_w"], 1, (hv,), node, "in")
    if out_bias:
        prop.bind(prefix["out_b"], 0, (eo,), node, "out")
    lin = {"tokens": tokens, "batch": batch, "rank": 3}
    prop.add_op(f"{name}.q", "linear", {"in": x.segs, "out": (qk,)}, {**lin, "bias": in_bias}, node)
    prop.add_op(f"{name}.k", "linear", {"in": x.segs, "out": (qk,)}, {**lin, "bias": in_bias}, node)
    prop.add_op(f"{name}.v", "linear", {"in": x.segs, "out": (hv,)}, {**lin, "bias": in_bias}, node)
    prop.add_op(f"{name}.attn", "attention", {"heads": (RawSeg((h,)),), "qk": (RawSeg((q,)),),
                                              "v": (RawSeg((v,)),)}, {"tokens": tokens, "batch": batch}, node)
    prop.add_op(f"{name}.proj", "linear", {"in": (hv,), "out": (eo,)}, {**lin, "bias": out_bias}, node)
    prop.attention[name] = {"kind": kind, "heads": h, "qk": q, "v": v}
    return eo


@dataclass(frozen=True)
class TimmAttention:
    """timm's ``Attention`` (ViT, DeiT, ...): fused qkv Linear, optional q/k norms, proj Linear."""

    kind: str = "timm"

    def analyse(self, prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:
        if any(a not in (None, False) for a in (*node.args[1:], *node.kwargs.values())):
            raise AnalysisError(f"{where(node)} is called with an attention mask; not supported")
        x, shape = _input(prop, node, node.args[0])
        eo = _open(prop, node, self.kind, x, m.num_heads, m.head_dim, m.proj.out_features, shape[1], shape[0],
                   m.qkv.bias is not None, m.proj.bias is not None,
                   {"in_w": f"{node.target}.qkv.weight", "in_b": f"{node.target}.qkv.bias",
                    "out_w": f"{node.target}.proj.weight", "out_b": f"{node.target}.proj.bias"})
        dims = prop.attention[node.target]
        if not isinstance(m.q_norm, nn.Identity) or not isinstance(m.k_norm, nn.Identity):
            prop.spaces[dims["qk"]].protected.append(f"q/k normalisation in {node.target}")
        if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
            for d in ("heads", "v"):
                prop.spaces[dims[d]].protected.append(f"output normalisation in {node.target}")
        return Chan(len(shape) - 1, (eo,))


@dataclass(frozen=True)
class TorchMultiheadAttention:
    """``nn.MultiheadAttention`` used as self-attention (query, key and value the same tensor)."""

    kind: str = "mha"

    def analyse(self, prop: Propagation, node: fx.Node, m: nn.MultiheadAttention) -> Several:
        args = list(node.args) + [node.kwargs.get(k) for k in ("query", "key", "value") if k in node.kwargs]
        if len(args) < 3 or not (args[0] is args[1] is args[2]):
            raise AnalysisError(f"{where(node)}: only self-attention (query is key is value) is supported")
        extra = {k: v for k, v in node.kwargs.items() if k not in ("need_weights", "query", "key", "value")}
        if len(node.args) > 3 or any(v is not None for v in extra.values()):
            raise AnalysisError(f"{where(node)} is called with masks or options mdprune does not support")
        for user in node.users:
            if not (user.op == "call_function" and user.args[1] == 0 and len(user.args) == 2):
                raise AnalysisError(f"{where(node)}: its attention weights are used; not supported")
        x, shape = _input(prop, node, args[0])
        tokens, batch = (shape[1], shape[0]) if m.batch_first else (shape[0], shape[1])
        eo = _open(prop, node, self.kind, x, m.num_heads, m.head_dim, m.out_proj.out_features, tokens, batch,
                   m.in_proj_bias is not None, m.out_proj.bias is not None,
                   {"in_w": f"{node.target}.in_proj_weight", "in_b": f"{node.target}.in_proj_bias",
                    "out_w": f"{node.target}.out_proj.weight", "out_b": f"{node.target}.out_proj.bias"})
        return Several((Chan(len(shape) - 1, (eo,)), None))


def _timm_attention() -> type | None:
    try:
        from timm.layers import Attention
    except ImportError:
        try:
            from timm.models.vision_transformer import Attention
        except ImportError:
            return None
    return Attention


_TIMM_ATTENTION = _timm_attention()


def attention_adapter(m: nn.Module) -> TimmAttention | TorchMultiheadAttention | None:
    """The adapter for an attention module, or None if ``m`` is not one mdprune recognises."""
    if _TIMM_ATTENTION is not None and type(m) is _TIMM_ATTENTION:
        if getattr(m, "gate", None) is not None:
            return None  # gated attention: analysed as an unknown leaf (named error)
        return TimmAttention()
    if type(m) is nn.MultiheadAttention:
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            return None
        return TorchMultiheadAttention()
    return None
