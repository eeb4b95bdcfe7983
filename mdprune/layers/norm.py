"""Norms and per-channel scales: BatchNorm (frozen too), GroupNorm, LayerNorm, RMSNorm (torch's, timm's RmsNorm,
RmsNorm2d and SimpleNorm), LayerScale, timm's norm + act.

Their tensors hold one value per channel, so they follow their input's channels; their slim resize sets the
size attributes from those tensors. A LayerNorm or RMSNorm over pruned features is *normalised*: the masked
model normalises over the kept features only (see apply/mask.py and masked_norm.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from ..space.errors import AnalysisError, where
from ..space.functions import mark_normalized
from ..space.splits import whole_groups
from ..space.values import Chan
from .masked_norm import MaskedRMSNorm
from .registry import ChannelRule, LayerKind, builtin, layer_kind
from .rules import bind, chan_input, input_channels, require_axis

if TYPE_CHECKING:
    from ..space.channels import Propagation


def per_channel(prop: Propagation, node: fx.Node, m: nn.Module, roles: dict[str, str], axis: int = 1) -> Chan:
    """A layer whose tensors (``roles``: name -> role) each hold one value per channel of ``axis``."""
    what = "channels" if axis == 1 else "features"
    x = input_channels(prop, node, axis, what)
    for t, role in roles.items():
        if getattr(m, t, None) is not None:
            bind(prop, node, t, 0, x.segs, role)
    return x


def batchnorm_channels(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:
    return per_channel(prop, node, m, {"weight": "affine", "bias": "affine", "running_mean": "stat",
                                       "running_var": "stat"})


def frozen_batchnorm_channels(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:
    """torchvision's / timm's FrozenBatchNorm2d: buffers only, so no gradient reads them (role ``stat``)."""
    return per_channel(prop, node, m, dict.fromkeys(("weight", "bias", "running_mean", "running_var"), "stat"))


def groupnorm_channels(prop: Propagation, node: fx.Node, m: nn.GroupNorm) -> Chan:
    """One group per channel normalises each channel alone. Larger groups: channels are groups x width per
    group (group-major); whole groups are pruned (the kept groups' statistics do not change), the width per
    group is kept (detector heads: ``GroupNorm(32, 256)``)."""
    x = per_channel(prop, node, m, {"weight": "affine", "bias": "affine"})
    g, width = m.num_groups, m.num_channels // m.num_groups
    if width > 1:
        whole_groups(prop, node, x.segs, g, width, str(node.target),
                     f"width per group of GroupNorm {node.target} ({g} groups of {width})")
    return x


def layernorm_channels(prop: Propagation, node: fx.Node, m: nn.LayerNorm) -> Chan:
    x, shape = chan_input(prop, node, "features")
    if len(m.normalized_shape) != 1:
        raise AnalysisError(f"{where(node)} normalises over {len(m.normalized_shape)} axes; only 1 is supported")
    require_axis(node, x, -1, shape, "features")
    for t in ("weight", "bias"):
        if getattr(m, t, None) is not None:
            bind(prop, node, t, 0, x.segs, "norm")
    mark_normalized(prop, node.target, x.segs)
    return x


def channels_first_norm(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:
    """A norm over the channels of an (N, C, ...) tensor, one weight per channel (timm's ``RmsNorm2d``)."""
    if len(m.normalized_shape) != 1:
        raise AnalysisError(f"{where(node)} normalises over {len(m.normalized_shape)} axes; only 1 is supported")
    x = per_channel(prop, node, m, {"weight": "norm", "bias": "norm"})
    mark_normalized(prop, node.target, x.segs)
    return x


def layerscale_channels(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:
    return per_channel(prop, node, m, {"gamma": "affine"}, axis=-1)


def layerscale2d_channels(prop: Propagation, node: fx.Node, m: nn.Module) -> Chan:
    return per_channel(prop, node, m, {"gamma": "affine"})


def last_axis_norm(m: nn.Module) -> bool:
    """A norm over the last axis alone that the masked model can restrict to kept features (LayerNorm, RMSNorm,
    a user's kind with the LayerNorm rule and a ``masked`` stand-in)."""
    kind = layer_kind(m)
    return (isinstance(m, nn.LayerNorm) or (kind is not None and kind.channels is layernorm_channels
                                            and kind.masked is not None)) \
        and len(getattr(m, "normalized_shape", ())) == 1


def resize_norm(new: nn.Module, old: nn.Module | None = None, width: int | None = None) -> None:
    """Set a norm's size attributes to ``width`` (default: its per-channel tensors' length).

    Covers BatchNorm, GroupNorm and LayerNorm with their subclasses (timm's norm + act modules), and modules
    holding ``running_mean`` (frozen BatchNorms). A norm traced into is no module of the traced model: its
    tensors are sliced where they are read, and its literal sizes patched in the graph.
    """
    if width is None:
        ref = next((t for t in (getattr(new, a, None) for a in ("running_mean", "weight", "bias")) if t is not None),
                   None)
        if ref is None:
            return  # nothing sized it
        width = ref.shape[0]
    if isinstance(new, nn.GroupNorm):
        new.num_groups = width // (new.num_channels // new.num_groups)  # whole groups are pruned
        new.num_channels = width
    elif hasattr(new, "normalized_shape"):  # LayerNorm, RMSNorm and the like
        if len(new.normalized_shape) == 1:
            new.normalized_shape = (width,)
    elif hasattr(new, "num_features"):
        new.num_features = width


def _elementwise(m: nn.Module | None) -> bool:
    if m is None:
        return True
    kind = layer_kind(m)
    return kind is not None and kind.name == "passthrough" and next(m.parameters(), None) is None


def _drop_and_act_elementwise(m: nn.Module) -> bool:
    """timm's norm + drop + activation modules: covered when their drop and act are parameter-free
    pass-throughs (an activation mdprune does not know, or one with parameters, is traced into)."""
    return all(_elementwise(getattr(m, a, None)) for a in ("drop", "act"))


def _kind(name: str, types: tuple[Any, ...], rule: ChannelRule, norm_act: bool = False, resize: bool = True,
          masked: Any = None) -> None:
    builtin(LayerKind(name, types, rule, resize_norm if resize else None,
                      accepts=_drop_and_act_elementwise if norm_act else None, masked=masked))


def _masked(axis: int, statistic: str) -> Any:
    return lambda m: MaskedRMSNorm(m, axis, statistic)  # type: ignore[arg-type]


_NA = "timm.layers.norm_act."
_kind("batchnorm", (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm), batchnorm_channels)
_kind("frozen_batchnorm", ("torchvision.ops.misc.FrozenBatchNorm2d",), frozen_batchnorm_channels)
_kind("groupnorm", (nn.GroupNorm, "timm.layers.GroupNorm", "timm.layers.GroupNorm1"), groupnorm_channels)
_kind("layernorm", (nn.LayerNorm, "timm.layers.LayerNorm"), layernorm_channels)  # timm's: same computation
_L = "timm.layers."
_kind("rmsnorm", (*((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()), f"{_L}RmsNorm", f"{_L}RmsNormFp32"),
      layernorm_channels, masked=_masked(-1, "rms"))
_kind("rmsnorm2d", (f"{_L}RmsNorm2d", f"{_L}RmsNorm2dFp32"), channels_first_norm, masked=_masked(1, "rms"))
_kind("simplenorm", (f"{_L}SimpleNorm", f"{_L}SimpleNormFp32"), layernorm_channels, masked=_masked(-1, "var"))
_kind("simplenorm2d", (f"{_L}SimpleNorm2d", f"{_L}SimpleNorm2dFp32"), channels_first_norm,
      masked=_masked(1, "var"))
_kind("layerscale", ("timm.layers.LayerScale",), layerscale_channels, resize=False)
_kind("layerscale2d", ("timm.layers.LayerScale2d",), layerscale2d_channels, resize=False)
_kind("batchnorm_act", (f"{_NA}BatchNormAct2d", f"{_NA}SyncBatchNormAct"), batchnorm_channels, norm_act=True)
_kind("frozen_batchnorm_act", (f"{_NA}FrozenBatchNormAct2d",), frozen_batchnorm_channels, norm_act=True)
_kind("groupnorm_act", (f"{_NA}GroupNormAct", f"{_NA}GroupNorm1Act"), groupnorm_channels, norm_act=True)
_kind("layernorm_act", (f"{_NA}LayerNormAct",), layernorm_channels, norm_act=True)
