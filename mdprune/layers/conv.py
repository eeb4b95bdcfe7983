"""Convolutions (``nn.Conv2d``, and ``nn.Conv3d`` of video models by the same rule): dense, depthwise and
grouped; their slim resize and latency op."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from ..space.values import Chan, RawSeg
from .epilogues import with_epilogue
from .registry import LatencyOp, LayerKind, builtin
from .rules import Segs, add_op, bind, chan_or_fixed_input, new_channels

if TYPE_CHECKING:
    from ..space.channels import Propagation


def _depthwise(m: nn.Conv2d) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


def conv2d_channels(prop: Propagation, node: fx.Node, m: nn.Conv2d) -> Chan:
    """Dense: new output channels, input channels on weight axis 1. Depthwise: its input's channels.
    Grouped: groups x width per group on both sides (see :func:`_grouped`)."""
    x, in_shape = chan_or_fixed_input(prop, node, "channels", 1, positions_elsewhere=True)
    depthwise = _depthwise(m)
    if m.groups == 1:
        bind(prop, node, "weight", 1, x.segs, "in")
        out = new_channels(prop, node, m.out_channels)
    elif depthwise:
        out = x.segs  # a depthwise convolution keeps its input's channels
    else:
        out = _grouped(prop, node, m, x)
    bind(prop, node, "weight", 0, out, "out")
    if m.bias is not None:
        bind(prop, node, "bias", 0, out, "out")
    out_shape = node.meta["mdp_shape"]
    fixed = {
        "kernel": tuple(m.kernel_size), "stride": tuple(m.stride), "padding": _padding(m),
        "dilation": tuple(m.dilation), "groups": m.groups, "depthwise": depthwise, "bias": m.bias is not None,
        "in_hw": tuple(in_shape[2:]), "out_hw": tuple(out_shape[2:]), "batch": in_shape[0],
    }
    add_op(prop, node, {"in": x, "out": out}, fixed, "conv3d" if isinstance(m, nn.Conv3d) else "conv2d")
    return Chan(1, out)


def _grouped(prop: Propagation, node: fx.Node, m: nn.Conv2d, x: Chan) -> Segs:
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
        bind(prop, node, "weight", 1, (RawSeg(inp[1:]),), "in")
    return (RawSeg(per_group(m.out_channels // g, name)),)


def _padding(m: nn.Conv2d) -> Any:
    return m.padding if isinstance(m.padding, str) else tuple(m.padding)


def resize_conv2d(new: nn.Conv2d, old: nn.Conv2d) -> None:
    new.out_channels = new.weight.shape[0]
    if _depthwise(old):
        new.groups = new.in_channels = new.out_channels
    else:
        new.in_channels = new.weight.shape[1] * new.groups


def build_conv2d(fixed: dict[str, Any], w: dict[str, int], batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    cin, cout = w["in"], w["out"]
    if fixed["depthwise"]:
        groups = cin
        if cin != cout:
            raise ValueError(f"a depthwise convolution keeps in == out widths, got {cin} and {cout}")
    else:
        groups = fixed["groups"]
    cls = nn.Conv3d if len(fixed["kernel"]) == 3 else nn.Conv2d
    conv = cls(cin, cout, fixed["kernel"], fixed["stride"], fixed["padding"], fixed["dilation"], groups,
               bias=fixed["bias"])
    return with_epilogue(conv, fixed, cout), (torch.randn(batch, cin, *fixed["in_hw"]),)


def conv2d_macs(f: dict[str, Any], w: dict[str, int]) -> int:
    per_out = math.prod(f["kernel"]) * (1 if f["depthwise"] else w["in"] // f["groups"])
    return f["batch"] * math.prod(f["out_hw"]) * w["out"] * per_out


CONV2D = builtin(LayerKind("conv2d", (nn.Conv2d,), conv2d_channels, resize_conv2d,
                           LatencyOp(("in", "out"), build_conv2d, conv2d_macs)))
CONV3D = builtin(LayerKind("conv3d", (nn.Conv3d,), conv2d_channels, resize_conv2d,
                           LatencyOp(("in", "out"), build_conv2d, conv2d_macs)))  # (in_hw, out_hw: three axes)
