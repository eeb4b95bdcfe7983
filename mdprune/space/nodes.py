"""Width-dependent ops that are not compute ops: pooling, standalone norms and activations, residual additions.

Their cost scales with a channel width too (a 3x3 max-pool on the stem's output can cost a tenth of a small
ResNet), and they vanish with their block. Each becomes an :class:`Op` of kind ``"node"`` with one role,
``"width"``, and a self-contained description of the call, so the latency tables can replay it at any width.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from .op_names import op_name
from .values import Chan, ParamRef

if TYPE_CHECKING:
    from .channels import Propagation

# module type -> attributes that configure it (besides its width)
_MODULES: dict[type, tuple[str, ...]] = {
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    nn.AdaptiveAvgPool2d: ("output_size",), nn.AdaptiveMaxPool2d: ("output_size",),
    nn.BatchNorm2d: ("eps",), nn.BatchNorm1d: ("eps",), nn.LayerNorm: ("eps", "elementwise_affine"),
    nn.ReLU: ("inplace",), nn.ReLU6: ("inplace",), nn.SiLU: ("inplace",), nn.Hardswish: ("inplace",),
    nn.GELU: ("approximate",), nn.Sigmoid: (), nn.Tanh: (),
}
_FUNCTIONS = {"add", "iadd", "sub", "mul", "relu", "relu_", "gelu", "silu", "sigmoid", "relu6", "hardswish",
              "adaptive_avg_pool2d", "adaptive_max_pool2d", "max_pool2d", "avg_pool2d", "mean"}


def _module_type(m: nn.Module) -> type | None:
    for t in _MODULES:
        if type(m) is t or (t is nn.LayerNorm and isinstance(m, nn.LayerNorm)):
            return t
    return None


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, (int, float, bool, str)) or v is None:
        return v
    raise TypeError


def node_op(prop: Propagation, gm: fx.GraphModule, node: fx.Node) -> dict[str, Any] | None:
    """The role segments and replay description of ``node``, or None if it is not a replayable node op."""
    out = prop.info.get(node.name)
    if not isinstance(out, Chan) or node.op not in ("call_module", "call_function", "call_method"):
        return None
    if node.op == "call_module":
        t = _module_type(gm.get_submodule(node.target))
        if t is None:
            return None
        m = gm.get_submodule(node.target)
        call = {"call": "module", "target": t.__name__, "config": {a: _plain(getattr(m, a)) for a in _MODULES[t]}}
    else:
        if op_name(node) not in _FUNCTIONS:
            return None
        if node.op == "call_method":
            call = {"call": "method", "target": node.target}
        elif node.target in (operator.add, operator.sub, operator.mul):
            call = {"call": "function", "target": f"operator.{node.target.__name__}"}
        else:
            call = {"call": "function", "target": f"{node.target.__module__}.{node.target.__name__}"}
    try:
        args = [_template(prop, a, out) for a in node.args]
        kwargs = {k: _template(prop, v, out) for k, v in node.kwargs.items()}
    except TypeError:
        return None
    return {"segs": out.segs, "fixed": {**call, "args": args, "kwargs": kwargs, "batch": prop.batch}}


def _template(prop: Propagation, a: Any, out: Chan) -> Any:
    """A tensor argument as {"shape": [...], "batched": bool}, the channel axis written as -1."""
    if not isinstance(a, fx.Node):
        return _plain(a)
    shape = a.meta.get("mdp_shape")
    if not isinstance(shape, tuple):
        raise TypeError  # a non-tensor value computed in the graph: not replayable
    v = prop.value(a)
    shape = list(shape)
    if isinstance(v, Chan):
        if prop.roots(v.segs) != prop.roots(out.segs):
            raise TypeError
        shape[v.axis] = -1
        return {"shape": shape, "batched": True}
    if isinstance(v, ParamRef):
        bound = prop.bindings.get(v.tensor, {})
        for j, pa in enumerate(v.axes):
            if pa is not None and pa in bound and prop.roots(bound[pa]) == prop.roots(out.segs):
                shape[j] = -1
        return {"shape": shape, "batched": False}
    return {"shape": shape, "batched": True}
