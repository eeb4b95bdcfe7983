"""Weight-standardised convolutions (timm's ``StdConv2d``, ``ScaledStdConv2d`` and their ``Same`` forms: BiT
ResNet-V2, NFNets, hybrid ViT stems).

Each output channel's weight is standardised over its inputs (input channels per group x kernel) before the
convolution, so pruning input channels changes the statistics: the slim convolution standardises over the kept
inputs, and the masked model's stand-in (:class:`MaskedStdConv2d`) does the same over the kept slice of weight
axis 1. ``ScaledStdConv2d``'s ``scale`` (gamma / sqrt(fan-in)) stays the dense one in both. Output channels
prune as for a plain convolution; the latency op is the convolution's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..space.values import Chan
from .conv import conv2d_channels, resize_conv2d
from .masked_norm import KeepMask
from .registry import LayerKind, builtin
from .rules import bind

if TYPE_CHECKING:
    from ..space.channels import Propagation


def stdconv2d_channels(prop: Propagation, node: fx.Node, m: nn.Conv2d) -> Chan:
    """A convolution's channels; its weight's input axis (the kept inputs its statistics run over) is recorded as
    normalised, so the masked model restricts the standardisation to it."""
    out = conv2d_channels(prop, node, m)
    if getattr(m, "gain", None) is not None:
        bind(prop, node, "gain", 0, out.segs, "out")
    inputs = prop.bindings.get(f"{node.target}.weight", {}).get(1)
    if inputs is not None:  # (a depthwise convolution standardises over its kernel alone)
        prop.normalized[str(node.target)] = inputs
    return out


class MaskedStdConv2d(KeepMask):
    """The masked model's weight-standardised convolution: statistics over the kept inputs (``set_keep``: a mask
    over weight axis 1) only, as the slim convolution computes them; the same tensor names as the original."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.weight.shape[1], conv.weight.device)
        self.weight, self.bias, self.gain = conv.weight, conv.bias, getattr(conv, "gain", None)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.kernel_size, self.same_pad = conv.kernel_size, getattr(conv, "same_pad", False)
        self.eps, self.scale = conv.eps, getattr(conv, "scale", 1.0)

    def standardised(self) -> torch.Tensor:
        w = self.weight
        m = self.keep.to(w.dtype).view(1, -1, 1, 1).expand_as(w).reshape(w.shape[0], -1)
        flat = w.reshape(w.shape[0], -1)
        n = m.sum(1, keepdim=True)
        mean = (flat * m).sum(1, keepdim=True) / n
        var = ((flat - mean) ** 2 * m).sum(1, keepdim=True) / n
        out = (flat - mean) * torch.rsqrt(var + self.eps)
        if self.gain is not None:
            out = out * (self.gain * self.scale).view(-1, 1)
        return (out * m).reshape_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:  # TensorFlow's SAME padding, computed from the input's size
            from timm.layers.padding import pad_same

            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardised(), self.bias, self.stride, self.padding, self.dilation, self.groups)


_T = "timm.layers.std_conv."
STDCONV2D = builtin(LayerKind(
    "stdconv2d", tuple(f"{_T}{n}" for n in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")),
    stdconv2d_channels, resize_conv2d, masked=MaskedStdConv2d))
