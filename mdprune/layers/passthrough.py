"""Layers that pass channels through: activations, dropout, pooling and other spatial layers, PReLU (one weight
per channel), flatten and softmax. None changes size in the slim model except PReLU."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from ..space.functions import elementwise_along, flatten_value
from ..space.values import Chan
from .registry import LayerKind, builtin
from .rules import bind, input_channels

if TYPE_CHECKING:
    from ..space.channels import Propagation

# Element-wise modules: every channel maps to itself.
_PASS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.CELU, nn.SELU, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.AlphaDropout,
)
# Library modules that are element-wise by construction (activations, drop layers); their own forwards call
# helpers or autograd Functions, so they are named here rather than traced.
_LIBRARY_PASS = (
    "timm.layers.DropPath", "torchvision.ops.StochasticDepth",
    *(f"timm.layers.activations.{n}" for n in (
        "Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish", "GELU", "GELUTanh",
        "QuickGELU")),
    *(f"timm.layers.activations_me.{n}" for n in ("SwishMe", "MishMe", "HardSigmoidMe", "HardSwishMe", "HardMishMe")),
)
# Spatial modules on NCHW (and NCL) tensors: channels stay on axis 1.
_SPATIAL = (
    nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d,
    nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
    nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, *((nn.CircularPad2d,) if hasattr(nn, "CircularPad2d")
                                                                 else ()),
)  # (the 2d pads pad the last two axes only)


def passthrough_channels(prop: Propagation, node: fx.Node, m: nn.Module) -> Any:
    """Every channel maps to itself, on whichever axis it is."""
    return prop.value(node.args[0])


def prelu_channels(prop: Propagation, node: fx.Node, m: nn.PReLU) -> Any:
    """A PReLU with one weight per channel (axis 1) binds it; with one shared weight it passes through."""
    if m.num_parameters > 1:
        x = input_channels(prop, node, 1)
        bind(prop, node, "weight", 0, x.segs, "affine")
        return x
    return prop.value(node.args[0])


def resize_prelu(new: nn.PReLU, old: nn.PReLU) -> None:
    new.num_parameters = new.weight.shape[0]


def spatial_channels(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:
    return input_channels(prop, node, 1)


def unfold_channels(prop: Propagation, node: fx.Node, m: nn.Unfold) -> Chan:
    """``nn.Unfold``: (N, C, H, W) -> (N, C x kh x kw, L), channel-major: each channel widened by its patch."""
    kh, kw = (m.kernel_size, m.kernel_size) if isinstance(m.kernel_size, int) else m.kernel_size
    return input_channels(prop, node, 1).widened(kh * kw)


def flatten_channels(prop: Propagation, node: fx.Node, m: nn.Flatten) -> Any:
    return flatten_value(prop, node, node.args[0], m.start_dim, m.end_dim)


def softmax_channels(prop: Propagation, node: fx.Node, m: nn.Softmax) -> Any:
    return elementwise_along(prop, node, node.args[0], m.dim)


builtin(LayerKind("passthrough", (*_PASS, *_LIBRARY_PASS), passthrough_channels))
builtin(LayerKind("prelu", (nn.PReLU, "timm.layers.activations.PReLU"), prelu_channels, resize_prelu))
builtin(LayerKind("spatial", _SPATIAL, spatial_channels))
builtin(LayerKind("flatten", (nn.Flatten,), flatten_channels))
builtin(LayerKind("unfold", (nn.Unfold,), unfold_channels))
builtin(LayerKind("softmax", (nn.Softmax,), softmax_channels))
