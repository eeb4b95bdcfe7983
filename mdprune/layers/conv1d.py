"""One-dimensional convolutions (``nn.Conv1d``) in vision models, in their two uses.

- **Over channels as a sequence** (ECA attention: ``Conv1d(1, 1, k)`` slid along the pooled channel vector):
  each output channel mixes its neighbours, so removing a channel would change which channels are neighbours.
  Those channels are kept whole (protected, with the reason); its latency op (``conv1d_along_channels``) is
  the layer alone on a sequence of that many channels.
- **Over a sequence, channels on axis 1** (dense or depthwise): pruned like a convolution, weight
  ``(out, in, k)``, with a latency op of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from ..space.errors import AnalysisError, where
from ..space.values import Chan, RawSeg
from .epilogues import with_epilogue
from .registry import LatencyOp, LayerKind, builtin
from .rules import add_op, bind, chan_input, new_channels

if TYPE_CHECKING:
    from ..space.channels import Propagation


def conv1d_channels(prop: Propagation, node: fx.Node, m: nn.Conv1d) -> Chan:
    x, in_shape = chan_input(prop, node, "channels")
    if len(in_shape) == 3 and x.axis == 2 and m.in_channels == m.out_channels == 1:
        prop.protect(x.segs, f"convolved along by {node.target} (each channel mixes its neighbours)")
        fixed = {"kernel": m.kernel_size[0], "stride": m.stride[0], "padding": _pad(m), "dilation": m.dilation[0],
                 "bias": m.bias is not None, "batch": in_shape[0]}
        add_op(prop, node, {"width": x}, fixed, "conv1d_along_channels")
        out_len = node.meta["mdp_shape"][2]
        if out_len == in_shape[2]:
            return Chan(2, x.segs)
        # (a circularly padded input, ECA's CECA: as many outputs as channels before the padding) kept whole
        reason = f"{node.target} slides along channels and changes their count"
        return Chan(2, (RawSeg((prop.new_space(out_len, "channel", str(node.target), protected=reason),)),))
    if x.axis != 1:
        raise AnalysisError(f"{where(node)}: its input's channels are on axis {x.axis}, neither the convolution's "
                            "channels (axis 1) nor a single-channel sequence it slides along")
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    if m.groups > 1 and not depthwise:
        raise AnalysisError(f"{where(node)}: grouped Conv1d (groups={m.groups}) is not supported")
    if depthwise:
        out = x.segs
    else:
        bind(prop, node, "weight", 1, x.segs, "in")
        out = new_channels(prop, node, m.out_channels)
    bind(prop, node, "weight", 0, out, "out")
    if m.bias is not None:
        bind(prop, node, "bias", 0, out, "out")
    fixed = {"kernel": m.kernel_size[0], "stride": m.stride[0], "padding": _pad(m), "dilation": m.dilation[0],
             "depthwise": depthwise, "bias": m.bias is not None, "in_len": in_shape[2],
             "out_len": node.meta["mdp_shape"][2], "batch": in_shape[0]}
    add_op(prop, node, {"in": x, "out": out}, fixed)
    return Chan(1, out)


def _pad(m: nn.Conv1d) -> Any:
    return m.padding if isinstance(m.padding, str) else m.padding[0]


def resize_conv1d(new: nn.Conv1d, old: nn.Conv1d) -> None:
    new.out_channels = new.weight.shape[0]
    if old.groups > 1:  # depthwise
        new.groups = new.in_channels = new.out_channels
    else:
        new.in_channels = new.weight.shape[1]


def build_conv1d(fixed: dict[str, Any], w: dict[str, int], batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    groups = w["in"] if fixed["depthwise"] else 1
    conv = nn.Conv1d(w["in"], w["out"], fixed["kernel"], fixed["stride"], fixed["padding"], fixed["dilation"],
                     groups, bias=fixed["bias"])
    return with_epilogue(conv, fixed, w["out"]), (torch.randn(batch, w["in"], fixed["in_len"]),)


def conv1d_macs(f: dict[str, Any], w: dict[str, int]) -> int:
    per_out = f["kernel"] * (1 if f["depthwise"] else w["in"])
    return f["batch"] * f["out_len"] * w["out"] * per_out


CONV1D = builtin(LayerKind("conv1d", (nn.Conv1d,), conv1d_channels, resize_conv1d,
                           LatencyOp(("in", "out"), build_conv1d, conv1d_macs),
                           accepts=lambda m: m.padding_mode == "zeros"))


def build_along(fixed: dict[str, Any], w: dict[str, int], batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    conv = nn.Conv1d(1, 1, fixed["kernel"], fixed["stride"], fixed["padding"], fixed["dilation"], bias=fixed["bias"])
    return conv, (torch.randn(batch, 1, w["width"]),)


def along_macs(f: dict[str, Any], w: dict[str, int]) -> int:
    pad = (f["dilation"] * (f["kernel"] - 1)) // 2 if f["padding"] == "same" else \
        0 if f["padding"] == "valid" else f["padding"]
    out = (w["width"] + 2 * pad - f["dilation"] * (f["kernel"] - 1) - 1) // f["stride"] + 1
    return f["batch"] * out * f["kernel"]  # k taps per output position


def _never(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:  # the op kind above covers no module type
    raise AssertionError("conv1d_along_channels is added by the Conv1d rule only")


ALONG = builtin(LayerKind("conv1d_along_channels", (), _never,
                          latency=LatencyOp(("width",), build_along, along_macs)))
