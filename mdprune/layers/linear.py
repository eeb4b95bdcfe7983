"""Linear layers (``nn.Linear``, timm's ``Linear``): their channel rule, slim resize and latency op."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from ..space.values import Chan
from .epilogues import with_epilogue
from .registry import LatencyOp, LayerKind, builtin
from .rules import add_op, bind, chan_or_fixed_input, new_channels, require_axis, tokens_and_batch

if TYPE_CHECKING:
    from ..space.channels import Propagation


def linear_fixed(prop: Propagation, in_shape: tuple[int, ...], bias: bool) -> dict[str, Any]:
    """Fixed signature of a linear layer applied to a tensor of ``in_shape`` (features last)."""
    tokens, batch = tokens_and_batch(prop, in_shape)
    fixed = {"tokens": tokens, "batch": batch, "bias": bias, "rank": len(in_shape)}
    if len(in_shape) == 2 and tokens > 1:  # (rows, features) with several rows per image: RoI heads' boxes
        fixed["rows"] = True  # (also keeps table entries timed at one row per image before this from being reused)
    return fixed


def linear_channels(prop: Propagation, node: fx.Node, m: nn.Linear) -> Chan:
    """Input features on weight axis 1; new output features (kind ``mlp`` on token sequences). A linear layer
    whose input carries its channels on another axis mixes along that last axis (MLP-Mixer's token MLP over
    ``x.transpose(1, 2)``): the channels pass through, its weights keep their widths (see :func:`_across`)."""
    x, in_shape = chan_or_fixed_input(prop, node, "features", -1)
    if x.axis != len(in_shape) - 1:
        return _across(prop, node, m, x, in_shape)
    require_axis(node, x, -1, in_shape, "features")
    bind(prop, node, "weight", 1, x.segs, "in")
    out = new_channels(prop, node, m.out_features, "mlp" if len(in_shape) >= 3 else "linear")
    bind(prop, node, "weight", 0, out, "out")
    if m.bias is not None:
        bind(prop, node, "bias", 0, out, "out")
    add_op(prop, node, {"in": x, "out": out}, linear_fixed(prop, in_shape, m.bias is not None), "linear")
    return Chan(len(in_shape) - 1, out)


def _across(prop: Propagation, node: fx.Node, m: nn.Linear, x: Chan, in_shape: tuple[int, ...]) -> Chan:
    """The layer applied to every channel's row alike: its latency op scales with the channel count."""
    batch = in_shape[0] if x.axis > 0 else 1
    other = math.prod(n for i, n in enumerate(in_shape[:-1]) if i != x.axis) // batch
    fixed = {"in": m.in_features, "out": m.out_features, "bias": m.bias is not None, "per_channel": other,
             "batch": batch}
    add_op(prop, node, {"rows": x}, fixed, "linear_across")
    return Chan(x.axis, x.segs)


def build_across(fixed: dict[str, Any], w: dict[str, int], batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    lin = nn.Linear(fixed["in"], fixed["out"], bias=fixed["bias"])
    return lin, (torch.randn(batch, w["rows"] * fixed["per_channel"], fixed["in"]),)


def across_macs(f: dict[str, Any], w: dict[str, int]) -> int:
    return f["batch"] * f["per_channel"] * w["rows"] * f["in"] * f["out"]


def resize_linear(new: nn.Linear, old: nn.Linear) -> None:
    new.out_features, new.in_features = new.weight.shape


def build_linear(fixed: dict[str, Any], w: dict[str, int], batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    lin = nn.Linear(w["in"], w["out"], bias=fixed["bias"])
    shape = (batch * fixed["tokens"], w["in"]) if fixed.get("rank", 3) == 2 else (batch, fixed["tokens"], w["in"])
    return with_epilogue(lin, fixed, w["out"]), (torch.randn(shape),)


def linear_macs(f: dict[str, Any], w: dict[str, int]) -> int:
    return f["batch"] * f["tokens"] * w["in"] * w["out"]


LINEAR = builtin(LayerKind("linear", (nn.Linear, "timm.layers.Linear"), linear_channels, resize_linear,
                           LatencyOp(("in", "out"), build_linear, linear_macs)))


def _never(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:  # the op kind below covers no module type
    raise AssertionError("linear_across is added by the Linear rule only")


LINEAR_ACROSS = builtin(LayerKind("linear_across", (), _never,
                                  latency=LatencyOp(("rows",), build_across, across_macs)))
