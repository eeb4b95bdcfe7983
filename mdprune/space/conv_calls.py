"""Convolutions called as functions (``F.conv2d(x, self.filt, groups=C)``): anti-aliasing blur pools (TResNet,
ResNet-AA), fixed filters and hand-written layers whose weight is a parameter or buffer of the model.

A depthwise call keeps its input's channels (its weight's axis 0 and bias follow them; a literal ``groups``
becomes a patched literal); a dense call (``groups=1``) reads its input's channels on weight axis 1 and makes
new output channels. Both record the same latency op as ``nn.Conv2d``. Other group counts are refused.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch.fx as fx

from .errors import AnalysisError, owner, where
from .values import Chan, ParamRef, RawSeg

if TYPE_CHECKING:
    from .channels import Propagation

# F.conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _arg(node: fx.Node, name: str) -> Any:
    i = _ARGS.index(name)
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, _DEFAULTS.get(name))


def _pair(v: Any) -> Any:
    return v if isinstance(v, str) else tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _bind_own_axis(prop: Propagation, node: fx.Node, v: Any, axis: int, segs: tuple[RawSeg, ...], role: str) -> bool:
    """Bind axis ``axis`` of the value ``v`` when it is a tensor's own axis (not one broadcast from size 1)."""
    if not isinstance(v, ParamRef) or v.axes[axis] is None:
        return False
    tensor = functools.reduce(getattr, v.tensor.split("."), prop.gm)
    if tensor.shape[v.axes[axis]] == 1 and prop.width(segs) != 1:
        return False  # a filter shared by every channel (``filt.expand(C, 1, k, k)``)
    prop.bind(v.tensor, v.axes[axis], segs, node, role)
    return True


def conv2d_call(prop: Propagation, node: fx.Node) -> Any:
    """``F.conv2d`` / ``torch.conv2d`` on a tensor whose channels mdprune follows."""
    x_node, w_node = _arg(node, "input"), _arg(node, "weight")
    x, w, bias = prop.value(x_node), prop.value(w_node), prop.value(_arg(node, "bias"))
    if not isinstance(x, Chan):
        if isinstance(w, Chan) or isinstance(bias, Chan):
            raise AnalysisError(f"{where(node)} convolves with a weight computed from channels; not supported")
        return None  # an image or another channel-free tensor: its output is too
    if x.axis != 1:
        raise AnalysisError(f"{where(node)} convolves a tensor whose channels are not on axis 1; not supported")
    in_shape, w_shape, out_shape = x_node.meta["mdp_shape"], w_node.meta["mdp_shape"], node.meta["mdp_shape"]
    cout, per_group = w_shape[0], w_shape[1]
    groups = in_shape[1] // per_group
    if not isinstance(w, ParamRef) and w is not None:
        raise AnalysisError(f"{where(node)} convolves with a weight mdprune cannot follow; not supported")
    if groups == in_shape[1] and cout == groups:  # depthwise: the input's channels go through
        out = x.segs
        if isinstance(_arg(node, "groups"), int):
            prop.patch(node, _ARGS.index("groups"), out, keyword="groups")
        if not _bind_own_axis(prop, node, w, 0, out, "out") and not isinstance(_arg(node, "groups"), fx.Node):
            prop.protect(out, f"{where(node)} convolves with a weight whose channel count mdprune cannot follow")
    elif groups == 1:
        if not _bind_own_axis(prop, node, w, 1, x.segs, "in"):
            prop.protect(x.segs, f"{where(node)} convolves with a weight mdprune cannot follow")
        out = (RawSeg((prop.new_space(cout, "channel", owner(node) or node.name),)),)
        if not _bind_own_axis(prop, node, w, 0, out, "out"):
            prop.protect(out, f"{where(node)} makes channels from a weight mdprune cannot follow")
    else:
        raise AnalysisError(f"{where(node)} is a grouped convolution call ({groups} groups); not supported")
    if bias is not None and not _bind_own_axis(prop, node, bias, 0, out, "out"):
        prop.protect(out, f"{where(node)} adds a bias mdprune cannot follow")
    depthwise = groups > 1
    fixed = {"kernel": tuple(w_shape[2:]), "stride": _pair(_arg(node, "stride")),
             "padding": _pair(_arg(node, "padding")), "dilation": _pair(_arg(node, "dilation")),
             "groups": 1, "depthwise": depthwise, "bias": bias is not None or _arg(node, "bias") is not None,
             "in_hw": tuple(in_shape[2:]), "out_hw": tuple(out_shape[2:]), "batch": in_shape[0]}
    name = f"{owner(node)}.{node.name}" if owner(node) else node.name
    prop.add_op(name, "conv2d", {"in": x.segs, "out": out}, fixed, node)
    return Chan(1, out)


CONV_RULES = {"conv2d": conv2d_call}
