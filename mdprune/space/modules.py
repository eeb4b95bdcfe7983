"""Channel rules for the leaf modules mdprune knows: convolutions, linear layers, norms and pass-throughs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from .errors import AnalysisError, where
from .functions import elementwise_along, flatten_value
from .values import Chan, RawSeg

if TYPE_CHECKING:
    from .channels import Propagation

Rule = Callable[["Propagation", fx.Node, nn.Module], Any]

# Element-wise modules: every channel maps to itself.
_PASS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout2d,
)
# Spatial modules on NCHW tensors: channels stay on axis 1.
_SPATIAL = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d,
)


def _timm_types() -> dict[str, type]:
    try:
        from timm.layers import DropPath, LayerNorm, LayerScale
    except ImportError:  # timm is optional at analysis time
        return {}
    return {"DropPath": DropPath, "LayerNorm": LayerNorm, "LayerScale": LayerScale}


_TIMM = _timm_types()


def chan_input(prop: Propagation, node: fx.Node, what: str) -> tuple[Chan, tuple[int, ...]]:
    """The channel value of a node's first argument, with its shape; an error if it has none."""
    arg = node.args[0]
    v = prop.value(arg)
    if not isinstance(v, Chan):
        raise AnalysisError(f"{where(node)}: cannot tell which axis of its input carries {what}")
    return v, arg.meta["mdp_shape"]


def _require_axis(node: fx.Node, x: Chan, axis: int, shape: tuple[int, ...], what: str) -> None:
    if x.axis != axis % len(shape):
        raise AnalysisError(f"{where(node)} expects {what} on axis {axis}, but they are on axis {x.axis}")


def _conv2d(prop: Propagation, node: fx.Node, m: nn.Conv2d) -> Chan:
    x, in_shape = chan_input(prop, node, "channels")
    _require_axis(node, x, 1, in_shape, "channels")
    name = node.target
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    if m.groups == 1:
        prop.bind(f"{name}.weight", 1, x.segs, node, "in")
        out = (RawSeg((prop.new_space(m.out_channels, "channel", name),)),)
    elif depthwise:
        out = x.segs  # a depthwise convolution keeps its input's channels
    else:
        reason = f"grouped convolution {name} (groups={m.groups})"
        prop.protect(x.segs, reason)
        out = (RawSeg((prop.new_space(m.out_channels, "channel", name, protected=reason),)),)
    prop.bind(f"{name}.weight", 0, out, node, "out")
    if m.bias is not None:
        prop.bind(f"{name}.bias", 0, out, node, "out")
    out_shape = node.meta["mdp_shape"]
    fixed = {
        "kernel": tuple(m.kernel_size), "stride": tuple(m.stride), "padding": _padding(m),
        "dilation": tuple(m.dilation), "groups": m.groups, "depthwise": depthwise, "bias": m.bias is not None,
        "in_hw": tuple(in_shape[2:]), "out_hw": tuple(out_shape[2:]), "batch": in_shape[0],
    }
    prop.add_op(name, "conv2d", {"in": x.segs, "out": out}, fixed, node)
    return Chan(1, out)


def _padding(m: nn.Conv2d) -> Any:
    return m.padding if isinstance(m.padding, str) else tuple(m.padding)


def linear_fixed(prop: Propagation, in_shape: tuple[int, ...], bias: bool) -> dict[str, Any]:
    """Fixed signature of a linear layer applied to a tensor of ``in_shape`` (features last)."""
    rows = math.prod(in_shape[:-1])
    batch = prop.batch if prop.batch and rows % prop.batch == 0 else 1
    return {"tokens": rows // batch, "batch": batch, "bias": bias, "rank": len(in_shape)}


def _linear(prop: Propagation, node: fx.Node, m: nn.Linear) -> Chan:
    x, in_shape = chan_input(prop, node, "features")
    _require_axis(node, x, -1, in_shape, "features")
    name = node.target
    prop.bind(f"{name}.weight", 1, x.segs, node, "in")
    kind = "mlp" if len(in_shape) >= 3 else "linear"
    out = (RawSeg((prop.new_space(m.out_features, kind, name),)),)
    prop.bind(f"{name}.weight", 0, out, node, "out")
    if m.bias is not None:
        prop.bind(f"{name}.bias", 0, out, node, "out")
    prop.add_op(name, "linear", {"in": x.segs, "out": out}, linear_fixed(prop, in_shape, m.bias is not None),
                node)
    return Chan(len(in_shape) - 1, out)


def _batchnorm(prop: Propagation, node: fx.Node, m: nn.modules.batchnorm._BatchNorm) -> Chan:
    x, shape = chan_input(prop, node, "channels")
    _require_axis(node, x, 1, shape, "channels")
    for t in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, t, None) is not None:
            prop.bind(f"{node.target}.{t}", 0, x.segs, node, "affine" if t in ("weight", "bias") else "stat")
    return x


def _layernorm(prop: Propagation, node: fx.Node, m: nn.LayerNorm) -> Chan:
    x, shape = chan_input(prop, node, "features")
    if len(m.normalized_shape) != 1:
        raise AnalysisError(f"{where(node)} normalises over {len(m.normalized_shape)} axes; only 1 is supported")
    _require_axis(node, x, -1, shape, "features")
    for t in ("weight", "bias"):
        if getattr(m, t, None) is not None:
            prop.bind(f"{node.target}.{t}", 0, x.segs, node, "norm")
    prop.normalized[node.target] = x.segs
    for s in x.segs:
        for i in s.spaces:
            prop.spaces[prop.find(i)].normalized = True
    return x


def _layerscale(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:
    x, shape = chan_input(prop, node, "features")
    _require_axis(node, x, -1, shape, "features")
    prop.bind(f"{node.target}.gamma", 0, x.segs, node, "affine")
    return x


def _passthrough(prop: Propagation, node: fx.Node, m: nn.Module) -> Any:
    if isinstance(m, nn.PReLU) and m.num_parameters > 1:
        x, shape = chan_input(prop, node, "channels")
        _require_axis(node, x, 1, shape, "channels")
        prop.bind(f"{node.target}.weight", 0, x.segs, node, "affine")
        return x
    return prop.value(node.args[0])


def _spatial(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:
    x, shape = chan_input(prop, node, "channels")
    _require_axis(node, x, 1, shape, "channels")
    return x


def _flatten_module(prop: Propagation, node: fx.Node, m: nn.Flatten) -> Any:
    return flatten_value(prop, node, node.args[0], m.start_dim, m.end_dim)


def _softmax(prop: Propagation, node: fx.Node, m: nn.Softmax) -> Any:
    return elementwise_along(prop, node, node.args[0], m.dim)


def module_rule(m: nn.Module) -> Rule | None:
    """The channel rule of a leaf module, or None if mdprune does not know it."""
    t = type(m)
    if t is nn.Conv2d:
        return _conv2d
    if t is nn.Linear or t is nn.modules.linear.NonDynamicallyQuantizableLinear:
        return _linear
    if t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm):
        return _batchnorm
    if t is nn.LayerNorm or t is _TIMM.get("LayerNorm"):
        return _layernorm
    if t is _TIMM.get("LayerScale"):
        return _layerscale
    if t in _PASS or t is _TIMM.get("DropPath"):
        return _passthrough
    if t in _SPATIAL:
        return _spatial
    if t is nn.Flatten:
        return _flatten_module
    if t is nn.Softmax:
        return _softmax
    return None


def is_known_leaf(m: nn.Module) -> bool:
    """Modules traced as one node: those with a rule (exact types, so a subclass's own forward is traced)."""
    return module_rule(m) is not None
