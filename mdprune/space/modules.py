"""Channel rules for the leaf modules mdprune knows: convolutions, linear layers, norms and pass-throughs."""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from .errors import AnalysisError, where
from .functions import elementwise_along, flatten_value, mark_normalized
from .values import Chan, RawSeg

if TYPE_CHECKING:
    from .channels import Propagation

Rule = Callable[["Propagation", fx.Node, nn.Module], Any]

# Element-wise modules: every channel maps to itself.
_PASS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.CELU, nn.SELU, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.AlphaDropout,
)
# Spatial modules on NCHW tensors: channels stay on axis 1.
_SPATIAL = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d,
)
# Library modules that are element-wise by construction (activations, drop layers); their own forwards call
# helpers or autograd Functions, so they are named here rather than traced.
_LIBRARY_PASS = (
    "timm.layers.DropPath", "torchvision.ops.StochasticDepth",
    *(f"timm.layers.activations.{n}" for n in (
        "Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish", "PReLU", "GELU", "GELUTanh",
        "QuickGELU")),
    *(f"timm.layers.activations_me.{n}" for n in ("SwishMe", "MishMe", "HardSigmoidMe", "HardSwishMe", "HardMishMe")),
)


def _import(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # optional libraries, other versions
        return None


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
        out = _grouped(prop, node, m, x)
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


def _grouped(prop: Propagation, node: fx.Node, m: nn.Conv2d, x: Chan) -> tuple[RawSeg, ...]:
    """A grouped convolution: channels are groups x width per group (group-major) on both sides.

    The group count is fixed; the width per group is a dimension on each side (the same count kept in every
    group). The input's layout is refined to match (a 1x1 convolution's output becomes groups x width).
    """
    name, g = node.target, m.groups
    groups = prop.new_space(g, "channel", f"{name}:groups", protected=f"group count of {name} (groups={g})")

    def per_group(width: int, label: str) -> tuple[int, ...]:
        if width == 1:
            return (groups,)
        w = prop.new_space(width, "channel", label)
        prop.spaces[w].repeat = g
        return (groups, w)

    inp = per_group(m.in_channels // g, f"{name}:in")
    prop.unify(x.segs, (RawSeg(inp),), node)
    if len(inp) == 2:
        prop.bind(f"{name}.weight", 1, (RawSeg(inp[1:]),), node, "in")
    return (RawSeg(per_group(m.out_channels // g, name)),)


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


def _per_channel(prop: Propagation, node: fx.Node, m: nn.Module, roles: dict[str, str]) -> Chan:
    """A norm whose tensors (``roles``: name -> role) each hold one value per channel of axis 1."""
    x, shape = chan_input(prop, node, "channels")
    _require_axis(node, x, 1, shape, "channels")
    for t, role in roles.items():
        if getattr(m, t, None) is not None:
            prop.bind(f"{node.target}.{t}", 0, x.segs, node, role)
    return x


def _batchnorm(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:
    return _per_channel(prop, node, m, {"weight": "affine", "bias": "affine", "running_mean": "stat",
                                        "running_var": "stat"})


def _frozen_batchnorm(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:
    """torchvision's / timm's FrozenBatchNorm2d: buffers only, so no gradient reads them (role ``stat``)."""
    return _per_channel(prop, node, m, dict.fromkeys(("weight", "bias", "running_mean", "running_var"), "stat"))


def _groupnorm(prop: Propagation, node: fx.Node, m: nn.GroupNorm) -> Chan:
    """One group per channel normalises each channel alone; other groupings keep the channels whole."""
    x = _per_channel(prop, node, m, {"weight": "affine", "bias": "affine"})
    if m.num_groups != m.num_channels:
        prop.protect(x.segs, f"GroupNorm {node.target} ({m.num_groups} groups of {m.num_channels} channels)")
    return x


def _layernorm(prop: Propagation, node: fx.Node, m: nn.LayerNorm) -> Chan:
    x, shape = chan_input(prop, node, "features")
    if len(m.normalized_shape) != 1:
        raise AnalysisError(f"{where(node)} normalises over {len(m.normalized_shape)} axes; only 1 is supported")
    _require_axis(node, x, -1, shape, "features")
    for t in ("weight", "bias"):
        if getattr(m, t, None) is not None:
            prop.bind(f"{node.target}.{t}", 0, x.segs, node, "norm")
    mark_normalized(prop, node.target, x.segs)
    return x


def _layerscale(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:
    x, shape = chan_input(prop, node, "features")
    _require_axis(node, x, -1, shape, "features")
    prop.bind(f"{node.target}.gamma", 0, x.segs, node, "affine")
    return x


def _layerscale2d(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:
    return _per_channel(prop, node, m, {"gamma": "affine"})


def _norm_act(norm: Rule) -> Rule:
    """timm's norm + drop + activation modules: the norm's rule; their drop and act pass channels through."""

    def rule(prop: Propagation, node: fx.Node, m: nn.Module) -> Any:
        return norm(prop, node, m)

    rule.__name__ = f"{norm.__name__}_act"
    rule.norm_act = True  # type: ignore[attr-defined]  # module_rule checks its drop and act
    return rule


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


# Library types a rule knows although their classes override forward (same computation: timm's Linear and
# LayerNorm; norm + drop + act modules whose drop and act are parameter-free pass-throughs).
_LIBRARY: dict[str, Rule] = {
    "timm.layers.Linear": _linear,  # casts its weight's dtype when scripted
    "timm.layers.LayerNorm": _layernorm,
    "timm.layers.GroupNorm": _groupnorm,
    "timm.layers.GroupNorm1": _groupnorm,
    "timm.layers.LayerScale": _layerscale,
    "timm.layers.LayerScale2d": _layerscale2d,
    "torchvision.ops.misc.FrozenBatchNorm2d": _frozen_batchnorm,
    "timm.layers.norm_act.BatchNormAct2d": _norm_act(_batchnorm),
    "timm.layers.norm_act.SyncBatchNormAct": _norm_act(_batchnorm),
    "timm.layers.norm_act.FrozenBatchNormAct2d": _norm_act(_frozen_batchnorm),
    "timm.layers.norm_act.GroupNormAct": _norm_act(_groupnorm),
    "timm.layers.norm_act.GroupNorm1Act": _norm_act(_groupnorm),
    "timm.layers.norm_act.LayerNormAct": _norm_act(_layernorm),
    **dict.fromkeys(_LIBRARY_PASS, _passthrough),
}
# nn.Module's own methods do not change what a forward computes, except these
_MODULE_API = frozenset(dir(nn.Module)) - {"forward", "__call__", "_call_impl", "_wrapped_call_impl", "__getattr__",
                                           "__getattribute__"}
_HARMLESS = frozenset({"reset_parameters", "reset_running_stats", "_check_input_dim"})  # set-up and checks only


@functools.cache
def _rules() -> dict[type, Rule]:
    """Classes with a rule: torch's base classes, and the library classes importable here."""
    rules: dict[type, Rule] = {
        nn.Conv2d: _conv2d, nn.Linear: _linear, nn.modules.batchnorm._BatchNorm: _batchnorm,
        nn.SyncBatchNorm: _batchnorm, nn.GroupNorm: _groupnorm, nn.LayerNorm: _layernorm,
        nn.Flatten: _flatten_module, nn.Softmax: _softmax,
    }
    rules.update(dict.fromkeys(_PASS, _passthrough))
    rules.update(dict.fromkeys(_SPATIAL, _spatial))
    for path, rule in _LIBRARY.items():
        if (t := _import(path)) is not None:
            rules[t] = rule
    return rules


def _covers(cls: type, base: type) -> bool:
    """Whether ``cls`` runs ``base``'s computation: it overrides no method of ``base`` that a forward may use."""
    for k in cls.__mro__[:cls.__mro__.index(base)]:
        for name, v in vars(k).items():
            method = callable(v) or isinstance(v, (staticmethod, classmethod, property))
            if method and hasattr(base, name) and name not in _MODULE_API and name not in _HARMLESS:
                return False
    return True


def _elementwise(m: nn.Module | None) -> bool:
    return m is None or (module_rule(m) is _passthrough and next(m.parameters(), None) is None)


def module_rule(m: nn.Module) -> Rule | None:
    """The channel rule of a leaf module, or None if mdprune does not know it.

    A class matches the rule of its nearest ancestor that has one, provided it overrides nothing that ancestor's
    forward uses; other subclasses (a BatchNorm whose forward adds an activation, ...) are traced into.
    """
    rules = _rules()
    cls = type(m)
    base = next((k for k in cls.__mro__ if k in rules), None)
    if base is None or not _covers(cls, base):
        return None
    rule = rules[base]
    if getattr(rule, "norm_act", False) and not all(_elementwise(getattr(m, a, None)) for a in ("drop", "act")):
        return None  # a norm + activation whose activation mdprune does not know: traced into
    return rule


def is_known_leaf(m: nn.Module) -> bool:
    """Modules traced as one node: those with a rule (a subclass with its own forward is traced into)."""
    return module_rule(m) is not None
