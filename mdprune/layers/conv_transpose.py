"""Transposed convolutions (``nn.ConvTranspose2d``, groups=1): the upsampling layers of mask and keypoint heads,
decoders and segmentation necks. Their channel rule, slim resize and latency op.

The weight is laid out ``(in, out, kh, kw)``: input channels on axis 0, output channels on axis 1 (the reverse
of a convolution's). Grouped and depthwise transposed convolutions are not this kind: the analysis names them as
unsupported, to be kept whole (``unsupported="keep"``, ``ignored_layers``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from ..space.values import Chan
from .epilogues import with_epilogue
from .registry import LatencyOp, LayerKind, builtin
from .rules import add_op, bind, chan_input, new_channels, require_axis

if TYPE_CHECKING:
    from ..space.channels import Propagation


def conv_transpose2d_channels(prop: Propagation, node: fx.Node, m: nn.ConvTranspose2d) -> Chan:
    """Input channels on weight axis 0; new output channels on weight axis 1 (and the bias)."""
    x, in_shape = chan_input(prop, node, "channels")
    require_axis(node, x, 1, in_shape)
    bind(prop, node, "weight", 0, x.segs, "in")
    out = new_channels(prop, node, m.out_channels)
    bind(prop, node, "weight", 1, out, "out")
    if m.bias is not None:
        bind(prop, node, "bias", 0, out, "out")
    out_hw = tuple(node.meta["mdp_shape"][2:])
    fixed = {
        "kernel": tuple(m.kernel_size), "stride": tuple(m.stride), "padding": tuple(m.padding),
        "dilation": tuple(m.dilation), "output_padding": _output_padding(m, in_shape[2:], out_hw),
        "bias": m.bias is not None, "in_hw": tuple(in_shape[2:]), "out_hw": out_hw, "batch": in_shape[0],
    }
    add_op(prop, node, {"in": x, "out": out}, fixed)
    return Chan(1, out)


def _output_padding(m: nn.ConvTranspose2d, in_hw: tuple[int, ...], out_hw: tuple[int, ...]) -> tuple[int, ...]:
    """The output padding that gives the size the layer produced (a forward given ``output_size`` picks its own)."""
    sizes = zip(in_hw, out_hw, m.stride, m.padding, m.dilation, m.kernel_size, strict=True)
    return tuple(o - ((i - 1) * s - 2 * p + d * (k - 1) + 1) for i, o, s, p, d, k in sizes)


def resize_conv_transpose2d(new: nn.ConvTranspose2d, old: nn.ConvTranspose2d) -> None:
    new.in_channels, new.out_channels = new.weight.shape[0], new.weight.shape[1]


def build_conv_transpose2d(fixed: dict[str, Any], w: dict[str, int], batch: int
                           ) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    conv = nn.ConvTranspose2d(w["in"], w["out"], fixed["kernel"], fixed["stride"], fixed["padding"],
                              fixed["output_padding"], bias=fixed["bias"], dilation=fixed["dilation"])
    return with_epilogue(conv, fixed, w["out"]), (torch.randn(batch, w["in"], *fixed["in_hw"]),)


def conv_transpose2d_macs(f: dict[str, Any], w: dict[str, int]) -> int:
    kh, kw = f["kernel"]
    return f["batch"] * f["in_hw"][0] * f["in_hw"][1] * w["in"] * w["out"] * kh * kw  # every input pixel, every tap


CONV_TRANSPOSE2D = builtin(LayerKind(
    "conv_transpose2d", (nn.ConvTranspose2d,), conv_transpose2d_channels, resize_conv_transpose2d,
    LatencyOp(("in", "out"), build_conv_transpose2d, conv_transpose2d_macs),
    accepts=lambda m: m.groups == 1 and m.padding_mode == "zeros"))
